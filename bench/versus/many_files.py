"""many-files: 100,000 small files: time to first full sync, peak RSS.

Both sides are paired and settled on an empty folder; then side a is stopped, the N files are
written into its folder (scenario_scale's: 1 KiB each, 1,000 per folder), and the clock starts
when a is started again: a scans, indexes and sends, b receives, until every file is on b with
the right content. For Syncthing a is the dialing side here (it dials as soon as it is up).

Time budget: the whole run should fit 15 minutes, and qmoi-sync needed ~946 s for 100,000
files on this machine in the last full measurement (Syncthing ~232 s). So each system gets a
cap, the same for both: an equal share of what is left of the run's budget when the first
system's clock starts (see `_measure`); a system that has not finished is reported
as "timed out after X s with Y of N files" (Y counted on disk, content checked) — never an
extrapolated figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scenario_scale as ssc

from .common import Ctx, Row, pair, per_system, usage_rows
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
    cap: Callable[[], float],
    phases: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Stop a, write n files into its folder, start a: until b holds all n intact, or until
    `cap()` seconds (asked when the clock starts) have passed.

    `count(folder)` counts files cheaply (polled); `matches(folder, n)` counts the intact ones.
    """
    phases = {} if phases is None else phases
    p.stop_side("a")
    t = time.perf_counter()
    populate(p.a_folder, n)
    populate_s = time.perf_counter() - t
    phases["populate_s"] = round(populate_s, 1)
    cap_s = cap()
    # poll cheaply (a directory walk of 100,000 entries costs CPU on the measured machine)
    interval = 0.1 if n <= 5_000 else 0.25 if n <= 20_000 else 1.0
    check_s = 0.0
    with ProcWatch(p.pids, interval=max(0.2, interval)) as watch:
        t0 = time.perf_counter()
        p.start_side("a")
        done = False
        while time.perf_counter() - t0 < cap_s:
            p.check_alive()
            if count(p.b_folder) >= n:
                t_check = time.perf_counter()
                done = matches(p.b_folder, n) == n
                check_s = time.perf_counter() - t_check
                if done:
                    break
            time.sleep(interval)  # polling interval of the wait loop above (deadline: cap_s)
        seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "files": n,
        "populate_s": round(populate_s, 2),
        "usage": watch.result(),
        # the end time is when the content check finished: it can be late by up to one poll
        # interval plus the check itself
        "poll_interval_s": interval,
        "last_check_s": round(check_s, 2),
    }
    out["cap_s"] = round(cap_s, 1)
    if done:
        out["seconds"] = round(seconds, 2)
        out["files_per_s"] = round(n / seconds, 1)
    else:
        t = time.perf_counter()
        ok = matches(p.b_folder, n)
        phases["final_count_s"] = round(time.perf_counter() - t, 1)
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


def _measure(ctx: Ctx, system: str, tmp: Path, n: int, caps: dict[str, float]) -> dict[str, Any]:
    phases: dict[str, float] = {}
    t = time.perf_counter()
    p = pair(system, tmp, dialer="a")
    with p:
        phases["pair_setup_s"] = round(time.perf_counter() - t, 1)

        def cap() -> float:
            # Decided when the first system's clock starts, then the same for every system (a
            # rate over windows of different length would not compare: Syncthing scans first,
            # then sends): an equal share of what is left of the run's budget, after keeping
            # what this system needed before its clock started (set-up + populating) twice
            # over for each system (tear-down, the next one's set-up).
            if "cap" not in caps:
                k = len(ctx.systems)
                before = phases["pair_setup_s"] + phases.get("populate_s", 0.0)
                caps["cap"] = max(MIN_CAP_S, (ctx.left_s() - 2 * before * k) / k)
            return caps["cap"]

        r = initial_sync(p, n, ssc._populate, ssc._count_files, _matches, cap, phases)
        t = time.perf_counter()
    phases["teardown_s"] = round(time.perf_counter() - t, 1)
    print(f"   {system}: {fmt_outcome(r)}; phases {phases}", flush=True)
    return {**r, "phases": phases}


def run(ctx: Ctx, files: int | None = None) -> dict[str, Any]:
    n = files or (1_000 if ctx.quick else 100_000)
    caps: dict[str, float] = {}
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp, n, caps))


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
            f"files intact on b within {max(r['cap_s'] for r in res.values()):g} s",
            "",
            {s: r.get("files_on_b", r["files"]) for s, r in res.items()},
            lower_is_better=False,
        ),
        Row(
            "files on b per second",
            "files/s",
            {s: r["files_per_s"] for s, r in res.items()},
            lower_is_better=False,
        ),
        *usage_rows(res),
    ]
