"""Typed status report: what `qmoi-sync status --json` prints (schema documented in README)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

SpaceState = Literal["idle", "syncing", "offline", "error", "paused"]


class DeviceStatus(BaseModel):
    id: str
    short_id: str
    name: str


class RelayStatus(BaseModel):
    url: str | None
    connected: bool
    last_error: str | None = None


class MemberStatus(BaseModel):
    id: str
    short_id: str
    name: str | None
    role: str
    platform: str | None = None
    this_device: bool = False


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


class StatusReport(BaseModel):
    schema_version: int = 1
    device: DeviceStatus
    agent_running: bool
    spaces: list[SpaceStatus]
