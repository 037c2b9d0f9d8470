"""Resource policy: when to hold back heavy work, and when to stop writing to a full disk.

Decisions (thresholds in `PolicyConfig`, overridable in ``<home>/policy.json``):

- **Defer bulk work** while the battery is below 20 % and the device is not on AC power, or while
  the normalized system load stays above 0.9 for 2 consecutive samples. "Bulk" today means
  ingesting (and so sending) text files larger than 1 MiB and the start-up scan of a folder with
  many changed files; the chunked binary transfer will ask `Policy.allow_bulk()` too. Small text
  deltas always flow.
- **Stop materializing** (writing file contents) into a space whose folder's filesystem has less
  than 500 MiB free — or less than 1 % of its size when that is smaller, so small disks are not
  blocked at a large reserve. Remote changes are still applied to the CRDT and committed; the
  documents stay pending and are written as soon as space is freed.

`Policy` is pure decision state fed by a `ResourceProbe`; `PolicyMonitor` is the agent task that
samples it periodically and tells the spaces when deferred work may proceed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.resources import ProcessUsage, ResourceProbe, filesystem_of
from qmoi_sync.agent.status import AgentStatus, PolicyState, PolicyStatus
from qmoi_sync.protocol.payload import Capabilities

if TYPE_CHECKING:
    from qmoi_sync.agent.space import SpaceSync

log = logging.getLogger("qmoi_sync.policy")

MiB = 1024 * 1024
POLICY_FILE = "policy.json"


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    battery_min_percent: float = Field(default=20.0, ge=0, le=100)
    load_max: float = Field(default=0.9, gt=0)
    load_readings: int = Field(default=2, ge=1, le=1000)
    #: a machine that is busy all the time still gets its bulk work done: load alone defers it
    #: for at most this long, then lets it run until the load has dropped below load_max again
    load_max_defer_s: float = Field(default=600.0, ge=0)
    disk_min_bytes: int = Field(default=500 * MiB, ge=0)
    disk_min_fraction: float = Field(default=0.01, ge=0, le=1)
    #: text files above this size are bulk work
    bulk_file_bytes: int = Field(default=1 * MiB, ge=0)
    #: a start-up scan with more changed files (or bytes) than this is bulk work
    bulk_scan_files: int = Field(default=20_000, ge=0)
    bulk_scan_bytes: int = Field(default=128 * MiB, ge=0)
    sample_interval_s: float = Field(default=5.0, gt=0, le=3600)
    publish_interval_s: float = Field(default=600.0, gt=0)

    @classmethod
    def load(cls, path: Path) -> PolicyConfig:
        """Defaults, overridden by the keys of `path` when it exists."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise UserError(f"{path}: invalid policy settings: {exc}") from exc


# -- pure decisions ----------------------------------------------------------------------------
def bulk_deferral_reason(
    config: PolicyConfig,
    on_ac: bool | None,
    battery_percent: float | None,
    loads: Sequence[float],
    load_high_for_s: float = 0.0,
) -> str | None:
    """Why bulk work must wait now, or None when it may run. `load_high_for_s`: how long the
    load has been above the threshold without a break (see load_max_defer_s)."""
    reasons = []
    if (
        battery_percent is not None
        and on_ac is not True
        and battery_percent < config.battery_min_percent
    ):
        reasons.append(
            f"on battery at {battery_percent:.0f}% (below {config.battery_min_percent:g}%)"
        )
    if load_is_high(config, loads) and load_high_for_s < config.load_max_defer_s:
        reasons.append(
            f"system load {loads[-1]:.2f} above {config.load_max:g} "
            f"for {config.load_readings} reading(s)"
        )
    return "; ".join(reasons) or None


def load_is_high(config: PolicyConfig, loads: Sequence[float]) -> bool:
    """The last `load_readings` samples are all above `load_max`."""
    n = config.load_readings
    recent = list(loads)[-n:]
    return len(recent) == n and all(x > config.load_max for x in recent)


def disk_threshold(config: PolicyConfig, total: int | None) -> int:
    """Bytes that must stay free: disk_min_bytes, or disk_min_fraction of the disk if smaller."""
    if total and config.disk_min_fraction > 0:
        return min(config.disk_min_bytes, int(total * config.disk_min_fraction))
    return config.disk_min_bytes


def disk_is_low(config: PolicyConfig, free: int | None, total: int | None) -> bool:
    return free is not None and free < disk_threshold(config, total)


@dataclass(frozen=True)
class DiskReading:
    folder: Path
    filesystem: str
    free: int | None
    total: int | None
    low: bool

    def warning(self) -> str:
        free = "?" if self.free is None else str(self.free // MiB)
        return (
            f"disk almost full on {self.filesystem}: {free} MiB free; "
            "not writing new files until space is freed"
        )


class SyncGate(Protocol):
    """What a SpaceSync asks before bulk work and before writing file contents."""

    def defer_bulk(self, size: int) -> str | None: ...

    def disk_blocked(self, folder: Path) -> str | None: ...


class Policy:
    """Decision state over a `ResourceProbe`. `sample()` takes power and load readings; disk
    readings are taken on demand per folder (a statvfs call)."""

    def __init__(
        self,
        probe: ResourceProbe,
        config: PolicyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.config = config or PolicyConfig()
        self.clock = clock
        self.load_high_since: float | None = None
        self.on_ac: bool | None = None
        self.battery_percent: float | None = None
        self.load: float | None = None
        self.loads: deque[float] = deque(maxlen=self.config.load_readings)
        self.bulk_reason: str | None = None
        self.disks: dict[Path, DiskReading] = {}
        self.bulk_ok = asyncio.Event()
        self._fs_cache: dict[Path, str] = {}
        self.sample()

    # -- readings ---------------------------------------------------------------------------
    def sample(self) -> tuple[bool, bool]:
        """Read power and load. Returns (bulk work just became allowed, AC state changed)."""
        was_allowed = self.allow_bulk()
        old_ac = self.on_ac
        self.on_ac, self.battery_percent = self.probe.power()
        self.load = self.probe.load()
        if self.load is not None:
            self.loads.append(self.load)
        now = self.clock()
        if load_is_high(self.config, self.loads):
            if self.load_high_since is None:
                self.load_high_since = now
        else:
            self.load_high_since = None
        high_for = 0.0 if self.load_high_since is None else now - self.load_high_since
        reason = bulk_deferral_reason(
            self.config, self.on_ac, self.battery_percent, self.loads, high_for
        )
        if reason != self.bulk_reason:
            if reason:
                log.info("deferring bulk work: %s", reason)
            else:
                log.info("bulk work allowed again")
        self.bulk_reason = reason
        if reason is None:
            self.bulk_ok.set()
        else:
            self.bulk_ok.clear()
        return (not was_allowed and self.allow_bulk()), old_ac != self.on_ac

    def check_disk(self, folder: Path) -> DiskReading:
        free = self.probe.disk_free(folder)
        total = self.probe.disk_total(folder)
        fs = self._fs_cache.get(folder)
        if fs is None:
            fs = self._fs_cache[folder] = filesystem_of(folder)
        reading = DiskReading(folder, fs, free, total, disk_is_low(self.config, free, total))
        old = self.disks.get(folder)
        if old is None or old.low != reading.low:
            if reading.low:
                log.warning("%s", reading.warning())
            elif old is not None:
                log.info("disk space on %s recovered: writing pending files", fs)
        self.disks[folder] = reading
        return reading

    # -- the gate SpaceSync asks -------------------------------------------------------------
    def allow_bulk(self) -> bool:
        return self.bulk_reason is None

    def defer_bulk(self, size: int) -> str | None:
        """Why work on `size` bytes must wait, or None to go ahead."""
        if size <= self.config.bulk_file_bytes or self.bulk_reason is None:
            return None
        return self.bulk_reason

    def disk_blocked(self, folder: Path) -> str | None:
        reading = self.check_disk(folder)
        return reading.warning() if reading.low else None

    # -- reporting ---------------------------------------------------------------------------
    def state(self) -> PolicyState:
        if any(d.low for d in self.disks.values()):
            return "disk_full"
        if self.bulk_reason is not None:
            return "deferring_bulk"
        return "normal"

    def status(self) -> PolicyStatus:
        reasons = [d.warning() for d in self.disks.values() if d.low]
        if self.bulk_reason:
            reasons.append(f"deferring bulk work: {self.bulk_reason}")
        return PolicyStatus(
            state=self.state(),
            reasons=reasons,
            on_ac=self.on_ac,
            battery_percent=self.battery_percent,
            load=None if self.load is None else round(self.load, 3),
            headless=self.probe.headless,
        )

    def capabilities(self, folder: Path, now: float | None = None) -> Capabilities:
        """This device's capabilities as published into the space whose folder is `folder`."""
        free = self.check_disk(folder).free
        return Capabilities(
            cpu_count=min(max(self.probe.cpu_count(), 0), 0xFFFF),
            memory_total=max(self.probe.memory_total(), 0),
            disk_free=None if free is None else max(free, 0),
            on_ac=self.on_ac,
            battery_percent=(
                None if self.battery_percent is None else min(max(self.battery_percent, 0.0), 100.0)
            ),
            headless=self.probe.headless,
            measured_at=int(now if now is not None else wall()),
        )


def changed_work(root: Path, known: dict[str, tuple[int, int, int]]) -> tuple[int, int]:
    """(files, bytes) in `root` that are new or changed against `known` (path -> size, mtime_ns,
    inode): what a scan would have to read and hash. Stat-only; the folder is not read."""
    count = size = 0
    stack = [(root, "")]
    while stack:
        base, rel = stack.pop()
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for e in entries:
            path = rel + e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), path + "/"))
                    continue
                if not e.is_file(follow_symlinks=False):
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if known.get(path) != (st.st_size, st.st_mtime_ns, st.st_ino):
                count += 1
                size += st.st_size
    return count, size


async def wait_for_scan(policy: Policy, sync: SpaceSync) -> None:
    """Hold a start-up scan back while it would be bulk work and bulk work is deferred."""
    if policy.allow_bulk():
        return
    known = {p: r.stat_key() for p, r in sync.files.items()}
    count, size = await asyncio.to_thread(changed_work, sync.root, known)
    cfg = policy.config
    if count <= cfg.bulk_scan_files and size <= cfg.bulk_scan_bytes:
        return
    while not policy.allow_bulk():
        sync.warnings["scan"] = (
            f"scan of {count} changed file(s) ({size / MiB:.1f} MiB) deferred: {policy.bulk_reason}"
        )
        await policy.bulk_ok.wait()
    sync.warnings.pop("scan", None)


class PolicyMonitor:
    """The agent task that samples resources every `sample_interval_s` and acts on changes:
    resumes deferred bulk work, writes pending files once the disk has room again, keeps the
    disk warning of each space current, and republishes this device's capabilities every
    `publish_interval_s` or when the power source changes."""

    def __init__(
        self,
        policy: Policy,
        usage: ProcessUsage,
        spaces: Callable[[], Iterable[SpaceSync]],
        publish: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.usage = usage
        self.spaces = spaces
        self.publish = publish
        self.clock = clock
        self.last_publish = clock()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.policy.config.sample_interval_s)
            if stop.is_set():
                break
            try:
                await self.tick()
            except Exception:  # one bad tick must not end resource monitoring
                log.exception("resource monitor tick failed")

    async def tick(self) -> None:
        _, power_changed = self.policy.sample()
        self.usage.sample()
        for sync in list(self.spaces()):
            reading = self.policy.check_disk(sync.root)
            if reading.low:
                sync.note_disk_low(reading.warning())
            else:
                await sync.materialize_pending()
            if self.policy.allow_bulk() and sync.deferred:
                await sync.resume_deferred()
        now = self.clock()
        if power_changed or now - self.last_publish >= self.policy.config.publish_interval_s:
            self.last_publish = now
            await self.publish()

    def agent_status(self) -> AgentStatus:
        return AgentStatus(
            pid=self.usage.pid,
            cpu_percent=round(self.usage.cpu_percent, 1),
            rss_bytes=self.usage.rss_bytes,
            uptime_s=round(self.usage.uptime_s, 1),
            policy=self.policy.status(),
        )
