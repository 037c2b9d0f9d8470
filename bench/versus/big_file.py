"""big-file: one 200 MiB random file written on a, until complete and verified on b.

scenario_binary.transfer: the random blocks are made before the clock starts; t0 when the write on
a is complete (the file closed: the issue counts "from the write on A"; the write itself is
``write_s``, open-to-complete ``from_open_s``), t1 when b's copy has the full size under its
final name (both systems write a temp file and rename it into place once complete). Then b's
copy is compared by SHA-256 (not timed; the same cost for both). Three files (one of 16 MiB
with --quick), settled in between.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import scenario_binary as sbin

from .common import Ctx, Row, pair, per_system, stats
from .procs import ProcWatch

NAME = "big-file"
MiB = 1024 * 1024


def _measure(ctx: Ctx, system: str, tmp: Path) -> dict[str, Any]:
    reps, size = (1, 16 * MiB) if ctx.quick else (3, 200 * MiB)
    runs = []
    with pair(system, tmp) as p:
        for i in range(reps):
            p.wait_settled(timeout=300)
            with ProcWatch(p.pids) as watch:
                r = sbin.transfer(p.a_folder, p.b_folder, p.pids(), f"big-{i}.bin", size, 100 + i)
            if not r["identical"]:
                raise RuntimeError(f"{system}: b's copy of big-{i}.bin differs from a's")
            runs.append({**r, "usage": watch.result()})
    return {
        "bytes": size,
        "seconds": stats([r["seconds"] for r in runs], 3),
        "runs": runs,
        # from the process trees (Syncthing's worker is a child of its monitor process)
        "cpu_s": {
            role: stats([r["usage"][role]["cpu_s"] for r in runs], 2) for role in runs[0]["usage"]
        },
        "peak_rss_mb": {
            role: max(r["usage"][role]["peak_rss_mb"] for r in runs) for role in runs[0]["usage"]
        },
    }


def run(ctx: Ctx) -> dict[str, Any]:
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp))


def rows(res: dict[str, Any]) -> list[Row]:
    mib = next(iter(res.values()))["bytes"] // MiB
    out = [
        Row(f"{mib} MiB on b, median", "s", {s: r["seconds"]["median"] for s, r in res.items()}),
        Row(
            "throughput",
            "MiB/s",
            {s: round(mib / r["seconds"]["median"], 1) for s, r in res.items()},
            lower_is_better=False,
        ),
    ]
    for role in ("a", "b", "relay"):
        cpu = {s: r["cpu_s"].get(role, {}).get("median") for s, r in res.items()}
        if any(v is not None for v in cpu.values()):
            out.append(Row(f"CPU {role} per file, median", "s", cpu))
        rss = {s: r["peak_rss_mb"].get(role) for s, r in res.items()}
        if any(v is not None for v in rss.values()):
            out.append(Row(f"peak RSS {role}", "MB", rss))
    return out
