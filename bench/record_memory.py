"""Memory and speed of the agent's per-file records (`agent/store.py` FileRecord) at N files:
the packed record against the frozen slots dataclass it replaced ("old", a copy below), made
as the agent makes them, before/after in one run.

    python bench/record_memory.py [--files 100000] [--rounds 3]

Every measurement runs in a fresh interpreter (RSS is per process), old and new alternated
round by round so that machine load hits both alike; the load average is printed with the
numbers (medians, min-max). Measured per variant:

- ``bytes_each``: what one record holds that nothing else shares (sys.getsizeof of the record
  and of each of its bytes/ints; the path string is the dict key's), as tracemalloc counts it
  plus GC headers.
- ``scan``: records made one file at a time from a fresh stat and fid/hash (space.py
  ``_record``): ``scan_traced_mb`` what tracemalloc sees kept (records + dict + paths; a
  separate process, tracemalloc costs memory itself), ``scan_rss_mb`` the RSS growth.
- ``load``: a restart, records read back from a real agent database (``Store.files``; old:
  the former query-everything-then-build code): RSS growth and peak growth (VmHWM), seconds.
- ``rescan_s``: a rescan-like pass: for each record a real ``os.stat`` (of one of 1,000 real
  files), compared with the record's size/mtime/inode as ``_ingest_local`` does, and its fid
  read (the entry lookup); ``attrs_s``: the three stat attributes read one by one (callers
  that do not use ``stat_key``).
- ``envelope_pass_ms``: finding the records of an applied envelope's documents among the N
  (``SpaceSync._apply_items``; old: the two passes it made before).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmoi_sync.agent.store import FileRecord, Store, records_by_fid


@dataclass(frozen=True, slots=True)
class DataclassRecord:
    """FileRecord as it was before it was packed (the "old" variant)."""

    path: str
    fid: bytes
    hash: bytes
    size: int
    mtime_ns: int
    inode: int


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _input(i: int) -> tuple[str, bytes, bytes, int, int, int]:
    """What the agent has when it makes a record: a fresh fid and hash, fresh stat ints (an
    mtime of ~1.76e18 ns and a ~7-digit inode, as ext4 gives)."""
    path = f"notes/d{i // 1000:03d}/file-{i:06d}.txt"
    fid = hashlib.blake2b(path.encode(), digest_size=16).digest()
    digest = hashlib.blake2b(fid, digest_size=16).digest()
    return (
        path,
        fid,
        digest,
        1000 + i % 97,
        1_764_000_000_000_000_000 + i * 1_000_003,
        2_000_000 + i,
    )


def _own_bytes(r: Any) -> int:
    if isinstance(r, FileRecord):
        return sys.getsizeof(r) + sys.getsizeof(r._packed)
    parts = (r.fid, r.hash, r.size, r.mtime_ns, r.inode)
    return sys.getsizeof(r) + sum(
        sys.getsizeof(v) for v in parts if not (isinstance(v, int) and -5 <= v <= 256)
    )


def _scan(cls: Any, n: int) -> dict[str, Any]:
    recs = {}
    for i in range(n):
        path, fid, digest, size, mtime_ns, inode = _input(i)
        recs[path] = cls(path, fid, digest, size, mtime_ns, inode)
    return recs


def measure_scan(variant: str, n: int, traced: bool) -> dict[str, Any]:
    cls: Any = FileRecord if variant == "new" else DataclassRecord
    if traced:
        tracemalloc.start()
        recs = _scan(cls, n)
        kept = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {"scan_traced_mb": kept / 1e6}
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    recs = _scan(cls, n)
    build_s = time.perf_counter() - t0
    rss = _status("VmRSS") - rss0
    out: dict[str, Any] = {
        "bytes_each": sum(_own_bytes(r) for r in recs.values()) / n,
        "scan_rss_mb": rss / 1e6,
        "scan_build_s": build_s,
    }
    with tempfile.TemporaryDirectory() as tmp:
        real = []
        for k in range(1000):
            p = os.path.join(tmp, f"f{k}")
            with open(p, "wb") as f:
                f.write(b"x" * (k % 50))
            real.append(p)
        stats = [os.stat(p) for p in real]
        # the records of this pass hold what the disk has (the unchanged case, the usual one)
        keyed = {
            path: cls(path, r.fid, r.hash, st.st_size, st.st_mtime_ns, st.st_ino)
            for (path, r), st in zip(recs.items(), stats * (n // 1000 + 1), strict=False)
        }
        paths = list(keyed)
        t0 = time.perf_counter()
        same = 0
        for i, path in enumerate(paths):
            rec = keyed[path]
            s = os.stat(real[i % 1000])
            st = (s.st_size, s.st_mtime_ns, s.st_ino)
            if variant == "new":
                same += st == rec.stat_key() and len(rec.fid.hex()) == 32
            else:
                same += st == (rec.size, rec.mtime_ns, rec.inode) and len(rec.fid.hex()) == 32
        out["rescan_s"] = time.perf_counter() - t0
        assert same == n, same
        t0 = time.perf_counter()
        for path in paths:
            rec = keyed[path]
            same -= (rec.size, rec.mtime_ns, rec.inode) is not None
        out["attrs_s"] = time.perf_counter() - t0
        assert same == 0
    # What an applied envelope costs at N tracked files: finding the records of its documents
    # (old: a table of every fid for absorbing unsaved edits, then a set of every fid for the
    # in-flight bases; new: one records_by_fid pass shared by both).
    wanted = [bytes(16), next(iter(recs.values())).fid]
    t0 = time.perf_counter()
    for _ in range(10):
        if variant == "new":
            found = records_by_fid(recs.values(), wanted)
        else:
            table = {r.fid: r for r in recs.values()}
            found = {f: table[f] for f in wanted if f in table}
            fids = {r.fid for r in recs.values()}
            assert wanted[1] in fids
        assert len(found) == 1
    out["envelope_pass_ms"] = (time.perf_counter() - t0) / 10 * 1000
    return out


async def _old_files(store: Store, space_id: str) -> dict[str, DataclassRecord]:
    """Store.files as it was: every row at once, then the records (sharing the rows' values)."""
    async with store.db.execute(
        "SELECT path, fid, hash, size, mtime_ns, inode FROM files WHERE space_id=?", (space_id,)
    ) as cur:
        rows = await cur.fetchall()
    return {r[0]: DataclassRecord(r[0], bytes(r[1]), bytes(r[2]), r[3], r[4], r[5]) for r in rows}


async def _load(variant: str, db: Path) -> dict[str, Any]:
    store = await Store.open(db)
    try:
        rss0 = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        recs: Any = await (store.files("s") if variant == "new" else _old_files(store, "s"))
        load_s = time.perf_counter() - t0
        return {
            "load_rss_mb": (_status("VmRSS") - rss0) / 1e6,
            "load_peak_mb": (_status("VmHWM") - rss0) / 1e6,
            "load_s": load_s,
            "loaded": len(recs),
        }
    finally:
        await store.close()


async def _make_db(db: Path, n: int) -> None:
    store = await Store.open(db)
    try:
        async with store.transaction():
            await store.put_files("s", (FileRecord(*_input(i)) for i in range(n)))
    finally:
        await store.close()


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "VARIANT", "DB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, variant, db = args.child
        if what == "load":
            res = asyncio.run(_load(variant, Path(db)))
        else:
            res = measure_scan(variant, args.files, traced=what == "traced")
        print(json.dumps(res))
        return
    n = str(args.files)
    load0 = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "state.db"
        asyncio.run(_make_db(db, args.files))
        for _ in range(args.rounds):
            for variant in ("old", "new"):
                res: dict[str, Any] = {}
                for what in ("scan", "traced", "load"):
                    res.update(_child(["--files", n, "--child", what, variant, str(db)]))
                assert res["loaded"] == args.files
                runs[variant].append(res)
    load1 = os.getloadavg()
    print(f"{args.files} records, {args.rounds} rounds alternated, load average")
    before, after = (" ".join(f"{x:.2f}" for x in la) for la in (load0, load1))
    print(f"  before {before}  after {after}")
    for key in runs["old"][0]:
        if key == "loaded":
            continue
        row = []
        for variant in ("old", "new"):
            vals = [r[key] for r in runs[variant]]
            row.append(
                f"{variant} {statistics.median(vals):8.3f} ({min(vals):.3f}-{max(vals):.3f})"
            )
        print(f"  {key:15s} " + "   ".join(row))


if __name__ == "__main__":
    main()
