"""idle: 10,000 files synced, then 60 s idle: CPU seconds and RSS of each agent.

Each system syncs the files first (many_files.initial_sync: a stopped, files written, a started,
until all are intact on b; that time is reported too), one system after the other. Then both
systems, settled, idle through the *same* 60 s window (3 s with --quick): the machine's load
during the window is then the same for both, and nothing polls them meanwhile. Reported per
side: CPU seconds in the window, RSS at its end and its sampled peak.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import scenario_idle_rss as sir

from .common import Ctx, Row, pair
from .many_files import initial_sync
from .procs import ProcWatch
from .systems import Pair

NAME = "idle"


def _matches(folder: Path, n: int) -> int:
    ok = 0
    for i in range(n):
        try:
            ok += (folder / sir._rel(i)).read_bytes() == sir._content(i)
        except OSError:
            pass
    return ok


def run(ctx: Ctx) -> dict[str, Any]:
    n, window = (300, 3.0) if ctx.quick else (10_000, 60.0)
    res: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        pairs: dict[str, Pair] = {}
        for system in ctx.systems:
            tmp = stack.enter_context(ctx.workdir(f"idle-{system}"))
            p = stack.enter_context(pair(system, tmp, dialer="a"))
            pairs[system] = p
            sync = initial_sync(p, n, sir._populate, sir._count_files, _matches, lambda: 600.0)
            if "seconds" not in sync:
                raise RuntimeError(f"{system}: {n} files not on b within 600 s: {sync}")
            p.wait_settled(timeout=300)
            res[system] = {"files": n, "sync": sync}
        for p in pairs.values():
            p.wait_settled(timeout=300)
        # one sample every 5 s: the bench's own polling must not be what keeps them busy
        watches = {s: ProcWatch(p.pids, interval=5.0) for s, p in pairs.items()}
        for w in watches.values():
            w.__enter__()
        t0 = time.perf_counter()
        try:
            time.sleep(window)  # the idle window itself: nothing to wait for, by design
        finally:
            elapsed = time.perf_counter() - t0
            for w in watches.values():
                w.__exit__(None, None, None)
        for s, w in watches.items():
            res[s]["idle_window_s"] = round(elapsed, 1)
            res[s]["usage"] = w.result()
            res[s]["settled_after_window"] = pairs[s].settled()
    return res


def rows(res: dict[str, Any]) -> list[Row]:
    n = next(iter(res.values()))["files"]
    window = next(iter(res.values()))["idle_window_s"]
    out = [
        Row(
            f"{n} files: first full sync",
            "s",
            {s: r["sync"].get("seconds") for s, r in res.items()},
        )
    ]
    for role, name in (("a", "side a"), ("b", "side b"), ("relay", "relay")):
        vals = {s: r["usage"].get(role) for s, r in res.items()}
        if not any(vals.values()):
            continue
        out.append(
            Row(
                f"CPU {name} in {window:g} s idle",
                "s",
                {s: v and v["cpu_s"] for s, v in vals.items()},
            )
        )
        out.append(Row(f"RSS {name}, idle", "MB", {s: v and v["rss_mb"] for s, v in vals.items()}))
    return out
