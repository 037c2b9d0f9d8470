"""protocol/chunks.py and the blob-channel frames: cut points, ids, encryption, manifests."""

from __future__ import annotations

import os
import random

import pytest

from qmoi_sync.protocol.chunks import (
    MAX_CHUNK,
    MAX_CHUNK_CIPHERTEXT,
    MIN_CHUNK,
    ChunkKeys,
    ChunkRef,
    Manifest,
)
from qmoi_sync.protocol.errors import DecryptError, MalformedError, ProtocolError, TooLargeError
from qmoi_sync.protocol.frames import (
    ChunkAck,
    ChunkData,
    ChunkMissing,
    GetChunk,
    PutChunk,
    decode_frame,
    encode_frame,
)
from qmoi_sync.protocol.keys import derive_epoch_keys

SPACE = bytes(range(16))


def keys(epoch: int = 0, secret: bytes = b"s" * 32) -> ChunkKeys:
    return ChunkKeys.for_epoch(epoch, derive_epoch_keys(SPACE, epoch, secret))


def split(k: ChunkKeys, data: bytes) -> list[bytes]:
    out, p, mv = [], 0, memoryview(data)
    while p < len(data):
        buf = mv[p : p + MAX_CHUNK]
        n = k.cut(buf, p + len(buf) >= len(data))
        out.append(data[p : p + n])
        p += n
    return out


def rnd(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def test_cut_sizes_and_determinism() -> None:
    k = keys()
    data = rnd(24 << 20)
    parts = split(k, data)
    assert b"".join(parts) == data
    assert all(MIN_CHUNK <= len(p) <= MAX_CHUNK for p in parts[:-1])
    assert split(keys(), data) == parts  # same key, same cuts
    # the cut only depends on bytes since the previous boundary, not on how much is buffered
    assert k.cut(data[: 3 * MAX_CHUNK], False) == k.cut(data[:MAX_CHUNK], False)


def test_cut_needs_lookahead_unless_eof() -> None:
    with pytest.raises(ValueError):
        keys().cut(b"x" * (MAX_CHUNK - 1), False)
    assert keys().cut(b"x" * 10, True) == 10
    assert keys().cut(bytes(5 * MAX_CHUNK), False) == MAX_CHUNK  # no anchor in zeros


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("overwrite", lambda d, m: d[:m] + bytes([d[m] ^ 1]) + d[m + 1 :]),
        ("insert 1 byte", lambda d, m: d[:m] + b"x" + d[m:]),
        ("delete 5 KiB", lambda d, m: d[:m] + d[m + 5000 :]),
        ("insert 100 KB", lambda d, m: d[:m] + rnd(100_000, 7) + d[m:]),
    ],
)
def test_local_edit_changes_few_chunks(name: str, edit: object) -> None:
    k = keys()
    data = rnd(32 << 20, 3)
    before = {k.chunk_id(p) for p in split(k, data)}
    after = [k.chunk_id(p) for p in split(k, edit(data, len(data) // 2))]  # type: ignore[operator]
    assert len(set(after) - before) <= 3, name


def test_keyed_ids_and_cuts_differ_per_key_and_epoch() -> None:
    a, b, a1 = keys(0), keys(0, b"t" * 32), keys(1)
    data = rnd(8 << 20)
    assert a.chunk_id(data[:100]) != b.chunk_id(data[:100]) != a1.chunk_id(data[:100])
    assert [len(p) for p in split(a, data)] != [len(p) for p in split(b, data)]


def test_encrypt_roundtrip_and_tamper() -> None:
    k = keys()
    data = rnd(100_000)
    cid = k.chunk_id(data)
    ct = k.encrypt(cid, data)
    assert ct == k.encrypt(cid, data)  # deterministic: identical chunks dedup
    assert data not in ct and len(ct) == len(data) + 16
    assert k.decrypt(cid, ct) == data
    bad = bytearray(ct)
    bad[500] ^= 1
    with pytest.raises(DecryptError):
        k.decrypt(cid, bytes(bad))
    with pytest.raises(DecryptError):  # another chunk's ciphertext under this id
        other = rnd(10, 9)
        k.decrypt(cid, k.encrypt(k.chunk_id(other), other))
    with pytest.raises(DecryptError):  # a member encrypting other content under an id
        k.decrypt(cid, k.encrypt(cid, b"forged"))
    with pytest.raises(DecryptError):
        keys(1).decrypt(cid, ct)
    with pytest.raises(TooLargeError):
        k.encrypt(cid, bytes(MAX_CHUNK + 1))
    with pytest.raises(DecryptError):
        k.decrypt(cid, b"short")


def test_manifest_json_roundtrip_and_validation() -> None:
    k = keys(3)
    parts = [b"a" * 10, b"b" * 20]
    m = Manifest.build(k, [ChunkRef(k.chunk_id(p), len(p)) for p in parts])
    assert m.size == 30 and m.epoch == 3 and m.verify(k) and not m.verify(keys(0))
    again = Manifest.from_json(m.to_json())
    assert again == m
    obj = m.to_json()
    for broken in (
        {**obj, "v": 2},
        {**obj, "s": 9},
        {**obj, "size": 31},
        {**obj, "hash": "zz"},
        {**obj, "chunks": [["00" * 32, 0]]},
        {**obj, "chunks": [["00" * 31, 30]]},
        {**obj, "chunks": "x"},
        {**obj, "e": -1},
        {**obj, "size": True},
    ):
        with pytest.raises(ProtocolError):
            Manifest.from_json(broken)
    forged = Manifest.from_json({**obj, "chunks": [obj["chunks"][1], obj["chunks"][0]]})
    assert not forged.verify(k)
    empty = Manifest.build(k, [])
    assert Manifest.from_json(empty.to_json()).size == 0


def test_chunk_frames_roundtrip_and_limits() -> None:
    cid = os.urandom(32)
    for frame in (
        PutChunk(cid, b"x" * 100),
        GetChunk(cid),
        ChunkAck(cid, stored=False),
        ChunkData(cid, b"y" * MAX_CHUNK_CIPHERTEXT),
        ChunkMissing(cid),
    ):
        assert decode_frame(encode_frame(frame)) == frame
    with pytest.raises(MalformedError):
        encode_frame(GetChunk(b"short"))
    with pytest.raises(TooLargeError):
        encode_frame(PutChunk(cid, bytes(MAX_CHUNK_CIPHERTEXT + 1)))
    raw = bytearray(encode_frame(PutChunk(cid, b"abc")))
    raw[33:37] = (MAX_CHUNK_CIPHERTEXT + 1).to_bytes(4, "big")
    with pytest.raises(TooLargeError):
        decode_frame(bytes(raw))
    with pytest.raises(MalformedError):
        decode_frame(encode_frame(GetChunk(cid)) + b"\x00")
