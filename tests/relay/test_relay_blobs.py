"""The relay's blob channel over real websockets: PutChunk/GetChunk, durability, quota, roles."""

from __future__ import annotations

import os

from relay_helpers import Client, RelayFactory, Space, authed, url_of

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.membership import Role
from qmoi_sync.relay import RelayServer


async def test_put_get_present_missing(relay: RelayServer, relay_url: str) -> None:
    space = Space.create(1)
    a = await authed(relay_url, space, space.admin)
    b = await authed(relay_url, space, space.members[0], log=False)
    cid, data = os.urandom(32), os.urandom(300_000)
    await a.send(F.PutChunk(cid, data))
    ack = await a.expect(F.ChunkAck)
    assert ack == F.ChunkAck(cid, stored=True)
    # the same chunk again (e.g. from another device): present, not stored twice
    await b.send(F.PutChunk(cid, data))
    assert await b.expect(F.ChunkAck) == F.ChunkAck(cid, stored=False)
    assert await relay.blobs.usage(space.space_id) == len(data)
    await b.send(F.GetChunk(cid))
    got = await b.expect(F.ChunkData)
    assert got.chunk_id == cid and got.data == data
    other = os.urandom(32)
    await b.send(F.GetChunk(other))
    assert await b.expect(F.ChunkMissing) == F.ChunkMissing(other)
    # stored as a file named by its id, holding exactly the uploaded bytes
    assert relay.blobs.path_of(space.space_id, cid).read_bytes() == data
    await a.close()
    await b.close()


async def test_pipelined_puts_acked_in_order_and_survive_restart(
    relay_factory: RelayFactory, tmp_path: object
) -> None:
    relay = await relay_factory()
    space = Space.create(0)
    c = await authed(url_of(relay), space, space.admin)
    chunks = [(os.urandom(32), os.urandom(50_000 + i)) for i in range(40)]
    for cid, data in chunks:
        await c.send(F.PutChunk(cid, data))
    acks = [await c.expect(F.ChunkAck) for _ in chunks]
    assert [a.chunk_id for a in acks] == [cid for cid, _ in chunks]
    data_dir = relay.config.data_dir
    await c.close()
    await relay.close()
    again = await relay_factory(data_dir=data_dir)
    assert await again.blobs.usage(space.space_id) == sum(len(d) for _c, d in chunks)
    c2 = await authed(url_of(again), space, space.admin)
    await c2.send(F.GetChunk(chunks[7][0]))
    assert (await c2.expect(F.ChunkData)).data == chunks[7][1]
    await c2.close()


async def test_pipelined_gets_each_answered_once(relay: RelayServer, relay_url: str) -> None:
    """Many downloads in flight (more than the relay reads ahead), present and missing mixed:
    every request gets exactly its own answer (the relay reads ahead while it sends)."""
    space = Space.create(0)
    c = await authed(relay_url, space, space.admin)
    chunks = {os.urandom(32): os.urandom(70_000 + i) for i in range(12)}
    for cid, data in chunks.items():
        await c.send(F.PutChunk(cid, data))
    for _ in chunks:
        await c.expect(F.ChunkAck)
    missing = [os.urandom(32) for _ in range(6)]
    asked = [*chunks, *missing, *chunks]  # 30 requests, the present ones twice
    for cid in asked:
        await c.send(F.GetChunk(cid))
    got: dict[bytes, list[bytes | None]] = {}
    for _ in asked:
        frame = await c.recv()
        assert isinstance(frame, F.ChunkData | F.ChunkMissing), frame
        got.setdefault(frame.chunk_id, []).append(
            frame.data if isinstance(frame, F.ChunkData) else None
        )
    assert {cid: got[cid] for cid in chunks} == {cid: [d, d] for cid, d in chunks.items()}
    assert {cid: got[cid] for cid in missing} == {cid: [None] for cid in missing}
    await c.close()


async def test_quota_exceeded_then_room(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(blob_quota_bytes=250_000)
    space = Space.create(0)
    c = await authed(url_of(relay), space, space.admin)
    first, second = (os.urandom(32), os.urandom(200_000)), (os.urandom(32), os.urandom(100_000))
    await c.send(F.PutChunk(*first))
    await c.expect(F.ChunkAck)
    await c.send(F.PutChunk(*second))
    err = await c.expect_error("quota_exceeded", fatal=False)
    assert second[0].hex()[:16] in err.message
    # already-stored chunks are still acknowledged (present) when the quota is full
    await c.send(F.PutChunk(*first))
    assert await c.expect(F.ChunkAck) == F.ChunkAck(first[0], stored=False)
    relay.config.blob_quota_bytes = 1_000_000  # the operator makes room
    await c.send(F.PutChunk(*second))
    assert await c.expect(F.ChunkAck) == F.ChunkAck(second[0], stored=True)
    assert relay.metrics.blob_puts["quota_exceeded"] == 1
    await c.close()


async def test_reader_may_download_not_upload(relay: RelayServer, relay_url: str) -> None:
    space = Space.create(1, role=Role.reader)
    admin = await authed(relay_url, space, space.admin)
    cid, data = os.urandom(32), b"ciphertext" * 10
    await admin.send(F.PutChunk(cid, data))
    await admin.expect(F.ChunkAck)
    reader = await authed(relay_url, space, space.members[0], log=False)
    await reader.send(F.PutChunk(os.urandom(32), b"x"))
    await reader.expect_error("read_only", fatal=False)
    await reader.send(F.GetChunk(cid))
    assert (await reader.expect(F.ChunkData)).data == data
    await admin.close()
    await reader.close()


async def test_chunks_are_per_space(relay_url: str) -> None:
    s1, s2 = Space.create(0), Space.create(0)
    c1 = await authed(relay_url, s1, s1.admin)
    c2 = await authed(relay_url, s2, s2.admin)
    cid = os.urandom(32)
    await c1.send(F.PutChunk(cid, b"one"))
    await c1.expect(F.ChunkAck)
    await c2.send(F.GetChunk(cid))
    assert await c2.expect(F.ChunkMissing) == F.ChunkMissing(cid)
    await c1.close()
    await c2.close()


async def test_chunk_before_auth_is_refused(relay_url: str) -> None:
    c = await Client.connect(relay_url)
    await c.send(F.GetChunk(os.urandom(32)))
    await c.expect_error("unexpected_frame", fatal=True)
    await c.wait_closed()


async def test_hints_forwarded_to_subscribers_never_stored(
    relay: RelayServer, relay_url: str
) -> None:
    """A prefetch hint (protocol/hints.py) goes to the space's other *subscribed* connections
    as it came, is not stored (a later subscriber gets nothing), and is refused when it is not
    the sender's own or comes from a reader."""
    space = Space.create(1)
    reader = space.add(role=Role.reader)
    a = await authed(relay_url, space, space.admin)
    b = await authed(relay_url, space, space.members[0], log=False)
    blob_only = await authed(relay_url, space, space.members[0], log=False)  # no Subscribe
    await b.send(F.Subscribe(0))
    await b.expect(F.CaughtUp)
    await a.send(F.Subscribe(0))
    await a.expect(F.CaughtUp)
    hint = space.envelope(space.admin, seq=1_700_000_000_000_000, plaintext=b"sealed hint")
    await a.send(F.Hint(hint))
    assert await b.expect(F.Hinted) == F.Hinted(hint)
    # forwarded, not stored: the log is empty for a new subscriber, nothing came back to a
    assert await relay.store.head_seq(space.space_id) == 0
    # someone else's hint, or one for another space: refused (not forwarded)
    await b.send(F.Hint(hint))
    await b.expect_error("wrong_sender", fatal=False)
    r = await authed(relay_url, space, reader, log=False)
    await r.send(F.Hint(space.envelope(reader, seq=5)))
    await r.expect_error("read_only", fatal=False)
    await a.send(F.Hint(b"\x01\x01 truncated envelope"))
    await a.expect_error("malformed", fatal=False)
    # a's connection still works, and b got nothing but the one hint
    await a.send(F.Hint(hint))
    assert await b.expect(F.Hinted) == F.Hinted(hint)
    # neither the sender nor an unsubscribed (blob-only) connection got a Hinted: the next
    # frame each receives is the answer to a request made now
    for c in (a, blob_only):
        await c.send(F.GetChunk(bytes(32)))
        assert await c.recv() == F.ChunkMissing(bytes(32))
    for c in (a, b, blob_only, r):
        await c.close()
