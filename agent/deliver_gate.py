"""Back-pressure on the envelopes a relay link has read but not applied yet.

The relay link's reader used to queue everything the relay sent: at the start of a large
catch-up the relay streams the backlog far faster than it can be applied, and a receiver's
RSS jumped ~140 MB in its first second (bench scale, 100,000 files). The gate bounds the
queued envelope bytes: the reader waits before queueing one more while the bound is reached,
so it stops reading the socket, the relay's send waits on TCP, and the relay (which streams a
backlog from its store, page by page) holds nothing extra either.

One exception keeps this from deadlocking: while the applier waits for a membership log
(an envelope from a sender or epoch the device does not know yet, SpaceSync.handle_remote),
the log it waits for may be *behind* the queued envelopes in the stream (the relay sends
Membership from another task). The gate then lets the reader read on, past the bound, so the
Membership frame is read and the envelope is not quarantined for lack of it. That wait lasts
at most MEMBERSHIP_WAIT_S per log version, so the overshoot is bounded too.

Nothing is ever dropped or reordered: the reader only waits, in stream order. Control frames
never wait on the gate (they are handled by the reader as they come); while the reader waits
the socket is not read, which delays them (and keepalive pongs) by at most one applied batch
of about the bound's size (a second or two), far below the 20 s ping timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("qmoi_sync.deliver_gate")

#: Default bound on queued, unapplied envelope bytes per relay link.
DEFAULT_QUEUE_BYTES = 4 << 20
#: Environment override (bytes, >= 1), e.g. for tests that want a catch-up to hit the bound.
QUEUE_BYTES_ENV = "QMOI_SYNC_DELIVER_QUEUE_BYTES"


def queue_bytes_from_env() -> int:
    """The bound from QMOI_SYNC_DELIVER_QUEUE_BYTES, or the default. A bad value is logged
    as an error and the default used: a typo in a tuning knob must not stop syncing."""
    raw = os.environ.get(QUEUE_BYTES_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_QUEUE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        log.error(
            "%s must be a whole number of bytes >= 1, got %r; using %d",
            QUEUE_BYTES_ENV,
            raw,
            DEFAULT_QUEUE_BYTES,
        )
        return DEFAULT_QUEUE_BYTES
    return value


class DeliverGate:
    """Counts queued envelope bytes; ``wait_for_room`` is what the reader awaits first.

    The bound counts envelopes queued and not yet taken by the applier (``waiting_bytes``):
    the reader reads the next bound's worth while the applier applies a batch, so a catch-up
    is pipelined (counting until applied stalled the reader for every batch, and the relay
    then had to restart its stream each time: a 100,000-file catch-up took ~55 % longer).
    In memory: the batch being applied plus the queue, about twice the bound.
    ``queued`` / ``queued_bytes`` (status: pending_in) count until applied."""

    def __init__(self, limit: int, membership_wanted: asyncio.Event) -> None:
        if limit < 1:
            raise ValueError(f"delivery queue bound must be at least 1 byte, got {limit}")
        self.limit = limit
        self.queued = 0
        self.queued_bytes = 0
        self.waiting_bytes = 0
        # Set by SpaceSync while its applier waits for a longer membership log.
        self._membership_wanted = membership_wanted
        self._freed = asyncio.Event()

    def full(self) -> bool:
        return self.waiting_bytes >= self.limit and not self._membership_wanted.is_set()

    async def wait_for_room(self) -> None:
        """Return once one more envelope may be queued: below the bound (one envelope larger
        than the bound still goes, alone), or at once while a membership log is wanted."""
        while self.full():
            self._freed.clear()
            freed = asyncio.ensure_future(self._freed.wait())
            wanted = asyncio.ensure_future(self._membership_wanted.wait())
            try:
                await asyncio.wait((freed, wanted), return_when=asyncio.FIRST_COMPLETED)
            finally:
                freed.cancel()
                wanted.cancel()

    def added(self, size: int) -> None:
        self.queued += 1
        self.queued_bytes += size
        self.waiting_bytes += size

    def taken(self, size: int) -> None:
        """The applier took envelopes of ``size`` bytes off the queue (to apply them now)."""
        self.waiting_bytes = max(0, self.waiting_bytes - size)
        self._freed.set()

    def applied(self, count: int, size: int) -> None:
        self.queued = max(0, self.queued - count)
        self.queued_bytes = max(0, self.queued_bytes - size)

    def reset(self) -> None:
        """The session ended: what was queued goes with it (the relay sends it again)."""
        self.queued = 0
        self.queued_bytes = 0
        self.waiting_bytes = 0
        self._freed.set()
