"""Per-sender replay protection tolerant of gaps and reordering.

Sequence numbers start at 1; ``0`` is never accepted. The window keeps a contiguous ``watermark``
(every seq ``<= watermark`` has been seen) and a sparse set of seen seqs above it. If the sparse
set would exceed :data:`MAX_SPARSE` entries, the watermark is advanced to the smallest sparse seq
(the unseen seqs below it are then treated as seen, i.e. very late arrivals are dropped) until it
fits again. Bounded memory, even against a sender that skips seqs on purpose.
"""

from __future__ import annotations

import heapq

from . import _codec as c
from .errors import MalformedError, ReplayError, TooLargeError

__all__ = ["MAX_SPARSE", "ReplayWindow"]

#: Maximum number of seen seqs kept above the watermark.
MAX_SPARSE = 65536
_VERSION = 1


class ReplayWindow:
    """Seen-seq tracker for one sender."""

    __slots__ = ("_heap", "_max_sparse", "_sparse", "_watermark")

    def __init__(self, watermark: int = 0, max_sparse: int = MAX_SPARSE) -> None:
        if isinstance(watermark, bool) or not isinstance(watermark, int) or watermark < 0:
            raise MalformedError("watermark must be a non-negative integer")
        if max_sparse < 1:
            raise MalformedError("max_sparse must be >= 1")
        self._watermark = watermark
        self._sparse: set[int] = set()
        self._heap: list[int] = []
        self._max_sparse = max_sparse

    @property
    def watermark(self) -> int:
        """Every seq ``<= watermark`` counts as seen."""
        return self._watermark

    @property
    def highest(self) -> int:
        """Highest seq seen (or the watermark)."""
        return max(self._sparse, default=self._watermark)

    def pending_gaps(self) -> int:
        """How many seqs are marked above the watermark (i.e. out of order)."""
        return len(self._sparse)

    def above(self) -> list[int]:
        """The seqs marked above the watermark, ascending (the seqs between are missing)."""
        return sorted(self._sparse)

    def seen(self, seq: int) -> bool:
        """True if ``seq`` was already marked (or is invalid: 0, negative, not an int)."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1 or seq > c.U64_MAX:
            return True
        return seq <= self._watermark or seq in self._sparse

    def mark(self, seq: int) -> bool:
        """Mark ``seq`` seen. Returns False if it already was (nothing changes), True otherwise."""
        if self.seen(seq):
            return False
        if seq == self._watermark + 1:
            self._watermark = seq
            self._absorb()
        else:
            self._sparse.add(seq)
            heapq.heappush(self._heap, seq)
            while len(self._sparse) > self._max_sparse:
                self._watermark = heapq.heappop(self._heap)
                self._sparse.discard(self._watermark)
                self._absorb()
        return True

    def advance_to(self, seq: int) -> None:
        """Count every seq ``<= seq`` as seen (they are covered by something else, e.g. the
        sender's full state)."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or seq > c.U64_MAX:
            raise MalformedError("seq must be an integer within 0..2^64-1")
        if seq <= self._watermark:
            return
        self._watermark = seq
        self._sparse = {s for s in self._sparse if s > seq}
        self._heap = sorted(self._sparse)
        self._absorb()

    def accept(self, seq: int) -> None:
        """Mark ``seq``; raise :class:`ReplayError` if it was already seen."""
        if not self.mark(seq):
            raise ReplayError(f"sequence number {seq} was already accepted (replay)")

    def _absorb(self) -> None:
        while self._heap and self._heap[0] == self._watermark + 1:
            self._watermark = heapq.heappop(self._heap)
            self._sparse.discard(self._watermark)

    # persistence: version u8 | watermark u64 | count u32 | seq u64 * count (strictly increasing)

    def to_bytes(self) -> bytes:
        seqs = sorted(self._sparse)
        return b"".join([c.u8(_VERSION), c.u64(self._watermark), c.u32(len(seqs))]) + b"".join(
            c.u64(s) for s in seqs
        )

    @classmethod
    def from_bytes(cls, data: bytes, max_sparse: int = MAX_SPARSE) -> ReplayWindow:
        r = c.Reader(data, "replay window")
        version = r.u8("version")
        if version != _VERSION:
            raise MalformedError(f"replay window: unknown version {version}")
        watermark = r.u64("watermark")
        count = r.count(max_sparse, "sparse count")
        if r.remaining != count * 8:
            if r.remaining > count * 8:
                raise MalformedError("replay window has trailing bytes")
            raise MalformedError("replay window is truncated")
        w = cls(watermark, max_sparse)
        last = watermark + 1  # sparse seqs are > watermark + 1 (else they'd be absorbed)
        for _ in range(count):
            s = r.u64("seq")
            if s <= last:
                raise MalformedError(
                    "replay window seqs are not strictly increasing above the mark"
                )
            w._sparse.add(s)
            last = s
        w._heap = sorted(w._sparse)
        r.end()
        if len(w._sparse) > max_sparse:  # pragma: no cover - guarded by count()
            raise TooLargeError("replay window too large")
        return w

    def __repr__(self) -> str:
        return f"ReplayWindow(watermark={self._watermark}, sparse={len(self._sparse)})"
