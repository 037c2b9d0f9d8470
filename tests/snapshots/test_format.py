"""Unit tests of the snapshot format (agent/snapshot_format.py): pure, no bucket."""

from __future__ import annotations

import os

import pytest

from qmoi_sync.agent.snapshot_format import (
    BinRef,
    ChunkRef,
    DocRef,
    FileRef,
    IntegrityError,
    Manifest,
    ObjRef,
    SnapshotKeys,
    chunk_key,
    keys_by_epoch,
    manifest_key,
    open_chunk,
    open_manifest,
    open_object,
    padded_size,
    parse_manifest_key,
    seal_chunk,
    seal_manifest,
    seal_object,
)
from qmoi_sync.protocol.chunks import ChunkKeys
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import EpochKeys

SPACE = bytes(range(16))


def keys(epoch: int = 0, seed: bytes = b"k" * 32) -> SnapshotKeys:
    return SnapshotKeys.derive(seed, SPACE, epoch)


def test_padding_buckets_are_monotonic_and_bounded() -> None:
    assert padded_size(0) == padded_size(4096) == 4096
    prev = 0
    for n in [4097, 5000, 10_000, 65_537, 1 << 20, (1 << 20) + 1, 123_456_789]:
        p = padded_size(n)
        assert p >= n and p >= prev
        assert p - n <= n * 0.12 + 1
        prev = p
    # Few distinct sizes: 1000 lengths around 100 KB fall into a handful of buckets.
    assert len({padded_size(100_000 + i * 17) for i in range(1000)}) <= 12


def test_object_roundtrip_and_dedup() -> None:
    k = keys()
    name, body = seal_object(k, b"hello world")
    name2, body2 = seal_object(k, b"hello world")
    assert (name, body) == (name2, body2)  # deterministic: identical content stored once
    assert len(body) == 8 + 4096 + 16
    assert open_object(k, name, body) == b"hello world"
    assert seal_object(keys(seed=b"x" * 32), b"hello world")[0] != name


def test_object_tamper_truncate_swap() -> None:
    k = keys()
    name, body = seal_object(k, b"a" * 5000)
    _other, obody = seal_object(k, b"b" * 5000)
    bad = bytearray(body)
    bad[100] ^= 1
    with pytest.raises(IntegrityError) as e:
        open_object(k, name, bytes(bad))
    assert e.value.kind == "tampered"
    with pytest.raises(IntegrityError):
        open_object(k, name, body[:-10])
    with pytest.raises(IntegrityError):
        open_object(k, name, obody)  # another valid object under this name
    with pytest.raises(IntegrityError):
        open_object(keys(epoch=1), name, body)


def _manifest(seq: int = 3) -> Manifest:
    idx = DocRef(bytes(16), b"\x00", os.urandom(32), (ObjRef(os.urandom(32), 10),))
    doc = DocRef(
        os.urandom(16),
        b"\x01\x02",
        os.urandom(32),
        (ObjRef(os.urandom(32), 5), ObjRef(os.urandom(32), 2)),
    )
    return Manifest(
        space_id=SPACE,
        epoch=0,
        signer=b"",
        seq=seq,
        created_ms=1_700_000_000_000,
        index=idx,
        docs=[doc],
        files=[
            FileRef("a/b.txt", doc.doc_id, "text", 0o644, 7, os.urandom(32)),
            FileRef("c.bin", bytes(15) + b"\x07", "binary", 0o644, 12, bytes(32)),
        ],
        bins=[BinRef(bytes(15) + b"\x07", 0, bytes(32), (ChunkRef(os.urandom(32), 12),))],
        prev_seq=2,
        prev_hash=os.urandom(32),
        cursor=41,
        windows={os.urandom(32): b"\x01"},
        sender_seq=9,
    )


def test_manifest_roundtrip_sign_and_tamper() -> None:
    ident = DeviceIdentity.generate()
    k = keys()
    m = _manifest()
    body = seal_manifest(ident, k, m)
    got = open_manifest(body, SPACE, lambda e: k if e == 0 else None)
    assert got.signer == ident.public.sign_pk
    assert got.seq == 3 and got.cursor == 41 and got.files == m.files and got.docs == m.docs
    assert got.index == m.index and got.prev_hash == m.prev_hash and got.windows == m.windows
    assert got.bins == m.bins and got.chunk_sizes() == {m.bins[0].chunks[0].chunk_id: 12}
    assert b"a/b.txt" not in body
    for pos in (10, len(body) // 2, len(body) - 3):
        bad = bytearray(body)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            open_manifest(bytes(bad), SPACE, lambda e: k)
    with pytest.raises(IntegrityError) as e:
        open_manifest(body, SPACE, lambda e: None)
    assert e.value.kind == "unknown_epoch"
    with pytest.raises(IntegrityError):
        open_manifest(body, bytes(16), lambda e: k)
    with pytest.raises(IntegrityError):
        open_manifest(body[:-1], SPACE, lambda e: k)


def test_manifest_keys_parse() -> None:
    key = manifest_key("pre/", 42, "0123abcd")
    assert key == "pre/m/000000000042-0123abcd"
    assert parse_manifest_key("pre/", key) == (42, "0123abcd")
    assert parse_manifest_key("pre/", "pre/o/abc") is None
    assert parse_manifest_key("pre/", "pre/m/42-0123abcd") is None


def test_keys_by_epoch() -> None:
    f = keys_by_epoch({0: b"a" * 32}, SPACE)
    assert f(1) is None
    k0 = f(0)
    assert k0 is not None and f(0) is k0


def _chunk_keys(seed: bytes = b"c") -> ChunkKeys:
    return ChunkKeys.for_epoch(0, EpochKeys(*(seed * 32 for _ in range(5))))


def test_chunk_object_roundtrip_pad_tamper_truncate_swap() -> None:
    ck = _chunk_keys()
    data, other = os.urandom(100_000), os.urandom(100_000)
    ref = ChunkRef(ck.chunk_id(data), len(data))
    oref = ChunkRef(ck.chunk_id(other), len(other))
    body = seal_chunk(ck.encrypt(ref.chunk_id, data))
    assert len(body) == padded_size(len(data) + 16)  # sizes leak only the padding bucket
    assert body == seal_chunk(ck.encrypt(ref.chunk_id, data))  # deterministic: stored once
    assert open_chunk(ck, ref, body) == data
    assert chunk_key("p/", ref.chunk_id) == f"p/c/{ref.chunk_id.hex()}"
    bad = bytearray(body)
    bad[500] ^= 1
    cases = {
        "flipped": bytes(bad),
        "truncated": body[:-100],
        "padding": body[:-1] + b"\x01",
        "swapped": seal_chunk(ck.encrypt(oref.chunk_id, other)),
        "other key": seal_chunk(_chunk_keys(b"d").encrypt(ref.chunk_id, data)),
    }
    for what, b in cases.items():
        with pytest.raises(IntegrityError) as e:
            open_chunk(ck, ref, b)
        assert e.value.kind == "tampered", what
    with pytest.raises(IntegrityError):  # the size the manifest records is checked too
        open_chunk(ck, ChunkRef(ref.chunk_id, len(data) - 1), body)
