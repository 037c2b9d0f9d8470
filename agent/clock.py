"""This device's wall clock, as other devices see it in what it writes.

Every wall-clock reading that leaves the device or is compared with one that came from another
device (index and settings timestamps, conflict names, membership and invite times, LAN
discovery windows, snapshot times, device info) goes through :func:`wall`, so a fault-injection
test can run one agent with a skewed clock: ``QMOI_SYNC_CLOCK_SKEW_S`` (seconds, may be negative
or fractional) is added to every reading. Unset (every real run), :func:`wall` is ``time.time()``.

Not through here: comparisons with file-system timestamps (``st_mtime``), which the kernel stamps
with the real clock — on a really skewed machine both are wrong together, so those must keep
reading the kernel's clock to stay consistent with it; and durations, which use ``monotonic``.
"""

from __future__ import annotations

import os
import time

SKEW_ENV = "QMOI_SYNC_CLOCK_SKEW_S"


def _skew() -> float:
    raw = os.environ.get(SKEW_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{SKEW_ENV} must be a number of seconds (got {raw!r})") from None
    if value != value or abs(value) > 100 * 365 * 86400:
        raise SystemExit(f"{SKEW_ENV} must be a finite number of seconds within a century")
    return value


SKEW_S = _skew()


def wall() -> float:
    """Seconds since the epoch on this device's (possibly skewed) clock."""
    return time.time() + SKEW_S


__all__ = ["SKEW_ENV", "SKEW_S", "wall"]
