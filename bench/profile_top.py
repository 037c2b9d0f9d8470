"""Summarize a py-spy "raw" (collapsed stacks) profile: top functions by self and total samples.

    python bench/profile_top.py bench/results/profile-burst-*/agent-b-*.txt [--within NAME] [-n 25]

`--within NAME` keeps only the stacks that pass through a frame whose text contains NAME (for
example `handle_remote` or `_reconcile_once`), so one code path can be broken down.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_LINENO = re.compile(r":\d+\)$")


def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (path/to/file.py)": aggregate over line numbers
    return _LINENO.sub(")", frame.strip())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--within", help="only stacks through a frame containing this text")
    p.add_argument("-n", type=int, default=25)
    args = p.parse_args()
    total = 0
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    for path in args.files:
        for line in path.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            frames = [_frame_name(f) for f in m.group(1).split(";") if f]
            if args.within and not any(args.within in f for f in frames):
                continue
            n = int(m.group(2))
            total += n
            if frames:
                self_c[frames[-1]] += n
            for f in set(frames):
                incl_c[f] += n
    print(f"{total} samples" + (f" through {args.within!r}" if args.within else ""))
    for title, counter in (("self", self_c), ("total (inclusive)", incl_c)):
        print(f"\n-- top by {title}")
        for name, n in counter.most_common(args.n):
            print(f"{100 * n / max(total, 1):6.1f}%  {n:7d}  {name}")


if __name__ == "__main__":
    main()
