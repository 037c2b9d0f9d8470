"""agent/clock.py: this device's clock against a server's, from an HTTP Date header (the relay
handshake's; doctor's probe and LAN discovery's relay-clock fallback use it)."""

from __future__ import annotations

import email.utils

from qmoi_sync.agent.clock import describe_offset, offset_from_date


def test_offset_from_a_date_header() -> None:
    server = 1_795_665_300.0  # a whole second: Date truncates to seconds
    date = email.utils.formatdate(server, usegmt=True)
    # Sent 30 min behind the server, answered in 0.2 s: the server was 30 min (+0.4 s for the
    # truncated second's middle, minus half the round trip) ahead.
    got = offset_from_date(date, server - 1800.0, 0.2)
    assert got is not None
    offset, uncertainty = got
    assert abs(offset - (1800.0 + 0.5 - 0.1)) < 1e-6 and abs(uncertainty - 0.6) < 1e-9
    assert describe_offset(offset) == "30.0 min behind"
    assert describe_offset(-90.0) == "90 s ahead of"
    assert describe_offset(3 * 86400.0) == "72.0 h behind"


def test_no_or_garbage_date_gives_no_offset() -> None:
    assert offset_from_date(None, 0.0, 0.1) is None
    assert offset_from_date("", 0.0, 0.1) is None
    assert offset_from_date("not a date", 0.0, 0.1) is None
