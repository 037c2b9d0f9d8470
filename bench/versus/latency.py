"""latency: a small text edit on a until the new content is readable on b.

A 40-line text file (scenario_latency's), one line changed per sample by an in-place save on a;
t0 just before the write, t1 when the bench process reads the new content from b's copy
(inotify on b's folder, then a read that must match: scenario_latency._one_inotify). Before each
sample both sides are settled, then a random gap of 0.2-0.8 s passes so samples do not fall
into step with either system's periodic timers (0.05-0.2 s with --quick).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import scenario_latency as sl
from benchlib import Inotify, wait_until

from .common import Ctx, Row, pair, per_system, stats, usage_rows
from .procs import ProcWatch

NAME = "latency"


def _measure(ctx: Ctx, system: str, tmp: Path) -> dict[str, Any]:
    reps, warmup = (3, 1) if ctx.quick else (20, 2)
    with pair(system, tmp) as p:
        src, dst = p.a_folder / sl.FILE, p.b_folder / sl.FILE
        seed = sl._content(-1)
        sl._write(src, seed)
        wait_until(lambda: sl._read(dst) == seed, timeout=60, what="seed file on b")
        values: list[float] = []
        timeouts = 0
        with Inotify(p.b_folder) as ino, ProcWatch(p.pids) as watch:
            for i in range(warmup + reps):
                p.wait_settled()
                # a deliberate random gap between edits (not a wait for a condition)
                time.sleep(ctx.rng.uniform(0.05, 0.2) if ctx.quick else ctx.rng.uniform(0.2, 0.8))
                text = sl._content(i)
                ms = sl._one_inotify(ino, src, dst, text)
                if ms is None:
                    timeouts += 1
                    wait_until(lambda t=text: sl._read(dst) == t, timeout=60, what="late edit")
                elif i >= warmup:
                    values.append(ms)
        return {
            "ms": stats(values),
            "timeouts": timeouts,
            "warmup": warmup,
            "usage": watch.result(),
        }


def run(ctx: Ctx) -> dict[str, Any]:
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp))


def rows(res: dict[str, Any]) -> list[Row]:
    out = []
    for key in ("median", "p95", "p99"):
        out.append(
            Row(f"edit visible on b, {key}", "ms", {s: r["ms"].get(key) for s, r in res.items()})
        )
    out.append(Row("timeouts (> 10 s)", "", {s: r["timeouts"] for s, r in res.items()}))
    return out + usage_rows(res, what="whole scenario")
