"""Envelope plaintexts: ``kind u8`` then a body.

======  =============  ==================================================================
kind    payload        body
======  =============  ==================================================================
0x01    Updates        count u32 | (doc_id 16 | update blob32)*
0x02    DeviceInfo     name str16 (<= 128) | platform str16 (<= 64) | agent_version str16 (<= 64)
0x03    StateRequest   count u32 | (doc_id 16 | state_vector blob32)*   (sync step 1)
0x04    StateReply     count u32 | (doc_id 16 | update blob32)*         (sync step 2)
======  =============  ==================================================================

The index document has the all-zero doc id (:data:`INDEX_DOC_ID`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _codec as c
from .envelope import MAX_PLAINTEXT
from .errors import MalformedError, TooLargeError

__all__ = [
    "DOC_ID_LEN",
    "INDEX_DOC_ID",
    "MAX_ITEMS",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_SHORT_STR",
    "DeviceInfo",
    "DocUpdate",
    "Payload",
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


@dataclass(frozen=True)
class DocUpdate:
    doc_id: bytes
    update: bytes


@dataclass(frozen=True)
class Updates:
    items: list[DocUpdate] = field(default_factory=list)


@dataclass(frozen=True)
class StateReply:
    """Answer to a :class:`StateRequest`: the updates the requester is missing."""

    items: list[DocUpdate] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    platform: str = ""
    agent_version: str = ""


@dataclass(frozen=True)
class StateRequest:
    """Sync step 1: ``items`` is a list of ``(doc_id, state_vector)``."""

    items: list[tuple[bytes, bytes]] = field(default_factory=list)


Payload = Updates | DeviceInfo | StateRequest | StateReply

_UPDATES, _DEVICE_INFO, _STATE_REQUEST, _STATE_REPLY = 0x01, 0x02, 0x03, 0x04


def _pairs(items: list[tuple[bytes, bytes]], what: str) -> list[bytes]:
    if len(items) > MAX_ITEMS:
        raise TooLargeError(f"{what}: {len(items)} items, limit {MAX_ITEMS}")
    parts = [c.u32(len(items))]
    for doc_id, blob in items:
        parts += [c.fixed(doc_id, DOC_ID_LEN, "doc_id"), c.blob32(blob, MAX_PAYLOAD, what)]
    return parts


def encode_payload(p: Payload) -> bytes:
    if isinstance(p, Updates | StateReply):
        kind = _UPDATES if isinstance(p, Updates) else _STATE_REPLY
        for it in p.items:
            if not isinstance(it, DocUpdate):
                raise MalformedError("items must be DocUpdate")
        parts = [c.u8(kind), *_pairs([(u.doc_id, u.update) for u in p.items], "update")]
    elif isinstance(p, StateRequest):
        parts = [c.u8(_STATE_REQUEST), *_pairs(list(p.items), "state vector")]
    elif isinstance(p, DeviceInfo):
        parts = [
            c.u8(_DEVICE_INFO),
            c.str16(p.name, MAX_NAME, "name"),
            c.str16(p.platform, MAX_SHORT_STR, "platform"),
            c.str16(p.agent_version, MAX_SHORT_STR, "agent_version"),
        ]
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
    if kind == _UPDATES:
        p = Updates([DocUpdate(d, u) for d, u in _read_pairs(r, "update")])
    elif kind == _STATE_REPLY:
        p = StateReply([DocUpdate(d, u) for d, u in _read_pairs(r, "update")])
    elif kind == _STATE_REQUEST:
        p = StateRequest(_read_pairs(r, "state vector"))
    elif kind == _DEVICE_INFO:
        p = DeviceInfo(
            r.str16(MAX_NAME, "name"),
            r.str16(MAX_SHORT_STR, "platform"),
            r.str16(MAX_SHORT_STR, "agent_version"),
        )
    else:
        raise MalformedError(f"unknown payload kind 0x{kind:02x}")
    r.end()
    return p
