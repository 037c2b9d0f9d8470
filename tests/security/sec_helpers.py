"""Helpers for the security suite: a frame-level relay client built on the protocol's own
encoders, real spaces made with the protocol module, and access to a harness device's keys.

Imported by the tests as ``from security.sec_helpers import ...`` (``tests/`` is on the path).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import string
import time
from dataclasses import dataclass, field
from typing import ClassVar

from harness import Device, Relay
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import parse_header, seal
from qmoi_sync.protocol.identity import SIGNATURE_LEN, DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role

TIMEOUT = 10.0
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
_PRINTABLE = set(string.printable) - set("\x0b\x0c")


# -- spaces -----------------------------------------------------------------------------------
@dataclass
class Space:
    """A real space as its admin holds it: verified log, epoch secrets, per-device seq counters."""

    admin: DeviceIdentity
    log: MembershipLog
    secrets: dict[int, bytes]
    members: list[DeviceIdentity] = field(default_factory=list)
    seqs: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def create(cls, n_members: int = 2, extra: tuple[DeviceIdentity, ...] = ()) -> Space:
        admin = DeviceIdentity.generate()
        log, secret0 = MembershipLog.create(admin, now=time.time())
        space = cls(admin, log, {0: secret0})
        for _ in range(n_members):
            space.add(DeviceIdentity.generate())
        for dev in extra:
            space.add(dev)
        return space

    @classmethod
    def of_device(cls, dev: Device) -> tuple[Space, DeviceIdentity]:
        """A harness device's view of its (single) space, read from its home like an attacker
        holding that device would: ``device.key`` and the ``membership`` table of ``state.db``."""
        ident = device_identity(dev)
        log = MembershipLog.from_bytes(device_log_bytes(dev))
        return cls(ident, log, log.unwrap_epoch_secrets(ident)), ident

    def add(self, dev: DeviceIdentity, role: Role = Role.member) -> DeviceIdentity:
        self.log.add_member(self.admin, dev.public, role, self.secrets, now=time.time())
        self.members.append(dev)
        return dev

    @property
    def space_id(self) -> bytes:
        return self.log.space_id

    @property
    def log_bytes(self) -> bytes:
        return self.log.to_bytes()

    def msg_key(self, epoch: int | None = None) -> bytes:
        e = self.log.current_epoch if epoch is None else epoch
        return derive_epoch_keys(self.space_id, e, self.secrets[e]).msg

    def next_seq(self, dev: DeviceIdentity) -> int:
        seq = self.seqs.get(dev.public.sign_pk, 0) + 1
        self.seqs[dev.public.sign_pk] = seq
        return seq

    def seal(
        self,
        dev: DeviceIdentity,
        plaintext: bytes = b"hello",
        seq: int | None = None,
        epoch: int | None = None,
    ) -> bytes:
        e = self.log.current_epoch if epoch is None else epoch
        return seal(
            dev,
            self.space_id,
            e,
            self.msg_key(e),
            self.next_seq(dev) if seq is None else seq,
            plaintext,
        )


def device_identity(dev: Device) -> DeviceIdentity:
    return DeviceIdentity.from_private_bytes((dev.home / "device.key").read_bytes())


def device_log_bytes(dev: Device) -> bytes:
    with sqlite3.connect(f"file:{dev.home / 'state.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT log FROM membership").fetchall()
    assert len(rows) == 1, f"{dev.name} should hold exactly one space, has {len(rows)}"
    return bytes(rows[0][0])


def resign(dev: DeviceIdentity, envelope: bytes) -> bytes:
    """Replace an envelope's signature with a valid one by ``dev`` over its (modified) bytes."""
    body = envelope[:-SIGNATURE_LEN]
    return body + dev.sign(body)


# -- a frame-level relay client ---------------------------------------------------------------
class Wire:
    """One raw websocket to the relay, speaking frames encoded with protocol.frames."""

    #: every connection opened by the current test; conftest closes them after each test.
    opened: ClassVar[list[Wire]] = []

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> Wire:
        ws = await connect(url, compression=None, max_size=None, open_timeout=TIMEOUT, proxy=None)
        w = cls(ws)
        cls.opened.append(w)
        return w

    @classmethod
    async def close_all(cls) -> None:
        opened, cls.opened = cls.opened, []
        for w in opened:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await w.close()

    async def send(self, frame: F.Frame) -> None:
        await self.ws.send(F.encode_frame(frame))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = TIMEOUT) -> F.Frame:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(data, bytes), f"relay sent a text frame: {data!r}"
        return F.decode_frame(data)

    async def recv_skipping(
        self, skip: tuple[type, ...] = (F.CaughtUp, F.Membership), timeout: float = TIMEOUT
    ) -> F.Frame:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if not isinstance(frame, skip):
                    return frame

    async def auth(
        self, dev: DeviceIdentity, space_id: bytes, log: bytes = b""
    ) -> F.Welcome | F.Error:
        pk = dev.public.sign_pk
        await self.send(F.Hello(space_id=space_id, sign_pk=pk, proto_version=F.PROTO_VERSION))
        ch = await self.recv()
        assert isinstance(ch, F.Challenge), ch
        await self.send(
            F.Auth(signature=dev.sign(F.auth_message(ch.nonce, space_id, pk)), membership_log=log)
        )
        frame = await self.recv()
        assert isinstance(frame, F.Welcome | F.Error), frame
        return frame

    async def publish(self, envelope: bytes) -> F.Frame:
        """Publish and return the relay's answer (an Ack or an Error)."""
        await self.send(F.Publish(envelope=envelope))
        return await self.recv_skipping()

    async def expect_error(self, code: str, *, fatal: bool) -> F.Error:
        frame = await self.recv_skipping()
        assert isinstance(frame, F.Error), f"expected Error({code}), got {frame!r}"
        assert frame.code == code, frame
        assert frame.fatal is fatal, frame
        assert_readable(frame)
        return frame

    async def wait_closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str]:
        """Drain until the relay closes the connection; returns (close code, close reason)."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass
        return self.ws.close_code, self.ws.close_reason or ""

    async def read_log(self, timeout: float = TIMEOUT) -> list[F.Deliver]:
        """Subscribe from 0 and return everything the relay holds, up to CaughtUp."""
        await self.send(F.Subscribe(from_seq=0))
        out: list[F.Deliver] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if isinstance(frame, F.Deliver):
                    out.append(frame)
                elif isinstance(frame, F.CaughtUp):
                    return out
                elif isinstance(frame, F.Error):
                    raise AssertionError(f"relay error while reading its log: {frame!r}")

    async def close(self) -> None:
        await self.ws.close()


def assert_readable(err: F.Error) -> None:
    """A relay error a human (and a script) can act on: a stable snake_case code and a plain
    one-line sentence, no traceback, no raw bytes."""
    assert _CODE_RE.match(err.code), f"unreadable error code {err.code!r}"
    msg = err.message
    assert 3 <= len(msg) <= 1024, f"error message length {len(msg)}: {msg!r}"
    assert set(msg) <= _PRINTABLE and "\n" not in msg, f"unprintable error message {msg!r}"
    assert "Traceback" not in msg and "Exception" not in msg, msg


# -- "the relay keeps serving" ----------------------------------------------------------------
@dataclass
class LegitPair:
    """Two members of a space connected to the relay *before* an attack: a publisher and a
    subscriber. ``check()`` proves the relay still stores and fans out for them."""

    relay: Relay
    space: Space
    pub_dev: DeviceIdentity
    sub_dev: DeviceIdentity
    pub: Wire
    sub: Wire
    published: list[bytes] = field(default_factory=list)
    #: envelopes of *other* senders the live subscriber received meanwhile.
    seen: list[bytes] = field(default_factory=list)

    @classmethod
    async def open(cls, relay: Relay, space: Space) -> LegitPair:
        pub_dev, sub_dev = space.members[0], space.members[1]
        pub = await Wire.open(relay.url)
        assert isinstance(await pub.auth(pub_dev, space.space_id, space.log_bytes), F.Welcome)
        sub = await Wire.open(relay.url)
        assert isinstance(await sub.auth(sub_dev, space.space_id, space.log_bytes), F.Welcome)
        await sub.send(F.Subscribe(from_seq=0))
        pair = cls(relay, space, pub_dev, sub_dev, pub, sub)
        # Drain the backlog (earlier tests may have published into this space).
        async with asyncio.timeout(TIMEOUT):
            while not isinstance(await sub.recv(), F.CaughtUp):
                pass
        return pair

    async def check(self) -> None:
        """The relay process is alive, still stores and fans out a fresh envelope between the
        pre-connected members, and still welcomes a new connection."""
        assert self.relay.proc is not None and self.relay.proc.poll() is None, (
            f"relay process died:\n{self.relay.log()[-3000:]}"
        )
        env = self.space.seal(self.pub_dev, b"still serving")
        ack = await self.pub.publish(env)
        assert isinstance(ack, F.Ack) and not ack.duplicate, ack
        self.published.append(env)
        async with asyncio.timeout(TIMEOUT):
            while True:
                got = await self.sub.recv_skipping()
                assert isinstance(got, F.Deliver), got
                if got.envelope == env:
                    break
                self.seen.append(got.envelope)
        fresh = await Wire.open(self.relay.url)
        try:
            welcome = await fresh.auth(self.sub_dev, self.space.space_id)
            assert isinstance(welcome, F.Welcome), (
                f"a new legitimate connection was refused: {welcome!r}"
            )
        finally:
            await fresh.close()

    async def stored(self) -> list[bytes]:
        """Every envelope the relay holds for the space (read by a fresh subscriber)."""
        reader = await Wire.open(self.relay.url)
        try:
            assert isinstance(await reader.auth(self.sub_dev, self.space.space_id), F.Welcome)
            return [d.envelope for d in await reader.read_log()]
        finally:
            await reader.close()

    async def close(self) -> None:
        await self.pub.close()
        await self.sub.close()


def sender_of(envelope: bytes) -> bytes:
    return parse_header(envelope).sender


__all__ = [
    "TIMEOUT",
    "LegitPair",
    "Space",
    "Wire",
    "assert_readable",
    "device_identity",
    "device_log_bytes",
    "resign",
    "sender_of",
]
