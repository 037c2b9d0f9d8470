"""CPU seconds and RSS of each side's processes (each process and its children) over a window.

A background thread samples the summed RSS of every role's process tree every `interval`
seconds, so `peak_rss_mb` is the peak *during the window* (VmHWM would include whatever came
before, e.g. set-up). CPU seconds are user + system, counted from the window's start for
processes that already ran, from zero for processes started inside it (a restarted side).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import psutil


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


class ProcWatch:
    def __init__(self, pids: Callable[[], dict[str, int]], interval: float = 0.2) -> None:
        """`pids()` gives role -> root pid; asked at every sample, so restarts are followed."""
        self._pids = pids
        self._interval = interval
        self._base: dict[int, float] = {}  # pid -> CPU seconds at the window's start
        self._last: dict[str, dict[int, float]] = {}  # role -> pid -> last CPU seconds seen
        self._peak: dict[str, float] = {}
        self._rss: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProcWatch:
        for pid in self._pids().values():
            for p in _tree(pid):
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self._base[p.pid] = t.user + t.system
        self._thread = threading.Thread(target=self._run, name="procwatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._sample()

    def _sample(self) -> None:
        for role, pid in self._pids().items():
            rss = 0
            cpus = self._last.setdefault(role, {})
            for p in _tree(pid):
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpus[p.pid] = t.user + t.system
            self._rss[role] = rss / 2**20
            self._peak[role] = max(self._peak.get(role, 0.0), rss / 2**20)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def result(self) -> dict[str, dict[str, Any]]:
        """role -> cpu_s (within the window), rss_mb (at its end), peak_rss_mb (sampled)."""
        out: dict[str, dict[str, Any]] = {}
        for role, cpus in self._last.items():
            cpu = sum(v - self._base.get(pid, 0.0) for pid, v in cpus.items())
            out[role] = {
                "cpu_s": round(cpu, 2),
                "rss_mb": round(self._rss.get(role, 0.0), 1),
                "peak_rss_mb": round(self._peak.get(role, 0.0), 1),
            }
        return out
