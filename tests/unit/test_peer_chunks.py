"""Chunks over a LAN peer connection, in process: the real PeerChunks on both ends of a real
websocket (loopback), real chunk crypto, and BinarySync's real fetch/verification over
transport-neutral sources.

The namespace suite (tests/lan) runs all of this between agents; what it cannot force is a
member peer that sends tampered data, a flood of requests, or data nobody asked for. Those are
driven here. The sources in the verification tests are in-process stand-ins for a transport
(a class with the RemoteChunks methods), since no real agent sends tampered chunks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from qmoi_sync.agent import peer_chunks
from qmoi_sync.agent.binary_sync import BinarySync, TamperedChunk
from qmoi_sync.agent.blob_transfer import BlobUnavailable
from qmoi_sync.agent.chunk_sources import Path as ChunkPath
from qmoi_sync.agent.peer_chunks import ChunkCounters, PeerChunks
from qmoi_sync.agent.peer_link import PeerConn
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.chunks import ChunkKeys, ChunkRef
from qmoi_sync.protocol.keys import derive_epoch_keys, new_epoch_secret, new_space_id

KEYS = ChunkKeys.for_epoch(1, derive_epoch_keys(new_space_id(), 1, new_epoch_secret()))
PLAIN = os.urandom(300_000)
CID = KEYS.chunk_id(PLAIN)
SEALED = KEYS.encrypt(CID, PLAIN)


@dataclass
class Pair:
    """Two PeerChunks joined by a real websocket; each end's reader feeds its frames in."""

    client: PeerChunks
    server: PeerChunks
    server_ws: list[ServerConnection] = field(default_factory=list)


async def _pump(ws: Any, chunks: PeerChunks) -> None:
    async for data in ws:
        frame = L.decode_peer_frame(data)
        if isinstance(frame, L.ChunkGet):
            chunks.on_get(frame)
        elif isinstance(frame, L.ChunkData | L.ChunkMissing):
            chunks.on_answer(frame)


def _conn(ws: Any, outbound: bool) -> PeerConn:
    return PeerConn(ws=ws, peer_pk=b"p" * 32, address="test", outbound=outbound, tag=b"t" * 16)


@pytest.fixture
async def pair_factory() -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(seal: peer_chunks.SealLocal | None) -> Pair:
        ready: asyncio.Future[PeerChunks] = asyncio.get_running_loop().create_future()

        async def handler(ws: ServerConnection) -> None:
            server = PeerChunks(_conn(ws, False), lambda: seal, ChunkCounters())
            ready.set_result(server)
            await _pump(ws, server)

        srv = await serve(handler, "127.0.0.1", 0, max_size=L.MAX_PEER_FRAME, close_timeout=1)
        port = srv.sockets[0].getsockname()[1]
        ws = await connect(f"ws://127.0.0.1:{port}/", max_size=L.MAX_PEER_FRAME, close_timeout=1)
        client = PeerChunks(_conn(ws, True), lambda: None, ChunkCounters())
        pump = asyncio.create_task(_pump(ws, client))
        server = await ready

        async def cleanup() -> None:
            client.close()
            server.close()
            pump.cancel()
            await ws.close()
            srv.close()
            await srv.wait_closed()

        cleanups.append(cleanup)
        return Pair(client, server)

    yield make
    for c in cleanups:
        await c()


async def _seal(epoch: int, chunk_id: bytes) -> bytes | None:
    return SEALED if (epoch, chunk_id) == (1, CID) else None


async def test_a_chunk_travels_sealed_and_opens_with_the_space_keys(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    p = await pair_factory(_seal)
    got = await p.client.get(1, CID)
    assert got == SEALED and KEYS.decrypt(CID, got) == PLAIN
    assert await p.client.get(1, b"x" * 32) is None  # the peer does not have it
    assert await p.client.get(2, CID) is None  # not under another epoch's keys
    assert p.server.counters.served == 1 and p.client.counters.received_bytes == len(SEALED)


async def test_unrequested_data_is_dropped_and_a_flood_is_not_queued(
    pair_factory: Callable[..., Awaitable[Pair]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()

    async def slow_seal(epoch: int, chunk_id: bytes) -> bytes | None:
        await gate.wait()
        return SEALED

    p = await pair_factory(slow_seal)
    # data nobody asked for: dropped, nothing counted, nothing kept
    p.client.on_answer(L.ChunkData(chunk_id=CID, data=SEALED))
    assert p.client.counters.received == 0 and p.client.inflight == 0
    # a peer asking far beyond any download window: the excess is dropped unanswered
    for i in range(peer_chunks.SERVE_QUEUE_MAX + 50):
        p.server.on_get(L.ChunkGet(epoch=1, chunk_id=i.to_bytes(32, "big")))
    assert p.server.dropped == 50
    assert len(p.server._tasks) == peer_chunks.SERVE_QUEUE_MAX
    serving = list(p.server._tasks)
    p.server.close()  # the session ends: serving stops, nothing is sent any more
    await asyncio.gather(*serving, return_exceptions=True)
    assert all(t.cancelled() for t in serving) and not p.server._tasks
    assert p.client.counters.received == 0


async def test_requests_fail_over_when_the_peer_goes_away(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    never = asyncio.Event()

    async def stuck(epoch: int, chunk_id: bytes) -> bytes | None:
        await never.wait()
        return None

    p = await pair_factory(stuck)
    waiting = asyncio.create_task(p.client.get(1, CID))
    await asyncio.sleep(0.05)
    p.client.close()  # the session ended
    with pytest.raises(BlobUnavailable):
        await waiting
    with pytest.raises(BlobUnavailable):
        await p.client.get(1, CID)


# -- verification, whatever the path ------------------------------------------------------------


@dataclass
class Source:
    """Stands in for one transport (RemoteChunks): hands out fixed bytes."""

    path: ChunkPath
    answer: bytes | None
    asked: int = 0
    refusals: list[bytes] = field(default_factory=list)

    def ready(self) -> bool:
        return True

    async def get(self, epoch: int, chunk_id: bytes) -> bytes | None:
        self.asked += 1
        return self.answer

    def refused(self, chunk_id: bytes) -> None:
        self.refusals.append(chunk_id)


@dataclass
class NoLocal:
    async def sources(self, chunk_id: bytes) -> list[Any]:
        return []

    async def forget_acked(self, ids: Any) -> None:
        return None


@dataclass
class Root:
    root: Path


def _binary(tmp_path: Path, *sources: Source) -> BinarySync:
    return BinarySync(Root(tmp_path), NoLocal(), None, remote=list(sources))  # type: ignore[arg-type]


async def test_a_tampered_lan_chunk_is_refused_and_fetched_from_the_relay(tmp_path: Path) -> None:
    bad = bytearray(SEALED)
    bad[100] ^= 1
    lan = Source("lan", bytes(bad))
    relay = Source("relay", SEALED)
    binary = _binary(tmp_path, lan, relay)
    assert await binary._fetch(KEYS, ChunkRef(CID, len(PLAIN))) == PLAIN
    assert lan.refusals == [CID] and binary.stats.chunks_refused == 1
    assert binary.stats.by_path == {"relay": [1, len(SEALED)]}


async def test_another_chunk_under_the_id_or_a_wrong_size_is_refused(tmp_path: Path) -> None:
    other = os.urandom(1000)
    swapped = KEYS.encrypt(CID, other)  # valid AEAD under CID's key, but not CID's content
    binary = _binary(tmp_path, Source("lan", swapped))
    with pytest.raises(TamperedChunk):
        await binary._fetch(KEYS, ChunkRef(CID, len(PLAIN)))
    binary = _binary(tmp_path, Source("lan", SEALED))
    with pytest.raises(TamperedChunk):
        await binary._fetch(KEYS, ChunkRef(CID, len(PLAIN) + 1))
    assert binary.stats.chunks_refused == 1


async def test_lan_first_relay_only_for_what_no_peer_has(tmp_path: Path) -> None:
    lan, relay = Source("lan", SEALED), Source("relay", SEALED)
    binary = _binary(tmp_path, lan, relay)
    assert await binary._fetch(KEYS, ChunkRef(CID, len(PLAIN))) == PLAIN
    assert (lan.asked, relay.asked) == (1, 0)
    lan.answer = None
    assert await binary._fetch(KEYS, ChunkRef(CID, len(PLAIN))) == PLAIN
    assert (lan.asked, relay.asked) == (2, 1)
    assert binary.stats.by_path == {"lan": [1, len(SEALED)], "relay": [1, len(SEALED)]}
    relay.answer = None
    with pytest.raises(BlobUnavailable):  # nobody has it yet: retried later
        await binary._fetch(KEYS, ChunkRef(CID, len(PLAIN)))
