"""`python -m bench run [scenario ...] [--json results.json] [--quick]` (bench/versus/cli.py)
and `python -m bench targets [scenario ...]` (the qmoi-sync-only scenarios of bench/run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

# The bench modules import each other as top-level modules (benchlib, scenario_*), as they do
# when run as `python bench/run.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"]:
        from versus.cli import main as versus_main

        return versus_main(argv[1:])
    if argv[:1] == ["targets"]:
        from run import main as targets_main

        return targets_main(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
