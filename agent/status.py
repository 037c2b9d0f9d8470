"""Typed status report: what `qmoi-sync status --json` prints (schema documented in README)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

SpaceState = Literal["idle", "syncing", "offline", "error", "paused"]
PolicyState = Literal["normal", "deferring_bulk", "disk_full"]


class DeviceStatus(BaseModel):
    id: str
    short_id: str
    name: str


class RelayStatus(BaseModel):
    url: str | None
    connected: bool
    last_error: str | None = None


class CapabilitiesStatus(BaseModel):
    """What a device published about itself (agent/resources.py readings)."""

    cpu_count: int | None = None
    memory_total: int | None = None
    disk_free: int | None = None  # bytes free on that device's filesystem of this space's folder
    on_ac: bool | None = None
    battery_percent: float | None = None
    headless: bool = False


class MemberStatus(BaseModel):
    id: str
    short_id: str
    name: str | None
    role: str
    platform: str | None = None
    this_device: bool = False
    last_seen: str | None = None  # when the device last published its info (ISO 8601 UTC)
    capabilities: CapabilitiesStatus | None = None


class SpaceStatus(BaseModel):
    id: str
    name: str
    folder: str
    role: str | None
    state: SpaceState
    relay: RelayStatus
    pending_out: int
    last_sync: str | None
    conflicts: int
    quarantined: int
    files: int
    warnings: list[str]
    devices: list[MemberStatus]


class PolicyStatus(BaseModel):
    """The resource policy (agent/policy.py): what work is being held back, and why."""

    state: PolicyState
    reasons: list[str] = []
    on_ac: bool | None = None
    battery_percent: float | None = None
    load: float | None = None
    headless: bool = False


class AgentStatus(BaseModel):
    pid: int
    cpu_percent: float  # since the previous sample; 100 = one full core
    rss_bytes: int
    uptime_s: float
    policy: PolicyStatus


class StatusReport(BaseModel):
    schema_version: int = 1
    device: DeviceStatus
    agent_running: bool
    spaces: list[SpaceStatus]
    agent: AgentStatus | None = None  # None when the agent is not running
