"""Where an agent's memory goes (bench-only; `run.py idle_rss --profile memory`).

``install`` starts tracemalloc (one frame per allocation, to keep its own overhead small) and
makes SIGUSR1 write a report to a file: the process's memory by mapping kind from
/proc/self/smaps (shared libraries, heap/anonymous, per file), glibc's malloc_info totals,
Python's obmalloc arena use, the live objects by type (gc), and tracemalloc's top allocation
sites. RSS with tracemalloc on is larger than without: compare the parts, not the total.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType


def _smaps() -> list[str]:
    by_name: collections.Counter[str] = collections.Counter()
    by_kind: collections.Counter[str] = collections.Counter()
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":") or "-" in parts[0]:
            name = parts[5] if len(parts) > 5 else "[anon]"
            continue
        if parts[0] == "Rss:":
            kb = int(parts[1])
            by_name[name] += kb
            if name.startswith("/") and (".so" in name or "python" in name):
                by_kind["shared libraries + executable"] += kb
            elif name.startswith("/"):
                by_kind["other files"] += kb
            else:
                by_kind[name] += kb
    out = ["smaps RSS by kind (MB):"]
    out += [f"  {v / 1024:8.1f}  {k}" for k, v in by_kind.most_common()]
    out.append("smaps RSS by mapping (MB, top 25):")
    out += [f"  {v / 1024:8.1f}  {k}" for k, v in by_name.most_common(25)]
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
    out.append("smaps_rollup: " + ", ".join(" ".join(line.split()[:2]) for line in rollup[:12]))
    return out


def _malloc_info() -> list[str]:
    name = ctypes.util.find_library("c")
    if not name:
        return []
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallinfo2"):
        return []

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc.mallinfo2.restype = MallInfo2
    mi = libc.mallinfo2()
    mb = 2**20
    return [
        f"glibc mallinfo2: arena {mi.arena / mb:.1f} MB, in use {mi.uordblks / mb:.1f}"
        f" MB, free in arenas {mi.fordblks / mb:.1f} MB, mmapped {mi.hblkhd / mb:.1f} MB"
        f" ({mi.hblks} blocks), top releasable {mi.keepcost / mb:.1f} MB"
    ]


def _objects() -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        t = type(obj).__qualname__
        counts[t] += 1
        sizes[t] += sys.getsizeof(obj)
    out = [f"gc-tracked objects: {sum(counts.values())} (shallow sizes, MB, top 25):"]
    out += [f"  {sizes[t] / 2**20:8.2f}  {counts[t]:8d}  {t}" for t, _ in sizes.most_common(25)]
    return out


def report() -> str:
    out = [f"=== {time.strftime('%H:%M:%S')} pid-report"]
    out += _smaps()
    out += _malloc_info()
    if hasattr(sys, "_debugmallocstats"):
        out.append("(obmalloc: see sys._debugmallocstats on stderr)")
    out += _objects()
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        cur, peak = tracemalloc.get_traced_memory()
        out.append(f"tracemalloc: current {cur / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB")
        for group in ("filename", "lineno"):
            stats = snap.statistics(group)
            out.append(f"tracemalloc top 30 by {group} (MB, count):")
            for st in stats[:30]:
                out.append(f"  {st.size / 2**20:8.2f} {st.count:8d}  {st.traceback}")
        site = os.environ.get("QMOI_BENCH_HOLDERS")
        if site:
            out += holders(site)
        stats = snap.statistics("traceback")
        out.append("tracemalloc top 12 by traceback:")
        for st in stats[:12]:
            out.append(f"  {st.size / 2**20:8.2f} {st.count:8d}")
            out += [f"      {line}" for line in st.traceback.format()]
    return "\n".join(out) + "\n"


def install(path: Path) -> None:
    tracemalloc.start(int(os.environ.get("QMOI_BENCH_TRACE_FRAMES", "1")))

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        # Written whole, then renamed: the bench waits for the file to exist.
        tmp = path.with_suffix(".tmp")
        tmp.write_text(report())
        tmp.rename(path)

    signal.signal(signal.SIGUSR1, on_signal)


def _owner(obj: object, skip: set[int]) -> str:
    """Who refers to ``obj``: "Type.attr" for an attribute, else the referrer's type."""
    for ref in gc.get_referrers(obj):
        if id(ref) in skip:
            continue
        if isinstance(ref, dict):
            for owner in gc.get_referrers(ref):
                if id(owner) not in skip and getattr(owner, "__dict__", None) is ref:
                    attr = next((k for k, v in ref.items() if v is obj), "?")
                    return f"{type(owner).__qualname__}.{attr}"
            key = next((k for k, v in ref.items() if v is obj), None)
            if key is not None:
                return f"dict[{str(key)[:40]}]"
        if hasattr(ref, "f_code"):
            return f"frame {ref.f_code.co_filename}:{ref.f_lineno}"
        return type(ref).__qualname__
    return "?"


def holders(site: str) -> list[str]:
    """Containers holding bytes allocated at ``site`` ("file.py:line"), by owner."""
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    objs = gc.get_objects()
    skip = {id(objs)}
    for obj in objs:
        for ref in gc.get_referents(obj):
            if not isinstance(ref, bytes):
                continue
            tb = tracemalloc.get_object_traceback(ref)
            if tb is None or not str(tb[-1]).endswith(site):
                continue
            key = f"{type(obj).__qualname__} held by {_owner(obj, skip)}"
            totals[key] += sys.getsizeof(ref)
            counts[key] += 1
    out = [f"holders of bytes allocated at {site} (MB, count):"]
    out += [f"  {v / 2**20:8.2f} {counts[k]:8d}  {k}" for k, v in totals.most_common(15)]
    return out
