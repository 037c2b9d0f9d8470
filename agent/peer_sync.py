"""LAN sync for one space: authenticated peer sessions, per-sender causal order, resyncs.

What flows between two authenticated peers (frames in protocol/lan.py):

* every envelope either device seals into its stream (`SpaceSync.on_sealed`) goes to each
  connected peer at once, as well as to the relay outbox; each side applies what it receives
  through `SpaceSync.handle_peer`, which never moves the relay cursor. The replay windows drop
  whatever arrives twice (LAN and relay);
* a state-vector resync (StateRequest -> StateReply, sealed as direct envelopes) when a session
  starts, every RESYNC_INTERVAL_S, and whenever per-sender order cannot be kept;
* sealed chunks of binary files, asked for by a device that lacks them (agent/peer_chunks.py).

Order. pycrdt 0.14 can silently lose updates applied out of order (design brief §4), so a
peer's stream goes through a CausalBuffer: released strictly in that sender's seq order, starting
after what is already applied (its replay window's watermark, or what a StateReply covered). Gaps
that do not fill within GAP_TIMEOUT_S, a full buffer, or an update whose dependencies are missing
(`handle_peer` stops there) end in the same way: held envelopes are dropped, a resync is asked
for, and the peer's stream is set aside until the reply (whose direct seq says which part of the
stream it covers) has been applied; the set-aside envelopes are then replayed in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed, WebSocketException

from qmoi_sync.agent.causal import BufferFull, CausalBuffer
from qmoi_sync.agent.clock import CLOCK_OFF_S, wall
from qmoi_sync.agent.lan_config import dial_address
from qmoi_sync.agent.peer_chunks import ChunkCounters, PeerChunks, SealLocal
from qmoi_sync.agent.peer_link import (
    CLOSE_DUPLICATE,
    CLOSE_GONE,
    PeerConn,
    Refused,
    dial,
)
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.envelope import open_envelope, parse_header
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import device_id
from qmoi_sync.protocol.membership import Role
from qmoi_sync.protocol.payload import DeviceInfo, StateRequest, decode_payload
from qmoi_sync.protocol.version import __version__

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime

log = logging.getLogger("qmoi_sync.lan")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


#: Periodic state-vector resync with each peer (the safety net of design brief §4).
RESYNC_INTERVAL_S = _env_float("QMOI_SYNC_LAN_RESYNC_S", 180.0)
#: A sequence gap in a peer's stream that does not fill within this long ends in a resync.
GAP_TIMEOUT_S = 3.0
#: A resync request without its final reply within this long is asked again.
REQUEST_TIMEOUT_S = 60.0
TICK_S = 0.25
#: State requests of one peer are answered at most this often.
MIN_ANSWER_INTERVAL_S = 0.5
#: Frames queued for one peer; a peer that falls this far behind is disconnected (it resyncs
#: when it comes back).
SEND_QUEUE_MAX = 4096
#: Stream envelopes set aside while a resync is pending.
SIDE_MAX = 4096
#: Causal buffer bounds (per space, all LAN senders together).
BUFFER_MAX_COUNT = 10_000
BUFFER_MAX_BYTES = 64 * 1024 * 1024
#: Discovery tags of this many most recent epochs are recognized (a member that has not yet
#: learned of a new epoch still advertises the previous one's tag).
TAG_EPOCHS = 4
DIAL_BACKOFF_MIN = 0.25
DIAL_BACKOFF_MAX = 10.0
#: After a peer refused us (or we refused it), wait this long before dialing it again.
REFUSED_BACKOFF = 30.0


@dataclass
class Target:
    """A discovered advertisement that carries one of this space's tags."""

    instance: str
    addresses: list[str]
    port: int
    tag: bytes


@dataclass
class LanStats:
    received: int = 0  # stream envelopes received from LAN peers
    sent: int = 0  # stream envelopes sent to LAN peers (one count per peer)
    resyncs: int = 0  # state requests sent
    gaps: int = 0  # resyncs caused by a gap, a full buffer or a missing dependency
    refused: int = 0  # connections refused (failed challenge, not a member)


class SpaceLan:
    """LAN sync of one space (agent/lan.py creates one per LAN-enabled space)."""

    def __init__(self, runtime: SpaceRuntime, identity_pk: bytes) -> None:
        self.rt = runtime
        self.sync = runtime.sync
        self.me = identity_pk
        self.space_bytes = self.sync.space_bytes
        self.sessions: dict[bytes, PeerSession] = {}
        self.buffer = CausalBuffer(max_count=BUFFER_MAX_COUNT, max_bytes=BUFFER_MAX_BYTES)
        self.covered: dict[bytes, int] = {}
        self.gap_since: dict[bytes, float] = {}
        self.first_sync = asyncio.Event()
        self.stats = LanStats()
        self.chunk_counters = ChunkCounters()
        self.targets: dict[str, Target] = {}
        self.instance_pk: dict[str, bytes] = {}
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._outbox_dirty = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self.sync.on_sealed = self._on_sealed
        self.sync.on_stream_gap = self._relay_gap

    # -- SpaceAuth (peer_link) -------------------------------------------------------------------
    def is_member(self, sign_pk: bytes) -> bool:
        return self.rt.keyring.is_member(sign_pk)

    def log_bytes(self) -> bytes:
        return self.rt.keyring.log.to_bytes()

    async def adopt_log(self, data: bytes) -> None:
        await self.rt.on_membership(data)

    def seal_local(self) -> SealLocal | None:
        """How this space reads and seals one of its chunks for a peer (agent/binary_sync.py)."""
        binary = self.rt.binary
        if binary is None:
            return None
        rates = self.sync.rates

        async def seal(epoch: int, chunk_id: bytes) -> bytes | None:
            sealed = await binary.sealed_local(epoch, chunk_id)
            if sealed is not None:
                rates.up.add(len(sealed))  # the space's transfer rate counts served chunks
            return sealed

        return seal

    # -- discovery tags ----------------------------------------------------------------------------
    def lan_time(self) -> float:
        """The clock this space's discovery tags follow: this device's (``wall``), or the
        relay's once this device's was measured more than CLOCK_OFF_S off it (at the relay
        handshake; the last measurement stays while the relay is unreachable). Tags rotate every
        TAG_WINDOW_S with one window of tolerance, so two devices more than about 10 min apart
        never found each other on the LAN; following the relay's clock, they do."""
        link = self.rt.link
        offset = link.state.clock_offset_s if link is not None else None
        now = wall()
        return now + offset if offset is not None and abs(offset) > CLOCK_OFF_S else now

    def current_tag(self, now: float) -> bytes | None:
        ring = self.rt.keyring
        keys = ring.epoch_keys.get(ring.current_epoch)
        if keys is None:
            return None
        return L.discovery_tag(keys.discovery, L.tag_window(now))

    def accepted_tags(self, now: float) -> set[bytes]:
        """Tags of the previous, current and next window (clock skew) for recent epochs."""
        ring = self.rt.keyring
        w = L.tag_window(now)
        out: set[bytes] = set()
        for epoch in sorted(ring.epoch_keys)[-TAG_EPOCHS:]:
            key = ring.epoch_keys[epoch].discovery
            out.update(L.discovery_tag(key, x) for x in (w - 1, w, w + 1))
        return out

    @property
    def active(self) -> bool:
        return not self._closed and not self.rt.record.paused and not self.rt.revoked

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.spawn(self._gap_ticker())
        self._drain_task = asyncio.create_task(self._drain_outbox())
        self._outbox_dirty.set()

    async def _gap_ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.gap_since:
                await self.check_gaps()

    def cancel(self) -> None:
        """Stop everything without waiting (safe under the space owner's lock)."""
        self._closed = True
        if self.sync.on_sealed == self._on_sealed:
            self.sync.on_sealed = None
        if self.sync.on_stream_gap == self._relay_gap:
            self.sync.on_stream_gap = None
        for s in list(self.sessions.values()):
            s.stop("closing", CLOSE_GONE)
        for t in self._all_tasks():
            t.cancel()

    def _all_tasks(self) -> list[asyncio.Task[None]]:
        tasks = list(self._dialers.values()) + list(self._tasks)
        if self._drain_task is not None:
            tasks.append(self._drain_task)
        return tasks

    async def close(self) -> None:
        self.cancel()
        await cancel_and_wait(*self._all_tasks())  # cancelled above: waits, no second cancel
        waits = [s.done.wait() for s in list(self.sessions.values())]
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=5)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- outgoing stream ---------------------------------------------------------------------------
    def _on_sealed(self, sealed: list[tuple[int, bytes]]) -> None:
        """SpaceSync hook, called synchronously right after a commit."""
        if self.sessions:
            frames = [L.encode_peer_frame(L.StreamEnvelope(envelope=e)) for _seq, e in sealed]
            for session in list(self.sessions.values()):
                if not self.is_member(session.peer_pk):
                    continue  # removed just now: its session is being closed
                for frame in frames:
                    session.enqueue(frame)
                self.stats.sent += len(frames)
                self.sync.rates.up.add(sum(len(f) for f in frames))
        if self.rt.record.relay_url is None:
            self._outbox_dirty.set()

    async def _drain_outbox(self) -> None:
        """A space without a relay has nobody to acknowledge its outbox: what it seals went to
        the connected peers, and the others get it with their next resync."""
        store = self.sync.store
        space_id = self.sync.space_id
        while True:
            await self._outbox_dirty.wait()
            self._outbox_dirty.clear()
            if self.rt.record.relay_url is not None:
                continue  # the relay link owns the outbox (checked each time: relays can change)
            if self.rt.record.paused:
                await asyncio.sleep(1.0)
                self._outbox_dirty.set()
                continue
            while rows := await store.outbox(space_id, after_seq=0, limit=1024):
                async with store.transaction():
                    await store.delete_outbox(space_id, [seq for seq, _e in rows])

    # -- incoming stream ---------------------------------------------------------------------------
    def _baseline(self, sender: bytes) -> int:
        window = self.sync.windows.get(sender)
        applied = window.watermark if window is not None else 0
        return max(applied, self.covered.get(sender, 0)) + 1

    def _track_gap(self, sender: bytes) -> None:
        if sender in self.buffer.gaps():
            self.gap_since.setdefault(sender, time.monotonic())
        else:
            self.gap_since.pop(sender, None)

    async def offer(self, session: PeerSession, seq: int, envelope: bytes) -> None:
        sender = session.peer_pk
        released = self.buffer.set_next(sender, self._baseline(sender))
        try:
            released += self.buffer.offer(sender, seq, envelope)
        except BufferFull:
            self.buffer.drop_sender(sender)
            self.gap_since.pop(sender, None)
            session.side.append((seq, envelope))
            await session.request_resync("causal buffer full", gap=True)
        self._track_gap(sender)
        if released:
            await self.apply_released(session, [(r.seq, bytes(r.update)) for r in released])

    async def apply_released(self, session: PeerSession, items: list[tuple[int, bytes]]) -> None:
        done = await self.sync.handle_peer([e for _s, e in items])
        if done < len(items):
            # A dependency is missing (an update of a third device the peer had and we lack):
            # keep the rest aside and ask the peer for everything we miss.
            session.side[:0] = items[done:]
            await session.request_resync("missing dependency", gap=True)

    async def _relay_gap(self, sender: bytes) -> bool:
        """A gap in ``sender``'s relay stream (agent/relay_order.py): resync with that device if
        it is a peer (its reply covers its whole stream: True, the gap is the LAN's to close),
        else with any peer that can answer (it may hold the missing updates, but its reply
        says nothing about ``sender``'s seqs: False, so the relay repairs go on too — their
        state resync through the relay closes the gap)."""
        sessions = [self.sessions[sender]] if sender in self.sessions else []
        sessions += [s for p, s in self.sessions.items() if p != sender]
        for session in sessions:
            if session.peer_can_write:
                await session.request_resync("relay sequence gap", gap=True)
                return session.peer_pk == sender
        return False

    async def release_after_reply(self, session: PeerSession, covered: int) -> None:
        sender = session.peer_pk
        self.covered[sender] = max(self.covered.get(sender, 0), covered)
        # The relay path's order follows what the reply covered too (held envelopes, gaps).
        order = self.sync.order.covered
        order[sender] = max(order.get(sender, 0), covered)
        self.sync.order.note_filled(sender, "LAN resync", sender)
        await self.sync.release_held()
        released = self.buffer.set_next(sender, self._baseline(sender))
        if released:
            await self.apply_released(session, [(r.seq, bytes(r.update)) for r in released])
        side, session.side = sorted(session.side), []
        for seq, envelope in side:
            if session.pending is not None:
                session.side.append((seq, envelope))
                continue
            await self.offer(session, seq, envelope)
        self._track_gap(sender)

    async def check_gaps(self) -> None:
        now = time.monotonic()
        for sender, since in list(self.gap_since.items()):
            released = self.buffer.set_next(sender, self._baseline(sender))
            session = self.sessions.get(sender)
            if released and session is not None:
                await self.apply_released(session, [(r.seq, bytes(r.update)) for r in released])
            self._track_gap(sender)
            if sender in self.gap_since and now - since > GAP_TIMEOUT_S:
                dropped = self.buffer.drop_sender(sender)
                self.gap_since.pop(sender, None)
                log.info(
                    "LAN: %d envelope(s) from %s waited too long for a gap; resyncing",
                    dropped,
                    device_id(sender)[:9],
                )
                if session is not None:
                    await session.request_resync("sequence gap", gap=True)

    # -- sessions ----------------------------------------------------------------------------------
    def register(self, session: PeerSession) -> bool:
        """One session per peer. Two devices that dial each other at once end up with two;
        both sides keep the one dialed by the smaller key (the newer one if both were dialed
        by the same side: the old one is a leftover)."""
        pk = session.peer_pk
        old = self.sessions.get(pk)
        if old is not None and not old.done.is_set():
            mine, theirs = session.initiator(self.me), old.initiator(self.me)
            if mine != theirs and mine > theirs:
                return False
            old.stop("replaced by a newer connection", CLOSE_DUPLICATE)
        self.sessions[pk] = session
        return True

    def unregister(self, session: PeerSession) -> None:
        if self.sessions.get(session.peer_pk) is session:
            del self.sessions[session.peer_pk]

    async def run_session(self, conn: PeerConn) -> None:
        session = PeerSession(self, conn)
        if not self.active:
            await conn.close(CLOSE_GONE, "space not syncing")
            return
        if not self.register(session):
            await conn.close(CLOSE_DUPLICATE, "duplicate")
            return
        try:
            await session.run()
        finally:
            self.unregister(session)

    def peer_status(self) -> dict[bytes, PeerSession]:
        return {pk: s for pk, s in self.sessions.items() if s.ready}

    async def wait_first_sync(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.first_sync.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- dialing -----------------------------------------------------------------------------------
    def found(self, target: Target) -> None:
        if self._closed:
            return
        if target.instance not in self.targets:
            log.info(
                "LAN: found %s at %s:%d for space %s",
                target.instance[:12],
                ",".join(target.addresses),
                target.port,
                self.rt.record.name,
            )
        self.targets[target.instance] = target
        task = self._dialers.get(target.instance)
        if task is None or task.done():
            task = asyncio.create_task(self._dial_loop(target.instance))
            self._dialers[target.instance] = task
            task.add_done_callback(lambda t, i=target.instance: self._forget_dialer(i, t))

    def _forget_dialer(self, instance: str, task: asyncio.Task[None]) -> None:
        if self._dialers.get(instance) is task:
            del self._dialers[instance]
            self.instance_pk.pop(instance, None)

    def lost(self, instance: str) -> None:
        """The advertisement went away: stop dialing it. A live session is left alone (its
        pings tell whether the peer is still there)."""
        self.targets.pop(instance, None)

    async def _dial_loop(self, instance: str) -> None:
        delay = DIAL_BACKOFF_MIN
        service = self.rt.agent.lan
        assert service is not None
        while (target := self.targets.get(instance)) is not None and not self._closed:
            pk = self.instance_pk.get(instance)
            live = self.sessions.get(pk) if pk is not None else None
            if live is not None and not live.done.is_set():
                await live.done.wait()
                continue
            if not self.active:
                await asyncio.sleep(1.0)
                continue
            conn: PeerConn | None = None
            refused = False
            for address in target.addresses:
                ip, port = dial_address(address, target.port)  # a test hook may redirect it
                host = f"[{ip}]" if ":" in ip else ip
                try:
                    conn = await dial(f"ws://{host}:{port}/", service.identity, self, target.tag)
                    break
                except Refused as exc:
                    self.stats.refused += 1
                    log.info("LAN: %s (%s) refused: %s", instance[:12], address, exc)
                    refused = True
                    break
                except (OSError, TimeoutError, WebSocketException) as exc:
                    log.debug("LAN: cannot reach %s at %s: %s", instance[:12], address, exc)
            if conn is not None:
                self.instance_pk[instance] = conn.peer_pk
                await self.run_session(conn)
                delay = DIAL_BACKOFF_MIN
            elif refused:
                delay = REFUSED_BACKOFF
            else:
                delay = min(DIAL_BACKOFF_MAX, max(DIAL_BACKOFF_MIN, delay * 2))
            await asyncio.sleep(random.uniform(delay / 2, delay))
            if delay >= REFUSED_BACKOFF:
                delay = DIAL_BACKOFF_MIN


@dataclass
class PeerSession:
    space: SpaceLan
    conn: PeerConn
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(SEND_QUEUE_MAX))
    pending: int | None = None
    pending_since: float = 0.0
    side: list[tuple[int, bytes]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    connected_at: float = field(default_factory=time.time)
    _next_request: int = 0
    _log_len: int = 0
    _stop_reason: str | None = None
    _stop_code: int = 1000
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _resync_at: float = 0.0
    _last_answer: float = 0.0
    chunks: PeerChunks = field(init=False)

    def __post_init__(self) -> None:
        self.chunks = PeerChunks(self.conn, self.space.seal_local, self.space.chunk_counters)

    @property
    def peer_pk(self) -> bytes:
        return self.conn.peer_pk

    def initiator(self, me: bytes) -> bytes:
        return me if self.conn.outbound else self.conn.peer_pk

    def stop(self, reason: str, code: int = 1000) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop_code = code
        self._stopped.set()

    def enqueue(self, frame: bytes) -> None:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.stop("peer too slow: send queue full")

    @property
    def peer_can_write(self) -> bool:
        role = self.space.rt.keyring.role_of(self.peer_pk)
        return role is not None and role is not Role.reader

    async def request_resync(self, why: str, gap: bool = False) -> None:
        """Ask the peer for what we miss (sync step 1); its stream is set aside meanwhile."""
        if self.pending is not None or not self.peer_can_write:
            return
        self._next_request = (self._next_request + 1) & 0xFFFFFFFF
        self.pending = self._next_request
        self.pending_since = time.monotonic()
        envelope = await self.space.sync.state_request()
        if envelope is None:
            self.pending = None
            return
        self.space.stats.resyncs += 1
        if gap:
            self.space.stats.gaps += 1
        log.debug("LAN: resync with %s (%s)", device_id(self.peer_pk)[:9], why)
        self.enqueue(L.encode_peer_frame(L.SyncRequest(request_id=self.pending, envelope=envelope)))

    async def run(self) -> None:
        rt = self.space.rt
        self._log_len = len(rt.keyring.log)
        tasks = [
            asyncio.create_task(self._reader()),
            asyncio.create_task(self._writer()),
            asyncio.create_task(self._ticker()),
            asyncio.create_task(self._stopped.wait()),
        ]
        try:
            await self._hello()
            self.ready = True
            log.info(
                "LAN: %s peer %s (%s) connected for space %s",
                "dialed" if self.conn.outbound else "accepted",
                device_id(self.peer_pk)[:9],
                self.conn.address,
                rt.record.name,
            )
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception() if not t.cancelled() else None
                if exc is not None and not isinstance(exc, ConnectionClosed | OSError):
                    log.warning("LAN session with %s failed: %r", self.conn.address, exc)
        finally:
            self.ready = False
            self.chunks.close()
            await cancel_and_wait(*tasks)
            self.done.set()
            await self.conn.close(self._stop_code, self._stop_reason or "")
            log.info(
                "LAN: peer %s (%s) gone: %s",
                device_id(self.peer_pk)[:9],
                self.conn.address,
                self._stop_reason or "connection closed",
            )

    async def _hello(self) -> None:
        sync = self.space.sync
        rt = self.space.rt
        if sync.send_block is None:
            caps = sync.capabilities_source(sync.root) if sync.capabilities_source else None
            info = DeviceInfo(
                name=rt.agent.device_name,
                platform=rt.agent.policy.probe.platform,
                agent_version=__version__,
                capabilities=caps,
            )
            envelope = await sync.seal_direct(info)
            if envelope is not None:
                self.enqueue(L.encode_peer_frame(L.DirectEnvelope(envelope=envelope)))
        if self.peer_can_write:
            await self.request_resync("connected")
        else:
            self.space.first_sync.set()
        self._resync_at = time.monotonic() + RESYNC_INTERVAL_S

    async def _writer(self) -> None:
        ws = self.conn.ws
        while True:
            frame = await self.queue.get()
            log_now = self.space.rt.keyring.log
            if len(log_now) > self._log_len:
                # Our membership grew (a join we answered, a revocation): the peer gets the log
                # before anything sealed under it.
                self._log_len = len(log_now)
                await ws.send(L.encode_peer_frame(L.LogUpdate(log=log_now.to_bytes())))
            if frame:
                await ws.send(frame)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            space = self.space
            if not space.is_member(self.peer_pk):
                self.stop("no longer a member of the space", 1008)
                return
            if not space.active:
                self.stop("space paused", CLOSE_GONE)
                return
            if len(space.rt.keyring.log) > self._log_len:
                self.enqueue(b"")  # the writer sends the log
            now = time.monotonic()
            if self.pending is not None and now - self.pending_since > REQUEST_TIMEOUT_S:
                log.info("LAN: resync with %s timed out; asking again", self.conn.address)
                self.pending = None
                self.side.clear()
                await self.request_resync("timed out")
            elif self.pending is None and now >= self._resync_at:
                self._resync_at = now + RESYNC_INTERVAL_S
                await self.request_resync("periodic")

    def _check_own(self, envelope: bytes, direct: bool) -> int:
        """Header checks for what a peer may send us: its own envelopes only, of this space,
        stream or direct as the frame says. Returns the seq."""
        try:
            header = parse_header(envelope)
        except ProtocolError as exc:
            raise Refused(f"malformed envelope: {exc}") from exc
        if header.sender != self.peer_pk:
            raise Refused("peer sent an envelope of another device")
        if header.space_id != self.space.space_bytes:
            raise Refused("peer sent an envelope of another space")
        if L.is_direct_seq(header.seq) != direct:
            raise Refused("stream/direct sequence mismatch")
        return header.seq

    async def _reader(self) -> None:
        space = self.space
        sync = space.sync
        try:
            while True:
                frame = await self.conn.recv()
                if not space.is_member(self.peer_pk):
                    # Removed while connected: nothing more of it is applied (not even
                    # envelopes of the old epoch, which the relay path may still accept).
                    self.stop("no longer a member of the space", 1008)
                    return
                if isinstance(frame, L.StreamEnvelope):
                    seq = self._check_own(frame.envelope, direct=False)
                    space.stats.received += 1
                    space.sync.rates.down.add(len(frame.envelope))
                    if self.pending is not None:
                        if len(self.side) < SIDE_MAX:
                            self.side.append((seq, frame.envelope))
                        # beyond that: dropped, the pending reply covers them
                        continue
                    await space.offer(self, seq, frame.envelope)
                elif isinstance(frame, L.SyncRequest):
                    self._check_own(frame.envelope, direct=True)
                    request = self._open_request(frame.envelope)
                    if request is None:
                        continue
                    # A reply walks every document: a peer asking in a loop is slowed down.
                    wait = self._last_answer + MIN_ANSWER_INTERVAL_S - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._last_answer = time.monotonic()
                    replies = await sync.state_reply(request)
                    for i, envelope in enumerate(replies):
                        self.enqueue(
                            L.encode_peer_frame(
                                L.SyncReply(
                                    request_id=frame.request_id,
                                    final=i == len(replies) - 1,
                                    envelope=envelope,
                                )
                            )
                        )
                elif isinstance(frame, L.SyncReply):
                    seq = self._check_own(frame.envelope, direct=True)
                    if frame.request_id != self.pending:
                        continue  # an answer to a request we gave up on
                    if await sync.handle_peer([frame.envelope]) == 0:
                        log.warning("LAN: a state reply from %s did not apply", self.conn.address)
                    if frame.final:
                        self.pending = None
                        await space.release_after_reply(self, L.covered_seq(seq))
                        space.first_sync.set()
                elif isinstance(frame, L.DirectEnvelope):
                    self._check_own(frame.envelope, direct=True)
                    await sync.handle_peer([frame.envelope])
                elif isinstance(frame, L.LogUpdate):
                    await space.adopt_log(frame.log)
                    self._log_len = max(self._log_len, len(space.rt.keyring.log))
                elif isinstance(frame, L.ChunkGet):
                    self.chunks.on_get(frame)
                elif isinstance(frame, L.ChunkData | L.ChunkMissing):
                    self.chunks.on_answer(frame)
                    if isinstance(frame, L.ChunkData):
                        sync.rates.down.add(len(frame.data))
                elif isinstance(frame, L.Bye):
                    self.stop(f"peer said bye: {frame.code}")
                    return
                else:
                    raise Refused(f"unexpected {type(frame).__name__} after the handshake")
        except Refused as exc:
            log.warning("LAN: dropping peer %s: %s", self.conn.address, exc)
            self.stop(str(exc), 1008)

    def _open_request(self, envelope: bytes) -> StateRequest | None:
        ring = self.space.rt.keyring
        try:
            opened = open_envelope(
                envelope,
                expected_space_id=self.space.space_bytes,
                msg_keys=ring.msg_keys(),
                is_member=ring.is_member,
            )
            payload = decode_payload(opened.plaintext)
        except ProtocolError as exc:
            log.info("LAN: ignored a state request from %s: %s", self.conn.address, exc)
            return None
        if not isinstance(payload, StateRequest):
            raise Refused("a sync request without a StateRequest")
        return payload
