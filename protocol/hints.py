"""Prefetch hints: "these chunks of a file I am still uploading are at the relay already".

A device uploading a large binary file tells the space's other devices, while the upload is
still going on, which chunks the relay has durably acknowledged, so that they fetch those while
the rest is uploaded (and the file possibly still written) instead of waiting for the manifest.
A hint is *ephemeral*: the relay forwards it to the devices connected now (``Hint`` /
``Hinted`` frames) and never stores it; a device that misses one simply fetches those chunks
after the manifest, as before. It grants nothing: a receiver stages hinted chunks (each verified
by AEAD and its recomputed keyed id) and uses them only for a manifest, signed and delivered
the usual way, that names the same chunk at the same offset.

Sealed like an envelope (:func:`.envelope.seal`: signed by the sender, encrypted) under a key
derived from the epoch's message key for this purpose only (:func:`hint_key`), so a hint can
never be opened as an envelope of the log, nor an envelope as a hint. The relay sees its size
and timing (as it sees the chunk uploads themselves), never the transfer or the chunk list.

Body (big-endian)::

    version u8 (1) | transfer 16 | chunk epoch u32 | count u16
                   | (offset u64 | chunk_id 32 | size u32) * count        (1 <= count <= 512)

``transfer`` is a random id per upload job (not the file id, which a new file only gets from its
whole-file hash, nor the path). ``seq`` of the envelope is the sender's clock in microseconds:
receivers refuse hints older than :data:`HINT_MAX_AGE_S` or not newer than the last one they
accepted from that sender (a relay replaying old hints makes nobody fetch anything).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from hashlib import sha256

from . import _codec as c
from .chunks import CHUNK_ID_LEN, MAX_CHUNK
from .envelope import OpenedEnvelope, open_envelope, seal
from .errors import MalformedError, TooLargeError
from .identity import DeviceIdentity

__all__ = [
    "HINT_MAX_AGE_S",
    "HINT_VERSION",
    "MAX_HINT",
    "MAX_HINT_ENTRIES",
    "MAX_HINT_OFFSET",
    "TRANSFER_ID_LEN",
    "HintEntry",
    "OpenedHint",
    "PrefetchHint",
    "decode_hint",
    "encode_hint",
    "hint_key",
    "open_hint",
    "seal_hint",
]

HINT_VERSION = 1
TRANSFER_ID_LEN = 16
#: Chunks one hint names at most.
MAX_HINT_ENTRIES = 512
#: Largest chunk offset a hint may name (a file of 1 TiB; the manifest limit is ~40 GiB).
MAX_HINT_OFFSET = 1 << 40
_ENTRY_LEN = 8 + CHUNK_ID_LEN + 4
_BODY_HEAD = 1 + TRANSFER_ID_LEN + 4 + 2
#: Largest sealed hint (a full body plus the envelope's framing, rounded up).
MAX_HINT = 32 * 1024
#: A hint whose seq (sender clock, microseconds) is further from the receiver's clock than this
#: is refused: replayed, or sent by a device whose clock is far off (it only loses prefetching).
HINT_MAX_AGE_S = 600.0
_KEY_INFO = b"qmoi-sync prefetch hint key v1"


@dataclass(frozen=True, slots=True)
class HintEntry:
    offset: int
    chunk_id: bytes
    size: int


@dataclass(frozen=True)
class PrefetchHint:
    transfer: bytes
    epoch: int
    entries: tuple[HintEntry, ...]


@dataclass(frozen=True)
class OpenedHint:
    sender: bytes
    seq: int
    hint: PrefetchHint


def hint_key(msg_key: bytes) -> bytes:
    """The key hints of an epoch are sealed with (never the message key itself)."""
    return hmac.new(bytes(msg_key), _KEY_INFO, sha256).digest()


def encode_hint(hint: PrefetchHint) -> bytes:
    entries = hint.entries
    if not isinstance(entries, tuple) or not 1 <= len(entries) <= MAX_HINT_ENTRIES:
        raise MalformedError(f"a hint names 1..{MAX_HINT_ENTRIES} chunks")
    parts = [
        c.u8(HINT_VERSION),
        c.fixed(hint.transfer, TRANSFER_ID_LEN, "transfer"),
        c.u32(hint.epoch),
        c.u16(len(entries)),
    ]
    for e in entries:
        _check_entry(e.offset, e.size)
        parts += [c.u64(e.offset), c.fixed(e.chunk_id, CHUNK_ID_LEN, "chunk_id"), c.u32(e.size)]
    return b"".join(parts)


def decode_hint(data: bytes) -> PrefetchHint:
    """Decode a hint body (from another device: hostile until checked); raises a
    ProtocolError subclass on anything malformed or over the limits."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedError("hint: expected bytes")
    if len(data) > _BODY_HEAD + MAX_HINT_ENTRIES * _ENTRY_LEN:
        raise TooLargeError(f"hint is {len(data)} bytes")
    r = c.Reader(data, "hint")
    version = r.u8("version")
    if version != HINT_VERSION:
        raise MalformedError(f"hint version {version} is not supported")
    transfer = r.take(TRANSFER_ID_LEN, "transfer")
    epoch = r.u32("epoch")
    count = r.u16("count")
    if not 1 <= count <= MAX_HINT_ENTRIES:
        raise MalformedError(f"a hint names 1..{MAX_HINT_ENTRIES} chunks, not {count}")
    entries = []
    for _ in range(count):
        offset = r.u64("offset")
        cid = r.take(CHUNK_ID_LEN, "chunk_id")
        size = r.u32("size")
        _check_entry(offset, size)
        entries.append(HintEntry(offset, cid, size))
    r.end()
    return PrefetchHint(transfer, epoch, tuple(entries))


def _check_entry(offset: int, size: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise MalformedError("hint offset must be a non-negative integer")
    if offset + MAX_CHUNK > MAX_HINT_OFFSET:
        raise MalformedError(f"hint offset {offset} is beyond {MAX_HINT_OFFSET}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CHUNK:
        raise MalformedError(f"hint chunk size must be 1..{MAX_CHUNK}")


def seal_hint(
    identity: DeviceIdentity,
    space_id: bytes,
    epoch: int,
    msg_key: bytes,
    seq: int,
    hint: PrefetchHint,
) -> bytes:
    """Sign and encrypt a hint (envelope layout, hint key of the epoch's message key)."""
    return seal(identity, space_id, epoch, hint_key(msg_key), seq, encode_hint(hint))


def open_hint(
    data: bytes,
    space_id: bytes,
    msg_keys: Mapping[int, bytes],
    is_member: Callable[[bytes], bool],
) -> OpenedHint:
    """Check (structure, space, sender membership, signature, key commitment, AEAD) and
    decode a sealed hint; raises a ProtocolError subclass otherwise."""
    if isinstance(data, bytes | bytearray) and len(data) > MAX_HINT:
        raise TooLargeError(f"hint is {len(data)} bytes, limit {MAX_HINT}")
    keys = {e: hint_key(k) for e, k in msg_keys.items()}
    opened: OpenedEnvelope = open_envelope(data, space_id, keys, is_member)
    return OpenedHint(opened.header.sender, opened.header.seq, decode_hint(opened.plaintext))
