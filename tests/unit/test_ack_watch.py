"""agent/ack_watch.py: a publish unacknowledged for ACK_TIMEOUT_S is overdue."""

from __future__ import annotations

from qmoi_sync.agent.ack_watch import ACK_TIMEOUT_S, AckWatch


def test_unacked_publish_becomes_overdue_acked_and_refused_ones_do_not() -> None:
    w = AckWatch()
    w.sent(1, 0.0)
    w.sent(2, 0.0)
    w.acked(1)
    assert not w.overdue(ACK_TIMEOUT_S - 1)
    assert w.overdue(ACK_TIMEOUT_S + 1)
    w.dropped_by_relay()  # a rate-limited publish is resent on a schedule, not lost
    assert not w.overdue(ACK_TIMEOUT_S + 1)


def test_a_resend_restarts_the_clock() -> None:
    w = AckWatch()
    w.sent(7, 0.0)
    w.sent(7, ACK_TIMEOUT_S)
    assert not w.overdue(ACK_TIMEOUT_S + 1)
