"""The binary-file suite: real relay + agent processes (tests/harness.py), pinned resource
readings (tests/resource_env.py), helpers in binhelpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
