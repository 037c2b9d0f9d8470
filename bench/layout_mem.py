"""LayoutCache memory and speed at N files, this tree against another revision's layout.py.

    python bench/layout_mem.py [--files 100000] [--rounds 2] [--baseline main]

Each measurement runs in a fresh child process (a heap that already grew would hide what the
next variant allocates), baseline and current alternated within one invocation, so the ratio
holds on a loaded machine even when the absolute times do not. Per variant and names
(``plain``, ``fold_case``: the same in a case-insensitive folder, ``Caps``):

* ``kept_mb``: what the cache still holds (tracemalloc) after ``full`` over N text files in
  folders of 1,000 (the bench ``scale`` layout: ``d000/f000.txt``; ``Caps``: ``D000/F000.txt``
  in a case-insensitive folder, where no name is spelled as its own fold);
* ``peak_mb``: tracemalloc's peak during ``full`` (its transient on top of the entries);
* ``updates_kept_mb``: what the update batch added (its new entries included);
* ``again_peak_mb``: the peak of a second ``full`` after the updates above what was held;
* ``rss_mb``: VmRSS growth over ``full`` (no tracemalloc);
* ``full_s`` / ``updates_s``: one ``full`` and the update batch (no tracemalloc): new files,
  renames within and across folders, deletes, none near a conflict (so no full fallback).

The entries themselves are built before measuring: they belong to the index, not the cache.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

from qmoi_sync.agent.index import FileEntry

REPO = Path(__file__).resolve().parent.parent
T0 = 1_764_000_000.0
DEV = "AAAAAAA"
EDITS = {DEV: 1}
PER_DIR = 1000
UPDATES = 2000  # update calls per run, 3 changed entries each


def _entry(fid: int, path: str | None) -> FileEntry:
    return FileEntry(
        fid=f"{fid:032x}",
        path=path,
        kind="text",
        mode=0o644,
        created_ts=T0 + fid,
        created_dev=DEV,
        edits=EDITS,
        alive=path is not None,
    )


def _load(path: Path) -> ModuleType:
    # Loaded inside the real package so its relative imports (``.index``) resolve.
    spec = importlib.util.spec_from_file_location("qmoi_sync.agent._layout_measured", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _path(i: int, caps: bool) -> str:
    return (
        f"D{i // PER_DIR:03d}/F{i % PER_DIR:03d}.txt"
        if caps
        else f"d{i // PER_DIR:03d}/f{i % PER_DIR:03d}.txt"
    )


def _updates(entries: dict[str, FileEntry], n: int, cache: Any) -> None:
    """``UPDATES`` batches: a new file in a new folder, a rename (every 2nd within its folder,
    else to another folder), a delete; each applied to ``entries`` then to the cache."""
    nxt = n
    for i in range(UPDATES):
        new = _entry(nxt, f"new{i // 100:03d}/n{i:05d}.txt")
        nxt += 1
        old = entries[f"{(2 * i * 7919) % n:032x}"]  # even fids move, odd ones go
        where = f"d{i % 50:03d}" if i % 2 else (old.path or "").rsplit("/", 1)[0]
        moved = _entry(int(old.fid, 16), f"{where}/r{i:05d}.txt")
        gone = _entry((2 * i * 104729 + 1) % n, None)
        for e in (new, moved, gone):
            entries[e.fid] = e
        if cache.update(entries, [new.fid, moved.fid, gone.fid]) is None:
            raise RuntimeError(f"update {i} fell back to a full layout")


def child(layout_py: Path, n: int, names: str, mode: str) -> dict[str, Any]:
    mod = _load(layout_py)
    fold_case = names != "plain"
    entries = {e.fid: e for e in (_entry(i, _path(i, names == "Caps")) for i in range(n))}
    gc.collect()
    cache = mod.LayoutCache(fold_case=fold_case)
    out: dict[str, Any] = {}
    if mode == "mem":
        tracemalloc.start()
        cache.full(entries)
        gc.collect()
        cur, peak = tracemalloc.get_traced_memory()
        out["kept_mb"] = round(cur / 1e6, 2)
        out["peak_mb"] = round(peak / 1e6, 2)
        _updates(entries, n, cache)  # (its new entries are counted too: ~1.5 MB)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        out["updates_kept_mb"] = round((held - cur) / 1e6, 2)
        tracemalloc.reset_peak()
        cache.full(entries)  # again, as after a change near a conflict copy
        out["again_peak_mb"] = round((tracemalloc.get_traced_memory()[1] - held) / 1e6, 2)
        tracemalloc.stop()
    else:
        rss0 = _rss_kb()
        t = time.perf_counter()
        cache.full(entries)
        out["full_s"] = round(time.perf_counter() - t, 3)
        gc.collect()
        out["rss_mb"] = round((_rss_kb() - rss0) / 1024, 1)
        t = time.perf_counter()
        _updates(entries, n, cache)
        out["updates_s"] = round(time.perf_counter() - t, 3)
        want = mod.compute_layout(entries, fold_case=fold_case)
        if dict(cache.paths) != dict(want.paths) or dict(cache.by_fid) != dict(want.by_fid):
            raise RuntimeError("the cache no longer equals compute_layout")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="main", help="git revision of agent/layout.py")
    ap.add_argument("--child", nargs=4, metavar=("LAYOUT_PY", "N", "NAMES", "MODE"))
    args = ap.parse_args()
    if args.child:
        path, n, names, mode = args.child
        print(json.dumps(child(Path(path), int(n), names, mode)))
        return
    old = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{args.baseline}:agent/layout.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "layout_baseline.py"
        base.write_text(old)
        variants = {args.baseline: base, "this tree": REPO / "agent" / "layout.py"}
        print(f"{args.files} files, load average {os.getloadavg()}")
        for r in range(args.rounds):
            for names in ("plain", "fold_case", "Caps"):  # (the last two fold case)
                for name, path in variants.items():
                    got: dict[str, Any] = {}
                    for mode in ("mem", "time"):
                        cmd = [sys.executable, __file__, "--child", str(path),
                               str(args.files), names, mode]  # fmt: skip
                        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                        got.update(json.loads(res.stdout))
                    print(f"round {r} {names:>9} {name:>10}: {json.dumps(got)}")
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
