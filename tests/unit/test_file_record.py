"""FileRecord is stored packed (the path plus one bytes value) to save memory at 100,000 files;
it must still behave exactly like the frozen dataclass it replaced: every value the kernel can
report round-trips (pre-1970 and post-2262 mtimes, inodes >= 2^63, the largest file size),
equality and hash are the field-wise ones, values that cannot be a stat are refused with a
clear error, and the store keeps and reloads every such record (SQLite's INTEGER is signed
64-bit, so an inode >= 2^63 or an mtime past 2262 used to fail the batch's transaction).

A real agent folder is used where the kernel can produce the value (an mtime set with utime);
inodes >= 2^63 cannot be made on a test machine's file system, so those are given directly."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import time
from pathlib import Path

import pytest
from local_space import make_sync

from qmoi_sync.agent import store as store_mod
from qmoi_sync.agent.chunk_store import ChunkStore
from qmoi_sync.agent.index import FID_BYTES
from qmoi_sync.agent.store import FileRecord, Store
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog

NS = 1_000_000_000
I64_MIN, I64_MAX, U64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
# st_mtime_ns is time_t seconds * 10^9 + nanoseconds: far beyond 64 bits either way.
MTIME_MIN, MTIME_MAX = I64_MIN * NS, I64_MAX * NS + NS - 1


@dataclasses.dataclass(frozen=True, slots=True)
class Reference:
    """The dataclass FileRecord used to be: the semantics to match."""

    path: str
    fid: bytes
    hash: bytes
    size: int
    mtime_ns: int
    inode: int


FID = bytes(range(16))
SIZES = [0, 1, 255, 256, 1 << 31, I64_MAX, -1, I64_MIN]
MTIMES = [
    0,
    1,
    -1,  # 1969-12-31T23:59:59.999999999
    -NS,
    -NS + 1,
    NS - 1,
    1_700_000_000_123_456_789,
    -2_208_988_800_000_000_001,  # 1899, one ns before a whole second
    I64_MAX,
    I64_MAX + 1,  # the first mtime SQLite cannot hold as an integer (2262)
    I64_MIN,
    I64_MIN - 1,
    MTIME_MAX,
    MTIME_MIN,
]
INODES = [0, 1, 2, 1 << 32, I64_MAX, I64_MAX + 1, U64_MAX]
HASHES = [b"", bytes(16), b"\x01" * 16, b"\xff" * 32, bytes(range(64))]


def fields(r: FileRecord | Reference) -> tuple[str, bytes, bytes, int, int, int]:
    return r.path, r.fid, r.hash, r.size, r.mtime_ns, r.inode


def cases() -> list[tuple[str, bytes, bytes, int, int, int]]:
    out = [("a.txt", FID, HASHES[1], s, 0, 1) for s in SIZES]
    out += [("dir/b.bin", b"\xff" * 16, HASHES[3], 7, m, 2) for m in MTIMES]
    out += [("c", bytes(16), HASHES[2], 0, 5, i) for i in INODES]
    out += [("d/é 🙂", FID, h, 9, 9, 9) for h in HASHES]
    out.append(("", FID, b"", I64_MAX, MTIME_MAX, U64_MAX))
    out.append(("\udcff-undecodable", FID, b"", I64_MIN, MTIME_MIN, 0))
    return out


@pytest.mark.parametrize("values", cases())
def test_every_stat_value_round_trips(values: tuple[str, bytes, bytes, int, int, int]) -> None:
    rec = FileRecord(*values)
    ref = Reference(*values)
    assert fields(rec) == values
    assert rec.stat_key() == values[3:]
    assert repr(rec) == repr(ref).replace("Reference(", "FileRecord(")
    assert hash(rec) == hash(ref)
    assert pickle.loads(pickle.dumps(rec)) == rec
    assert copy.copy(rec) == rec and copy.deepcopy(rec) == rec
    moved = rec.with_path("elsewhere/x")
    assert fields(moved) == ("elsewhere/x", *values[1:])
    assert moved == FileRecord("elsewhere/x", *values[1:])


def test_equality_and_hash_are_field_wise() -> None:
    base = ("p", FID, bytes(16), 10, 1_700_000_000_000_000_001, 42)
    variants = [base]
    for i, other in enumerate(["q", b"\x01" * 16, b"\x02" * 16, 11, 1_700_000_000_000_000_002, 43]):
        changed = list(base)
        changed[i] = other
        variants.append(tuple(changed))  # type: ignore[arg-type]
    # hashes differing only in length, and a hash that is a prefix of another
    variants += [(*base[:2], bytes(32), *base[3:]), (*base[:2], bytes(15), *base[3:])]
    # seconds/nanoseconds neighbours of a whole second (the split must be canonical)
    variants += [(*base[:4], m, base[5]) for m in (-NS, -NS + 1, -NS - 1, -1, 0)]
    for a in variants:
        for b in variants:
            ra, rb = FileRecord(*a), FileRecord(*b)  # type: ignore[arg-type]
            fa, fb = Reference(*a), Reference(*b)  # type: ignore[arg-type]
            assert (ra == rb) == (fa == fb) == (a == b), (a, b)
            assert (ra != rb) == (fa != fb)
            if ra == rb:
                assert hash(ra) == hash(rb)
    rec = FileRecord(*base)
    assert rec != Reference(*base)  # like a dataclass: another class is never equal
    assert rec != base
    assert len({FileRecord(*base), FileRecord(*base), FileRecord("q", *base[1:])}) == 2


def test_frozen() -> None:
    rec = FileRecord("p", FID, bytes(16), 1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.path = "q"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del rec.path  # type: ignore[misc]
    assert fields(rec) == ("p", FID, bytes(16), 1, 2, 3)


@pytest.mark.parametrize(
    ("values", "error", "words"),
    [
        (("p", bytes(15), b"", 0, 0, 0), ValueError, "fid must be 16 bytes, not 15"),
        (("p", bytes(17), b"", 0, 0, 0), ValueError, "fid must be 16 bytes, not 17"),
        (("p", FID, b"", I64_MAX + 1, 0, 0), ValueError, "cannot be a file's stat"),
        (("p", FID, b"", I64_MIN - 1, 0, 0), ValueError, "cannot be a file's stat"),
        (("p", FID, b"", 0, MTIME_MAX + 1, 0), ValueError, "cannot be a file's stat"),
        (("p", FID, b"", 0, MTIME_MIN - 1, 0), ValueError, "cannot be a file's stat"),
        (("p", FID, b"", 0, 0, -1), ValueError, "cannot be a file's stat"),
        (("p", FID, b"", 0, 0, U64_MAX + 1), ValueError, "cannot be a file's stat"),
        (("p", FID, b"", 1.5, 0, 0), ValueError, "size=1.5"),
        (("p", FID, b"", 0, 1.5, 0), TypeError, "mtime_ns must be an int"),
        (("p", FID, "not bytes", 0, 0, 0), TypeError, "hash 'not bytes'"),
        (("p", "x" * 16, b"", 0, 0, 0), ValueError, "cannot be a file's stat"),
    ],
)
def test_values_no_stat_can_have_are_refused(
    values: tuple[str, bytes, bytes, int, int, int], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words) as info:
        FileRecord(*values)
    assert "'p'" in str(info.value)  # the error names the file


async def test_store_keeps_records_sqlite_integers_cannot_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite text cannot hold a lone surrogate; the agent never tracks such a name
    recs = [FileRecord(*v) for v in cases() if v[0].isprintable() or v[0] == ""]
    by_path = {r.path: r for r in recs}  # the last record of each path
    store = await Store.open(tmp_path / "state.db")
    try:
        async with store.transaction():
            await store.put_files("s", recs[:-3])
            for r in recs[-3:]:
                await store.put_file("s", r)
        # read page by page: one row a page, a last page partly full, exactly full, one page
        for page in (1, 4, len(by_path), len(by_path) + 1):
            monkeypatch.setattr(store_mod, "_FILE_ROWS_PER_PAGE", page)
            assert await store.files("s") == by_path
            assert await store.files("another space") == {}
        assert len(by_path) % 4
        # the usual values stay plain SQLite integers (the blob form is only for the rest)
        async with store.db.execute(
            "SELECT typeof(size), typeof(mtime_ns), typeof(inode) FROM files WHERE path='a.txt'"
        ) as cur:
            assert await cur.fetchall() == [("integer", "integer", "integer")]
    finally:
        await store.close()
    reopened = await Store.open(tmp_path / "state.db")
    try:
        assert await reopened.files("s") == by_path
    finally:
        await reopened.close()


def test_fid_width_is_the_index_fid_width() -> None:
    assert FileRecord("p", bytes(FID_BYTES), b"", 0, 0, 0).fid == bytes(FID_BYTES)


@pytest.mark.parametrize(
    "when",
    [
        10_413_792_000 * NS + 123_456_789,  # 2300-01-01T00:00:00.123456789Z
        -2_208_988_800 * NS + 5,  # 1900-01-01, before the epoch
    ],
    ids=["after-2262", "before-1970"],
)
async def test_agent_tracks_a_file_dated_outside_64_bit_ns_or_before_1970_across_a_restart(
    store: Store, tmp_path: Path, when: int
) -> None:
    """A file whose mtime does not fit in 64 bits of nanoseconds (touch -d 2300-01-01: any
    file system with 64-bit seconds allows it), or is before 1970 (old archives), is tracked
    with that mtime in the index too, and the agent's state reloads. Before the store wrote
    such values as blobs, the rescan failed with SQLite's OverflowError; before the index took
    negative mtimes, a pre-1970 file failed it with "bad mtime"."""
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "future.txt").write_text("from the future\n")
    os.utime(folder / "future.txt", ns=(when, when))
    st = os.stat(folder / "future.txt")  # what this file system kept of it
    sync = await make_sync(store, folder, me, log)
    await sync.rescan()
    assert sync.files["future.txt"].stat_key() == (st.st_size, st.st_mtime_ns, st.st_ino)
    (entry,) = [e for e in sync.index.entries().values() if e.path == "future.txt"]
    assert entry.mtime_ns == st.st_mtime_ns
    before = dict(sync.files)
    sent = await store.outbox_count(sync.space_id)
    again = await make_sync(store, folder, me, log)  # the agent restarted
    assert again.files == before
    await again.rescan()  # nothing changed on disk: the same records, nothing new to send
    assert again.files == before
    assert await store.outbox_count(sync.space_id) == sent


@pytest.mark.parametrize("mtime", [MTIME_MAX, MTIME_MIN, I64_MAX + 1, -5, 0])
async def test_chunk_index_keeps_a_binary_file_dated_beyond_64_bit_ns(
    store: Store, mtime: int
) -> None:
    """The chunk index (where a binary file's chunks can be read locally) records the file's
    mtime in SQLite too: a binary file dated after 2262 used to fail its ingest there."""
    chunks = ChunkStore(store, "s" * 32)
    await chunks.ensure_schema()
    await chunks.set_file_chunks("far.bin", 10, mtime, [(b"\x01" * 32, 4), (b"\x02" * 32, 6)])
    (src,) = await chunks.sources(b"\x02" * 32)
    assert (src.path, src.offset, src.length, src.file_size, src.mtime_ns) == (
        "far.bin",
        4,
        6,
        10,
        mtime,
    )
