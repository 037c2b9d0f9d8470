"""Relay test helpers: real spaces built with the protocol module, a frame-level client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.relay import RelayServer

T = TypeVar("T")

#: ``await relay_factory(data_dir=None, **RelayConfig overrides)`` starts an in-process relay.
RelayFactory = Callable[..., Awaitable[RelayServer]]


def url_of(server: RelayServer) -> str:
    return f"{server.scheme}://127.0.0.1:{server.port}"


TIMEOUT = 10.0


@dataclass
class Space:
    """A real space: a verified membership log and the epoch secrets (as an admin would hold)."""

    admin: DeviceIdentity
    log: MembershipLog
    secrets: dict[int, bytes]
    members: list[DeviceIdentity] = field(default_factory=list)
    seqs: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def create(cls, n_members: int = 1, role: Role = Role.member) -> Space:
        admin = DeviceIdentity.generate()
        log, secret0 = MembershipLog.create(admin, now=time.time())
        space = cls(admin, log, {0: secret0})
        for _ in range(n_members):
            space.add(role=role)
        return space

    @property
    def space_id(self) -> bytes:
        return self.log.space_id

    @property
    def log_bytes(self) -> bytes:
        return self.log.to_bytes()

    def add(self, role: Role = Role.member, device: DeviceIdentity | None = None) -> DeviceIdentity:
        dev = device or DeviceIdentity.generate()
        self.log.add_member(self.admin, dev.public, role, self.secrets, now=time.time())
        self.members.append(dev)
        return dev

    def remove(self, dev: DeviceIdentity) -> None:
        _op, secret = self.log.remove_member(self.admin, dev.public.sign_pk, now=time.time())
        self.secrets[self.log.current_epoch] = secret

    def next_seq(self, dev: DeviceIdentity) -> int:
        seq = self.seqs.get(dev.public.sign_pk, 0) + 1
        self.seqs[dev.public.sign_pk] = seq
        return seq

    def envelope(
        self,
        dev: DeviceIdentity,
        seq: int | None = None,
        plaintext: bytes = b"hello",
        space_id: bytes | None = None,
    ) -> bytes:
        sid = space_id or self.space_id
        epoch = self.log.current_epoch
        keys = derive_epoch_keys(sid, epoch, self.secrets[epoch])
        if seq is None:
            seq = self.next_seq(dev)
        return seal(dev, sid, epoch, keys.msg, seq, plaintext)


class Client:
    """A frame-level relay client over a real websocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        # Presence frames arrive whenever the space's connected devices change: `recv` keeps
        # them here instead of returning them (tests of presence read `presences`).
        self.presences: list[F.Presence] = []

    @classmethod
    async def connect(cls, url: str, **kwargs: object) -> Client:
        ws = await connect(url, compression=None, max_size=None, open_timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]
        return cls(ws)

    async def send(self, frame: F.Frame) -> None:
        await self.ws.send(F.encode_frame(frame))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = TIMEOUT) -> F.Frame:
        async with asyncio.timeout(timeout):
            while True:
                data = await self.ws.recv()
                assert isinstance(data, bytes), "relay sent a text frame"
                frame = F.decode_frame(data)
                if not isinstance(frame, F.Presence):
                    return frame
                self.presences.append(frame)

    async def wait_presence(self, online: set[bytes], timeout: float = TIMEOUT) -> F.Presence:
        """Read until the latest Presence lists exactly `online` (other frames are dropped)."""
        async with asyncio.timeout(timeout):
            while not (self.presences and set(self.presences[-1].online) == online):
                data = await self.ws.recv()
                assert isinstance(data, bytes), "relay sent a text frame"
                frame = F.decode_frame(data)
                if isinstance(frame, F.Presence):
                    self.presences.append(frame)
        return self.presences[-1]

    async def expect(self, cls: type[T], timeout: float = TIMEOUT) -> T:
        frame = await self.recv(timeout)
        assert isinstance(frame, cls), f"expected {cls.__name__}, got {frame!r}"
        return frame

    async def expect_error(self, code: str, *, fatal: bool, timeout: float = TIMEOUT) -> F.Error:
        err = await self.expect(F.Error, timeout)
        assert err.code == code, err
        assert err.fatal is fatal, err
        return err

    async def auth(
        self, dev: DeviceIdentity, space_id: bytes, log: bytes = b""
    ) -> F.Welcome | F.Error:
        pk = dev.public.sign_pk
        await self.send(F.Hello(space_id=space_id, sign_pk=pk, proto_version=F.PROTO_VERSION))
        ch = await self.expect(F.Challenge)
        sig = dev.sign(F.auth_message(ch.nonce, space_id, pk))
        await self.send(F.Auth(signature=sig, membership_log=log))
        frame = await self.recv()
        assert isinstance(frame, F.Welcome | F.Error), frame
        return frame

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Drain until the relay closes the connection; returns the close code."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()

    async def collect_delivers(
        self, count: int, timeout: float = TIMEOUT
    ) -> tuple[list[F.Deliver], list[F.Frame]]:
        """Read until ``count`` Delivers arrived; also returns every other frame seen."""
        delivers: list[F.Deliver] = []
        others: list[F.Frame] = []
        async with asyncio.timeout(timeout):
            while len(delivers) < count:
                f = await self.recv(timeout)
                if isinstance(f, F.Deliver):
                    delivers.append(f)
                else:
                    others.append(f)
        return delivers, others


async def authed(url: str, space: Space, dev: DeviceIdentity, log: bool = True) -> Client:
    c = await Client.connect(url)
    w = await c.auth(dev, space.space_id, space.log_bytes if log else b"")
    assert isinstance(w, F.Welcome), w
    return c


async def wait_for(predicate: object, timeout: float = TIMEOUT, interval: float = 0.01) -> None:
    """Poll a condition with a deadline (for server-side state that has no event to await)."""
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling server state that has no event
            await asyncio.sleep(interval)
