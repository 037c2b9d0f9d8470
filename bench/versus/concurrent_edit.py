"""concurrent-edit: both sides edit different lines of one file while disconnected.

Disconnected = b's process stopped (the same for both systems). With b stopped, its copy of a
40-line file gets line 30 changed; then t0, a's copy gets line 5 changed (a is running and
notices it), and b is started again (for Syncthing b is the dialing side, so it dials as soon
as it is up). Converged = both folders hold the same files with the same bytes and both systems
report settled. Recorded: seconds to converge; whether the file itself holds both edits (a
merge), the conflict copies that appeared, and whether both edits survive somewhere (in the
file or a conflict copy). For Syncthing a conflict copy is its documented outcome.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from benchlib import wait_until

from .common import Ctx, Row, pair, per_system, stats

NAME = "concurrent-edit"
FILE = "shared-notes.txt"
TIMEOUT_S = 120.0
# the sync systems' own bookkeeping in the folder: not user files
_IGNORE_DIRS = (".stfolder", ".stversions", ".qmoi")
_IGNORE_PREFIXES = (".syncthing.", "~syncthing~", ".qmoi-tmp")


def _base() -> str:
    return "".join(f"line {n:02d}: nothing to see here yet\n" for n in range(40))


def _with_line(text: str, n: int, line: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[n] = line
    return "".join(lines)


def tree(folder: Path) -> dict[str, bytes]:
    """relative path -> bytes of every user file under `folder`."""
    out: dict[str, bytes] = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in _IGNORE_DIRS]
        for f in files:
            if f.startswith(_IGNORE_PREFIXES):
                continue
            path = Path(dirpath) / f
            try:
                out[str(path.relative_to(folder))] = path.read_bytes()
            except OSError:
                continue  # renamed away meanwhile: the next look sees the new state
    return out


def _measure(ctx: Ctx, system: str, tmp: Path) -> dict[str, Any]:
    reps = 1 if ctx.quick else 3
    runs = []
    base = _base()
    with pair(system, tmp, dialer="b") as p:
        for rep in range(reps):
            name = f"rep{rep}-{FILE}"
            (p.a_folder / name).write_text(base)
            wait_until(
                lambda n=name: tree(p.b_folder).get(n) == base.encode(),
                timeout=60,
                what="base on b",
            )
            p.wait_settled()
            p.stop_side("b")
            edit_b = f"line 30: edited on b while disconnected, rep {rep}\n"
            edit_a = f"line 05: edited on a while b was away, rep {rep}\n"
            (p.b_folder / name).write_text(_with_line(base, 30, edit_b))
            t0 = time.perf_counter()
            (p.a_folder / name).write_text(_with_line(base, 5, edit_a))
            p.start_side("b")

            def converged() -> dict[str, bytes] | None:
                ta = tree(p.a_folder)
                if ta != tree(p.b_folder) or not p.settled():
                    return None
                return ta

            final = wait_until(converged, timeout=TIMEOUT_S, what="converged", interval=0.05)
            seconds = time.perf_counter() - t0
            mine = {
                k: v.decode(errors="replace")
                for k, v in final.items()
                if k.startswith(f"rep{rep}-")
            }
            text = mine.get(name, "")
            copies = sorted(k for k in mine if k != name)
            everything = "".join(mine.values())
            runs.append(
                {
                    "seconds": round(seconds, 3),
                    "merged_in_file": edit_a in text and edit_b in text,
                    "conflict_copies": copies,
                    "both_edits_survive": edit_a in everything and edit_b in everything,
                    "file_has": [w for w, e in (("a", edit_a), ("b", edit_b)) if e in text],
                }
            )
    return {"seconds": stats([r["seconds"] for r in runs], 3), "runs": runs}


def run(ctx: Ctx) -> dict[str, Any]:
    return per_system(ctx, NAME, lambda s, tmp: _measure(ctx, s, tmp))


def _outcome(r: dict[str, Any]) -> str:
    runs = r["runs"]
    merged = sum(x["merged_in_file"] for x in runs)
    copies = sum(len(x["conflict_copies"]) for x in runs)
    lost = sum(not x["both_edits_survive"] for x in runs)
    return f"{merged}/{len(runs)} merged, {copies} conflict copies, {lost} lost an edit"


def rows(res: dict[str, Any]) -> list[Row]:
    return [
        Row(
            "time to converge, median",
            "s",
            {s: r["seconds"]["median"] for s, r in res.items()},
            note="; ".join(f"{s}: {_outcome(r)}" for s, r in res.items()),
        ),
    ]
