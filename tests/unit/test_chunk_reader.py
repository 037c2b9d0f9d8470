"""agent/chunker.py: the buffered reader cuts exactly where the reference definition does, and
the producer thread yields the same chunks (ids, sizes, ciphertexts) and always lets go of its fd.

Real files in tmp_path; no mocks."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from qmoi_sync.agent.chunker import READ_BUFFER, ChunkProducer, ChunkReader, pwrite_all
from qmoi_sync.protocol.chunks import MAX_CHUNK, ChunkKeys
from qmoi_sync.protocol.keys import derive_epoch_keys

KEYS = ChunkKeys.for_epoch(0, derive_epoch_keys(bytes(16), 0, b"k" * 32))


def reference_chunks(data: bytes) -> list[bytes]:
    """The cut definition applied to the whole file in memory."""
    out = []
    pos = 0
    while pos < len(data):
        window = data[pos : pos + MAX_CHUNK]
        n = KEYS.cut(window, eof=pos + MAX_CHUNK >= len(data))
        out.append(data[pos : pos + n])
        pos += n
    return out


def sample(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    # random data with a run of zeros (no anchor: cut at MAX_CHUNK) in the middle
    zeros = size // 4
    return rng.randbytes(size // 2) + bytes(zeros) + rng.randbytes(size - size // 2 - zeros)


SIZES = [
    0,
    1,
    MAX_CHUNK - 1,
    MAX_CHUNK,
    MAX_CHUNK + 1,
    READ_BUFFER,
    READ_BUFFER + 7,
    6 * MAX_CHUNK + 5,
]


@pytest.mark.parametrize("size", SIZES)
def test_reader_cuts_like_the_reference(tmp_path: Path, size: int) -> None:
    data = sample(size, size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = ChunkReader(fd, KEYS)
        got = []
        offsets = []
        while (item := reader.next()) is not None:
            offsets.append(item[0])
            got.append(item[1])
    finally:
        os.close(fd)
    want = reference_chunks(data)
    assert got == want
    assert offsets == [sum(len(c) for c in want[:i]) for i in range(len(want))]


async def _produce(fd: int, seal: bool) -> tuple[list[tuple[bytes, int, bytes | None]], int]:
    producer = ChunkProducer(fd, KEYS, seal=seal, depth=2)
    out = []
    try:
        producer.start()
        while items := await producer.batch(3):
            out.extend((i.chunk_id, i.size, i.ciphertext) for i in items)
    finally:
        await producer.close()
    assert producer.final_stat is not None
    return out, producer.final_stat.st_size


@pytest.mark.parametrize("seal", [True, False])
def test_producer_identifies_and_seals_every_chunk(tmp_path: Path, seal: bool) -> None:
    data = sample(9 * MAX_CHUNK + 12345, 7)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    got, size = asyncio.run(_produce(fd, seal))
    assert size == len(data)
    want = reference_chunks(data)
    assert [(cid, n) for cid, n, _ct in got] == [(KEYS.chunk_id(c), len(c)) for c in want]
    for (cid, _n, ct), plain in zip(got, want, strict=True):
        if seal:
            assert ct is not None and KEYS.decrypt(cid, ct) == plain
        else:
            assert ct is None
    with pytest.raises(OSError):
        os.fstat(fd)  # the producer closed the fd it was given


def test_producer_stopped_early_releases_its_fd(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(sample(8 * MAX_CHUNK, 3))
    fd = os.open(path, os.O_RDONLY)

    async def one_then_stop() -> int:
        producer = ChunkProducer(fd, KEYS, seal=True, depth=1)
        producer.start()
        try:
            return len(await producer.batch(1))
        finally:
            await producer.close()

    assert asyncio.run(one_then_stop()) == 1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_producer_read_error_reaches_the_consumer(tmp_path: Path) -> None:
    # A directory fd: preadv fails with EISDIR in the thread; the consumer sees that error.
    fd = os.open(tmp_path, os.O_RDONLY)
    with pytest.raises(IsADirectoryError):
        asyncio.run(_produce(fd, True))


def test_producer_leaves_acknowledged_chunks_unsealed(tmp_path: Path) -> None:
    data = sample(5 * MAX_CHUNK, 5)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    chunks = reference_chunks(data)
    skip = frozenset(KEYS.chunk_id(c) for c in chunks[1:3])

    async def run() -> list[tuple[bytes, bytes | None]]:
        producer = ChunkProducer(os.open(path, os.O_RDONLY), KEYS, seal=True, skip_seal=skip)
        out = []
        try:
            producer.start()
            while items := await producer.batch(4):
                out.extend((i.chunk_id, i.ciphertext) for i in items)
        finally:
            await producer.close()
        return out

    got = asyncio.run(run())
    assert [cid for cid, _ct in got] == [KEYS.chunk_id(c) for c in chunks]
    assert [ct is None for _cid, ct in got] == [KEYS.chunk_id(c) in skip for c in chunks]


def test_pwrite_all_lands_chunks_in_any_order(tmp_path: Path) -> None:
    parts = [bytes([i]) * (100_000 + i) for i in range(5)]
    offsets = [sum(len(p) for p in parts[:i]) for i in range(5)]
    fd = os.open(tmp_path / "dl", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in (3, 0, 4, 2, 1):
            pwrite_all(fd, parts[i], offsets[i])
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "dl").read_bytes() == b"".join(parts)
