"""One space's connection to its relay: authenticate, follow the log, drain the outbox.

The link reconnects by itself with exponential backoff and jitter. Delivered envelopes are handed
to the space owner in batches (whatever arrived while the previous batch was being applied), so a
burst of a thousand files costs a handful of transactions while a single edit goes through alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import websockets
from websockets.asyncio.client import ClientConnection, connect

from qmoi_sync.agent.ack_watch import ACK_TIMEOUT_S, AckWatch
from qmoi_sync.agent.clock import CLOCK_OFF_S, describe_offset, offset_from_date, wall
from qmoi_sync.agent.deliver_gate import DeliverGate, queue_bytes_from_env
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.errors import ProtocolError

log = logging.getLogger("qmoi_sync.relay_link")

MAX_DELIVER_BATCH = 512
# Relay errors that mean "this publish was dropped, try again later".
RESEND_CODES = frozenset({"quota_exceeded", "rate_limited", "store_unavailable"})
RESEND_MIN = 0.5
RESEND_MAX = 30.0
BACKOFF_MIN = 0.2
# How often open sequence gaps are looked at (agent/relay_order.py decides when to act).
GAP_TICK_S = 0.5
BACKOFF_MAX = 30.0
#: Sealed prefetch hints waiting for the connection at most (oldest dropped beyond).
HINTS_QUEUED_MAX = 64
# Relay refusals that mean "the relay's membership log does not list this device".
REFUSED_MEMBERSHIP = frozenset({"revoked", "not_a_member"})


DISK_FULL_ERROR = (
    "cannot save sync state: the disk holding this device's qmoi-sync home is full; "
    "nothing received is lost, syncing resumes by itself once space is freed"
)


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL ("database or disk is full"), or the I/O error an ENOSPC can surface as."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


class LogTruncated(Exception):
    """The relay no longer holds the log from this device's cursor (dropped after a
    snapshot): restore from the snapshot, then subscribe again."""

    def __init__(self, before_seq: int) -> None:
        super().__init__(f"the relay's log now starts at seq {before_seq}")
        self.before_seq = before_seq


class PublishUnacknowledged(ConnectionError):
    """A publish got no Ack on a live connection (agent/ack_watch.py): reconnect, resend."""


class RelayRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class LinkState:
    connected: bool = False
    caught_up: bool = False
    last_error: str | None = None
    quota_exceeded: bool = False
    attempts: int = 0
    #: Set while the relay refuses this device as "revoked" / "not_a_member".
    refused: str | None = None
    #: How far the relay's clock is ahead of this device's (negative: behind), from the Date
    #: header of the last handshake; kept while disconnected (LAN discovery uses it then too).
    clock_offset_s: float | None = None


MembershipHandler = Callable[[bytes], Awaitable[None]]
JoinHandler = Callable[[int, bytes], Awaitable[F.JoinReply | None]]


async def recv_frame(ws: ClientConnection, timeout: float = 30) -> F.Frame:
    """The relay's next frame; an ``Error`` frame raises RelayRefused, a text frame or bytes
    that do not decode raise ProtocolError."""
    data = await asyncio.wait_for(ws.recv(), timeout=timeout)
    if isinstance(data, str):
        raise ProtocolError("malformed", "relay sent a text frame")
    frame = F.decode_frame(data)
    if isinstance(frame, F.Error):
        raise RelayRefused(frame.code, frame.message)
    return frame


class RelayLink:
    def __init__(
        self,
        sync: SpaceSync,
        url: str,
        membership_log: Callable[[], bytes],
        on_membership: MembershipHandler,
        on_join_forward: JoinHandler,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
        deliver_queue_bytes: int | None = None,
    ) -> None:
        self.sync = sync
        self.url = url
        self.membership_log = membership_log
        self.on_membership = on_membership
        self.on_join_forward = on_join_forward
        self.ssl_context = ssl_context
        self.rng = rng or random.Random()
        self.state = LinkState()
        self.caught_up = asyncio.Event()
        self._wake = asyncio.Event()
        self._resend_at: float | None = None
        self._resend_delay = 0.0
        self._push_pending = False
        self._relay_log_digest: bytes | None = None
        self._relay_log_changed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._ack_watch = AckWatch()  # per session, replaced by _session
        # Log compaction after snapshots: a Truncate to send, and the relay's last answer.
        self._truncate_pending: int | None = None
        self.truncated_before: int | None = None
        # Envelopes the relay delivered that are not applied yet (queued for the applier),
        # bounded in bytes (agent/deliver_gate.py; QMOI_SYNC_DELIVER_QUEUE_BYTES by default).
        self.gate = DeliverGate(
            deliver_queue_bytes if deliver_queue_bytes is not None else queue_bytes_from_env(),
            sync.membership_wanted,
        )
        # Devices the relay says are connected to it for this space (Presence frames).
        self.online: frozenset[bytes] = frozenset()
        # Prefetch hints (protocol/hints.py): sealed ones waiting to be sent (ephemeral: dropped
        # with the session, oldest first when too many wait)
        # (received ones go to the space's BinarySync.on_hint).
        self._hints: deque[bytes] = deque(maxlen=HINTS_QUEUED_MAX)
        # A relay from before hints closes the connection on the unknown frame: none are sent
        # to it again (until the agent restarts), so it costs one reconnect, not one per file.
        self.hints_unsupported = False

    @property
    def pending_in(self) -> int:
        return self.gate.queued

    @property
    def pending_in_bytes(self) -> int:
        return self.gate.queued_bytes

    @property
    def latency_ms(self) -> float | None:
        """Round trip of the last keepalive ping to the relay (None before the first one)."""
        ws = self._ws
        return round(ws.latency * 1000, 3) if ws is not None and ws.latency else None

    def push_membership(self) -> None:
        """Send our (grown) membership log to the relay: on the live connection, before any
        envelope sealed after this call; if offline, the next Auth carries it anyway."""
        self._push_pending = True
        self.sync.outbox_changed.set()

    async def wait_relay_log(self, log: bytes, timeout: float) -> bool:
        """Wait until the relay has told us (Welcome or Membership) that it holds ``log``."""
        want = hashlib.sha256(log).digest()
        try:
            async with asyncio.timeout(timeout):
                while self._relay_log_digest != want:
                    self._relay_log_changed.clear()
                    await self._relay_log_changed.wait()
        except TimeoutError:
            return False
        return True

    def _relay_log(self, log: bytes) -> None:
        self._relay_log_digest = hashlib.sha256(log).digest()
        self._relay_log_changed.set()

    def request_truncate(self, before_seq: int) -> None:
        """Tell the relay (admin devices) it may drop the log below ``before_seq``: a snapshot
        covers it. Sent on the live connection, or on the next one."""
        self._truncate_pending = max(before_seq, self._truncate_pending or 0)
        self.sync.outbox_changed.set()

    def send_hint(self, sealed: bytes) -> bool:
        """Queue a sealed prefetch hint for the live connection (sent ahead of the outbox).
        False if not connected: hints are never kept for a later session."""
        if self._ws is None or self.hints_unsupported:
            return False
        self._hints.append(sealed)
        self.sync.outbox_changed.set()
        return True

    def wake(self) -> None:
        """Retry now (e.g. the user asked, or the network came back)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = BACKOFF_MIN
        while not stop.is_set():
            self.state.attempts += 1
            try:
                await self._session(stop)
                delay = BACKOFF_MIN
            except LogTruncated as exc:
                restore = self.sync.on_log_truncated
                self.state.last_error = f"{exc}; restoring from the latest snapshot"
                log.warning("relay log truncated for %s: %s", self.sync.space_id[:8], exc)
                if restore is not None:
                    try:
                        await restore(exc.before_seq)
                        self.state.last_error = None
                        delay = BACKOFF_MIN
                    except Exception as rexc:
                        self.state.last_error = f"{exc}; restore from snapshot failed: {rexc}"
                        delay = BACKOFF_MAX
                else:
                    delay = BACKOFF_MAX
            except RelayRefused as exc:
                self.state.last_error = str(exc)
                log.warning("relay refused space %s: %s", self.sync.space_id[:8], exc)
                if exc.code in REFUSED_MEMBERSHIP:
                    delay = BACKOFF_MAX
                    self.state.refused = str(exc)
                    self.sync.refused = "this device was removed from the space"
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    self.state.last_error = f"relay link error: {type(exc).__name__}: {exc}"
                    log.exception("relay link for %s failed; reconnecting", self.sync.space_id[:8])
                else:
                    # Nothing was lost (the transaction rolled back; the relay resends what was
                    # not acknowledged): say so plainly rather than with a traceback per retry.
                    self.state.last_error = DISK_FULL_ERROR
                    log.warning("space %s: %s", self.sync.space_id[:8], DISK_FULL_ERROR)
                delay = max(delay, 1.0)
            except (OSError, websockets.WebSocketException, ProtocolError, TimeoutError) as exc:
                self.state.last_error = f"relay unreachable: {exc}"
                log.info("relay link for %s down: %s", self.sync.space_id[:8], exc)
            except Exception as exc:
                # A bug in one session must not end the link for good (silently: nobody awaits
                # this task): logged with its traceback, then reconnect with backoff.
                self.state.last_error = f"relay link error: {type(exc).__name__}: {exc}"
                log.exception("relay link for %s failed; reconnecting", self.sync.space_id[:8])
                delay = max(delay, 1.0)
            finally:
                self.state.connected = False
                self.state.caught_up = False
            if stop.is_set():
                break
            # Full jitter keeps a fleet of agents from reconnecting in lockstep after an outage.
            sleep_for = self.rng.uniform(BACKOFF_MIN, delay)
            delay = min(BACKOFF_MAX, delay * 2)
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waiters, timeout=sleep_for, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()

    async def _session(self, stop: asyncio.Event) -> None:
        sent, t0 = wall(), time.monotonic()
        async with connect(
            self.url,
            compression=None,
            max_size=F.MAX_FRAME,
            ssl=self.ssl_context,
            open_timeout=10,
            ping_interval=20,
            ping_timeout=20,
            proxy=None,
        ) as ws:
            self._note_clock(ws, sent, time.monotonic() - t0)
            await self._handshake(ws)
            self._ws = ws
            self.state.connected = True
            self.state.last_error = None
            await ws.send(F.encode_frame(F.Subscribe(from_seq=self.sync.subscribe_from())))
            deliveries: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
            acks: asyncio.Queue[int] = asyncio.Queue()
            self._ack_watch = AckWatch()
            tasks = [
                asyncio.create_task(self._reader(ws, deliveries, acks)),
                asyncio.create_task(self._acker(acks)),
                asyncio.create_task(self._applier(deliveries)),
                asyncio.create_task(self._writer(ws)),
                asyncio.create_task(self._gap_watch(ws)),
                asyncio.create_task(self._ack_watchdog()),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._ws = None
                await cancel_and_wait(*tasks)
                # Undelivered envelopes go with the session; the relay sends them again.
                self.gate.reset()
                self.online = frozenset()
                self._hints.clear()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]

    def _note_clock(self, ws: ClientConnection, sent: float, elapsed_s: float) -> None:
        """Measure this device's clock against the relay's (its handshake reply's Date header):
        kept for LAN discovery, and shown in status when off by more than CLOCK_OFF_S."""
        date = ws.response.headers.get("Date") if ws.response is not None else None
        got = offset_from_date(date, sent, elapsed_s)
        if got is None:
            return
        offset, _uncertainty = got
        self.state.clock_offset_s = offset
        if abs(offset) > CLOCK_OFF_S:
            self.sync.warnings["clock"] = (
                f"this device's clock is {describe_offset(offset)} the relay's: timestamps "
                "and invite expiry are off; LAN discovery follows the relay's clock"
            )
        else:
            self.sync.warnings.pop("clock", None)

    async def _handshake(self, ws: ClientConnection) -> None:
        me = self.sync.identity.public.sign_pk
        await ws.send(
            F.encode_frame(
                F.Hello(space_id=self.sync.space_bytes, sign_pk=me, proto_version=F.PROTO_VERSION)
            )
        )
        challenge = await self._recv(ws)
        if not isinstance(challenge, F.Challenge):
            raise ProtocolError(
                "malformed", f"expected a challenge, got {type(challenge).__name__}"
            )
        sig = self.sync.identity.sign(F.auth_message(challenge.nonce, self.sync.space_bytes, me))
        self._push_pending = False  # Auth carries our log; a longer one extends the relay's
        await ws.send(F.encode_frame(F.Auth(signature=sig, membership_log=self.membership_log())))
        welcome = await self._recv(ws)
        if not isinstance(welcome, F.Welcome):
            raise ProtocolError("malformed", f"expected welcome, got {type(welcome).__name__}")
        self.state.refused = None
        self.sync.refused = None
        if welcome.log:
            self._relay_log(welcome.log)
            await self.on_membership(welcome.log)

    async def _recv(self, ws: ClientConnection) -> F.Frame:
        return await recv_frame(ws)

    async def _reader(
        self,
        ws: ClientConnection,
        deliveries: asyncio.Queue[tuple[int, bytes]],
        acks: asyncio.Queue[int],
    ) -> None:
        async for data in ws:
            if isinstance(data, str):
                raise ProtocolError("malformed", "relay sent a text frame")
            frame = F.decode_frame(data)
            if isinstance(frame, F.Deliver):
                self.sync.rates.down.add(len(data))
                del data  # not kept alive (with the envelope's bytes twice) while waiting
                # Back-pressure (agent/deliver_gate.py): past the bound the socket is not read
                # until the applier catches up, unless it waits for a membership log.
                await self.gate.wait_for_room()
                self.gate.added(len(frame.envelope))
                deliveries.put_nowait((frame.relay_seq, frame.envelope))
            elif isinstance(frame, F.Ack):
                acks.put_nowait(frame.sender_seq)
                self._ack_watch.acked(frame.sender_seq)
                self.sync.note_own_relay_seq(frame.relay_seq)
                self.state.quota_exceeded = False
            elif isinstance(frame, F.LogTruncated):
                raise LogTruncated(frame.before_seq)
            elif isinstance(frame, F.Truncated):
                self.truncated_before = frame.before_seq
            elif isinstance(frame, F.CaughtUp):
                deliveries.put_nowait((-1, b""))
            elif isinstance(frame, F.Presence):
                self.online = frozenset(frame.online)
            elif isinstance(frame, F.Hinted):
                binary = self.sync.binary
                if binary is not None:
                    binary.on_hint(frame.hint)
            elif isinstance(frame, F.Membership):
                self._relay_log(frame.log)
                await self.on_membership(frame.log)
            elif isinstance(frame, F.JoinForward):
                reply = await self.on_join_forward(frame.request_id, frame.request)
                if reply is not None:  # None: another admin issued that invite
                    await ws.send(F.encode_frame(reply))
            elif isinstance(frame, F.Error):
                if frame.code == "malformed" and "0x0d" in frame.message:
                    self.hints_unsupported = True
                if frame.code == "quota_exceeded":
                    self.state.quota_exceeded = True
                if frame.code in RESEND_CODES:
                    # The relay dropped a publish; it has no per-envelope reference, so resend
                    # everything still unacknowledged after a growing pause (the relay acks
                    # already-stored ones as duplicates).
                    self._ack_watch.dropped_by_relay()
                    self._schedule_resend()
                self.state.last_error = f"{frame.code}: {frame.message}"
                log.warning(
                    "relay error for %s: %s %s", self.sync.space_id[:8], frame.code, frame.message
                )
                if frame.fatal:
                    raise RelayRefused(frame.code, frame.message)

    async def _gap_watch(self, ws: ClientConnection) -> None:
        """Repair sequence gaps (agent/relay_order.py): when a repair wants the relay's log
        again from before a gap, subscribe again on this connection (the relay replaces the
        subscription). Only once caught up, so the next CaughtUp is the new subscription's:
        until then relay seqs may go back (the old subscription's last frames, then the new
        backlog) without that being taken for a replay."""
        while True:
            await asyncio.sleep(GAP_TICK_S)
            await self.sync.repair_gaps()
            if self.sync.order.resubscribe_from is None or not self.state.caught_up:
                continue
            self.state.caught_up = False
            start = self.sync.subscribe_from(resubscribe=True)
            log.info(
                "space %s: sequence gap; subscribing again from relay seq %d",
                self.sync.space_id[:8],
                start,
            )
            await ws.send(F.encode_frame(F.Subscribe(from_seq=start)))

    async def _ack_watchdog(self) -> None:
        """End the session when a publish stays unacknowledged (agent/ack_watch.py): the
        next one resends the outbox. A periodic look: "no Ack came" has no event."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(GAP_TICK_S)
            if self._ack_watch.overdue(loop.time()):
                break
        raise PublishUnacknowledged(f"no Ack from the relay for {ACK_TIMEOUT_S:.0f} s")

    async def _acker(self, acks: asyncio.Queue[int]) -> None:
        """Delete acknowledged envelopes from the outbox, many per transaction under load."""
        store = self.sync.store
        while True:
            seqs = [await acks.get()]
            while not acks.empty():
                seqs.append(acks.get_nowait())
            async with store.transaction():
                await store.delete_outbox(self.sync.space_id, seqs)
            await self.sync.save_cursor()

    async def _applier(self, deliveries: asyncio.Queue[tuple[int, bytes]]) -> None:
        while True:
            first = await deliveries.get()
            batch = [first]
            while len(batch) < MAX_DELIVER_BATCH and not deliveries.empty():
                batch.append(deliveries.get_nowait())
            real = [(s, e) for s, e in batch if s >= 0]
            size = sum(len(e) for _, e in real)
            self.gate.taken(size)  # the reader may read the next ones while these apply
            if real:
                try:
                    await self.sync.handle_remote(real)
                finally:
                    self.gate.applied(len(real), size)
            if len(real) != len(batch):
                self.sync.order.settled()
                self.state.caught_up = True
                self.caught_up.set()
            # Not kept alive while waiting for the next delivery: after a large catch-up the
            # last batch's envelopes (MBs) were held by these locals for as long as it was idle.
            del first, batch, real

    def _schedule_resend(self) -> None:
        loop = asyncio.get_running_loop()
        self._resend_delay = min(RESEND_MAX, max(RESEND_MIN, self._resend_delay * 2))
        self._resend_at = loop.time() + self._resend_delay
        self.sync.outbox_changed.set()

    async def _writer(self, ws: ClientConnection) -> None:
        sent_upto = 0
        self._resend_at = None
        self._resend_delay = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if self._resend_at is not None:
                await asyncio.sleep(max(0.0, self._resend_at - loop.time()))
                self._resend_at = None
                sent_upto = 0
            elif not self.state.quota_exceeded:
                self._resend_delay = 0.0
            self.sync.outbox_changed.clear()
            rows = await self.sync.store.outbox(self.sync.space_id, after_seq=sent_upto, limit=256)
            if self._push_pending:
                # Checked after reading the outbox: an envelope sealed with a new epoch can only
                # be in `rows` if the push was requested before, so the log always goes first.
                self._push_pending = False
                await ws.send(F.encode_frame(F.PushMembership(log=self.membership_log())))
            if self._truncate_pending is not None:
                before, self._truncate_pending = self._truncate_pending, None
                await ws.send(F.encode_frame(F.Truncate(before_seq=before)))
            while self._hints:
                # Ahead of the outbox: a hint is worth something only while the upload it
                # describes is still going on (the manifest follows in the outbox).
                await ws.send(F.encode_frame(F.Hint(self._hints.popleft())))
            if rows:
                for seq, envelope in rows:
                    frame = F.encode_frame(F.Publish(envelope=envelope))
                    await ws.send(frame)
                    self._ack_watch.sent(seq, loop.time())
                    self.sync.rates.up.add(len(frame))
                    sent_upto = seq
                continue
            await self.sync.outbox_changed.wait()
