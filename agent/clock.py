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

import email.utils
import os
import time

SKEW_ENV = "QMOI_SYNC_CLOCK_SKEW_S"
# A clock this far off its relay's is reported (space status, doctor), and LAN discovery then
# follows the relay's clock (agent/peer_sync.py SpaceLan.lan_time). Below it, each device's own
# clock: LAN discovery tolerates one tag window (10 min), and two devices each within this of
# the relay are within twice this of each other.
CLOCK_OFF_S = 60.0


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


def offset_from_date(date: str | None, sent: float, elapsed_s: float) -> tuple[float, float] | None:
    """How far a server's clock is ahead of :func:`wall` (negative: behind), and the
    uncertainty of that, from the ``Date`` header of its reply to a request sent at ``sent``
    (a :func:`wall` reading) that took ``elapsed_s``. None without a usable header."""
    if not date:
        return None
    try:
        server_ts = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # Date has 1 s resolution (truncated): the server's clock was in [ts, ts + 1) at some
    # moment of the exchange, taken as its middle.
    return server_ts + 0.5 - (sent + elapsed_s / 2), 0.5 + elapsed_s / 2


def describe_offset(offset_s: float) -> str:
    """This device's clock against a server's ("12.5 min ahead of", "3.0 h behind"), given
    how far the server's is ahead of this one's (``offset_from_date``)."""
    off = abs(offset_s)
    if off < 120:
        amount = f"{off:.0f} s"
    elif off < 7200:
        amount = f"{off / 60:.1f} min"
    else:
        amount = f"{off / 3600:.1f} h"
    return f"{amount} {'behind' if offset_s > 0 else 'ahead of'}"


__all__ = ["CLOCK_OFF_S", "SKEW_ENV", "SKEW_S", "describe_offset", "offset_from_date", "wall"]
