"""Per-connection rate limiting and the relay's default limits.

Everything here is synchronous and clock-injectable so it can be tested without sleeping.

A connection owns one :class:`ConnectionLimiter`: two token buckets (messages and bytes). A message
that does not fit is *dropped* (the caller answers ``Error("rate_limited")``); a client that keeps
sending while limited accumulates strikes and is disconnected once ``max_strikes`` consecutive
messages were dropped. One message that fits resets the strike count, so a client that backs off
when told is never disconnected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

GiB = 1024 * 1024 * 1024
MiB = 1024 * 1024
KiB = 1024

#: Default per-space quota on stored envelope bytes.
DEFAULT_SPACE_QUOTA_BYTES = 1 * GiB
#: Default cap on the number of spaces one relay will register.
DEFAULT_MAX_SPACES = 10_000
#: Default sustained message rate per connection, and the burst allowed above it.
DEFAULT_RATE_MSGS_PER_S = 1_000.0
DEFAULT_RATE_BURST = 2_000
#: Default sustained byte rate per connection.
DEFAULT_RATE_BYTES_PER_S = 32 * MiB
#: How long a joiner may wait for an admin's answer.
DEFAULT_JOIN_TIMEOUT_S = 600.0
#: A client that connects and completes no Hello/Auth (or JoinRequest) within this is closed.
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
#: Non-fatal errors tolerated on one connection before it is closed.
DEFAULT_MAX_ERRORS = 20
#: Consecutive rate-limited (dropped) messages before the connection is closed.
DEFAULT_MAX_RATE_STRIKES = 100
#: Pending (unanswered) join requests per space.
DEFAULT_MAX_PENDING_JOINS_PER_SPACE = 16
#: Largest opaque join request the relay will hold and forward.
DEFAULT_MAX_JOIN_REQUEST_BYTES = 4 * KiB  # = protocol.invite.MAX_JOIN_REQUEST
#: Publishes accepted from one connection but not yet acknowledged (back-pressure on pipelining).
DEFAULT_MAX_INFLIGHT_PUBLISHES = 1_024
#: Live deliveries buffered for one subscriber before it falls back to reading from the store.
DEFAULT_SUBSCRIBER_BUFFER_BYTES = 16 * MiB
#: Default per-space quota on stored chunk bytes (the blob channel; apart from envelopes).
DEFAULT_BLOB_QUOTA_BYTES = 20 * GiB
#: Chunk frames (PutChunk/GetChunk) are rate-limited apart from envelopes, per connection.
DEFAULT_BLOB_RATE_BYTES_PER_S = 1 * GiB
DEFAULT_BLOB_RATE_MSGS_PER_S = 5_000.0
#: Chunk uploads accepted from one connection but not yet acknowledged.
DEFAULT_MAX_INFLIGHT_CHUNKS = 64
#: Chunk downloads read from disk ahead of the one being sent, per connection (each up to a
#: MiB in memory).
BLOB_READ_AHEAD = 8


class Verdict(Enum):
    """What to do with one incoming message."""

    ACCEPT = "accept"
    DROP = "drop"  # over the limit: answer rate_limited, do not process
    CLOSE = "close"  # sustained abuse: close the connection


class TokenBucket:
    """A classic token bucket: ``rate`` tokens per second, at most ``capacity`` banked.

    ``take(n)`` either removes ``n`` tokens and returns True, or leaves the bucket untouched and
    returns False. A request larger than the capacity can never succeed, so callers size the
    capacity to at least the largest legal request.
    """

    __slots__ = ("_clock", "_last", "_tokens", "capacity", "rate")

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._tokens = float(capacity)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._last = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def take(self, n: float = 1.0) -> bool:
        self._refill()
        if n <= self._tokens:
            self._tokens -= n
            return True
        return False


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-connection rate configuration."""

    msgs_per_s: float = DEFAULT_RATE_MSGS_PER_S
    burst: int = DEFAULT_RATE_BURST
    bytes_per_s: float = DEFAULT_RATE_BYTES_PER_S
    #: Byte bucket capacity; must be at least the largest frame or big frames could never pass.
    bytes_burst: int = 64 * MiB
    max_strikes: int = DEFAULT_MAX_RATE_STRIKES


@dataclass(slots=True)
class ConnectionLimiter:
    """Message and byte token buckets for one connection, plus the abuse strike counter."""

    limits: RateLimits
    clock: Callable[[], float] = time.monotonic
    strikes: int = 0
    dropped_total: int = 0
    _msgs: TokenBucket = field(init=False)
    _bytes: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self._msgs = TokenBucket(self.limits.msgs_per_s, self.limits.burst, self.clock)
        self._bytes = TokenBucket(self.limits.bytes_per_s, self.limits.bytes_burst, self.clock)

    def check(self, size: int) -> Verdict:
        """Account one incoming message of ``size`` bytes."""
        # Message bucket first; bytes are only charged if the message token was available. A
        # message dropped for its bytes still spends its message token (no refund).
        if self._msgs.take(1) and self._bytes.take(size):
            self.strikes = 0
            return Verdict.ACCEPT
        self.strikes += 1
        self.dropped_total += 1
        if self.strikes > self.limits.max_strikes:
            return Verdict.CLOSE
        return Verdict.DROP
