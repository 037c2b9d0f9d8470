"""Blob garbage collection on the relay over real websockets: listing pages, age-checked drops,
roles, spaces kept apart, usage and restart."""

from __future__ import annotations

import os
import time

from relay_helpers import RelayFactory, Space, authed, url_of

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.membership import Role
from qmoi_sync.relay import RelayServer


def _age(relay: RelayServer, space: Space, cid: bytes, seconds: float) -> None:
    """Make a stored chunk look uploaded `seconds` ago (its file's mtime is its age)."""
    path = relay.blobs.path_of(space.space_id, cid)
    t = time.time() - seconds
    os.utime(path, (t, t))


async def test_list_pages_in_order_and_drop_only_old_unreferenced(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory()
    space = Space.create(1)
    a = await authed(url_of(relay), space, space.admin)
    chunks = {os.urandom(32): os.urandom(1000 + i) for i in range(F.MAX_CHUNK_LIST + 5)}
    for cid, data in chunks.items():
        await a.send(F.PutChunk(cid, data))
    for _ in chunks:
        await a.expect(F.ChunkAck)
    # two pages, ids ascending, nothing twice
    await a.send(F.ListChunks())
    first = await a.expect(F.ChunkList)
    assert first.more and len(first.entries) == F.MAX_CHUNK_LIST
    await a.send(F.ListChunks(first.entries[-1][0]))
    second = await a.expect(F.ChunkList)
    assert not second.more and len(second.entries) == 5
    ids = [cid for cid, _age_s in first.entries + second.entries]
    assert ids == sorted(chunks)
    assert all(age < 60 for _cid, age in first.entries)

    old, young = ids[:3], ids[3:5]
    for cid in old:
        _age(relay, space, cid, 3600)
    before = await relay.blobs.usage(space.space_id)
    await a.send(F.DropChunks(600, (*old, *young, os.urandom(32))))
    reply = await a.expect(F.ChunksDropped)
    # the young ones and the unknown id are kept/skipped; the relay checks age, not the caller
    assert reply.dropped == 3
    assert reply.freed_bytes == sum(len(chunks[c]) for c in old)
    assert await relay.blobs.usage(space.space_id) == before - reply.freed_bytes
    for cid in old:
        await a.send(F.GetChunk(cid))
        assert await a.expect(F.ChunkMissing) == F.ChunkMissing(cid)
    await a.send(F.GetChunk(young[0]))
    assert (await a.expect(F.ChunkData)).data == chunks[young[0]]
    await a.close()


async def test_a_put_of_a_present_chunk_makes_it_young_again(
    relay: RelayServer, relay_url: str
) -> None:
    space = Space.create(1)
    a = await authed(relay_url, space, space.admin)
    b = await authed(relay_url, space, space.members[0], log=False)
    cid, data = os.urandom(32), os.urandom(5000)
    await a.send(F.PutChunk(cid, data))
    await a.expect(F.ChunkAck)
    _age(relay, space, cid, 3600)
    # another device uploads the same chunk again (its own manifest will reference it)
    await b.send(F.PutChunk(cid, data))
    assert await b.expect(F.ChunkAck) == F.ChunkAck(cid, stored=False)
    await a.send(F.DropChunks(600, (cid,)))
    assert (await a.expect(F.ChunksDropped)).dropped == 0
    await b.send(F.GetChunk(cid))
    assert (await b.expect(F.ChunkData)).data == data
    await a.close()
    await b.close()


async def test_readers_may_list_not_drop_and_spaces_stay_apart(
    relay: RelayServer, relay_url: str
) -> None:
    space = Space.create(1, role=Role.reader)
    other = Space.create(0)
    admin = await authed(relay_url, space, space.admin)
    stranger = await authed(relay_url, other, other.admin)
    cid = os.urandom(32)
    await admin.send(F.PutChunk(cid, b"sealed bytes"))
    await admin.expect(F.ChunkAck)
    _age(relay, space, cid, 3600)
    reader = await authed(relay_url, space, space.members[0], log=False)
    await reader.send(F.ListChunks())
    assert [c for c, _a in (await reader.expect(F.ChunkList)).entries] == [cid]
    await reader.send(F.DropChunks(0, (cid,)))
    await reader.expect_error("read_only", fatal=False)
    # another space's admin neither sees nor drops this space's chunks
    await stranger.send(F.ListChunks())
    assert (await stranger.expect(F.ChunkList)).entries == ()
    await stranger.send(F.DropChunks(0, (cid,)))
    assert (await stranger.expect(F.ChunksDropped)).dropped == 0
    await admin.send(F.GetChunk(cid))
    assert (await admin.expect(F.ChunkData)).data == b"sealed bytes"
    for c in (admin, stranger, reader):
        await c.close()


async def test_usage_after_drop_survives_restart(relay_factory: RelayFactory) -> None:
    relay = await relay_factory()
    space = Space.create(0)
    a = await authed(url_of(relay), space, space.admin)
    keep, drop = (os.urandom(32), os.urandom(7000)), (os.urandom(32), os.urandom(9000))
    for cid, data in (keep, drop):
        await a.send(F.PutChunk(cid, data))
        await a.expect(F.ChunkAck)
    _age(relay, space, drop[0], 3600)
    await a.send(F.DropChunks(60, (drop[0],)))
    assert (await a.expect(F.ChunksDropped)).freed_bytes == 9000
    data_dir = relay.config.data_dir
    await a.close()
    await relay.close()
    again = await relay_factory(data_dir=data_dir)
    assert await again.blobs.usage(space.space_id) == 7000
