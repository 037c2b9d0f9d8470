"""Envelope plaintexts: ``kind u8`` then a body.

======  =============  ==================================================================
kind    payload        body
======  =============  ==================================================================
0x01    Updates        count u32 | (doc_id 16 | update blob32)*
0x02    DeviceInfo     name str16 (<= 128) | platform str16 (<= 64) | agent_version str16 (<= 64)
0x03    StateRequest   count u32 | (doc_id 16 | state_vector blob32)*   (sync step 1)
0x04    StateReply     count u32 | (doc_id 16 | update blob32)*         (sync step 2)
0x05    DeviceInfo v2  the 0x02 body | capabilities blob16 (<= 256)
0x06    Updates        the 0x01 body, ``full_state``: the first envelope of the sender's whole
        (full state)   state (this one and the next ones it sealed in the same commit), sealed
                       when it moved to another relay: it covers the sender's stream below this
                       seq, which the new relay never had (a receiver sees no gap there)
0x07    RepairRequest  request_id 16 | responders: count u8 (<= 16) | sign_pk 32* |
                       gaps: count u16 (<= 256) | (sender 32 | first_missing u64 | top u64)* |
                       the 0x03 body (state vectors)
0x08    RepairReply    request_id 16 | requester 32 | part u16 | parts u16 (part < parts) |
                       covers: count u16 (<= 256) | (sender 32 | seq u64)* | the 0x01 body
======  =============  ==================================================================

Kinds 0x07/0x08 are the state-vector resync *through the relay* (agent/relay_repair.py): stream
envelopes (new seqs of their sender, so every device consumes them in order), addressed inside
the sealed payload — the relay sees neither who asks whom nor what. A request names the devices
asked to answer (none: any writer) and the gaps it is about; a reply names its request and
requester, and ``covers`` says, per sender of those gaps, up to which of its seqs the replier's
state holds everything (in the last part only; parts are numbered so a requester knows when a
split reply is whole).

The index document has the all-zero doc id (:data:`INDEX_DOC_ID`).

DeviceInfo is versioned by its kind byte: a :class:`DeviceInfo` without capabilities is encoded as
kind 0x02 exactly as before (so every 0x02 payload ever sent still decodes, to
``capabilities=None``); with capabilities it is kind 0x05, whose body is the 0x02 body followed by
a length-prefixed capabilities record. The record starts with its own version byte::

    version u8 (1) | flags u8 | cpu_count u16 | memory_total u64 | disk_free u64 |
    battery u16 (hundredths of a percent, <= 10000) | measured_at u64 (unix seconds)

    flags: 0x01 on_ac is known, 0x02 on_ac, 0x04 battery is known, 0x08 disk_free is known,
           0x10 headless. Other bits must be 0 in version 1.

A version-1 record has exactly 30 bytes. Later versions only append fields: a decoder reads the
version-1 prefix of a newer record and ignores the rest of the (length-delimited) record, so the
payload as a whole stays strictly framed. Unknown fields are dropped, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _codec as c
from .envelope import MAX_PLAINTEXT
from .errors import MalformedError, TooLargeError

__all__ = [
    "CAPABILITIES_VERSION",
    "DOC_ID_LEN",
    "INDEX_DOC_ID",
    "MAX_CAPABILITIES",
    "MAX_ITEMS",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_REPAIR_GAPS",
    "MAX_REPAIR_PARTS",
    "MAX_RESPONDERS",
    "MAX_SHORT_STR",
    "Capabilities",
    "DeviceInfo",
    "DocUpdate",
    "Payload",
    "RepairGap",
    "RepairReply",
    "RepairRequest",
    "StateReply",
    "StateRequest",
    "Updates",
    "decode_payload",
    "encode_payload",
]

DOC_ID_LEN = 16
INDEX_DOC_ID = bytes(DOC_ID_LEN)
#: Most items (updates / state vectors) in one payload.
MAX_ITEMS = 100_000
#: Largest payload (what fits in an envelope).
MAX_PAYLOAD = MAX_PLAINTEXT
#: Longest device name (UTF-8 bytes).
MAX_NAME = 128
#: Longest platform / agent version strings (UTF-8 bytes).
MAX_SHORT_STR = 64
#: Largest capabilities record (any version).
MAX_CAPABILITIES = 256
CAPABILITIES_VERSION = 1
_CAPS_V1_LEN = 30
_F_AC_KNOWN, _F_ON_AC, _F_BATTERY, _F_DISK, _F_HEADLESS = 0x01, 0x02, 0x04, 0x08, 0x10
_F_ALL_V1 = _F_AC_KNOWN | _F_ON_AC | _F_BATTERY | _F_DISK | _F_HEADLESS
_U64_MAX = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class DocUpdate:
    doc_id: bytes
    update: bytes


@dataclass(frozen=True)
class Updates:
    items: list[DocUpdate] = field(default_factory=list)
    #: Part of the sender's whole state (kind 0x06): everything it sealed before is included.
    full_state: bool = False


@dataclass(frozen=True)
class StateReply:
    """Answer to a :class:`StateRequest`: the updates the requester is missing."""

    items: list[DocUpdate] = field(default_factory=list)


@dataclass(frozen=True)
class Capabilities:
    """What a device can do, as it measured it at ``measured_at`` (unix seconds).

    ``cpu_count``/``memory_total`` 0 mean unknown; ``disk_free`` is the free space on the
    filesystem of the space's folder on that device (bytes). ``battery_percent`` travels in
    hundredths of a percent (the encoder rounds).
    """

    cpu_count: int = 0
    memory_total: int = 0
    disk_free: int | None = None
    on_ac: bool | None = None
    battery_percent: float | None = None
    headless: bool = False
    measured_at: int = 0


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    platform: str = ""
    agent_version: str = ""
    capabilities: Capabilities | None = None


@dataclass(frozen=True)
class StateRequest:
    """Sync step 1: ``items`` is a list of ``(doc_id, state_vector)``."""

    items: list[tuple[bytes, bytes]] = field(default_factory=list)


#: Most devices one repair request asks, and most gaps / covers it is about.
MAX_RESPONDERS = 16
MAX_REPAIR_GAPS = 256
#: Most parts one repair reply is split into.
MAX_REPAIR_PARTS = 4096
_REQUEST_ID_LEN = 16
_PK_LEN = 32


@dataclass(frozen=True)
class RepairGap:
    """A hole in ``sender``'s stream: seqs ``first_missing`` .. below ``top`` (the highest
    received) did not all arrive."""

    sender: bytes
    first_missing: int
    top: int


@dataclass(frozen=True)
class RepairRequest:
    """Sync step 1 through the relay: "I miss these senders' seqs; here are my state vectors".
    ``responders``: the devices asked to answer (empty: any writer of the space)."""

    request_id: bytes
    responders: list[bytes] = field(default_factory=list)
    gaps: list[RepairGap] = field(default_factory=list)
    items: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class RepairReply:
    """Sync step 2 through the relay, for ``requester`` only: part ``part`` of ``parts`` of the
    diff against its state vectors. ``covers``: (sender, seq) — the replier's state holds every
    update of ``sender`` up to ``seq`` (sent in the last part)."""

    request_id: bytes
    requester: bytes
    part: int = 0
    parts: int = 1
    covers: list[tuple[bytes, int]] = field(default_factory=list)
    items: list[DocUpdate] = field(default_factory=list)


Payload = Updates | DeviceInfo | StateRequest | StateReply | RepairRequest | RepairReply

_UPDATES, _DEVICE_INFO, _STATE_REQUEST, _STATE_REPLY = 0x01, 0x02, 0x03, 0x04
_DEVICE_INFO_V2 = 0x05
_FULL_STATE = 0x06
_REPAIR_REQUEST, _REPAIR_REPLY = 0x07, 0x08


def _encode_caps(cap: Capabilities) -> bytes:
    if not isinstance(cap, Capabilities):
        raise MalformedError("capabilities must be Capabilities")
    flags = 0
    if cap.on_ac is not None:
        flags |= _F_AC_KNOWN | (_F_ON_AC if cap.on_ac else 0)
    battery = 0
    if cap.battery_percent is not None:
        pct = cap.battery_percent
        if not isinstance(pct, int | float) or not 0.0 <= pct <= 100.0:  # also refuses NaN
            raise MalformedError(f"battery_percent {pct!r} is not within 0..100")
        flags |= _F_BATTERY
        battery = round(pct * 100)
    if cap.disk_free is not None:
        flags |= _F_DISK
    if cap.headless:
        flags |= _F_HEADLESS
    return b"".join(
        [
            c.u8(CAPABILITIES_VERSION),
            c.u8(flags),
            c.u16(cap.cpu_count),
            c.u64(cap.memory_total),
            c.u64(cap.disk_free if cap.disk_free is not None else 0),
            c.u16(battery),
            c.u64(cap.measured_at),
        ]
    )


def _decode_caps(raw: bytes) -> Capabilities:
    r = c.Reader(raw, "capabilities")
    version = r.u8("version")
    if version == 0:
        raise MalformedError("capabilities: version 0 is not valid")
    if len(raw) < _CAPS_V1_LEN or (version == 1 and len(raw) != _CAPS_V1_LEN):
        raise MalformedError(f"capabilities v{version}: {len(raw)} bytes")
    flags = r.u8("flags")
    if version == 1 and flags & ~_F_ALL_V1:
        raise MalformedError(f"capabilities: unknown flags 0x{flags:02x}")
    cpu_count = r.u16("cpu_count")
    memory_total = r.u64("memory_total")
    disk_free = r.u64("disk_free")
    battery = r.u16("battery")
    measured_at = r.u64("measured_at")
    if battery > 10000 or (battery and not flags & _F_BATTERY):
        raise MalformedError(f"capabilities: battery {battery} out of range")
    if flags & _F_ON_AC and not flags & _F_AC_KNOWN:
        raise MalformedError("capabilities: on_ac set but not known")
    if disk_free and not flags & _F_DISK:
        raise MalformedError("capabilities: disk_free set but not known")
    # newer versions append fields after these: ignored here (the record is length-delimited)
    return Capabilities(
        cpu_count=cpu_count,
        memory_total=memory_total,
        disk_free=disk_free if flags & _F_DISK else None,
        on_ac=bool(flags & _F_ON_AC) if flags & _F_AC_KNOWN else None,
        battery_percent=battery / 100 if flags & _F_BATTERY else None,
        headless=bool(flags & _F_HEADLESS),
        measured_at=measured_at,
    )


def _pairs(items: list[tuple[bytes, bytes]], what: str) -> list[bytes]:
    if len(items) > MAX_ITEMS:
        raise TooLargeError(f"{what}: {len(items)} items, limit {MAX_ITEMS}")
    parts = [c.u32(len(items))]
    for doc_id, blob in items:
        parts += [c.fixed(doc_id, DOC_ID_LEN, "doc_id"), c.blob32(blob, MAX_PAYLOAD, what)]
    return parts


def encode_payload(p: Payload) -> bytes:
    if isinstance(p, Updates | StateReply):
        kind = _STATE_REPLY
        if isinstance(p, Updates):
            kind = _FULL_STATE if p.full_state else _UPDATES
        for it in p.items:
            if not isinstance(it, DocUpdate):
                raise MalformedError("items must be DocUpdate")
        parts = [c.u8(kind), *_pairs([(u.doc_id, u.update) for u in p.items], "update")]
    elif isinstance(p, StateRequest):
        parts = [c.u8(_STATE_REQUEST), *_pairs(list(p.items), "state vector")]
    elif isinstance(p, RepairRequest):
        if len(p.responders) > MAX_RESPONDERS:
            raise TooLargeError(f"repair request: {len(p.responders)} responders")
        if len(p.gaps) > MAX_REPAIR_GAPS:
            raise TooLargeError(f"repair request: {len(p.gaps)} gaps")
        parts = [
            c.u8(_REPAIR_REQUEST),
            c.fixed(p.request_id, _REQUEST_ID_LEN, "request_id"),
            c.u8(len(p.responders)),
            *[c.fixed(pk, _PK_LEN, "responder") for pk in p.responders],
            c.u16(len(p.gaps)),
        ]
        for g in p.gaps:
            if not isinstance(g, RepairGap) or not 1 <= g.first_missing <= g.top:
                raise MalformedError("repair request: a gap must be RepairGap, 1 <= first <= top")
            parts += [
                c.fixed(g.sender, _PK_LEN, "gap sender"),
                c.u64(g.first_missing),
                c.u64(g.top),
            ]
        parts += _pairs(list(p.items), "state vector")
    elif isinstance(p, RepairReply):
        if not 0 <= p.part < p.parts <= MAX_REPAIR_PARTS:
            raise MalformedError(f"repair reply: part {p.part} of {p.parts}")
        if len(p.covers) > MAX_REPAIR_GAPS:
            raise TooLargeError(f"repair reply: {len(p.covers)} covers")
        for it in p.items:
            if not isinstance(it, DocUpdate):
                raise MalformedError("items must be DocUpdate")
        parts = [
            c.u8(_REPAIR_REPLY),
            c.fixed(p.request_id, _REQUEST_ID_LEN, "request_id"),
            c.fixed(p.requester, _PK_LEN, "requester"),
            c.u16(p.part),
            c.u16(p.parts),
            c.u16(len(p.covers)),
        ]
        for sender, seq in p.covers:
            parts += [c.fixed(sender, _PK_LEN, "covered sender"), c.u64(seq)]
        parts += _pairs([(u.doc_id, u.update) for u in p.items], "update")
    elif isinstance(p, DeviceInfo):
        parts = [
            c.u8(_DEVICE_INFO if p.capabilities is None else _DEVICE_INFO_V2),
            c.str16(p.name, MAX_NAME, "name"),
            c.str16(p.platform, MAX_SHORT_STR, "platform"),
            c.str16(p.agent_version, MAX_SHORT_STR, "agent_version"),
        ]
        if p.capabilities is not None:
            parts.append(c.blob16(_encode_caps(p.capabilities), MAX_CAPABILITIES, "capabilities"))
    else:
        raise MalformedError(f"not a payload: {type(p).__name__}")
    out = b"".join(parts)
    if len(out) > MAX_PAYLOAD:
        raise TooLargeError(f"payload is {len(out)} bytes, limit {MAX_PAYLOAD}")
    return out


def _read_pairs(r: c.Reader, what: str) -> list[tuple[bytes, bytes]]:
    n = r.count(MAX_ITEMS, "item count")
    # each item needs at least 20 bytes: refuse impossible counts before looping
    if n * (DOC_ID_LEN + 4) > r.remaining:
        raise MalformedError(f"payload is truncated: {n} items cannot fit in {r.remaining} bytes")
    out = []
    for i in range(n):
        doc_id = r.take(DOC_ID_LEN, f"doc_id {i}")
        out.append((doc_id, r.blob32(MAX_PAYLOAD, f"{what} {i}")))
    return out


def decode_payload(b: bytes) -> Payload:
    if not isinstance(b, bytes | bytearray | memoryview):
        raise MalformedError("payload: expected bytes")
    if len(b) > MAX_PAYLOAD:
        raise TooLargeError(f"payload is {len(b)} bytes, limit {MAX_PAYLOAD}")
    r = c.Reader(b, "payload")
    kind = r.u8("kind")
    p: Payload
    if kind in (_UPDATES, _FULL_STATE):
        p = Updates([DocUpdate(d, u) for d, u in _read_pairs(r, "update")], kind == _FULL_STATE)
    elif kind == _STATE_REPLY:
        p = StateReply([DocUpdate(d, u) for d, u in _read_pairs(r, "update")])
    elif kind == _STATE_REQUEST:
        p = StateRequest(_read_pairs(r, "state vector"))
    elif kind == _REPAIR_REQUEST:
        request_id = r.take(_REQUEST_ID_LEN, "request_id")
        n = r.u8("responder count")
        if n > MAX_RESPONDERS:
            raise TooLargeError(f"repair request: {n} responders, limit {MAX_RESPONDERS}")
        responders = [r.take(_PK_LEN, f"responder {i}") for i in range(n)]
        n = r.u16("gap count")
        if n > MAX_REPAIR_GAPS:
            raise TooLargeError(f"repair request: {n} gaps, limit {MAX_REPAIR_GAPS}")
        gaps = []
        for i in range(n):
            gap = RepairGap(r.take(_PK_LEN, f"gap {i} sender"), r.u64("first"), r.u64("top"))
            if not 1 <= gap.first_missing <= gap.top:
                raise MalformedError(f"repair request: gap {i} is {gap.first_missing}..{gap.top}")
            gaps.append(gap)
        p = RepairRequest(request_id, responders, gaps, _read_pairs(r, "state vector"))
    elif kind == _REPAIR_REPLY:
        request_id = r.take(_REQUEST_ID_LEN, "request_id")
        requester = r.take(_PK_LEN, "requester")
        part, parts = r.u16("part"), r.u16("parts")
        if not 0 <= part < parts <= MAX_REPAIR_PARTS:
            raise MalformedError(f"repair reply: part {part} of {parts}")
        n = r.u16("cover count")
        if n > MAX_REPAIR_GAPS:
            raise TooLargeError(f"repair reply: {n} covers, limit {MAX_REPAIR_GAPS}")
        covers = [(r.take(_PK_LEN, f"cover {i} sender"), r.u64(f"cover {i}")) for i in range(n)]
        items = [DocUpdate(d, u) for d, u in _read_pairs(r, "update")]
        p = RepairReply(request_id, requester, part, parts, covers, items)
    elif kind in (_DEVICE_INFO, _DEVICE_INFO_V2):
        name = r.str16(MAX_NAME, "name")
        platform = r.str16(MAX_SHORT_STR, "platform")
        agent_version = r.str16(MAX_SHORT_STR, "agent_version")
        caps = None
        if kind == _DEVICE_INFO_V2:
            caps = _decode_caps(r.blob16(MAX_CAPABILITIES, "capabilities"))
        p = DeviceInfo(name, platform, agent_version, caps)
    else:
        raise MalformedError(f"unknown payload kind 0x{kind:02x}")
    r.end()
    return p
