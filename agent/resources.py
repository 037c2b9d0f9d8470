"""Device awareness: what this machine can do right now, behind a small injectable interface.

`ResourceProbe` is the interface the policy (agent/policy.py) reads; `PsutilProbe` is the real one.
`FileProbe` is a **test hook**: when the environment variable ``QMOI_SYNC_TEST_RESOURCES`` names a
JSON file, the agent reads its readings (battery, AC, load, free disk, …) from that file instead
of from the machine, so end-to-end tests can change what a real agent process sees while it runs.
It only replaces the *readings*; every decision made from them is the real policy code. Keys
missing from the file fall back to the real machine's readings::

    {"on_ac": false, "battery_percent": 10, "load": 0.2, "disk_free": 104857600,
     "disk_total": 10737418240, "cpu_count": 4, "memory_total": 8589934592,
     "headless": true, "platform": "Linux-x86_64"}
"""

from __future__ import annotations

import json
import logging
import os
import platform as _platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from qmoi_sync.agent.clock import wall

log = logging.getLogger("qmoi_sync.resources")

TEST_RESOURCES_ENV = "QMOI_SYNC_TEST_RESOURCES"


class ResourceProbe(Protocol):
    """Readings of the machine. Every method is cheap (no blocking measurement)."""

    @property
    def platform(self) -> str: ...

    @property
    def headless(self) -> bool: ...

    def cpu_count(self) -> int: ...

    def memory_total(self) -> int: ...

    def disk_free(self, path: Path) -> int | None:
        """Bytes available to this user on the filesystem holding `path` (None: unknown)."""
        ...

    def disk_total(self, path: Path) -> int | None: ...

    def power(self) -> tuple[bool | None, float | None]:
        """(on AC power, battery percent); None where unknown or there is no battery."""
        ...

    def load(self) -> float | None:
        """System load normalized by CPU count (1.0 = every core busy)."""
        ...


def platform_name() -> str:
    return f"{_platform.system()}-{_platform.machine()}"


def detect_headless(flag: bool = False) -> bool:
    """True for `run --headless`, or on Linux/BSD when no display server is reachable."""
    if flag:
        return True
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return False


class PsutilProbe:
    """The real machine, through psutil."""

    def __init__(self, headless_flag: bool = False) -> None:
        self._platform = platform_name()
        self._headless = detect_headless(headless_flag)
        self._cpus = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        self._has_loadavg = hasattr(os, "getloadavg")
        if not self._has_loadavg:
            psutil.cpu_percent(interval=None)  # prime: the next call covers the interval since

    @property
    def platform(self) -> str:
        return self._platform

    @property
    def headless(self) -> bool:
        return self._headless

    def cpu_count(self) -> int:
        return int(self._cpus)

    def memory_total(self) -> int:
        return int(psutil.virtual_memory().total)

    def disk_free(self, path: Path) -> int | None:
        try:
            return int(psutil.disk_usage(str(path)).free)
        except OSError:
            return None

    def disk_total(self, path: Path) -> int | None:
        try:
            return int(psutil.disk_usage(str(path)).total)
        except OSError:
            return None

    def power(self) -> tuple[bool | None, float | None]:
        sensors = getattr(psutil, "sensors_battery", None)
        if sensors is None:
            return None, None
        try:
            battery = sensors()
        except (OSError, RuntimeError, ValueError):
            return None, None
        if battery is None:  # no battery: a desktop or a server
            return None, None
        plugged = battery.power_plugged
        return (bool(plugged) if plugged is not None else None), float(battery.percent)

    def load(self) -> float | None:
        if self._has_loadavg:
            try:
                return float(os.getloadavg()[0]) / self._cpus
            except OSError:
                return None
        # Windows: CPU use since the previous call (i.e. over the sampling interval).
        return float(psutil.cpu_percent(interval=None)) / 100.0


class FileProbe:
    """Test hook: readings from a JSON file (see the module docstring); the rest from `base`.

    The file is re-read on every call (it is tiny), so a test that rewrites it changes what the
    running agent sees at its next sample. A file that is missing or half-written keeps the last
    good readings.
    """

    def __init__(self, path: Path, base: ResourceProbe) -> None:
        self.path = path
        self.base = base
        self._last: dict[str, Any] = {}

    def _data(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return self._last
        if isinstance(data, dict):
            self._last = data
        return self._last

    def _get(self, key: str) -> tuple[bool, Any]:
        data = self._data()
        return (key in data), data.get(key)

    @property
    def platform(self) -> str:
        has, v = self._get("platform")
        return str(v) if has else self.base.platform

    @property
    def headless(self) -> bool:
        has, v = self._get("headless")
        return bool(v) if has else self.base.headless

    def cpu_count(self) -> int:
        has, v = self._get("cpu_count")
        return int(v) if has else self.base.cpu_count()

    def memory_total(self) -> int:
        has, v = self._get("memory_total")
        return int(v) if has else self.base.memory_total()

    def disk_free(self, path: Path) -> int | None:
        has, v = self._get("disk_free")
        if has:
            return None if v is None else int(v)
        return self.base.disk_free(path)

    def disk_total(self, path: Path) -> int | None:
        has, v = self._get("disk_total")
        if has:
            return None if v is None else int(v)
        return self.base.disk_total(path)

    def power(self) -> tuple[bool | None, float | None]:
        data = self._data()
        if "on_ac" not in data and "battery_percent" not in data:
            return self.base.power()
        on_ac, pct = data.get("on_ac"), data.get("battery_percent")
        return (None if on_ac is None else bool(on_ac)), (None if pct is None else float(pct))

    def load(self) -> float | None:
        has, v = self._get("load")
        if has:
            return None if v is None else float(v)
        return self.base.load()


def make_probe(headless_flag: bool = False) -> ResourceProbe:
    """The probe the agent uses: the real machine, or the test hook when its variable is set."""
    real = PsutilProbe(headless_flag)
    hook = os.environ.get(TEST_RESOURCES_ENV)
    if hook:
        log.warning("resource readings come from %s (%s test hook)", hook, TEST_RESOURCES_ENV)
        return FileProbe(Path(hook), real)
    return real


def filesystem_of(path: Path) -> str:
    """The mount point holding `path` (for messages such as "disk almost full on /home")."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


@dataclass
class ProcessUsage:
    """This agent's own CPU and memory use (psutil.Process), sampled by the policy monitor."""

    pid: int
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self._proc = psutil.Process(self.pid)
        self._proc.cpu_percent(interval=None)  # prime
        self.started_at = self.started_at or wall()
        # Uptime runs on the monotonic clock (a wall-clock step or an injected skew must not
        # make it jump); anchored at started_at.
        self._started_mono = time.monotonic() - max(0.0, wall() - self.started_at)
        self.sample()

    def sample(self) -> None:
        """CPU percent since the previous sample (100 = one full core) and resident memory."""
        try:
            with self._proc.oneshot():
                self.cpu_percent = float(self._proc.cpu_percent(interval=None))
                self.rss_bytes = int(self._proc.memory_info().rss)
        except psutil.Error:
            pass

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono
