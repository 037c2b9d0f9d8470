"""Fault-injection tests: this folder's helper modules are importable by name (as in
tests/snapshots), and bench/crash_soak.py imports them the same way."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
