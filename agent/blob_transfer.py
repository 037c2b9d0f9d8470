"""The blob channel of one space: a second websocket to the relay, for chunks only.

Envelopes (small text edits, index updates) keep their own connection (relay_link.py), so a
200 MiB upload never queues in front of a one-line edit. This link authenticates exactly like
the envelope link (signed challenge), then carries ``PutChunk``/``GetChunk`` requests, many in
flight at once; replies are matched by chunk id. It connects only while there is work and closes
after ``IDLE_S`` without any.

Errors: a ``quota_exceeded`` refusal fails the oldest outstanding upload (the relay answers
uploads in order) with :class:`BlobQuotaExceeded`; any other non-fatal relay error, or losing the
connection, fails every outstanding request with :class:`BlobUnavailable`. Callers retry with a
pause: uploads and downloads are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import websockets
from websockets.asyncio.client import ClientConnection, connect

from qmoi_sync.agent.rate import SpaceRates
from qmoi_sync.agent.relay_link import BACKOFF_MAX, BACKOFF_MIN, RelayRefused, recv_frame
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity

log = logging.getLogger("qmoi_sync.blob_transfer")

IDLE_S = 30.0
CONNECT_TIMEOUT_S = 10.0
#: An upload not acknowledged within this is failed (retried by the caller).
ACK_TIMEOUT_S = 120.0


class BlobError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class BlobUnavailable(BlobError):
    """Not connected, connection lost, or a transient relay error: retry later."""


class BlobQuotaExceeded(BlobError):
    """The relay's blob quota for the space is full."""


@dataclass
class BlobLinkState:
    connected: bool = False
    last_error: str | None = None
    quota_exceeded: bool = False
    sent_chunks: int = 0
    sent_bytes: int = 0
    received_chunks: int = 0
    received_bytes: int = 0


class BlobLink:
    def __init__(
        self,
        identity: DeviceIdentity,
        space_id: bytes,
        url: str,
        membership_log: Callable[[], bytes],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.identity = identity
        self.space_id = space_id
        self.url = url
        self.membership_log = membership_log
        self.ssl_context = ssl_context
        self.state = BlobLinkState()
        self._ws: ClientConnection | None = None
        self._up = asyncio.Event()  # set while a session is authenticated
        self._dead = asyncio.Event()  # set when a send found the connection gone
        self._demand = asyncio.Event()
        self._puts: dict[bytes, asyncio.Future[bool]] = {}
        self._put_order: deque[bytes] = deque()
        self._gets: dict[bytes, asyncio.Future[bytes | None]] = {}
        self._last_use = 0.0
        self._waiting = 0  # requests waiting for a connection
        self.paused = False
        self._rng = random.Random()
        # The space's transfer-rate counters (agent/rate.py), when status should count chunks.
        self.rates: SpaceRates | None = None

    # -- requests ----------------------------------------------------------------------------
    async def _session_ws(self, timeout: float) -> ClientConnection:
        if self.paused:
            raise BlobUnavailable("paused", "the space is paused")
        self._demand.set()
        self._last_use = asyncio.get_running_loop().time()
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            raise BlobUnavailable("offline", self.state.last_error or "relay unreachable") from None
        finally:
            self._waiting -= 1
        ws = self._ws
        if ws is None:
            raise BlobUnavailable("offline", "connection lost")
        return ws

    async def wait_up(self, timeout: float) -> bool:
        """Connect if needed and wait at most ``timeout`` for an authenticated session: whether
        the relay is reachable now (an upload may then publish for LAN peers instead)."""
        try:
            await self._session_ws(timeout)
        except BlobUnavailable:
            return False
        return True

    async def put(self, chunk_id: bytes, ciphertext: bytes, timeout: float = 60.0) -> bool:
        """Upload one chunk; returns once the relay holds it durably (True: stored now, False:
        it had it already). Raises BlobQuotaExceeded / BlobUnavailable / BlobError."""
        ws = await self._session_ws(timeout)
        fut = self._puts.get(chunk_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._puts[chunk_id] = fut
            self._put_order.append(chunk_id)
            await self._send(ws, F.PutChunk(chunk_id, ciphertext))
            self.state.sent_chunks += 1
            self.state.sent_bytes += len(ciphertext)
            if self.rates is not None:
                self.rates.up.add(len(ciphertext))
        # Sent (or already on its way): waiting for the ack must not keep the chunk in memory.
        del ciphertext
        try:
            async with asyncio.timeout(ACK_TIMEOUT_S):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise BlobUnavailable("timeout", "the relay did not acknowledge a chunk") from None

    async def get(self, chunk_id: bytes, timeout: float = 60.0) -> bytes | None:
        """Download one chunk's ciphertext; None if the relay does not have it."""
        ws = await self._session_ws(timeout)
        fut = self._gets.get(chunk_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._gets[chunk_id] = fut
            await self._send(ws, F.GetChunk(chunk_id))
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise BlobUnavailable("timeout", "no answer from the relay") from None

    async def _send(self, ws: ClientConnection, frame: F.Frame) -> None:
        try:
            await ws.send(F.encode_frame(frame))
        except websockets.ConnectionClosed as exc:
            # The write side saw the connection die; the read side may only notice at the next
            # keepalive (a half-closed socket): end the session now so it reconnects at once.
            self._up.clear()
            self._dead.set()
            with contextlib.suppress(Exception):
                ws.transport.abort()
            self._fail_all(BlobUnavailable("offline", f"connection lost: {exc}"))

    def _fail_all(self, exc: BlobError) -> None:
        for fut in [*self._puts.values(), *self._gets.values()]:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" noise for abandoned waits
        self._puts.clear()
        self._put_order.clear()
        self._gets.clear()

    # -- connection --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        delay = BACKOFF_MIN
        while not stop.is_set():
            self._demand.clear()
            if not (self._puts or self._gets or self._waiting):
                waiters = [
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(self._demand.wait()),
                ]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if stop.is_set():
                    break
            if self.paused:
                self._fail_all(BlobUnavailable("paused", "the space is paused"))
                await asyncio.sleep(0.5)
                continue
            try:
                await self._session(stop)
                delay = BACKOFF_MIN
                continue
            except RelayRefused as exc:
                self.state.last_error = str(exc)
                delay = BACKOFF_MAX
            except (OSError, websockets.WebSocketException, ProtocolError, TimeoutError) as exc:
                self.state.last_error = f"relay unreachable: {exc}"
                log.info("blob link for %s down: %s", self.space_id.hex()[:8], exc)
            finally:
                self.state.connected = False
                self._up.clear()
                self._ws = None
                self._fail_all(BlobUnavailable("offline", self.state.last_error or "disconnected"))
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._rng.uniform(BACKOFF_MIN, delay))
            delay = min(BACKOFF_MAX, delay * 2)

    async def _session(self, stop: asyncio.Event) -> None:
        async with connect(
            self.url,
            compression=None,
            max_size=F.MAX_FRAME,
            max_queue=32,
            ssl=self.ssl_context,
            open_timeout=CONNECT_TIMEOUT_S,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
            proxy=None,
        ) as ws:
            await self.handshake(ws)
            self._dead.clear()
            self._ws = ws
            self.state.connected = True
            self.state.last_error = None
            self._up.set()
            reader = asyncio.create_task(self._reader(ws))
            stopper = asyncio.create_task(stop.wait())
            dead = asyncio.create_task(self._dead.wait())
            try:
                loop = asyncio.get_running_loop()
                while not reader.done() and not stop.is_set():
                    idle = loop.time() - self._last_use
                    busy = bool(self._puts or self._gets)
                    if not busy and idle >= IDLE_S:
                        break
                    await asyncio.wait(
                        [reader, stopper, dead],
                        timeout=IDLE_S if busy else IDLE_S - idle + 0.01,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if dead.done():
                        raise ConnectionError("blob connection lost")
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
            finally:
                self._up.clear()
                self._ws = None
                await cancel_and_wait(reader, stopper, dead)

    async def handshake(self, ws: ClientConnection) -> None:
        """Authenticate ``ws`` for this space (also used by agent/blob_gc.py's own connection)."""
        me = self.identity.public.sign_pk
        await ws.send(F.encode_frame(F.Hello(self.space_id, me, F.PROTO_VERSION)))
        challenge = await self._recv(ws)
        if not isinstance(challenge, F.Challenge):
            raise ProtocolError("malformed", f"expected a challenge, got {challenge!r}")
        sig = self.identity.sign(F.auth_message(challenge.nonce, self.space_id, me))
        await ws.send(F.encode_frame(F.Auth(signature=sig, membership_log=self.membership_log())))
        welcome = await self._recv(ws)
        for _ in range(16):  # frames the relay may send around its Welcome (Presence, ...)
            if isinstance(welcome, F.Welcome):
                break
            welcome = await self._recv(ws)
        if not isinstance(welcome, F.Welcome):
            raise ProtocolError("malformed", f"expected welcome, got {type(welcome).__name__}")

    async def _recv(self, ws: ClientConnection) -> F.Frame:
        return await recv_frame(ws)

    async def _reader(self, ws: ClientConnection) -> None:
        async for data in ws:
            if isinstance(data, str):
                raise ProtocolError("malformed", "relay sent a text frame")
            frame = F.decode_frame(data)
            if isinstance(frame, F.ChunkAck):
                self.state.quota_exceeded = False
                fut = self._puts.pop(frame.chunk_id, None)
                with contextlib.suppress(ValueError):
                    self._put_order.remove(frame.chunk_id)
                if fut is not None and not fut.done():
                    fut.set_result(frame.stored)
            elif isinstance(frame, F.ChunkData | F.ChunkMissing):
                gfut = self._gets.pop(frame.chunk_id, None)
                if gfut is not None and not gfut.done():
                    if isinstance(frame, F.ChunkData):
                        self.state.received_chunks += 1
                        self.state.received_bytes += len(frame.data)
                        if self.rates is not None:
                            self.rates.down.add(len(frame.data))
                        gfut.set_result(frame.data)
                    else:
                        gfut.set_result(None)
            elif isinstance(frame, F.Error):
                self.state.last_error = f"{frame.code}: {frame.message}"
                if frame.fatal:
                    raise RelayRefused(frame.code, frame.message)
                if frame.code == "quota_exceeded":
                    self.state.quota_exceeded = True
                    while self._put_order:
                        cid = self._put_order.popleft()
                        pfut = self._puts.pop(cid, None)
                        if pfut is not None and not pfut.done():
                            pfut.set_exception(BlobQuotaExceeded(frame.code, frame.message))
                            pfut.exception()
                            break
                else:
                    log.warning("blob channel error: %s %s", frame.code, frame.message)
                    self._fail_all(BlobUnavailable(frame.code, frame.message))
