"""Typed status report: what `qmoi-sync status --json` prints (schema documented in README)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

SpaceState = Literal["idle", "syncing", "offline", "error", "paused"]
PolicyState = Literal["normal", "deferring_bulk", "disk_full"]
PeerPath = Literal["lan", "relay"]


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
    # How this device reaches that one now: "lan" (a direct, authenticated peer connection),
    # "relay" (through the connected relay), or None (neither). `address` is the peer's
    # ip:port, or the relay URL; `rtt_ms` the round trip of that connection (for "relay", the
    # hop from this device to the relay).
    path: PeerPath | None = None
    address: str | None = None
    rtt_ms: float | None = None
    # Binary-file chunk bytes exchanged with that device over the current LAN session.
    lan_chunk_bytes_in: int | None = None
    lan_chunk_bytes_out: int | None = None
    # Connected now: this device while its agent runs; another one while the relay lists it
    # as connected to this space (Presence) or while it is a connected LAN peer.
    online: bool = False


class LanStatus(BaseModel):
    """LAN peers of a space (agent/lan.py, agent/peer_sync.py)."""

    enabled: bool
    port: int | None = None
    peers: int = 0  # devices connected over the LAN now
    received: int = 0  # stream envelopes received from LAN peers
    sent: int = 0  # stream envelopes sent to LAN peers
    resyncs: int = 0  # state-vector resyncs asked of LAN peers
    refused: int = 0  # peer connections refused (failed challenge, not a member)
    chunks_served: int = 0  # binary-file chunks sent to LAN peers (and their sealed bytes)
    chunk_bytes_served: int = 0
    chunks_received: int = 0  # chunks received from LAN peers, before verification
    chunk_bytes_received: int = 0


class SettingsDocStatus(BaseModel):
    """One settings document of a space, as this device syncs it (agent/settings_sync.py)."""

    name: str
    format: str
    path: str | None  # this device's file; None: not mapped here
    # ok | invalid (does not parse: not synced, not overwritten) | error | waiting | removed
    # (from the space, elsewhere) | unmapped (known in the space, no file on this device)
    state: str
    error: str | None = None
    keys: int = 0  # keys synced
    local_keys: int = 0  # keys kept on this device by `settings local` patterns
    secret_keys: list[str] = []  # keys kept on this device because they look like credentials
    conflicts: int = 0  # keys whose concurrent losing values `qmoi-sync conflicts` lists


class SnapshotStatus(BaseModel):
    """S3 snapshots of a space (agent/snapshot_service.py)."""

    target: str | None = None  # s3://bucket/prefix, None when not configured
    every_s: int | None = None
    duty: str = ""  # who takes snapshots, from this device's point of view
    holder: bool = False  # this device holds snapshot duty
    running: bool = False
    progress: dict[str, Any] | None = None  # while a snapshot or restore runs
    last_id: str | None = None
    last_at: str | None = None  # ISO 8601 UTC
    last_error: str | None = None  # e.g. bucket unreachable, credentials refused
    retention_note: str | None = None


class OffenderStatus(BaseModel):
    """Who sent what this device refused (agent/offenders.py). ``id`` is a device id, or
    "relay" / "lan" when what was refused proves nothing about the device it names (bad
    signature, unknown sender...) and is charged to the path it came by, or when the relay
    replayed, reordered or withheld envelopes."""

    id: str
    short_id: str | None = None  # device offenders only
    name: str | None = None  # the device's published name, if known
    what: str  # e.g. "malformed CRDT update", "bad_signature", "replayed an envelope (dropped)"
    count: int
    last: str  # ISO 8601 UTC


class GapStatus(BaseModel):
    """A hole in one sender's relay stream (agent/relay_order.py): seqs below the highest one
    received that never arrived."""

    id: str
    short_id: str
    name: str | None = None
    first_missing: int  # the sender's first seq not received
    missing: int  # seqs missing below the highest received
    held: int  # envelopes received after the gap, held until it fills
    since: str  # ISO 8601 UTC
    repairs: int  # repair attempts (LAN resync / subscribing to the relay again)


class RepairedGapStatus(BaseModel):
    """A gap that was listed in ``gaps`` and closed, and how (the last few)."""

    id: str
    short_id: str
    name: str | None = None
    first_missing: int
    missing: int
    since: str  # ISO 8601 UTC, when it was first seen
    repaired_at: str  # ISO 8601 UTC
    repairs: int
    # "relay re-subscription", "late delivery by the relay", "LAN resync", "LAN peer",
    # "state resync through the relay"
    how: str
    by: str | None = None  # device id of the member whose state filled it (a resync)


class SpaceStatus(BaseModel):
    id: str
    name: str
    folder: str
    role: str | None
    state: SpaceState
    relay: RelayStatus
    pending_out: int  # sealed envelopes not yet acknowledged by the relay
    last_sync: str | None
    conflicts: int
    quarantined: int
    files: int
    warnings: list[str]
    devices: list[MemberStatus]
    lan: LanStatus | None = None
    duplicates: int = 0  # envelopes that arrived twice (LAN and relay) and were applied once
    settings: list[SettingsDocStatus] = []
    snapshot: SnapshotStatus | None = None
    # binary and large files (agent/binary_sync.py): waiting to upload / download, and chunks
    # refused because they failed verification (tampered or corrupt)
    pending_up_files: int = 0
    pending_up_bytes: int = 0
    pending_down_files: int = 0
    pending_down_bytes: int = 0
    chunks_refused: int = 0
    # chunks this device fetched (and verified), by path: LAN peers or the relay's blob channel
    chunks_lan: int = 0
    chunk_bytes_lan: int = 0
    chunks_relay: int = 0
    chunk_bytes_relay: int = 0
    # prefetch (agent/prefetch.py): chunks staged from other devices' hints before their
    # manifest came, how many of those a download used, and hints refused (hostile/invalid)
    chunks_prefetched: int = 0
    chunks_prefetch_used: int = 0
    hints_refused: int = 0
    pending_out_bytes: int = 0  # total size of the `pending_out` envelopes
    # Envelopes the relay delivered that are not applied yet (and their bytes); 0 when offline:
    # undelivered ones stay at the relay and come again on reconnect.
    pending_in: int = 0
    pending_in_bytes: int = 0
    # Transfer rate over the last 10 s (agent/rate.py), bytes/s: envelopes over the relay and
    # the LAN plus binary chunks, up = sent by this device, down = received.
    rate_up_bps: float = 0.0
    rate_down_bps: float = 0.0
    # Refusals by offender (most recent first), and sequence gaps open for a few seconds;
    # both empty when the agent is not running.
    offenders: list[OffenderStatus] = []
    gaps: list[GapStatus] = []
    repaired_gaps: list[RepairedGapStatus] = []
    # State-vector resync through the relay (agent/relay_repair.py): requests this device sent,
    # replies it sent, and requests / replies it ignored (not for it, rate-limited, unknown).
    repair_requests: int = 0
    repair_replies: int = 0
    repair_ignored: int = 0


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
