"""Sliding-window byte counters: the current transfer rate that `status` shows."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 10.0


class RateCounter:
    """Bytes counted over the last `window` seconds; `rate()` is their mean in bytes/s."""

    def __init__(
        self, window: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0
        self.total = 0

    def add(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        now = self.clock()
        self._events.append((now, nbytes))
        self._sum += nbytes
        self.total += nbytes
        self._expire(now)

    def _expire(self, now: float) -> None:
        limit = now - self.window
        while self._events and self._events[0][0] < limit:
            self._sum -= self._events.popleft()[1]

    def rate(self) -> float:
        """Mean bytes/s over the window (0.0 when nothing moved in it)."""
        self._expire(self.clock())
        return self._sum / self.window


class SpaceRates:
    """Up (sent) and down (received) counters of one space, all channels together."""

    def __init__(
        self, window: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.up = RateCounter(window, clock)
        self.down = RateCounter(window, clock)
