"""Helpers for the security suite: a frame-level relay client built on the protocol's own
encoders, real spaces made with the protocol module, and access to a harness device's keys.

Imported by the tests as ``from security.sec_helpers import ...`` (``tests/`` is on the path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import select
import sqlite3
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness import (
    Device,
    Relay,
    create_space,
    free_port,
    invite,
    join,
    wait_converged,
    wait_until,
)
from pycrdt import Doc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from qmoi_sync.agent.index import IndexDoc
from qmoi_sync.agent.textdoc import ingest_disk_text, new_text_doc
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import open_envelope, parse_header, seal
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import SIGNATURE_LEN, DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import (
    INDEX_DOC_ID,
    DocUpdate,
    Payload,
    Updates,
    decode_payload,
    encode_payload,
)

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
        self.presences: list[F.Presence] = []

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
        """The next frame; Presence frames (sent whenever the space's connected devices
        change) are kept in `presences` instead."""
        async with asyncio.timeout(timeout):
            while True:
                data = await self.ws.recv()
                assert isinstance(data, bytes), f"relay sent a text frame: {data!r}"
                frame = F.decode_frame(data)
                if not isinstance(frame, F.Presence):
                    return frame
                self.presences.append(frame)

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
    "InjectingProxy",
    "LegitPair",
    "Replica",
    "Space",
    "Wire",
    "World",
    "assert_readable",
    "cli_in_pty",
    "create_files_payload",
    "device_identity",
    "device_log_bytes",
    "resign",
    "sender_of",
    "world_of",
]


# -- a member's decrypted view of the space (what a hostile member can see) -------------------
class Replica:
    """Opens every envelope of the space with a member's keys and keeps the CRDT state, so a
    test can craft updates against the *real* documents (real file ids, real text)."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self.index = IndexDoc()
        self.docs: dict[bytes, Doc] = {}
        self.cursor = 0
        self.by_sender: dict[bytes, list[tuple[int, bytes]]] = {}

    def _open(self, envelope: bytes) -> tuple[bytes, Payload]:
        keys = {e: self.space.msg_key(e) for e in self.space.secrets}
        opened = open_envelope(envelope, self.space.space_id, keys, self.space.log.is_member)
        return opened.header.sender, decode_payload(opened.plaintext)

    async def catch_up(self, wire: Wire) -> None:
        await wire.send(F.Subscribe(from_seq=self.cursor))
        async with asyncio.timeout(TIMEOUT):
            while True:
                frame = await wire.recv()
                if isinstance(frame, F.CaughtUp):
                    break
                if not isinstance(frame, F.Deliver):
                    continue
                self.cursor = frame.relay_seq
                sender = parse_header(frame.envelope).sender
                self.by_sender.setdefault(sender, []).append((frame.relay_seq, frame.envelope))
                try:
                    _sender, payload = self._open(frame.envelope)
                except ProtocolError:
                    continue  # e.g. an earlier attack's garbage
                if isinstance(payload, Updates):
                    for item in payload.items:
                        with contextlib.suppress(ValueError):
                            if item.doc_id == INDEX_DOC_ID:
                                self.index.apply_update(item.update)
                            else:
                                self.doc(item.doc_id).apply_update(item.update)

    def doc(self, fid: bytes) -> Doc:
        if fid not in self.docs:
            self.docs[fid] = new_text_doc()
        return self.docs[fid]

    def fid_of(self, path: str) -> bytes:
        for fid_hex, entry in self.index.entries().items():
            if entry.alive and entry.path == path:
                return bytes.fromhex(fid_hex)
        raise KeyError(path)


def create_files_payload(rep: Replica, paths: list[str], text: str) -> bytes:
    """An Updates payload creating ``paths`` (index entries + document content) the way an
    agent would publish it — with no check at all on the paths."""
    items = []
    for path in paths:
        fid = os.urandom(16)
        entry = rep.index.create(fid.hex(), path, "text", 0o644, "M", time.time())
        items.append(DocUpdate(INDEX_DOC_ID, entry))
        update = ingest_disk_text(new_text_doc(), text)
        assert update is not None
        items.append(DocUpdate(fid, update))
    return encode_payload(Updates(items=items))


# -- a relay that misbehaves: a man in the middle between one agent and the real relay ---------
class InjectingProxy:
    """Forwards every websocket message between an agent and the real relay, and lets the test
    inject frames toward the agent — what a compromised relay (or anyone on its path) could
    send. Runs its own event loop in a thread, so blocking ``wait_until`` polls don't stall it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="injecting-proxy", daemon=True)
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._live: list[tuple[ServerConnection, asyncio.Lock]] = []
        #: connections the agent opened through the proxy so far.
        self.connections = 0
        #: A misbehaving relay: each message from the relay to the agent goes through this
        #: (in the proxy's thread) and what it returns is sent instead — nothing (drop,
        #: withhold), several (duplicate, or held ones released in another order), or others.
        #: None: forward as is.
        self.rewrite: Callable[[bytes | str], list[bytes | str]] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> InjectingProxy:
        self._thread.start()
        assert self._started.wait(TIMEOUT), "proxy did not start"
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)

    def connected(self) -> bool:
        return bool(self._live)

    def inject(self, frame: F.Frame) -> None:
        """Send ``frame`` to the agent on its current connection (in order with forwarded ones)."""
        self.inject_raw(F.encode_frame(frame))

    def inject_raw(self, data: bytes | str) -> None:
        """Send any websocket message (garbage, a text frame...) to the agent."""
        fut = asyncio.run_coroutine_threadsafe(self._inject(data), self._loop)
        fut.result(TIMEOUT)

    async def _inject(self, data: bytes | str) -> None:
        assert self._live, "no agent is connected through the proxy"
        ws, lock = self._live[-1]
        async with lock:
            await ws.send(data)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", self.port, compression=None, max_size=None):
            self._started.set()
            await self._stop.wait()

    async def _handle(self, down: ServerConnection) -> None:
        lock = asyncio.Lock()
        async with connect(self.upstream, compression=None, max_size=None, proxy=None) as up:
            entry = (down, lock)
            self._live.append(entry)
            self.connections += 1

            async def to_agent() -> None:
                async for msg in up:
                    rewrite = self.rewrite
                    out = [msg] if rewrite is None else rewrite(msg)
                    async with lock:
                        for m in out:
                            await down.send(m)

            async def to_relay() -> None:
                async for msg in down:
                    await up.send(msg)

            tasks = [asyncio.create_task(to_agent()), asyncio.create_task(to_relay())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._live.remove(entry)
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(BaseException):
                        await t


# -- a hostile relay's rewrites (InjectingProxy.rewrite) -------------------------------------
def deliver_from(msg: bytes | str, sender: bytes) -> tuple[F.Deliver, int] | None:
    """The Deliver frame and its sender seq if ``msg`` delivers an envelope of ``sender``."""
    if not isinstance(msg, bytes):
        return None
    try:
        frame = F.decode_frame(msg)
        if not isinstance(frame, F.Deliver):
            return None
        header = parse_header(frame.envelope)
    except ProtocolError:
        return None
    return (frame, header.seq) if header.sender == sender else None


class Withhold:
    """Withholds every envelope of ``sender`` but the ``allow`` ones right after the first,
    while ``capturing``; what was withheld stays withheld (on every later delivery too, e.g.
    after b subscribes again) until ``release()``. ``capturing = False``: new seqs pass."""

    def __init__(self, sender: bytes, allow: int = 0) -> None:
        self.sender = sender
        self.capturing = True
        self.allow = allow
        self.withheld: set[int] = set()
        self.passed: set[int] = set()
        self._released = False
        self._lock = threading.Lock()

    def __call__(self, msg: bytes | str) -> list[bytes | str]:
        d = deliver_from(msg, self.sender)
        with self._lock:
            if d is None or self._released:
                return [msg]
            seq = d[1]
            if self.capturing and seq not in self.passed and seq not in self.withheld:
                if self.withheld and len(self.passed) < self.allow:
                    self.passed.add(seq)
                else:
                    self.withheld.add(seq)
            return [] if seq in self.withheld else [msg]

    def release(self) -> None:
        with self._lock:
            self._released = True


# -- the shared real-process world -------------------------------------------------------------
SYNC_TIMEOUT = 20.0


@dataclass
class World:
    """Real processes shared by the agent-level security tests (one set per session, to keep
    the suite fast): a relay; agents ``a`` (admin) and ``b`` running, ``b`` reaching the relay
    through an :class:`InjectingProxy`; device ``m`` created with the CLI (init + join) but never
    started — the tests speak for it with its key and keys read from its home."""

    tmp: Path
    relay: Relay
    proxy: InjectingProxy
    a: Device
    b: Device
    m: Device
    m_dev: DeviceIdentity
    space: Space  # m's view: its log and epoch secrets
    n: int = 0
    #: files the "sync goes on" checks created (expected extra content in the trees).
    made: set[str] = field(default_factory=set)

    # -- speaking for a device -----------------------------------------------------------
    async def wire_as(self, dev: DeviceIdentity | None = None) -> Wire:
        w = await Wire.open(self.relay.url)
        welcome = await w.auth(dev or self.m_dev, self.space.space_id)
        assert isinstance(welcome, F.Welcome), welcome
        return w

    async def publish(self, plaintext: bytes) -> bytes:
        """m publishes one validly signed, correctly encrypted envelope; the relay accepts it."""
        w = await self.wire_as()
        env = self.space.seal(self.m_dev, plaintext)
        ack = await w.publish(env)
        assert isinstance(ack, F.Ack) and not ack.duplicate, ack
        await w.close()
        return env

    async def replica(self) -> Replica:
        r = Replica(self.space)
        w = await self.wire_as()
        await r.catch_up(w)
        await w.close()
        return r

    def inject(self, envelope: bytes) -> None:
        """Deliver an envelope to b as a compromised relay would. relay_seq 1 never moves b's
        cursor (it is max()ed), so b's reconnects still resume correctly."""
        self.proxy.inject(F.Deliver(relay_seq=1, envelope=envelope))

    # -- observing the agents ----------------------------------------------------------------
    def status(self, dev: Device) -> dict[str, Any]:
        return dev.space_status("notes")

    def quarantined(self, dev: Device) -> int:
        return int(self.status(dev)["quarantined"])

    def members_known_to(self, dev: Device) -> set[bytes]:
        return set(MembershipLog.from_bytes(device_log_bytes(dev)).members())

    def trees(self) -> dict[str, dict[str, bytes]]:
        return {
            d.name: {p: v for p, v in d.tree().items() if p not in self.made}
            for d in (self.a, self.b)
        }

    def a_to_b(self, rel: str, text: str) -> None:
        self.made.add(rel)
        self.a.write(rel, text)
        wait_until(lambda: self.b.read(rel) == text, SYNC_TIMEOUT, f"{rel} a→b")

    def sync_goes_on(self) -> None:
        """A normal edit after an attack still propagates a→b and b→a."""
        self.n += 1
        rel = f"after-attack-{self.n}.txt"
        one, two = f"from a {self.n}\n", f"from a {self.n}\nand b\n"
        self.a_to_b(rel, one)
        self.b.write(rel, two)
        wait_until(lambda: self.a.read(rel) == two, SYNC_TIMEOUT, f"{rel} b→a")


@contextlib.contextmanager
def world_of(tmp: Path) -> Iterator[World]:
    # Low per-connection rate limits, so a flood is cut quickly (the agents send far less).
    relay = Relay(tmp / "relay-data").start(("--rate-msgs", "50", "--rate-burst", "100"))
    proxy = InjectingProxy(relay.url).start()
    a = Device(tmp / "home-a", tmp / "folder-a", "a").init()
    b = Device(tmp / "home-b", tmp / "folder-b", "b").init()
    m = Device(tmp / "home-m", tmp / "folder-m", "m").init()
    try:
        create_space(a, relay)
        a.start()
        join(b, invite(a))
        join(m, invite(a))
        # b's traffic goes through the man in the middle (transparent unless a test injects).
        with contextlib.closing(sqlite3.connect(b.home / "state.db")) as db, db:
            db.execute("UPDATE spaces SET relay_url=?", (proxy.url,))
        a.write("keep.txt", "precious line 1\nprecious line 2\n")
        b.start()
        wait_until(proxy.connected, what="b connected through the proxy")
        b.write("notes/b-own.txt", "b's own notes\n")
        wait_converged([a, b], what="initial files on a and b")
        space, m_dev = Space.of_device(m)
        wait_until(
            lambda: (
                m_dev.public.sign_pk in set(MembershipLog.from_bytes(device_log_bytes(b)).members())
            ),
            what="b knows m",
        )
        yield World(tmp, relay, proxy, a, b, m, m_dev, space)
        for dev in (a, b):
            log = dev.log()
            assert "Traceback" not in log, f"{dev.name} logged a traceback:\n{log[-4000:]}"
    finally:
        b.stop()
        a.stop()
        proxy.stop()
        relay.stop()


def cli_in_pty(dev: Device, *args: str, timeout: float = 30) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (so it renders for a human, as on a real terminal);
    returns (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmoi_sync.agent", "--home", str(dev.home), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, out.decode("utf-8", "replace")
