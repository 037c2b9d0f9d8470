"""many-files: 100,000 small files: time to first full sync, peak RSS.

Both sides are paired and settled on an empty folder; then side a is stopped, the N files are
written into its folder (scenario_scale's: 1 KiB each, 1,000 per folder), and the clock starts
when a is started again: a scans, indexes and sends, b receives, until every file is on b with
the right content. For Syncthing a is the dialing side here (it dials as soon as it is up).

Time budget: the whole run should fit 15 minutes, and qmoi-sync needed ~946 s for 100,000
files on this machine in the last full measurement (Syncthing ~232 s). So each system gets a
cap (from the run's remaining budget, see cli.py); a system that has not finished is reported
as "timed out after X s with Y of N files" (Y counted on disk, content checked) — never an
extrapolated figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scenario_scale as ssc

from .common import Ctx, Row, pair, per_system
from .procs import ProcWatch
from .systems import Pair

NAME = "many-files"
MIN_CAP_S = 60.0


def initial_sync(
    p: Pair,
    n: int,
    populate: Callable[[Path, int], None],
    count: Callable[[Path], int],
    matches: Callable[[Path, int], int],
    cap_s: float,
) -> dict[str, Any]:
    """Stop a, write n files into its folder, start a: until b holds all n intact (or cap_s).

    `count(folder)` counts files cheaply (polled); `matches(folder, n)` counts the intact ones.
    """
    p.stop_side("a")
    t = time.perf_counter()
    populate(p.a_folder, n)
    populate_s = time.perf_counter() - t
    # poll cheaply (a directory walk of 100,000 entries costs CPU on the measured machine)
    interval = 0.1 if n <= 5_000 else 1.0
    with ProcWatch(p.pids, interval=max(0.2, interval)) as watch:
        t0 = time.perf_counter()
        p.start_side("a")
        done = False
        while time.perf_counter() - t0 < cap_s:
            p.check_alive()
            if count(p.b_folder) >= n and matches(p.b_folder, n) == n:
                done = True
                break
            time.sleep(interval)  # polling interval of the wait loop above (deadline: cap_s)
        seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "files": n,
        "populate_s": round(populate_s, 2),
        "usage": watch.result(),
    }
    if done:
        out["seconds"] = round(seconds, 2)
        out["files_per_s"] = round(n / seconds, 1)
    else:
        ok = matches(p.b_folder, n)
        out["timed_out_after_s"] = round(seconds, 1)
        out["files_on_b"] = ok
        out["files_per_s"] = round(ok / seconds, 1)
    return out


def _matches(folder: Path, n: int) -> int:
    ok = 0
    for i in range(n):
        try:
            ok += (folder / ssc._rel(i)).read_bytes() == ssc._content(i)
        except OSError:
            pass
    return ok


def cap_for(ctx: Ctx, systems_left: int) -> float:
    """Seconds each remaining system may take: the run's remaining budget, shared."""
    return max(MIN_CAP_S, ctx.left_s() / max(1, systems_left))


def _measure(ctx: Ctx, system: str, tmp: Path, n: int) -> dict[str, Any]:
    left = len(ctx.systems) - ctx.systems.index(system)
    # populating and pairing cost time too: keep ~15 % of this system's share for them
    cap = cap_for(ctx, left) * 0.85
    with pair(system, tmp, dialer="a") as p:
        r = initial_sync(p, n, ssc._populate, ssc._count_files, _matches, cap)
    return {**r, "cap_s": round(cap, 1)}


def run(ctx: Ctx, files: int | None = None) -> dict[str, Any]:
    n = files or (1_000 if ctx.quick else 100_000)
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp, n))


def fmt_outcome(r: dict[str, Any]) -> str:
    if "seconds" in r:
        return f"{r['seconds']} s"
    return (
        f"timed out after {r['timed_out_after_s']} s with {r['files_on_b']} of {r['files']} files"
    )


def rows(res: dict[str, Any]) -> list[Row]:
    n = next(iter(res.values()))["files"]
    return [
        Row(
            f"{n} files: first full sync",
            "s",
            {s: r.get("seconds") for s, r in res.items()},
            note="; ".join(f"{s}: {fmt_outcome(r)}" for s, r in res.items()),
        ),
        Row(
            "files on b per second",
            "files/s",
            {s: r["files_per_s"] for s, r in res.items()},
            lower_is_better=False,
        ),
        *(
            Row(f"{m} side {role}", u, {s: r["usage"].get(role, {}).get(k) for s, r in res.items()})
            for role in ("a", "b", "relay")
            for m, u, k in (("CPU", "s", "cpu_s"), ("peak RSS", "MB", "peak_rss_mb"))
            if any(role in r["usage"] for r in res.values())
        ),
    ]
