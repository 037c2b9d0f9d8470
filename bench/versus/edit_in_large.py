"""edit-in-large: a one-line edit in a 1 MB text file: latency and bytes on the wire.

All sync traffic goes through bench/proxy.py (qmoi-sync: agents <-> relay, both agents' links;
Syncthing: the one connection between the instances). The 1 MB file (scenario_edit_bytes's)
is synced first; then per edit: settled and no byte moving for 100 ms, counters reset, one line
near the middle gets a word inserted (an in-place save: the file's length changes, as with a
typed edit), t0 before the write, t1 when b's copy reads back the new content; the bytes are
counted until both sides are settled and the wire is quiet again. Reported: latency, bytes side
a sent, and bytes on every link in both directions (qmoi-sync's pass the relay: a->relay->b
counts twice, as it travels twice). Raw counts: keepalives in the window are included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import scenario_edit_bytes as seb
from benchlib import wait_until

from .common import Ctx, Row, pair, per_system, stats
from .procs import ProcWatch

NAME = "edit-in-large"
FILE = "large.txt"


def _edit(text: str, k: int) -> str:
    lines = text.splitlines(keepends=True)
    i = len(lines) // 2 + k * 97
    lines[i] = lines[i].replace(" fox ", f" fox (edit {k}) ", 1)
    return "".join(lines)


def _measure(ctx: Ctx, system: str, tmp: Path) -> dict[str, Any]:
    edits = 2 if ctx.quick else 5
    text = seb._big_text()
    out: list[dict[str, Any]] = []
    with pair(system, tmp, proxy=True) as p:
        assert p.proxy is not None
        src, dst = p.a_folder / FILE, p.b_folder / FILE
        p.proxy.reset()
        t0 = time.perf_counter()
        src.write_text(text)
        wait_until(lambda: seb._read(dst) == text, timeout=300, what="1 MB file on b")
        initial_s = time.perf_counter() - t0
        p.wait_settled(timeout=300)
        seb._wait_quiet(p.proxy)
        initial = p.wire_bytes()
        with ProcWatch(p.pids) as watch:
            for k in range(edits):
                p.wait_settled()
                seb._wait_quiet(p.proxy)
                p.proxy.reset()
                text = _edit(text, k)
                t0 = time.perf_counter()
                src.write_text(text)
                wait_until(
                    lambda t=text: seb._read(dst) == t, timeout=60, what="edit on b", interval=0.001
                )
                ms = (time.perf_counter() - t0) * 1000
                p.wait_settled()
                seb._wait_quiet(p.proxy)
                a_sent, total = p.wire_bytes()
                out.append({"ms": round(ms, 2), "a_sent_bytes": a_sent, "wire_bytes": total})
    return {
        "file_size": seb.SIZE,
        "initial_sync": {
            "seconds": round(initial_s, 3),
            "a_sent_bytes": initial[0],
            "wire_bytes": initial[1],
        },
        "ms": stats([e["ms"] for e in out]),
        "a_sent_bytes": stats([float(e["a_sent_bytes"]) for e in out], 0),
        "wire_bytes": stats([float(e["wire_bytes"]) for e in out], 0),
        "edits": out,
        "usage": watch.result(),
    }


def run(ctx: Ctx) -> dict[str, Any]:
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp))


def rows(res: dict[str, Any]) -> list[Row]:
    return [
        Row("edit visible on b, median", "ms", {s: r["ms"]["median"] for s, r in res.items()}),
        Row(
            "bytes sent by a, median", "B", {s: r["a_sent_bytes"]["median"] for s, r in res.items()}
        ),
        Row(
            "bytes on all links, median",
            "B",
            {s: r["wire_bytes"]["median"] for s, r in res.items()},
        ),
        Row(
            "initial 1 MB file on b",
            "s",
            {s: r["initial_sync"]["seconds"] for s, r in res.items()},
        ),
    ]
