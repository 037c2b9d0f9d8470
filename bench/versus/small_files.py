"""small-files: 1,000 new 1 KiB files written on a, until all are present and intact on b.

Written flat into a's folder as fast as Python can (scenario_burst.write_and_wait: the clock
runs from before the first write until the last file matched on b, inotify + reads on b).
Three repetitions in one pair (one of 50 files with --quick), each with new names and new
content (so no system can reuse blocks of an earlier repetition), settled in between.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import scenario_burst as sb

from .common import Ctx, Row, pair, per_system, stats, usage_rows
from .procs import ProcWatch

NAME = "small-files"
TIMEOUT_S = 300.0


def _measure(ctx: Ctx, system: str, tmp: Path) -> dict[str, Any]:
    reps, files = (1, 50) if ctx.quick else (3, sb.FILES)
    runs = []
    with pair(system, tmp) as p, ProcWatch(p.pids) as watch:
        for rep in range(reps):
            p.wait_settled()
            expected = {
                f"small-{rep}-{i:04d}.txt": sb._content(rep * files + i) for i in range(files)
            }
            runs.append(sb.write_and_wait(p.a_folder, p.b_folder, expected, TIMEOUT_S))
        p.wait_settled(timeout=TIMEOUT_S)
    return {
        "files": files,
        "file_size": sb.SIZE,
        "seconds": stats([r["seconds"] for r in runs], 3),
        "runs": runs,
        "usage": watch.result(),
    }


def run(ctx: Ctx) -> dict[str, Any]:
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp))


def rows(res: dict[str, Any]) -> list[Row]:
    n = next(iter(res.values()))["files"]
    return [
        Row(f"{n} x 1 KiB on b, median", "s", {s: r["seconds"]["median"] for s, r in res.items()}),
        Row("slowest run", "s", {s: r["seconds"]["max"] for s, r in res.items()}),
        *usage_rows(res, what=f"{len(next(iter(res.values()))['runs'])} runs"),
    ]
