"""Files the agent could not read (permissions, a lock held by another program, an I/O error),
tried again with exponential backoff.

A chmod produces a watcher event, but the end of a lock (an editor or a database holding a file
on Windows, a network file system answering again) does not: without a timer such a file would
wait for its next edit or the next start to be synced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("qmoi_sync.read_retry")

RETRY_MIN_S = 0.5
RETRY_MAX_S = 60.0


class ReadRetry:
    """Paths whose last read failed, each with its next attempt time (monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._attempts: dict[str, int] = {}
        self._due: dict[str, float] = {}
        self._changed = asyncio.Event()

    def failed(self, path: str) -> float:
        """The read of ``path`` failed: schedule the next attempt; returns the delay (s)."""
        n = self._attempts.get(path, 0) + 1
        self._attempts[path] = n
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(n - 1, 8))
        self._due[path] = self._clock() + delay
        self._changed.set()
        return delay

    def settled(self, path: str) -> None:
        """``path`` was read, deleted or ignored: nothing to retry any more."""
        self._attempts.pop(path, None)
        self._due.pop(path, None)

    def pending(self) -> set[str]:
        return set(self._attempts)

    def _take_due(self) -> tuple[set[str], float | None]:
        now = self._clock()
        due = {p for p, t in self._due.items() if t <= now}
        for p in due:
            del self._due[p]  # the attempt count stays until the read succeeds
        later = [t - now for t in self._due.values()]
        return due, (min(later) if later else None)

    async def run(self, stop: asyncio.Event, ingest: Callable[[set[str]], Awaitable[None]]) -> None:
        """Hand due paths to ``ingest`` (the normal local-change path, which calls ``failed`` or
        ``settled`` again) until ``stop`` is set."""
        while not stop.is_set():
            self._changed.clear()
            due, wait = self._take_due()
            if due:
                log.info("retrying %d unreadable file(s)", len(due))
                await ingest(due)
                continue
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._changed.wait()),
            ]
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), wait
                    )
            finally:
                for w in waiters:
                    w.cancel()
