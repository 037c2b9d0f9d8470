"""Binary chunks over authenticated LAN peer connections: serving them and fetching them.

A peer session (agent/peer_sync.py) exists only after both devices proved a key of the space's
membership, and it is bound to that one space: a ``ChunkGet`` is answered only from this space's
files, and only while the requester is still a member (the session's reader checks membership
before every frame). The answer is the sealed chunk, exactly what the relay's blob channel would
carry, re-encrypted from the local plaintext after its keyed id was re-verified; the receiver
checks it like a chunk from the relay (agent/binary_sync.py), so a peer cannot pass anything off.

Bounded memory, both ways: a server reads and seals at most ``SERVE_CONCURRENCY`` chunks per peer
at a time and drops requests beyond ``SERVE_QUEUE_MAX`` waiting ones (the requester
times out and asks elsewhere); a requester has at most its download window in flight, and a
``ChunkData`` nobody asked for is dropped as soon as it is decoded (frames are capped at
``MAX_PEER_FRAME`` by the websocket, chunk data at ``MAX_CHUNK_CIPHERTEXT`` by the decoder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed

from qmoi_sync.agent.blob_transfer import BlobError, BlobUnavailable
from qmoi_sync.agent.chunk_sources import Path
from qmoi_sync.protocol import lan as L

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime
    from qmoi_sync.agent.peer_link import PeerConn

log = logging.getLogger("qmoi_sync.lan")

#: Chunks read and sealed at once for one peer.
SERVE_CONCURRENCY = 4
#: Requests of one peer waiting to be served; more are dropped unanswered.
SERVE_QUEUE_MAX = 64
#: A chunk asked of a peer and not answered within this long is asked elsewhere.
GET_TIMEOUT_S = 20.0
#: A chunk the peer does not take off the socket within this long ends the session.
SEND_TIMEOUT_S = 10.0
#: Remembered (chunk, peer) pairs whose data failed verification, and chunk senders.
_MEMORY_MAX = 4096

#: Reads one chunk from this device's files and seals it: (epoch, chunk id) -> ciphertext.
SealLocal = Callable[[int, bytes], Awaitable[bytes | None]]


@dataclass
class ChunkCounters:
    served: int = 0  # chunks sent to the peer(s)
    served_bytes: int = 0
    received: int = 0  # chunks received from the peer(s) (before verification)
    received_bytes: int = 0


class PeerChunks:
    """The chunk traffic of one peer session, both directions."""

    def __init__(
        self, conn: PeerConn, seal_local: Callable[[], SealLocal | None], space: ChunkCounters
    ) -> None:
        self.conn = conn
        self.seal_local = seal_local
        self.space = space  # the space's totals (LanStatus)
        self.counters = ChunkCounters()  # this peer's (MemberStatus)
        self._gets: dict[bytes, asyncio.Future[bytes | None]] = {}
        self._waiting = 0
        self._sem = asyncio.Semaphore(SERVE_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.dropped = 0  # requests beyond SERVE_QUEUE_MAX

    @property
    def inflight(self) -> int:
        return len(self._gets)

    # -- fetching --------------------------------------------------------------------------------
    async def get(self, epoch: int, chunk_id: bytes) -> bytes | None:
        """The sealed chunk from this peer, None if it does not have it. Raises BlobUnavailable
        when the session ends or the peer does not answer in time."""
        if self._closed:
            raise BlobUnavailable("offline", "the LAN peer is gone")
        fut = self._gets.get(chunk_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._gets[chunk_id] = fut
            try:
                await self.conn.send(L.ChunkGet(epoch=epoch, chunk_id=chunk_id))
            except (ConnectionClosed, OSError) as exc:
                self._gets.pop(chunk_id, None)
                raise BlobUnavailable("offline", f"LAN peer connection lost: {exc}") from None
        try:
            async with asyncio.timeout(GET_TIMEOUT_S):
                return await asyncio.shield(fut)
        except TimeoutError:
            if self._gets.get(chunk_id) is fut:
                del self._gets[chunk_id]
            raise BlobUnavailable("timeout", "no answer from the LAN peer") from None

    def on_answer(self, frame: L.ChunkData | L.ChunkMissing) -> None:
        fut = self._gets.pop(frame.chunk_id, None)
        if fut is None or fut.done():
            return  # not asked for (or given up on): dropped
        if isinstance(frame, L.ChunkData):
            for c in (self.counters, self.space):
                c.received += 1
                c.received_bytes += len(frame.data)
            fut.set_result(frame.data)
        else:
            fut.set_result(None)

    # -- serving ---------------------------------------------------------------------------------
    def on_get(self, frame: L.ChunkGet) -> None:
        """A request of the (authenticated member) peer: served in the background, so the
        session keeps reading its stream meanwhile."""
        if self._closed:
            return
        if self._waiting >= SERVE_QUEUE_MAX:
            # More than any download window asks for at once: dropped unanswered (a requester
            # times out and asks elsewhere), so a flood costs neither tasks nor memory.
            self.dropped += 1
            return
        self._waiting += 1
        task = asyncio.create_task(self._serve(frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, frame: L.ChunkGet) -> None:
        try:
            async with self._sem:
                answer: L.ChunkData | L.ChunkMissing = L.ChunkMissing(chunk_id=frame.chunk_id)
                seal = self.seal_local()
                sealed = await seal(frame.epoch, frame.chunk_id) if seal is not None else None
                if sealed is not None:
                    answer = L.ChunkData(chunk_id=frame.chunk_id, data=sealed)
                # Sent while holding the slot: at most SERVE_CONCURRENCY sealed chunks of this
                # peer wait in memory for the socket.
                await self._send(answer)
        finally:
            self._waiting -= 1

    async def _send(self, answer: L.ChunkData | L.ChunkMissing) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await self.conn.send(answer)
        except TimeoutError:
            # The peer stopped reading (a pulled cable): with the socket buffer full, websockets
            # cannot even send its keepalive ping, so nothing else would notice for minutes.
            log.info("LAN: peer %s stopped reading chunks; dropping it", self.conn.address)
            with contextlib.suppress(Exception):
                self.conn.ws.transport.abort()
            return
        except (ConnectionClosed, OSError):
            return
        if isinstance(answer, L.ChunkData):
            for c in (self.counters, self.space):
                c.served += 1
                c.served_bytes += len(answer.data)

    # -- end ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """The session ended: waiting requests go elsewhere, serving stops."""
        self._closed = True
        gone = BlobUnavailable("offline", "the LAN peer went away")
        for fut in self._gets.values():
            if not fut.done():
                fut.set_exception(gone)
                fut.exception()  # retrieved: no "never retrieved" noise
        self._gets.clear()
        for task in list(self._tasks):
            task.cancel()


class LanChunks:
    """The LAN peers of a space as one chunk source (agent/chunk_sources.RemoteChunks).

    A chunk is asked of the connected peers one after another (least busy first) until one has
    it; a peer whose data failed verification is not asked for that chunk again."""

    path: Path = "lan"

    def __init__(self, runtime: SpaceRuntime) -> None:
        self.rt = runtime
        self._sender: dict[bytes, bytes] = {}  # chunk id -> peer whose data is being verified
        self._bad: dict[bytes, set[bytes]] = {}  # chunk id -> peers that sent bad data

    def _peers(self) -> list[tuple[bytes, PeerChunks]]:
        space = self.rt.lan
        if space is None or not space.active:
            return []
        return [
            (pk, s.chunks)
            for pk, s in space.sessions.items()
            if s.ready and not s.done.is_set() and space.is_member(pk)
        ]

    def ready(self) -> bool:
        return bool(self._peers())

    def serves(self, sign_pk: bytes) -> bool:
        """Whether the device ``sign_pk`` is a LAN peer chunks can be fetched from now."""
        return any(pk == sign_pk for pk, _chunks in self._peers())

    async def get(self, epoch: int, chunk_id: bytes) -> bytes | None:
        tried: set[bytes] = set()
        failure: BlobError | None = None
        while True:
            bad = self._bad.get(chunk_id, set())
            peers = [(pk, p) for pk, p in self._peers() if pk not in tried and pk not in bad]
            if not peers:
                break
            pk, peer = min(peers, key=lambda item: item[1].inflight)
            tried.add(pk)
            try:
                sealed = await peer.get(epoch, chunk_id)
            except BlobError as exc:
                failure = exc
                continue
            if sealed is not None:
                if len(self._sender) >= _MEMORY_MAX:
                    self._sender.clear()
                self._sender[chunk_id] = pk
                return sealed
        if failure is not None:
            raise failure
        return None

    def refused(self, chunk_id: bytes) -> None:
        pk = self._sender.pop(chunk_id, None)
        if pk is None:
            return
        if len(self._bad) >= _MEMORY_MAX:
            self._bad.clear()
        self._bad.setdefault(chunk_id, set()).add(pk)
        log.warning("LAN: a peer sent chunk %s that failed verification", chunk_id.hex()[:16])
