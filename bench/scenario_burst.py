"""burst: 1,000 new 1 KiB text files written on a, until all are on b with the right content.

Each repetition uses a fresh relay, fresh devices and a fresh space. t0 is taken before the first
file is written (the writes themselves, ~1000 open/write/close in the bench process, count). On
b, an inotify watch reports each file as it is renamed into place; each reported file is read
and compared, and the clock stops when the last one matches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchlib import Inotify, cluster, verdict, wait_until, workdir

TARGET_S = 1.5
FILES = 1000
SIZE = 1024
TIMEOUT_S = 120.0


def _content(i: int) -> bytes:
    head = f"burst file {i:04d}\n".encode()
    body = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit %04d\n" % i) * 20
    return (head + body)[: SIZE - 1] + b"\n"


def _name(i: int) -> str:
    return f"burst-{i:04d}.txt"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


def write_and_wait(
    src: Path, dst: Path, expected: dict[str, bytes], timeout: float
) -> dict[str, Any]:
    """Write `expected` (name -> bytes) flat into `src`; return when all are in `dst` intact.

    Seconds are from before the first write; `first_file_s` is when the first one matched.
    """
    with Inotify(dst) as ino:
        t0 = time.perf_counter()
        for name, data in expected.items():
            with open(src / name, "wb") as f:
                f.write(data)
        t_written = time.perf_counter()
        missing = set(expected)
        first_seen: float | None = None
        deadline = t0 + timeout
        while missing:
            left_ms = (deadline - time.perf_counter()) * 1000
            if left_ms <= 0:
                raise TimeoutError(f"{len(missing)} files missing after {timeout}s")
            names = ino.read(min(left_ms, 100))
            for name in names:
                if name in missing and _read(dst / name) == expected[name]:
                    missing.discard(name)
                    first_seen = first_seen or time.perf_counter()
            if not names:
                # Quiet for 100 ms (or an inotify queue overflow): re-check what is left.
                for name in list(missing):
                    if _read(dst / name) == expected[name]:
                        missing.discard(name)
        t_done = time.perf_counter()
    seconds = t_done - t0
    return {
        "seconds": round(seconds, 3),
        "files_per_s": round(len(expected) / seconds, 1),
        "write_s": round(t_written - t0, 3),
        "first_file_s": round((first_seen or t_done) - t0, 3),
    }


def _one(rep: int, keep: bool) -> dict[str, Any]:
    expected = {_name(i): _content(i) for i in range(FILES)}
    with workdir(f"burst{rep}", keep) as tmp, cluster(tmp) as c:
        r = write_and_wait(c.a.folder, c.b.folder, expected, TIMEOUT_S)
        wait_until(c.a.idle, timeout=60, what="a idle")
        wait_until(c.b.idle, timeout=60, what="b idle")
        a_sent = c.a.space_status()
    return {
        "seconds": r["seconds"],
        "files_per_s": r["files_per_s"],
        "write_s": r["write_s"],
        "first_file_on_b_s": r["first_file_s"],
        "a_files_tracked": a_sent["files"],
        "verdict": verdict(r["seconds"], TARGET_S),
    }


def run(quick: bool, keep: bool = False) -> dict[str, Any]:
    reps = 1 if quick else 3
    runs = [_one(r, keep) for r in range(reps)]
    secs = [r["seconds"] for r in runs]
    return {
        "files": FILES,
        "file_size": SIZE,
        "method": "inotify on b's folder, each reported file read and compared",
        "runs": runs,
        "best_s": min(secs),
        "worst_s": max(secs),
        "target_s": TARGET_S,
        "verdict": verdict(max(secs), TARGET_S),
    }


def summary(r: dict[str, Any]) -> str:
    each = ", ".join(f"{x['seconds']} s ({x['files_per_s']:.0f} files/s)" for x in r["runs"])
    return f"burst ({r['files']} x 1 KiB): {each} [{r['verdict']} ≤{TARGET_S:g} s]"
