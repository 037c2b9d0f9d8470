"""The websocket relay: authenticates devices against each space's membership log, stores the
envelopes they publish (ciphertext it cannot read) and fans them out to the space's other devices.

One websocket = one device in one space. The flow, frame by frame, is documented in
``docs/architecture.md``; in short::

    client Hello(space_id, sign_pk, proto_version)   relay Challenge(nonce)
    client Auth(signature, membership_log)            relay Welcome(head_seq, log)
    client Subscribe(from_seq)                        relay Deliver* CaughtUp(head) Deliver*
    client Publish(envelope)                          relay Ack(sender_seq, relay_seq, duplicate)
    client PushMembership(log)                        relay Membership(log) to the whole space

or, for a device that wants to join with an invite (no Hello)::

    joiner JoinRequest(space_id, invite_id, request)
                                     relay JoinForward(request_id, request) to every admin online
    admin  JoinReply(request_id, accepted, reason, log)
                                     relay JoinResult(ok, reason, log) to the joiner

Design points:

* Every connection has exactly one reader (its handler task). Publishes are *pipelined*: the
  handler verifies a Publish, queues it for the store's group commit and goes on reading; a
  per-connection ack task awaits the commits in order and sends the Acks. A bounded in-flight
  queue gives back-pressure (the handler stops reading, TCP does the rest).
* Live fan-out never blocks a publisher: the store calls :meth:`RelayServer._on_commit`
  synchronously after each commit, which appends to each subscriber's bounded buffer. A subscriber
  whose buffer is full simply falls back to reading from the store from its cursor, so a slow
  device costs disk reads, never memory, and never slows anyone else down.
* Backlog and live meet without gaps or duplicates because a subscription tracks one cursor (the
  last relay sequence it sent) and the store's committed head: it registers for live delivery
  first, then sends from the store while ``head > cursor``, then from its buffer, skipping
  anything ``<= cursor``.
* Messages to *other* connections (Membership broadcasts, JoinForward, revocation) go through
  that connection's mailbox task, so one stuck client cannot stall the sender.
* The relay never sees a content key: it checks envelope *signatures* (the sender's public key is
  in the header) and membership, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.chunks import MAX_CHUNK_CIPHERTEXT
from qmoi_sync.protocol.envelope import EnvelopeHeader, verify_envelope_signature
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import verify
from qmoi_sync.protocol.invite import parse_join_request
from qmoi_sync.protocol.membership import MembershipLog, Role

from .blobs import BlobStore, PutStatus
from .limits import (
    BLOB_READ_AHEAD,
    DEFAULT_BLOB_QUOTA_BYTES,
    DEFAULT_BLOB_RATE_BYTES_PER_S,
    DEFAULT_BLOB_RATE_MSGS_PER_S,
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_JOIN_TIMEOUT_S,
    DEFAULT_MAX_ERRORS,
    DEFAULT_MAX_INFLIGHT_CHUNKS,
    DEFAULT_MAX_INFLIGHT_PUBLISHES,
    DEFAULT_MAX_JOIN_REQUEST_BYTES,
    DEFAULT_MAX_PENDING_JOINS_PER_SPACE,
    DEFAULT_MAX_RATE_STRIKES,
    DEFAULT_MAX_SPACES,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_BYTES_PER_S,
    DEFAULT_RATE_MSGS_PER_S,
    DEFAULT_SPACE_QUOTA_BYTES,
    DEFAULT_SUBSCRIBER_BUFFER_BYTES,
    ConnectionLimiter,
    RateLimits,
    Verdict,
)
from .metrics import RelayMetrics, SpaceLabelMode
from .ops_http import OpsHttp
from .store import (
    AppendResult,
    AppendStatus,
    RelayStore,
    SpaceLimitError,
    StoredEnvelope,
    StoreError,
)
from .tasks import cancel_and_wait

__all__ = ["RelayConfig", "RelayServer", "run_relay"]

log = logging.getLogger("qmoi_sync.relay")

MAILBOX_LIMIT = 256
#: A prefetch hint is not forwarded to a connection with this many frames queued already.
HINT_MAILBOX_MAX = MAILBOX_LIMIT // 4
#: Presence announcements are coalesced for PRESENCE_DELAY_S * (1 + connections / 50), at
#: most PRESENCE_DELAY_MAX_S (see _Space.announce_presence).
PRESENCE_DELAY_S = 0.05
PRESENCE_DELAY_MAX_S = 1.0
BACKLOG_PAGE_COUNT = 256
BACKLOG_PAGE_BYTES = 4 * 1024 * 1024


@dataclass
class RelayConfig:
    """Everything the relay needs to run. Limits may be changed on a running server's config
    (they are read when used), e.g. ``server.config.space_quota_bytes = ...``."""

    host: str
    port: int
    data_dir: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None
    space_quota_bytes: int = DEFAULT_SPACE_QUOTA_BYTES
    max_spaces: int = DEFAULT_MAX_SPACES
    rate_msgs_per_s: float = DEFAULT_RATE_MSGS_PER_S
    rate_burst: int = DEFAULT_RATE_BURST
    rate_bytes_per_s: float = DEFAULT_RATE_BYTES_PER_S
    #: Byte-bucket capacity; None = max(2 s of ``rate_bytes_per_s``, 2 * MAX_FRAME).
    rate_bytes_burst: int | None = None
    max_rate_strikes: int = DEFAULT_MAX_RATE_STRIKES
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    max_errors: int = DEFAULT_MAX_ERRORS
    max_pending_joins_per_space: int = DEFAULT_MAX_PENDING_JOINS_PER_SPACE
    max_join_request_bytes: int = DEFAULT_MAX_JOIN_REQUEST_BYTES
    max_inflight_publishes: int = DEFAULT_MAX_INFLIGHT_PUBLISHES
    subscriber_buffer_bytes: int = DEFAULT_SUBSCRIBER_BUFFER_BYTES
    #: Extra time the group-commit writer waits for more publishes (0 = natural batching only).
    commit_linger_s: float = 0.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    #: Separate plain-HTTP listener for /metrics (and /healthz); None = no metrics listener.
    #: /healthz is always answered on the relay port too (relay/ops_http.py says why).
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    #: How per-space series are labelled: "hash" (default), "raw" space id, or "none".
    metrics_space_label: SpaceLabelMode = "hash"
    #: The blob channel (relay/blobs.py): per-space quota on stored chunk bytes, and the rate
    #: limit of chunk frames per connection (kept apart from the envelope limits above).
    blob_quota_bytes: int = DEFAULT_BLOB_QUOTA_BYTES
    blob_rate_bytes_per_s: float = DEFAULT_BLOB_RATE_BYTES_PER_S
    blob_rate_msgs_per_s: float = DEFAULT_BLOB_RATE_MSGS_PER_S
    max_inflight_chunks: int = DEFAULT_MAX_INFLIGHT_CHUNKS

    def blob_rate_limits(self) -> RateLimits:
        return RateLimits(
            msgs_per_s=self.blob_rate_msgs_per_s,
            burst=int(2 * self.blob_rate_msgs_per_s),
            bytes_per_s=self.blob_rate_bytes_per_s,
            bytes_burst=max(int(2 * self.blob_rate_bytes_per_s), 2 * F.MAX_FRAME),
            max_strikes=self.max_rate_strikes,
        )

    def rate_limits(self) -> RateLimits:
        bytes_burst = self.rate_bytes_burst
        if bytes_burst is None:
            bytes_burst = max(int(2 * self.rate_bytes_per_s), 2 * F.MAX_FRAME)
        return RateLimits(
            msgs_per_s=self.rate_msgs_per_s,
            burst=self.rate_burst,
            bytes_per_s=self.rate_bytes_per_s,
            bytes_burst=bytes_burst,
            max_strikes=self.max_rate_strikes,
        )


# ---------------------------------------------------------------------------------- logging


def short(b: bytes) -> str:
    """Space ids and keys are logged shortened: enough to correlate, not to identify."""
    return b[:4].hex()


def _ev(level: int, event: str, **fields: object) -> None:
    if not log.isEnabledFor(level):
        return
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    log.log(level, "%s %s", event, text, extra={"relay_event": event, "relay_fields": fields})


# ---------------------------------------------------------------------------------- state


class _Fatal(Exception):
    """Send ``Error(code, message, fatal=True)`` and close the connection."""

    def __init__(self, code: str, message: str, close_code: int = CloseCode.POLICY_VIOLATION):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass(eq=False)
class _PendingJoin:
    request_id: int
    space: _Space
    joiner: _Conn
    request: bytes
    joiner_key: bytes
    result: asyncio.Future[F.JoinResult]
    created: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Space:
    space_id: bytes
    log: MembershipLog
    log_bytes: bytes
    conns: set[_Conn] = field(default_factory=set)
    joins: dict[int, _PendingJoin] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The devices last announced as connected (Presence frames).
    presence: tuple[bytes, ...] = ()
    # Connections that authenticated since the last announcement: they get the current set
    # even if it did not change (another connection of the same device was already there).
    presence_waiting: set[_Conn] = field(default_factory=set)
    presence_timer: asyncio.TimerHandle | None = None

    def online(self) -> tuple[bytes, ...]:
        return tuple(sorted({c.sign_pk for c in self.conns if c.sign_pk is not None}))

    def announce_presence(self, newcomer: _Conn | None = None) -> None:
        """Schedule a Presence announcement (coalesced).

        A Presence frame lists every connected device and goes to every connection: one per
        connect or disconnect costs O(devices²) bytes for a space whose devices come and go
        together (1,000 devices reconnecting after a relay restart: ~8 GB of frames queued in
        the mailboxes, the relay's loop too busy to finish opening handshakes). So changes are
        gathered for a short delay that grows with the space (50 ms for a few devices, ~1 s
        for a thousand) and announced once, to everyone if the set changed and otherwise only
        to the connections that arrived meanwhile.
        """
        if newcomer is not None:
            self.presence_waiting.add(newcomer)
        if self.presence_timer is None:
            delay = min(PRESENCE_DELAY_MAX_S, PRESENCE_DELAY_S * (1 + len(self.conns) / 50))
            self.presence_timer = asyncio.get_running_loop().call_later(delay, self._announce_now)

    def _announce_now(self) -> None:
        self.presence_timer = None
        online = self.online()
        # changed: everyone; unchanged: only the connections that have not been told yet
        targets = set(self.conns) if online != self.presence else self.presence_waiting & self.conns
        self.presence = online
        self.presence_waiting.clear()
        if not targets:
            return
        frame = F.Presence(online[: F.MAX_PRESENCE])
        for conn in targets:
            conn.post(frame)

    def cancel_presence(self) -> None:
        if self.presence_timer is not None:
            self.presence_timer.cancel()
            self.presence_timer = None


class _Subscription:
    """Streams a space's envelopes to one connection from a cursor, backlog then live."""

    def __init__(self, conn: _Conn, space: _Space, from_seq: int, buffer_limit: int) -> None:
        self.conn = conn
        self.space = space
        self.cursor = from_seq
        self.buffer: deque[tuple[int, bytes]] = deque()
        self.buffer_bytes = 0
        self.buffer_limit = buffer_limit
        #: relay seqs published on this very connection while subscribed: never echoed back.
        self.own: set[int] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.overflows = 0

    def offer(self, env: StoredEnvelope) -> None:
        """Called synchronously from the store's commit hook, in relay-seq order."""
        if env.origin is self.conn:
            self.own.add(env.relay_seq)
        elif self.buffer_bytes + len(env.data) <= self.buffer_limit:
            self.buffer.append((env.relay_seq, env.data))
            self.buffer_bytes += len(env.data)
        else:
            # Dropped from memory; the run loop sees head > cursor and reads it from the store.
            self.overflows += 1
        self.wake.set()

    async def run(self, store: RelayStore) -> None:
        space_id = self.space.space_id
        head = store.committed_head(space_id)
        if head is None:
            head = await store.head_seq(space_id)
        if self.cursor > head:
            # The client is ahead of us (e.g. the relay lost data): restart from our head so
            # nothing published from now on is skipped.
            self.cursor = head
        if await self._below_log(store):
            return
        # CaughtUp marks the end of the backlog as it stood when the subscription started, so a
        # busy space cannot postpone it indefinitely.
        backlog_end: int | None = head
        while True:
            if backlog_end is not None and self.cursor >= backlog_end:
                await self.conn.send(F.CaughtUp(head_seq=self.cursor))
                backlog_end = None
            self._drain_buffer_prefix()
            nxt = self.cursor + 1
            if nxt in self.own:  # our own publish: skip it
                self.own.discard(nxt)
                self.cursor = nxt
                continue
            if self.buffer and self.buffer[0][0] == nxt:  # live, from memory
                seq, data = self._pop()
                await self.conn.send(F.Deliver(relay_seq=seq, envelope=data))
                self.cursor = seq
                continue
            head = store.committed_head(space_id) or 0
            if head > self.cursor:  # backlog, or live items that overflowed the buffer
                if not await self._send_page(store, head):
                    return
                continue
            self.wake.clear()
            if self._idle(store):
                await self.wake.wait()

    def _idle(self, store: RelayStore) -> bool:
        head = store.committed_head(self.space.space_id) or 0
        return not self.buffer and head <= self.cursor and (self.cursor + 1) not in self.own

    def _pop(self) -> tuple[int, bytes]:
        seq, data = self.buffer.popleft()
        self.buffer_bytes -= len(data)
        return seq, data

    def _drain_buffer_prefix(self) -> None:
        while self.buffer and self.buffer[0][0] <= self.cursor:
            self._pop()

    async def _below_log(self, store: RelayStore) -> bool:
        """If the envelope after the cursor was dropped (the log was truncated after a
        snapshot), tell the subscriber (LogTruncated: it restores from the snapshot and
        subscribes again) and end the subscription. Never skip silently over a gap."""
        start = await store.log_start(self.space.space_id)
        if self.cursor + 1 >= start:
            return False
        await self.conn.send(F.LogTruncated(before_seq=start))
        return True

    async def _send_page(self, store: RelayStore, head: int) -> bool:
        """Send the next page of the backlog; False if the subscription must end."""
        page = await store.read_page(
            self.space.space_id,
            self.cursor,
            max_count=BACKLOG_PAGE_COUNT,
            max_bytes=BACKLOG_PAGE_BYTES,
        )
        if (not page or page[0][0] > self.cursor + 1) and await self._below_log(store):
            return False
        if not page:
            self.cursor = max(self.cursor, head)
        for seq, data in page:
            if seq <= self.cursor:
                continue
            if seq in self.own:
                self.own.discard(seq)
            else:
                await self.conn.send(F.Deliver(relay_seq=seq, envelope=data))
            self.cursor = seq
        if self.own:
            self.own = {s for s in self.own if s > self.cursor}
        return True


class _Conn:
    """One websocket connection."""

    _ids = itertools.count(1)

    def __init__(self, server: RelayServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.cid = next(self._ids)
        cfg = server.config
        self.limiter = ConnectionLimiter(cfg.rate_limits())
        self.blob_limiter = ConnectionLimiter(cfg.blob_rate_limits())
        self.blob_inflight: asyncio.Queue[tuple[bytes, int, asyncio.Future[PutStatus]]] = (
            asyncio.Queue(maxsize=max(1, cfg.max_inflight_chunks))
        )
        self.blob_acker: asyncio.Task[None] | None = None
        # Downloads: reads started in order, answered in order by one sender task. A bounded
        # queue: up to BLOB_READ_AHEAD chunks are read from disk while earlier ones are on the
        # wire (answering each GetChunk inline made a download one disk read + one send at a
        # time, whatever the downloader kept in flight).
        self.blob_reads: asyncio.Queue[tuple[bytes, asyncio.Task[bytes | None]]] = asyncio.Queue(
            maxsize=BLOB_READ_AHEAD
        )
        self.blob_sender: asyncio.Task[None] | None = None
        self.errors = 0
        self.space: _Space | None = None
        self.sign_pk: bytes | None = None
        self.sub: _Subscription | None = None
        self.revoked = False
        self.inflight: asyncio.Queue[tuple[int, asyncio.Future[AppendResult]]] = asyncio.Queue(
            maxsize=max(1, cfg.max_inflight_publishes)
        )
        self.mailbox: asyncio.Queue[tuple[bytes, _Fatal | None]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        try:
            peer = ws.remote_address
            self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        except Exception:
            self.peer = "?"

    # -- sending ---------------------------------------------------------------------------

    async def send(self, frame: F.Frame) -> None:
        await self.ws.send(F.encode_frame(frame))
        self.server.metrics.frame_sent(frame)

    async def send_error(self, code: str, message: str, fatal: bool) -> None:
        await self.send(_error_frame(code, message, fatal))

    def post(self, frame: F.Frame, then_close: _Fatal | None = None) -> None:
        """Queue a frame from *another* task; delivered by this connection's mailbox task."""
        if self.mailbox.qsize() >= MAILBOX_LIMIT:
            _ev(logging.WARNING, "mailbox_full", conn=self.cid)
            self.close_soon(
                _Fatal("too_slow", "connection is not reading", CloseCode.TRY_AGAIN_LATER)
            )
            return
        self.mailbox.put_nowait((F.encode_frame(frame), then_close))
        self.server.metrics.frame_sent(frame)

    def close_soon(self, fatal: _Fatal) -> None:
        """Close from another task: best-effort Error frame, then close."""
        task = asyncio.create_task(self._send_fatal(fatal))
        self.server._background.add(task)
        task.add_done_callback(self.server._background.discard)

    async def _send_fatal(self, fatal: _Fatal) -> None:
        with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
            async with asyncio.timeout(5):
                await self.send_error(fatal.code, fatal.message, True)
        with contextlib.suppress(Exception):
            await self.ws.close(fatal.close_code, fatal.code[:100])

    async def _mailbox_loop(self) -> None:
        while True:
            data, then_close = await self.mailbox.get()
            await self.ws.send(data)
            if then_close is not None:
                with contextlib.suppress(Exception):
                    await self.ws.close(then_close.close_code, then_close.code[:100])
                return

    async def error(self, code: str, message: str, *, counts: bool = True) -> None:
        """A non-fatal error; too many of them on one connection closes it."""
        _ev(logging.INFO, "client_error", conn=self.cid, code=code)
        await self.send_error(code, message, False)
        if counts:
            self.errors += 1
            if self.errors >= self.server.config.max_errors:
                raise _Fatal("too_many_errors", f"{self.errors} errors on this connection")

    # -- receiving -------------------------------------------------------------------------

    async def recv_frame(self) -> F.Frame | None:
        """The next frame, or None if it was dropped by the rate limiter."""
        data = await self.ws.recv()
        if isinstance(data, str):
            raise _Fatal(
                "malformed",
                "text frames are not accepted; binary frames only",
                CloseCode.UNSUPPORTED_DATA,
            )
        blob = bool(data) and data[0] in F.BLOB_FRAME_TYPES
        verdict = (self.blob_limiter if blob else self.limiter).check(len(data))
        if verdict is Verdict.CLOSE:
            raise _Fatal(
                "rate_limited", "sustained rate-limit violations", CloseCode.POLICY_VIOLATION
            )
        if verdict is Verdict.DROP:
            await self.error("rate_limited", "message dropped: slow down", counts=False)
            return None
        try:
            frame = F.decode_frame(data, F.MAX_FRAME)
        except ProtocolError as exc:
            raise _Fatal(
                exc.code, f"undecodable frame: {exc.message}", CloseCode.PROTOCOL_ERROR
            ) from None
        self.server.metrics.frame_received(frame)
        return frame

    async def recv_required(self) -> F.Frame:
        while True:
            frame = await self.recv_frame()
            if frame is not None:
                return frame

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.server.config
        try:
            try:
                async with asyncio.timeout(cfg.handshake_timeout_s):
                    first = await self.recv_required()
                    if isinstance(first, F.Hello):
                        await self._authenticate(first)
            except TimeoutError:
                raise _Fatal("handshake_timeout", "no complete handshake in time") from None
            if isinstance(first, F.JoinRequest):
                await self._join(first)
                return
            if not isinstance(first, F.Hello):
                raise _Fatal(
                    "unexpected_frame",
                    f"expected Hello or JoinRequest, got {type(first).__name__}",
                    CloseCode.PROTOCOL_ERROR,
                )
            self._spawn(self._ack_loop(), "ack")
            self._spawn(self._mailbox_loop(), "mailbox")
            await self._main_loop()
        except _Fatal as fatal:
            _ev(logging.INFO, "closing", conn=self.cid, code=fatal.code, reason=fatal.message)
            await self._send_fatal(fatal)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if (rcvd is not None and rcvd.code == CloseCode.MESSAGE_TOO_BIG) or (
                exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG
            ):
                _ev(logging.WARNING, "closed_oversized_frame", conn=self.cid, peer=self.peer)
                self.server.metrics.refused("too_large")
            else:
                _ev(
                    logging.DEBUG,
                    "closed",
                    conn=self.cid,
                    code=rcvd.code if rcvd is not None else None,
                )

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"relay-{what}-{self.cid}")
        task.add_done_callback(self._aux_done)
        self.tasks.append(task)

    def _aux_done(self, task: asyncio.Task[None]) -> None:
        """A helper task of this connection ended: if it failed unexpectedly, drop the connection
        rather than leave a half-working one (e.g. publishes that would never be acked)."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, ConnectionClosed | OSError):
            return
        log.error("connection task failed conn=%d task=%s", self.cid, task.get_name(), exc_info=exc)
        self.close_soon(_Fatal("internal_error", "relay error", CloseCode.INTERNAL_ERROR))

    async def _main_loop(self) -> None:
        while True:
            frame = await self.recv_frame()
            if frame is None:
                continue
            if self.revoked:
                raise _Fatal("revoked", "this device is no longer a member of the space")
            if isinstance(frame, F.Publish):
                await self._publish(frame)
            elif isinstance(frame, F.Subscribe):
                await self._subscribe(frame)
            elif isinstance(frame, F.PushMembership):
                await self._push_membership(frame)
            elif isinstance(frame, F.JoinReply):
                await self._join_reply(frame)
            elif isinstance(frame, F.PutChunk):
                await self._put_chunk(frame)
            elif isinstance(frame, F.GetChunk):
                await self._get_chunk(frame)
            elif isinstance(frame, F.ListChunks):
                await self._list_chunks(frame)
            elif isinstance(frame, F.DropChunks):
                await self._drop_chunks(frame)
            elif isinstance(frame, F.Truncate):
                await self._truncate(frame)
            elif isinstance(frame, F.Hint):
                await self._hint(frame)
            else:
                await self.error(
                    "unexpected_frame", f"{type(frame).__name__} is not valid after authentication"
                )

    async def cleanup(self) -> None:
        space = self.space
        if space is not None:
            space.conns.discard(self)
            space.presence_waiting.discard(self)
            space.announce_presence()
        tasks = list(self.tasks)
        if self.sub is not None and self.sub.task is not None:
            tasks.append(self.sub.task)
        await cancel_and_wait(*tasks)

    # -- authentication --------------------------------------------------------------------

    async def _authenticate(self, hello: F.Hello) -> None:
        server = self.server
        if hello.proto_version != F.PROTO_VERSION:
            raise _Fatal(
                "unsupported_version",
                f"relay speaks protocol {F.PROTO_VERSION}, not {hello.proto_version}",
            )
        nonce = os.urandom(32)
        await self.send(F.Challenge(nonce=nonce))
        auth = await self.recv_required()
        if not isinstance(auth, F.Auth):
            raise _Fatal(
                "unexpected_frame",
                f"expected Auth, got {type(auth).__name__}",
                CloseCode.PROTOCOL_ERROR,
            )
        try:
            verify(
                hello.sign_pk, auth.signature, F.auth_message(nonce, hello.space_id, hello.sign_pk)
            )
        except ProtocolError:
            raise _Fatal("bad_signature", "the challenge signature does not verify") from None
        space = await server._space_for_auth(hello.space_id, hello.sign_pk, auth.membership_log)
        head = await server.store.head_seq(space.space_id)
        # No await between the membership check and joining the space: a concurrent revocation
        # either happened before (we refuse) or will see us in space.conns (and revoke us).
        role = space.log.role_of(hello.sign_pk)
        if role is None:
            raise _Fatal("not_a_member", "this device is not a member of the space")
        self.space = space
        self.sign_pk = hello.sign_pk
        space.conns.add(self)
        await self.send(F.Welcome(head_seq=head, log=space.log_bytes))
        space.announce_presence(newcomer=self)  # reaches this connection too
        _ev(
            logging.INFO,
            "auth_ok",
            conn=self.cid,
            space=short(space.space_id),
            device=short(hello.sign_pk),
            role=role.value,
            peer=self.peer,
        )
        if role is Role.admin:
            for pj in list(space.joins.values()):
                self.post(F.JoinForward(request_id=pj.request_id, request=pj.request))

    # -- publish ---------------------------------------------------------------------------

    async def _own_sealed(self, blob: bytes, what: str) -> EnvelopeHeader | None:
        """The header of an envelope-shaped ``blob`` (an envelope, a prefetch hint) if this
        connection's device sealed it for this space and may write; else None, once the client
        has been told why (a revoked device is closed). ``what``: "publish", "send hints"."""
        space, me = self._authed()
        try:
            header = verify_envelope_signature(blob)
        except ProtocolError as exc:
            await self.error(exc.code, exc.message)
            return None
        if header.space_id != space.space_id:
            await self.error("wrong_space", f"cannot {what} for another space")
            return None
        if header.sender != me:
            await self.error("wrong_sender", f"a device may only {what} as itself")
            return None
        role = space.log.role_of(me)
        if role is None:
            raise _Fatal("revoked", "this device is no longer a member of the space")
        if role is Role.reader:
            await self.error("read_only", f"readers may not {what}")
            return None
        return header

    async def _publish(self, frame: F.Publish) -> None:
        space, me = self._authed()
        header = await self._own_sealed(frame.envelope, "publish")
        if header is None:
            return
        fut = self.server.store.submit_append(
            space.space_id,
            me,
            header.seq,
            frame.envelope,
            quota_bytes=self.server.config.space_quota_bytes,
            origin=self,
        )
        await self.inflight.put((header.seq, fut))

    async def _hint(self, frame: F.Hint) -> None:
        """Forward a prefetch hint (protocol/hints.py) to the space's other subscribed
        connections, as it came; never stored. Checked like a publish (structure, signature,
        space, sender, role) so a hint always comes from the member it names. Best effort: a
        connection whose mailbox is half full misses it (it fetches after the manifest),
        instead of being closed as too slow because of hints."""
        space, me = self._authed()
        if await self._own_sealed(frame.hint, "send hints") is None:
            return
        out = F.Hinted(frame.hint)
        for conn in list(space.conns):
            if conn.sub is None or conn.sign_pk == me or conn.mailbox.qsize() >= HINT_MAILBOX_MAX:
                continue
            conn.post(out)

    async def _ack_loop(self) -> None:
        while True:
            sender_seq, fut = await self.inflight.get()
            try:
                result = await fut
            except StoreError as exc:
                _ev(logging.ERROR, "store_error", conn=self.cid, error=str(exc))
                await self.send_error(
                    "store_unavailable", "relay storage failed; retry later", False
                )
                continue
            if result.status is AppendStatus.QUOTA_EXCEEDED:
                space = self.space
                _ev(
                    logging.INFO,
                    "quota_exceeded",
                    conn=self.cid,
                    space=short(space.space_id) if space else "?",
                )
                await self.send_error(
                    "quota_exceeded",
                    f"space quota of {self.server.config.space_quota_bytes} bytes reached; "
                    f"envelope seq {sender_seq} not stored",
                    False,
                )
                continue
            await self.send(
                F.Ack(
                    sender_seq=sender_seq,
                    relay_seq=result.relay_seq,
                    duplicate=result.status is AppendStatus.DUPLICATE,
                )
            )

    # -- blob channel (relay/blobs.py) ------------------------------------------------------

    async def _blob_writer(self, what: str) -> _Space | None:
        """The space, if this device may change its blobs; a reader gets a non-fatal error
        (None), a removed device a fatal one."""
        space, me = self._authed()
        role = space.log.role_of(me)
        if role is None:
            raise _Fatal("revoked", "this device is no longer a member of the space")
        if role is Role.reader:
            await self.error("read_only", f"readers may not {what}")
            return None
        return space

    async def _put_chunk(self, frame: F.PutChunk) -> None:
        space = await self._blob_writer("upload chunks")
        if space is None:
            return
        if self.blob_acker is None:
            self._spawn(self._blob_ack_loop(), "blob-ack")
            self.blob_acker = self.tasks[-1]
        blobs = self.server.blobs
        quota = self.server.config.blob_quota_bytes
        fut = await blobs.submit_put(space.space_id, frame.chunk_id, frame.data, quota)
        await self.blob_inflight.put((frame.chunk_id, len(frame.data), fut))

    async def _blob_ack_loop(self) -> None:
        metrics = self.server.metrics
        while True:
            chunk_id, size, fut = await self.blob_inflight.get()
            try:
                status = await fut
            except OSError as exc:
                _ev(logging.ERROR, "blob_store_error", conn=self.cid, error=str(exc))
                await self.send_error(
                    "store_unavailable", "relay storage failed; retry later", False
                )
                continue
            metrics.blob_put(status.value, size)
            if status is PutStatus.QUOTA_EXCEEDED:
                space = self.space
                _ev(
                    logging.INFO,
                    "blob_quota_exceeded",
                    conn=self.cid,
                    space=short(space.space_id) if space else "?",
                )
                await self.send_error(
                    "quota_exceeded",
                    f"blob quota of {self.server.config.blob_quota_bytes} bytes reached; "
                    f"chunk {chunk_id.hex()[:16]} not stored",
                    False,
                )
                continue
            await self.send(F.ChunkAck(chunk_id, stored=status is PutStatus.STORED))

    async def _get_chunk(self, frame: F.GetChunk) -> None:
        space, _me = self._authed()  # any member, readers included, may download
        if self.blob_sender is None:
            self._spawn(self._blob_send_loop(), "blob-send")
            self.blob_sender = self.tasks[-1]
        read = asyncio.create_task(
            self.server.blobs.get(space.space_id, frame.chunk_id, MAX_CHUNK_CIPHERTEXT)
        )
        try:
            # Full queue: the downloader asks faster than the socket drains; stop reading frames.
            await self.blob_reads.put((frame.chunk_id, read))
        except BaseException:
            read.cancel()
            raise

    async def _blob_send_loop(self) -> None:
        try:
            while True:
                chunk_id, read = await self.blob_reads.get()
                data = await read
                del read
                if data is None:
                    await self.send(F.ChunkMissing(chunk_id))
                else:
                    await self.send(F.ChunkData(chunk_id, data))
                del data
        finally:
            while not self.blob_reads.empty():
                self.blob_reads.get_nowait()[1].cancel()

    async def _list_chunks(self, frame: F.ListChunks) -> None:
        space, _me = self._authed()
        entries, more = await self.server.blobs.list_chunks(
            space.space_id, frame.after, F.MAX_CHUNK_LIST
        )
        await self.send(F.ChunkList(tuple(entries), more))

    async def _drop_chunks(self, frame: F.DropChunks) -> None:
        """A member device says no current manifest references these chunks (agent/blob_gc.py);
        each is deleted only if nobody uploaded it in the last ``min_age_s``."""
        space = await self._blob_writer("drop chunks")
        if space is None:
            return
        dropped, freed = await self.server.blobs.drop(
            space.space_id, list(frame.chunk_ids), frame.min_age_s
        )
        if dropped:
            _ev(
                logging.INFO,
                "blobs_dropped",
                conn=self.cid,
                space=short(space.space_id),
                chunks=dropped,
                bytes=freed,
            )
        await self.send(F.ChunksDropped(dropped, freed))

    # -- log compaction after snapshots ---------------------------------------------------

    async def _truncate(self, frame: F.Truncate) -> None:
        """An admin device says snapshots cover the log below ``before_seq``: drop it. Devices
        whose cursor is below are told (LogTruncated) and restore from the snapshot."""
        space, me = self._authed()
        if space.log.role_of(me) is not Role.admin:
            await self.error("not_admin", "only an admin device may truncate the log")
            return
        store = self.server.store
        head = await store.head_seq(space.space_id)
        before = min(frame.before_seq, head + 1)
        if before > await store.log_start(space.space_id):
            freed = await store.drop_before(space.space_id, before)
            _ev(
                logging.INFO,
                "log_truncated",
                conn=self.cid,
                space=short(space.space_id),
                before=before,
                freed=freed,
            )
        await self.send(F.Truncated(before_seq=await store.log_start(space.space_id)))

    # -- subscribe -------------------------------------------------------------------------

    async def _subscribe(self, frame: F.Subscribe) -> None:
        space, _me = self._authed()
        old = self.sub
        if old is not None:
            await cancel_and_wait(old.task)
        sub = _Subscription(self, space, frame.from_seq, self.server.config.subscriber_buffer_bytes)
        self.sub = sub  # registered for live delivery before reading the backlog
        sub.task = asyncio.create_task(self._run_sub(sub), name=f"relay-sub-{self.cid}")

    async def _run_sub(self, sub: _Subscription) -> None:
        try:
            await sub.run(self.server.store)
        except (ConnectionClosed, StoreError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("subscription failed conn=%d", self.cid)
            with contextlib.suppress(Exception):
                await self.ws.close(CloseCode.INTERNAL_ERROR, "internal error")

    # -- membership ------------------------------------------------------------------------

    async def _push_membership(self, frame: F.PushMembership) -> None:
        space, _me = self._authed()
        try:
            new = MembershipLog.from_bytes(frame.log, expected_space_id=space.space_id)
        except ProtocolError as exc:
            await self.error(exc.code, f"membership log refused: {exc.message}")
            return
        if not await self.server._apply_log(space, new, frame.log):
            await self.error(
                "bad_membership", "membership log does not extend the relay's log (fork or stale)"
            )

    # -- joins -----------------------------------------------------------------------------

    async def _join(self, req: F.JoinRequest) -> None:
        server = self.server
        cfg = server.config
        if len(req.request) > cfg.max_join_request_bytes:
            raise _Fatal("too_large", f"join request over {cfg.max_join_request_bytes} bytes")
        # The request is meant for the admins, but its outer structure is public: checking it here
        # keeps garbage away from admin devices and tells us which key the accepted log must add.
        try:
            body = parse_join_request(req.request)
        except ProtocolError as exc:
            raise _Fatal(exc.code, f"join request refused: {exc.message}") from None
        if body.space_id != req.space_id or body.invite_id != req.invite_id:
            raise _Fatal("malformed", "join request does not match its frame's space/invite")
        space = await server._load_space(req.space_id)
        if space is None:
            raise _Fatal("unknown_space", "this relay does not hold that space")
        if len(space.joins) >= cfg.max_pending_joins_per_space:
            raise _Fatal(
                "too_many_joins",
                "too many pending join requests for this space; retry later",
                CloseCode.TRY_AGAIN_LATER,
            )
        rid = next(server._join_ids)
        pj = _PendingJoin(
            rid,
            space,
            self,
            req.request,
            body.joiner.sign_pk,
            asyncio.get_running_loop().create_future(),
        )
        space.joins[rid] = pj
        admins = 0
        for conn in list(space.conns):
            if conn.sign_pk is not None and space.log.role_of(conn.sign_pk) is Role.admin:
                conn.post(F.JoinForward(request_id=rid, request=req.request))
                admins += 1
        _ev(
            logging.INFO,
            "join_pending",
            conn=self.cid,
            space=short(space.space_id),
            request=rid,
            admins_online=admins,
            peer=self.peer,
        )
        reader = asyncio.create_task(self._join_reader())
        try:
            waiters: list[asyncio.Future[Any]] = [pj.result, reader]
            done, _ = await asyncio.wait(
                waiters, timeout=cfg.join_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if reader in done:
                reader.result()  # re-raise ConnectionClosed / _Fatal
            if pj.result not in done:
                raise _Fatal(
                    "join_timeout",
                    "no admin answered the join request in time",
                    CloseCode.TRY_AGAIN_LATER,
                )
        finally:
            space.joins.pop(rid, None)
            await cancel_and_wait(reader)
        result = pj.result.result()
        await self.send(result)
        _ev(
            logging.INFO,
            "join_done",
            conn=self.cid,
            space=short(space.space_id),
            request=rid,
            ok=result.ok,
        )
        await self.ws.close(CloseCode.NORMAL_CLOSURE, "join done")

    async def _join_reader(self) -> None:
        """While a joiner waits, it may only wait: anything it sends is an error."""
        while True:
            frame = await self.recv_frame()
            if frame is not None:
                await self.error("join_pending", "wait for the JoinResult")

    async def _join_reply(self, frame: F.JoinReply) -> None:
        space, me = self._authed()
        if space.log.role_of(me) is not Role.admin:
            await self.error("forbidden", "only admins answer join requests")
            return
        pj = space.joins.get(frame.request_id)
        if pj is None or pj.result.done():
            await self.error(
                "unknown_request",
                "no such pending join request (answered or expired)",
                counts=False,
            )
            return
        if not frame.accepted:
            space.joins.pop(frame.request_id, None)
            pj.result.set_result(F.JoinResult(ok=False, reason=frame.reason, log=b""))
            return
        try:
            new = MembershipLog.from_bytes(frame.log, expected_space_id=space.space_id)
        except ProtocolError as exc:
            await self.error(exc.code, f"join log refused: {exc.message}")
            return
        if not new.is_extension_of(space.log):
            await self.error("bad_membership", "join log does not extend the relay's log")
            return
        if not new.is_member(pj.joiner_key):
            await self.error("bad_membership", "join log does not add the joiner")
            return
        if not await self.server._apply_log(space, new, frame.log):
            await self.error("bad_membership", "join log does not extend the relay's log")
            return
        if pj.result.done():  # the joiner vanished meanwhile
            return
        space.joins.pop(frame.request_id, None)
        pj.result.set_result(F.JoinResult(ok=True, reason=frame.reason, log=frame.log))

    # -- helpers ---------------------------------------------------------------------------

    def _authed(self) -> tuple[_Space, bytes]:
        assert self.space is not None and self.sign_pk is not None
        return self.space, self.sign_pk


# ---------------------------------------------------------------------------------- server


class RelayServer:
    """The relay, usable as ``async with RelayServer(config) as server: ... server.port``."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._store: RelayStore | None = None
        self._blobs: BlobStore | None = None
        self._server: Server | None = None
        self._spaces: dict[bytes, _Space] = {}
        self._spaces_lock = asyncio.Lock()
        self._conns: set[_Conn] = set()
        self._join_ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self.port: int = 0
        self.metrics = RelayMetrics()
        self.ops = OpsHttp(self)

    @property
    def store(self) -> RelayStore:
        if self._store is None:
            raise RuntimeError("relay not started")
        return self._store

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            raise RuntimeError("relay not started")
        return self._blobs

    @property
    def scheme(self) -> str:
        return "wss" if self.config.tls_cert else "ws"

    async def start(self) -> None:
        cfg = self.config
        ssl_ctx = build_ssl_context(cfg.tls_cert, cfg.tls_key)
        self._store = await RelayStore.open(cfg.data_dir, linger_s=cfg.commit_linger_s)
        self._store.add_commit_listener(self._on_commit)
        self._store.add_commit_listener(self.metrics.on_commit)
        try:
            self._blobs = await BlobStore.open(cfg.data_dir)
            self._server = await serve(
                self._handle,
                cfg.host,
                cfg.port,
                compression=None,
                max_size=F.MAX_FRAME,
                max_queue=16,
                ssl=ssl_ctx,
                open_timeout=cfg.handshake_timeout_s,
                ping_interval=cfg.ping_interval_s,
                ping_timeout=cfg.ping_timeout_s,
                close_timeout=5,
                logger=logging.getLogger("qmoi_sync.relay.ws"),
                server_header=None,
                process_request=self.ops.process_relay_port,
            )
            await self.ops.start()
        except BaseException:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            if self._blobs is not None:
                await self._blobs.close()
                self._blobs = None
            await self._store.close()
            raise
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else cfg.port
        _ev(logging.INFO, "listening", host=cfg.host, port=self.port, tls=ssl_ctx is not None)
        if self.ops.port is not None:
            _ev(logging.INFO, "metrics_listening", host=cfg.metrics_host, port=self.ops.port)

    async def close(self) -> None:
        """Close every connection (1001 going away), wait for handlers, close the store.

        Publishes already handed to the store are committed before it closes (its writer drains
        its queue); their Acks may not reach the devices any more, which resend them and get
        ``duplicate`` Acks. /healthz answers 503 from the start of the shutdown.
        """
        self.ops.stopping = True
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        await self.ops.close()
        for space in self._spaces.values():
            space.cancel_presence()
        for task in list(self._background):
            task.cancel()
        if self._blobs is not None:
            await self._blobs.close()
            self._blobs = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        _ev(logging.INFO, "stopped")

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections -----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Conn(self, ws)
        self.metrics.connection_opened()
        self._conns.add(conn)
        _ev(logging.DEBUG, "connected", conn=conn.cid, peer=conn.peer)
        try:
            await conn.run()
        except Exception:
            log.exception("connection handler failed conn=%d", conn.cid)
        finally:
            self._conns.discard(conn)
            await conn.cleanup()

    def _on_commit(self, space_id: bytes, envs: Sequence[StoredEnvelope]) -> None:
        space = self._spaces.get(space_id)
        if space is None:
            return
        for conn in space.conns:
            sub = conn.sub
            if sub is None:
                continue
            for env in envs:
                sub.offer(env)

    # -- spaces ----------------------------------------------------------------------------

    async def _load_space(self, space_id: bytes) -> _Space | None:
        space = self._spaces.get(space_id)
        if space is not None:
            return space
        async with self._spaces_lock:
            return await self._load_space_locked(space_id)

    async def _load_space_locked(self, space_id: bytes) -> _Space | None:
        space = self._spaces.get(space_id)
        if space is not None:
            return space
        rec = await self.store.get_space(space_id)
        if rec is None:
            return None
        try:
            mlog = MembershipLog.from_bytes(rec.log, expected_space_id=space_id)
        except ProtocolError:
            # Our own disk should not lie; refuse the space rather than trust it.
            log.error("stored membership log does not verify space=%s", short(space_id))
            return None
        space = _Space(space_id, mlog, rec.log)
        self._spaces[space_id] = space
        return space

    async def _space_for_auth(self, space_id: bytes, sign_pk: bytes, log_bytes: bytes) -> _Space:
        """The space a device authenticates into, registering it or extending its log."""
        offered: MembershipLog | None = None
        if log_bytes:
            try:
                offered = MembershipLog.from_bytes(log_bytes, expected_space_id=space_id)
            except ProtocolError as exc:
                raise _Fatal(exc.code, f"membership log refused: {exc.message}") from None
        async with self._spaces_lock:
            space = await self._load_space_locked(space_id)
            if space is None:
                if offered is None:
                    raise _Fatal("unknown_space", "unknown space and no membership log supplied")
                if not offered.is_member(sign_pk):
                    raise _Fatal("not_a_member", "this device is not in the supplied log")
                try:
                    await self.store.create_space(
                        space_id, log_bytes, max_spaces=self.config.max_spaces
                    )
                except SpaceLimitError:
                    raise _Fatal(
                        "too_many_spaces",
                        "this relay holds no more spaces",
                        CloseCode.TRY_AGAIN_LATER,
                    ) from None
                space = _Space(space_id, offered, log_bytes)
                self._spaces[space_id] = space
                _ev(
                    logging.INFO,
                    "space_registered",
                    space=short(space_id),
                    by=short(sign_pk),
                    members=len(offered.members()),
                )
                return space
        if offered is not None and offered.head_hash != space.log.head_hash:
            if offered.is_extension_of(space.log):
                await self._apply_log(space, offered, log_bytes)
            elif not space.log.is_extension_of(offered):
                _ev(
                    logging.WARNING, "membership_fork", space=short(space_id), device=short(sign_pk)
                )
        return space

    async def _apply_log(self, space: _Space, new: MembershipLog, new_bytes: bytes) -> bool:
        """Store an extension of a space's log, broadcast it, revoke removed devices.

        Returns False (and changes nothing) if ``new`` does not extend the current log, which can
        happen when another device extended it first.
        """
        async with space.lock:
            if new.head_hash == space.log.head_hash:
                return True
            if not new.is_extension_of(space.log):
                return False
            old = space.log
            await self.store.update_log(space.space_id, new_bytes)
            space.log = new
            space.log_bytes = new_bytes
            revoked = 0
            for conn in list(space.conns):
                assert conn.sign_pk is not None
                if new.is_member(conn.sign_pk):
                    conn.post(F.Membership(log=new_bytes))
                    became_admin = (
                        new.role_of(conn.sign_pk) is Role.admin
                        and old.role_of(conn.sign_pk) is not Role.admin
                    )
                    if became_admin:
                        for pj in list(space.joins.values()):
                            conn.post(F.JoinForward(request_id=pj.request_id, request=pj.request))
                else:
                    revoked += 1
                    space.conns.discard(conn)
                    conn.revoked = True
                    if conn.sub is not None and conn.sub.task is not None:
                        conn.sub.task.cancel()
                    conn.post(
                        F.Error(
                            code="revoked",
                            message="this device was removed from the space",
                            fatal=True,
                        ),
                        then_close=_Fatal("revoked", "removed from the space"),
                    )
            if revoked:
                space.announce_presence()
            _ev(
                logging.INFO,
                "membership_updated",
                space=short(space.space_id),
                ops=len(new),
                epoch=new.current_epoch,
                revoked=revoked,
            )
            return True


def _clip(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def _error_frame(code: str, message: str, fatal: bool) -> F.Error:
    return F.Error(code=_clip(code, F.MAX_CODE), message=_clip(message, F.MAX_REASON), fatal=fatal)


def build_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server TLS context from PEM paths, or None for plain ws://."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate and a key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def run_relay(
    config: RelayConfig,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the relay until ``stop`` is set.

    ``ready`` is called once with the actual bound port (so port 0 works). If ``stop`` is None the
    relay installs SIGTERM/SIGINT handlers and stops gracefully on either; if the caller passes its
    own ``stop`` event it owns signal handling.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, _on_signal, sig, stop)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    server = RelayServer(config)
    await server.start()
    try:
        if ready is not None:
            ready(server.port)
        await stop.wait()
    finally:
        _ev(logging.INFO, "shutting_down")
        await server.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    _ev(logging.INFO, "signal", name=sig.name)
    stop.set()
