"""Publishes never acknowledged on a live relay connection.

The relay acks every Publish after storing it (or as a duplicate), and reports a dropped one
with an Error (rate limit, quota: the link resends those on a schedule). A Publish or Ack lost
on a connection that stays up (a broken middlebox or proxy, a relay bug) left the envelope in
the outbox, unsent again until some unrelated reconnect: on a quiet, healthy-looking link,
that change reached no other device. ``AckWatch`` notices an envelope unacknowledged for
``ACK_TIMEOUT_S``; the link then ends the session, and the next one resends the outbox (the
relay stores what it lacks and acks the rest as duplicates).
"""

from __future__ import annotations

__all__ = ["ACK_TIMEOUT_S", "AckWatch"]

#: Generous: a relay under load commits in batches, and a needless reconnect costs a resend.
ACK_TIMEOUT_S = 20.0


class AckWatch:
    def __init__(self) -> None:
        self._sent: dict[int, float] = {}  # sender seq -> when it was (last) sent

    def sent(self, seq: int, now: float) -> None:
        self._sent[seq] = now

    def acked(self, seq: int) -> None:
        self._sent.pop(seq, None)

    def dropped_by_relay(self) -> None:
        """The relay refused publishes (rate limit, quota): they are resent on a schedule,
        not lost, so they are not waited for."""
        self._sent.clear()

    def overdue(self, now: float) -> bool:
        return any(now - t > ACK_TIMEOUT_S for t in self._sent.values())
