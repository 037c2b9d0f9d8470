"""Relay metrics: counters fed by the connection handlers, rendered in the Prometheus text
exposition format (version 0.0.4) by :func:`render`.

Counting is synchronous and allocation-free on the hot path (a few integer additions per frame);
everything that needs the store or the live connection table is gathered at scrape time by
``relay/ops_http.py`` and passed in as a :class:`Snapshot`.

Counters live for the process: they restart at 0 when the relay restarts, which Prometheus'
``rate()``/``increase()`` handle (counter resets). Rates are Prometheus' job, not ours.

Per-space storage is labelled with a *hash* of the space id by default, never the raw id: a space
id is what a joiner presents to the relay, and anyone holding one can make the relay forward join
requests to that space's admins. Metrics travel to monitoring systems, dashboards and
screenshots that are far less guarded than the relay's database, so they carry a label that lets
an operator tell spaces apart and, knowing a space id, find its series
(:func:`space_label`), but that does not reveal the id. ``raw`` (the full hex id) is available for
operators who keep metrics as private as the database; ``none`` drops the per-space series (one
series per space is also a cardinality cost on relays with many thousands of spaces).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from qmoi_sync.protocol import frames as F

SpaceLabelMode = Literal["hash", "raw", "none"]
SPACE_LABEL_MODES: tuple[SpaceLabelMode, ...] = ("hash", "raw", "none")

#: Connection states reported by ``qmoi_relay_connections`` (always all of them, 0 included).
CONNECTION_STATES = ("handshake", "joining", "authenticated", "subscribed")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SPACE_LABEL_CONTEXT = b"qmoi-sync relay metrics space label v1\0"


def space_label(space_id: bytes, mode: SpaceLabelMode = "hash") -> str:
    """The ``space`` label of a space: 12 hex chars of a domain-separated SHA-256 of its id
    (stable across restarts and relays), or the raw id in hex."""
    if mode == "raw":
        return space_id.hex()
    return hashlib.sha256(_SPACE_LABEL_CONTEXT + space_id).hexdigest()[:12]


@dataclass
class RelayMetrics:
    """What the relay counted since it started. Fed by ``relay/server.py``."""

    started_monotonic: float = field(default_factory=time.monotonic)
    connections_opened: int = 0
    envelopes_received: int = 0
    bytes_received: int = 0
    envelopes_stored: int = 0
    bytes_stored: int = 0
    envelopes_delivered: int = 0
    bytes_delivered: int = 0
    join_requests: int = 0
    joins: Counter[str] = field(default_factory=Counter)  # result: accepted | refused
    join_forwards: int = 0
    membership_pushes: int = 0
    membership_broadcasts: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # reason = the Error code
    #: Blob channel: PutChunk frames by result (stored, present, quota_exceeded), and bytes.
    blob_puts: Counter[str] = field(default_factory=Counter)
    blob_bytes_received: int = 0
    blob_bytes_stored: int = 0
    blob_gets: Counter[str] = field(default_factory=Counter)  # result: served | missing
    blob_bytes_served: int = 0

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    # -- hooks (called by the relay; keep them cheap) ----------------------------------------

    def connection_opened(self) -> None:
        self.connections_opened += 1

    def frame_received(self, frame: F.Frame) -> None:
        if isinstance(frame, F.Publish):
            self.envelopes_received += 1
            self.bytes_received += len(frame.envelope)
        elif isinstance(frame, F.PutChunk):
            self.blob_bytes_received += len(frame.data)
        elif isinstance(frame, F.PushMembership):
            self.membership_pushes += 1
        elif isinstance(frame, F.JoinRequest):
            self.join_requests += 1

    def frame_sent(self, frame: F.Frame) -> None:
        """A frame sent (or queued to a connection's mailbox) by the relay."""
        if isinstance(frame, F.Deliver):
            self.envelopes_delivered += 1
            self.bytes_delivered += len(frame.envelope)
        elif isinstance(frame, F.ChunkData):
            self.blob_gets["served"] += 1
            self.blob_bytes_served += len(frame.data)
        elif isinstance(frame, F.ChunkMissing):
            self.blob_gets["missing"] += 1
        elif isinstance(frame, F.Error):
            self.refusals[frame.code] += 1
        elif isinstance(frame, F.Membership):
            self.membership_broadcasts += 1
        elif isinstance(frame, F.JoinResult):
            self.joins["accepted" if frame.ok else "refused"] += 1
        elif isinstance(frame, F.JoinForward):
            self.join_forwards += 1

    def blob_put(self, result: str, size: int) -> None:
        """A PutChunk was decided: stored, present (already there) or quota_exceeded."""
        self.blob_puts[result] += 1
        if result == "stored":
            self.blob_bytes_stored += size

    def refused(self, reason: str) -> None:
        """A refusal that sends no Error frame (e.g. an oversized frame websockets closed)."""
        self.refusals[reason] += 1

    def on_commit(self, space_id: bytes, envs: Sequence[object]) -> None:
        """Store commit listener: envelopes that were durably stored."""
        del space_id
        self.envelopes_stored += len(envs)
        self.bytes_stored += sum(len(getattr(e, "data", b"")) for e in envs)


@dataclass(frozen=True)
class Snapshot:
    """Scrape-time state gathered from the server and its store."""

    connections: dict[str, int]
    spaces: int
    space_bytes: Sequence[tuple[bytes, int]]
    store_batches: int
    duplicates: int
    store_ok: bool = True
    space_label_mode: SpaceLabelMode = "hash"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self,
        name: str,
        kind: Literal["counter", "gauge"],
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_fmt(value)}")
            else:
                self.lines.append(f"{name} {_fmt(value)}")

    def single(
        self, name: str, kind: Literal["counter", "gauge"], help_text: str, value: float
    ) -> None:
        self.metric(name, kind, help_text, [({}, value)])


def render(m: RelayMetrics, snap: Snapshot) -> str:
    """The Prometheus text exposition of ``m`` and ``snap``."""
    w = _Writer()
    w.single("qmoi_relay_uptime_seconds", "gauge", "Seconds since the relay started.", m.uptime_s)
    w.single(
        "qmoi_relay_store_up",
        "gauge",
        "1 if the store answers (same check as /healthz), else 0.",
        1 if snap.store_ok else 0,
    )
    w.metric(
        "qmoi_relay_connections",
        "gauge",
        "Open websocket connections by state (handshake, joining, authenticated, subscribed).",
        [({"state": s}, snap.connections.get(s, 0)) for s in CONNECTION_STATES],
    )
    w.single(
        "qmoi_relay_connections_opened_total",
        "counter",
        "Websocket connections accepted.",
        m.connections_opened,
    )
    for what, count, size, text in (
        ("received", m.envelopes_received, m.bytes_received, "received in Publish frames"),
        ("stored", m.envelopes_stored, m.bytes_stored, "durably stored (committed)"),
        ("delivered", m.envelopes_delivered, m.bytes_delivered, "sent in Deliver frames"),
    ):
        w.single(f"qmoi_relay_envelopes_{what}_total", "counter", f"Envelopes {text}.", count)
        w.single(
            f"qmoi_relay_envelope_bytes_{what}_total", "counter", f"Envelope bytes {text}.", size
        )
    w.single(
        "qmoi_relay_envelopes_duplicate_total",
        "counter",
        "Publishes acknowledged as duplicates (already stored, not stored again).",
        snap.duplicates,
    )
    w.single(
        "qmoi_relay_store_commit_batches_total",
        "counter",
        "Group commits (one fsync each).",
        snap.store_batches,
    )
    w.metric(
        "qmoi_relay_refusals_total",
        "counter",
        "Refusals by reason: the code of each Error frame sent (too_large: oversized frame "
        "closed with 1009).",
        [({"reason": r}, n) for r, n in sorted(m.refusals.items())],
    )
    w.metric(
        "qmoi_relay_chunk_puts_total",
        "counter",
        "Chunk uploads (PutChunk) by result: stored, present (already stored), quota_exceeded.",
        [({"result": r}, m.blob_puts.get(r, 0)) for r in ("stored", "present", "quota_exceeded")],
    )
    w.metric(
        "qmoi_relay_chunk_gets_total",
        "counter",
        "Chunk downloads (GetChunk) by result: served, missing.",
        [({"result": r}, m.blob_gets.get(r, 0)) for r in ("served", "missing")],
    )
    for what, size in (
        ("received", m.blob_bytes_received),
        ("stored", m.blob_bytes_stored),
        ("served", m.blob_bytes_served),
    ):
        w.single(f"qmoi_relay_chunk_bytes_{what}_total", "counter", f"Chunk bytes {what}.", size)
    w.single("qmoi_relay_join_requests_total", "counter", "Join requests.", m.join_requests)
    w.metric(
        "qmoi_relay_joins_total",
        "counter",
        "Join requests answered by an admin, by result (accepted, refused).",
        [({"result": r}, m.joins.get(r, 0)) for r in ("accepted", "refused")],
    )
    w.single(
        "qmoi_relay_join_forwards_total",
        "counter",
        "Join requests forwarded to admin devices.",
        m.join_forwards,
    )
    w.single(
        "qmoi_relay_membership_pushes_total",
        "counter",
        "Membership logs pushed by devices (PushMembership frames).",
        m.membership_pushes,
    )
    w.single(
        "qmoi_relay_membership_broadcasts_total",
        "counter",
        "Membership frames sent to devices after a membership change.",
        m.membership_broadcasts,
    )
    w.single("qmoi_relay_spaces", "gauge", "Spaces registered on this relay.", snap.spaces)
    w.single(
        "qmoi_relay_storage_bytes",
        "gauge",
        "Envelope bytes stored, all spaces.",
        sum(n for _s, n in snap.space_bytes),
    )
    if snap.space_label_mode != "none":
        w.metric(
            "qmoi_relay_space_storage_bytes",
            "gauge",
            "Envelope bytes stored per space (label: hashed space id unless configured raw).",
            [
                ({"space": space_label(sid, snap.space_label_mode)}, n)
                for sid, n in snap.space_bytes
            ],
        )
    return "\n".join(w.lines) + "\n"
