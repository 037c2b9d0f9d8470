"""A space's shared snapshot configuration, kept in the index document.

It lives in its own root map (``snapshot``) of the index document, beside the ``files`` map, so
it syncs to every device like any index change and never mixes with file entries. Each key is a
JSON-encoded leaf, so concurrent changes of *different* keys both survive; concurrent writes of
one key converge to one winner (pycrdt: highest client id), which is all the lease needs — every
device reads the same winner once converged.

Keys:

- ``target``: ``{"url": "s3://bucket/prefix", "endpoint_url", "region", "path_style"}`` —
  never credentials: each device takes those from boto3's standard chain.
- ``policy``: ``{"every_s", "keep_last", "keep_daily", "gc_grace_s"}``.
- ``lease``: ``{"device": sign_pk hex, "until": unix seconds}`` — snapshot duty
  (agent/snapshot_duty.py).
- ``last``: ``{"seq", "id", "at", "hash"}`` — the latest snapshot written (so every device,
  including one about to restore, knows what it should at least find: rollback detection).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, Map, TransactionEvent

from qmoi_sync.agent.snapshot_s3 import TargetConfig

SNAPSHOT_MAP = "snapshot"
_EMPTY_UPDATE = b"\x00\x00"

DEFAULT_EVERY_S = 3600
DEFAULT_KEEP_LAST = 24
DEFAULT_KEEP_DAILY = 30
DEFAULT_GC_GRACE_S = 3600


@dataclass(frozen=True)
class SnapshotPolicy:
    every_s: int = DEFAULT_EVERY_S
    keep_last: int = DEFAULT_KEEP_LAST
    keep_daily: int = DEFAULT_KEEP_DAILY
    #: unreferenced objects younger than this are not garbage-collected (they may belong to a
    #: snapshot another device is still uploading)
    gc_grace_s: int = DEFAULT_GC_GRACE_S

    def to_json(self) -> dict[str, Any]:
        return {
            "every_s": self.every_s,
            "keep_last": self.keep_last,
            "keep_daily": self.keep_daily,
            "gc_grace_s": self.gc_grace_s,
        }

    @classmethod
    def from_json(cls, raw: Any) -> SnapshotPolicy:
        if not isinstance(raw, dict):
            return cls()

        def num(key: str, default: int, lo: int) -> int:
            v = raw.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                return default
            return max(lo, int(v))

        return cls(
            every_s=num("every_s", DEFAULT_EVERY_S, 1),
            keep_last=num("keep_last", DEFAULT_KEEP_LAST, 1),
            keep_daily=num("keep_daily", DEFAULT_KEEP_DAILY, 0),
            gc_grace_s=num("gc_grace_s", DEFAULT_GC_GRACE_S, 0),
        )


@dataclass(frozen=True)
class Lease:
    device: bytes
    until: float


@dataclass(frozen=True)
class LastSnapshot:
    seq: int
    id: str
    at: float
    hash: str


@dataclass(frozen=True)
class SharedConfig:
    target: TargetConfig | None = None
    policy: SnapshotPolicy = SnapshotPolicy()
    lease: Lease | None = None
    last: LastSnapshot | None = None


def _map(doc: Doc[Any]) -> Map[Any]:
    m: Map[Any] = doc.get(SNAPSHOT_MAP, type=Map)
    return m


def _get(m: Map[Any], key: str) -> Any:
    raw = m.get(key)
    if not isinstance(raw, str):
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # another device's junk (deep nesting included)
        return None


def read_config(doc: Doc[Any]) -> SharedConfig:
    """The shared configuration as the document says now (garbage degrades to defaults)."""
    m = _map(doc)
    lease_raw = _get(m, "lease")
    lease = None
    if isinstance(lease_raw, dict):
        dev, until = lease_raw.get("device"), lease_raw.get("until")
        if (
            isinstance(dev, str)
            and len(dev) == 64
            and isinstance(until, int | float)
            and not isinstance(until, bool)
            and math.isfinite(until)
        ):
            try:
                lease = Lease(bytes.fromhex(dev), float(until))
            except ValueError:
                lease = None
    last_raw = _get(m, "last")
    last = None
    if isinstance(last_raw, dict):
        seq, sid, at, h = (last_raw.get(k) for k in ("seq", "id", "at", "hash"))
        if (
            isinstance(seq, int)
            and isinstance(sid, str)
            and isinstance(at, int | float)
            and isinstance(h, str)
        ):
            last = LastSnapshot(seq, sid, float(at), h)
    return SharedConfig(
        target=TargetConfig.from_json(_get(m, "target")),
        policy=SnapshotPolicy.from_json(_get(m, "policy")),
        lease=lease,
        last=last,
    )


def set_fields(doc: Doc[Any], fields: dict[str, Any]) -> bytes:
    """Write JSON leaves (None deletes the key) in one transaction; returns its update."""
    m = _map(doc)
    captured: list[bytes] = []

    def on_commit(event: TransactionEvent) -> None:
        captured.append(event.update)

    sub = doc.observe(on_commit)
    try:
        with doc.transaction():
            for key, value in fields.items():
                if value is None:
                    if key in m:
                        del m[key]
                    continue
                encoded = json.dumps(value, separators=(",", ":"), sort_keys=True)
                if m.get(key) != encoded:
                    m[key] = encoded
    finally:
        doc.unobserve(sub)
    return captured[0] if captured else _EMPTY_UPDATE


def lease_json(device: bytes, until: float) -> dict[str, Any]:
    return {"device": device.hex(), "until": round(until, 3)}
