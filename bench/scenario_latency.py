"""latency: one small text edit on device a, until the new content is readable on device b.

t0 is taken just before the file is opened for writing on a; t1 when the bench process reads the
new content back from b's copy. Detection on b is either inotify (IN_MOVED_TO / IN_CLOSE_WRITE
on b's folder, then a read to confirm the content; default on Linux) or polling b's file every
0.5 ms. Samples run one after another; before each one both agents are idle (a's outbox is
empty), as between two saves by a person.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchlib import Inotify, cluster, percentile, verdict, wait_until, workdir

TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0
FILE = "latency.txt"
LINES = 40
TIMEOUT_S = 10.0


def _content(i: int) -> str:
    lines = [f"line {n:02d}: the quick brown fox jumps over the lazy dog\n" for n in range(LINES)]
    lines[LINES // 2] = f"line {LINES // 2:02d}: edit number {i} made at {time.time():.6f}\n"
    return "".join(lines)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _write(path: Path, text: str) -> None:
    # A plain in-place save (open, truncate, write, close), what most editors and scripts do.
    with open(path, "w") as f:
        f.write(text)


def _one_inotify(ino: Inotify, src: Path, dst: Path, text: str) -> float | None:
    ino.drain()
    t0 = time.perf_counter()
    _write(src, text)
    deadline = t0 + TIMEOUT_S
    while True:
        left_ms = (deadline - time.perf_counter()) * 1000
        if left_ms <= 0:
            return None
        if FILE in ino.read(left_ms) and _read(dst) == text:
            return (time.perf_counter() - t0) * 1000


def _one_poll(src: Path, dst: Path, text: str, interval: float = 0.0005) -> float | None:
    t0 = time.perf_counter()
    _write(src, text)
    deadline = t0 + TIMEOUT_S
    while time.perf_counter() < deadline:
        if _read(dst) == text:
            return (time.perf_counter() - t0) * 1000
        time.sleep(interval)
    return None


def run(quick: bool, method: str = "auto", keep: bool = False) -> dict[str, Any]:
    samples = 30 if quick else 200
    warmup = 5 if quick else 20
    if method == "auto":
        method = "inotify" if Inotify.available() else "poll"
    with workdir("latency", keep) as tmp, cluster(tmp) as c:
        src, dst = c.a.folder / FILE, c.b.folder / FILE
        first = _content(-1)
        _write(src, first)
        wait_until(lambda: _read(dst) == first, timeout=30, what="seed file on b")
        ino = Inotify(c.b.folder) if method == "inotify" else None
        values: list[float] = []
        timeouts = 0
        try:
            for i in range(warmup + samples):
                c.a.wait_idle()
                c.b.wait_idle()
                text = _content(i)
                ms = _one_inotify(ino, src, dst, text) if ino else _one_poll(src, dst, text)
                if ms is None:
                    timeouts += 1
                    wait_until(lambda t=text: _read(dst) == t, timeout=60, what="late edit")
                    continue
                if i >= warmup:
                    values.append(ms)
        finally:
            if ino:
                ino.close()
    p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
    return {
        "method": method,
        "method_detail": (
            "inotify on b's folder (IN_MOVED_TO|IN_CLOSE_WRITE) + read to confirm content"
            if method == "inotify"
            else "poll b's file every 0.5 ms"
        ),
        "write": "in-place save on a (open 'w', write, close)",
        "samples": len(values),
        "warmup": warmup,
        "timeouts": timeouts,
        "ms": {
            "p50": round(p50, 2),
            "p90": round(p90, 2),
            "p99": round(p99, 2),
            "max": round(max(values), 2) if values else None,
            "min": round(min(values), 2) if values else None,
            "mean": round(sum(values) / len(values), 2) if values else None,
        },
        # Each save adds a client id to the document (textdoc), so ingest cost grows with the
        # number of saves of one file: compare the first and last quarter of the samples.
        "median_first_quarter_ms": round(percentile(values[: len(values) // 4], 50), 2),
        "median_last_quarter_ms": round(percentile(values[-(len(values) // 4) :], 50), 2),
        "raw_ms": [round(v, 3) for v in values],
        "targets": {
            "p50_ms": {"target": TARGET_P50_MS, "verdict": verdict(p50, TARGET_P50_MS)},
            "p99_ms": {"target": TARGET_P99_MS, "verdict": verdict(p99, TARGET_P99_MS)},
        },
    }


def summary(r: dict[str, Any]) -> str:
    m = r["ms"]
    t = r["targets"]
    return (
        f"latency ({r['method']}, n={r['samples']}, timeouts={r['timeouts']}): "
        f"p50 {m['p50']} ms [{t['p50_ms']['verdict']} ≤{TARGET_P50_MS:g}], p90 {m['p90']} ms, "
        f"p99 {m['p99']} ms [{t['p99_ms']['verdict']} ≤{TARGET_P99_MS:g}], max {m['max']} ms"
    )
