"""Give memory back to the OS after large batches.

A first index of 10,000 files (or the catch-up of a second device) allocates tens of MB of
short-lived objects (decoded updates, batch lists, SQLite rows). CPython and yrs free them, but
glibc keeps the freed pages in its arenas: measured 15-20 MB of an idle agent's RSS
(bench/README.md, idle_rss). ``malloc_trim(0)`` returns them.

Event driven, no polling: each finished batch reports its size with ``note``; once enough work
has accumulated, a trim runs ``QUIET_S`` after the last batch (each new batch postpones it), so a
long burst is trimmed once at its end, and an idle agent never wakes up for it. Just before the
trim, registered ``on_quiet`` callbacks drop caches that only help while work is flowing (the
spaces' loaded text documents).

Only glibc has ``malloc_trim``; elsewhere trimming is skipped (the callbacks still run).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

__all__ = ["MIN_WORK", "QUIET_S", "Trimmer", "malloc_trim", "trimmer"]

log = logging.getLogger("qmoi_sync.memtrim")

MIN_WORK = 200  # batch items since the last trim before one is worth it (a trim costs ~5 ms)
QUIET_S = 3.0  # seconds without a large batch before trimming

_libc: ctypes.CDLL | bool | None = None  # None: not looked up yet; False: unavailable


def malloc_trim() -> bool:
    """``malloc_trim(0)`` if the C library has it; True if it ran."""
    global _libc
    if _libc is None:
        _libc = False
        name = ctypes.util.find_library("c")
        if name:
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(name)
                if hasattr(lib, "malloc_trim"):
                    lib.malloc_trim.argtypes = [ctypes.c_size_t]
                    lib.malloc_trim.restype = ctypes.c_int
                    _libc = lib
    if not _libc:
        return False
    assert isinstance(_libc, ctypes.CDLL)
    _libc.malloc_trim(0)
    return True


def _rss_bytes() -> int:
    """Resident set size from /proc (Linux); 0 where there is none."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Trimmer:
    def __init__(self, min_work: int = MIN_WORK, quiet_s: float = QUIET_S) -> None:
        self.min_work = min_work
        self.quiet_s = quiet_s
        self.work = 0
        self.trims = 0
        self._timer: asyncio.TimerHandle | None = None
        self._on_quiet: list[Callable[[], None]] = []

    def on_quiet(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` before each trim; returns a function that unregisters it."""
        self._on_quiet.append(callback)
        return lambda: self._on_quiet.remove(callback) if callback in self._on_quiet else None

    def note(self, items: int) -> None:
        """A batch of ``items`` finished (call from the event loop)."""
        if items <= 0:
            return
        self.work += items
        if self.work < self.min_work:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.quiet_s, self._run)

    def _run(self) -> None:
        self._timer = None
        self.work = 0
        for callback in list(self._on_quiet):
            try:
                callback()
            except Exception:  # a cache that cannot be dropped must not stop the trim
                log.exception("memory trim callback failed")
        before = _rss_bytes()
        if malloc_trim():
            self.trims += 1
            after = _rss_bytes()
            if before and after:
                log.info("memory trimmed: RSS %.1f -> %.1f MB", before / 2**20, after / 2**20)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


trimmer = Trimmer()  # one per process: the heap is per process
