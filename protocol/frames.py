"""Relay wire frames (one websocket binary message each): ``type u8`` then the fields.

Field encodings (big-endian): fixed-size byte fields as-is; ``u64``/``u16`` integers; ``bool`` as
one byte 0/1; byte blobs as ``u32 length | bytes``; strings as ``u16 length | UTF-8``.

=====  ==================  ==========================================================
type   frame               fields
=====  ==================  ==========================================================
0x01   Hello               space_id 16 | sign_pk 32 | proto_version u16
0x02   Auth                signature 64 | membership_log blob (may be empty)
0x03   Subscribe           from_seq u64
0x04   Publish             envelope blob
0x05   PushMembership      log blob
0x06   JoinRequest         space_id 16 | invite_id 16 | request blob
0x07   JoinReply           request_id u64 | accepted bool | reason str | log blob
0x08   PutChunk            chunk_id 32 | data blob (<= MAX_CHUNK_CIPHERTEXT)
0x09   GetChunk            chunk_id 32
0x0a   Truncate            before_seq u64  (admin: snapshots cover the log below before_seq)
0x0b   ListChunks          after chunk_id 32 (all zero: from the start)
0x0c   DropChunks          min_age_s u32 | count u16 | chunk_id 32 * count (<= MAX_CHUNK_LIST)
0x0d   Hint                hint blob (<= MAX_HINT: a sealed prefetch hint, protocol/hints.py)
0x81   Challenge           nonce 32
0x82   Welcome             head_seq u64 | log blob
0x83   Deliver             relay_seq u64 | envelope blob
0x84   Ack                 sender_seq u64 | relay_seq u64 | duplicate bool
0x85   CaughtUp            head_seq u64
0x86   Membership          log blob
0x87   JoinForward         request_id u64 | request blob
0x88   JoinResult          ok bool | reason str | log blob
0x89   Error               code str (<= 64) | message str (<= 1 KiB) | fatal bool
0x8a   ChunkAck            chunk_id 32 | stored bool (False: the relay had it already)
0x8b   ChunkData           chunk_id 32 | data blob (<= MAX_CHUNK_CIPHERTEXT)
0x8c   ChunkMissing        chunk_id 32
0x8d   Truncated           before_seq u64  (confirms a Truncate: the log now starts there)
0x8e   LogTruncated        before_seq u64  (a Subscribe's cursor is below the retained log:
                                            nothing delivered; restore from a snapshot first)
0x8f   Presence            count u16 | sign_pk 32 * count (<= MAX_PRESENCE)
0x90   ChunkList           more bool | count u16 | (chunk_id 32 | age_s u32) * count
0x91   ChunksDropped       dropped u32 | freed_bytes u64
0x92   Hinted              hint blob (<= MAX_HINT)
=====  ==================  ==========================================================

The chunk frames form the *blob channel* (protocol/chunks.py): encrypted chunks of binary files,
kept apart from the envelope log. A PutChunk is answered by a ChunkAck once the chunk is durable,
or by a non-fatal ``Error("quota_exceeded")``; a GetChunk by ChunkData or ChunkMissing.
ListChunks / DropChunks let a member device collect the space's unreferenced chunks (the relay
cannot tell which are referenced): answered by ChunkList (one page, ids ascending) and
ChunksDropped.
A ``Hint`` is forwarded as ``Hinted`` to the space's other subscribed connections and never
stored or answered (best effort: dropped for a connection whose mailbox is busy).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _codec as c
from .chunks import CHUNK_ID_LEN, MAX_CHUNK_CIPHERTEXT
from .envelope import MAX_ENVELOPE
from .errors import MalformedError, TooLargeError
from .hints import MAX_HINT
from .identity import SIGN_PK_LEN, SIGNATURE_LEN
from .invite import INVITE_ID_LEN, MAX_JOIN_REQUEST
from .keys import SPACE_ID_LEN
from .membership import MAX_LOG_BYTES
from .version import PROTO_VERSION

__all__ = [
    "AUTH_CONTEXT",
    "BLOB_FRAME_TYPES",
    "INVITE_ID_LEN",
    "MAX_CHUNK_LIST",
    "MAX_CODE",
    "MAX_FRAME",
    "MAX_JOIN_REQUEST",
    "MAX_PRESENCE",
    "MAX_REASON",
    "NONCE_LEN",
    "PROTO_VERSION",
    "Ack",
    "Auth",
    "CaughtUp",
    "Challenge",
    "ChunkAck",
    "ChunkData",
    "ChunkList",
    "ChunkMissing",
    "ChunksDropped",
    "Deliver",
    "DropChunks",
    "Error",
    "Frame",
    "GetChunk",
    "Hello",
    "Hint",
    "Hinted",
    "JoinForward",
    "JoinReply",
    "JoinRequest",
    "JoinResult",
    "ListChunks",
    "LogTruncated",
    "Membership",
    "Presence",
    "Publish",
    "PushMembership",
    "PutChunk",
    "Subscribe",
    "Truncate",
    "Truncated",
    "Welcome",
    "auth_message",
    "decode_frame",
    "encode_frame",
]

#: Largest frame: an envelope plus framing.
MAX_FRAME = MAX_ENVELOPE + 1024
#: Largest reason / error message (UTF-8 bytes).
MAX_REASON = 1024
#: Largest error code (UTF-8 bytes).
MAX_CODE = 64
NONCE_LEN = 32
#: Most devices a Presence frame lists.
MAX_PRESENCE = 4096
#: Most chunk ids a ChunkList or DropChunks frame carries.
MAX_CHUNK_LIST = 4096
AUTH_CONTEXT = b"qmoi-sync relay auth v1\0"


def auth_message(nonce: bytes, space_id: bytes, sign_pk: bytes) -> bytes:
    """The bytes a device signs to answer a relay :class:`Challenge`."""
    return (
        AUTH_CONTEXT
        + c.fixed(nonce, NONCE_LEN, "nonce")
        + c.fixed(space_id, SPACE_ID_LEN, "space_id")
        + c.fixed(sign_pk, SIGN_PK_LEN, "sign_pk")
    )


# -- client -> relay -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    space_id: bytes
    sign_pk: bytes
    proto_version: int = PROTO_VERSION


@dataclass(frozen=True)
class Auth:
    signature: bytes
    membership_log: bytes = b""


@dataclass(frozen=True)
class Subscribe:
    from_seq: int


@dataclass(frozen=True)
class Publish:
    envelope: bytes


@dataclass(frozen=True)
class PushMembership:
    log: bytes


@dataclass(frozen=True)
class JoinRequest:
    space_id: bytes
    invite_id: bytes
    request: bytes


@dataclass(frozen=True)
class JoinReply:
    request_id: int
    accepted: bool
    reason: str = ""
    log: bytes = b""


@dataclass(frozen=True)
class PutChunk:
    chunk_id: bytes
    data: bytes


@dataclass(frozen=True)
class GetChunk:
    chunk_id: bytes


@dataclass(frozen=True)
class ListChunks:
    """One page of the space's stored chunk ids above ``after``."""

    after: bytes = bytes(CHUNK_ID_LEN)


@dataclass(frozen=True)
class DropChunks:
    """Delete these chunks, each only if nobody uploaded it in the last ``min_age_s``."""

    min_age_s: int
    chunk_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class Hint:
    """A sealed prefetch hint for the space's other devices (protocol/hints.py)."""

    hint: bytes


@dataclass(frozen=True)
class Truncate:
    """Snapshots cover everything before ``before_seq``: the relay may drop that prefix."""

    before_seq: int


# -- relay -> client -------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True)
class Welcome:
    head_seq: int
    log: bytes


@dataclass(frozen=True)
class Deliver:
    relay_seq: int
    envelope: bytes


@dataclass(frozen=True)
class Ack:
    sender_seq: int
    relay_seq: int
    duplicate: bool = False


@dataclass(frozen=True)
class CaughtUp:
    head_seq: int


@dataclass(frozen=True)
class Membership:
    log: bytes


@dataclass(frozen=True)
class JoinForward:
    request_id: int
    request: bytes


@dataclass(frozen=True)
class JoinResult:
    ok: bool
    reason: str = ""
    log: bytes = b""


@dataclass(frozen=True)
class Error:
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class ChunkAck:
    chunk_id: bytes
    stored: bool = True


@dataclass(frozen=True)
class ChunkData:
    chunk_id: bytes
    data: bytes


@dataclass(frozen=True)
class ChunkMissing:
    chunk_id: bytes


@dataclass(frozen=True)
class ChunkList:
    """(chunk id, seconds since its last upload), ids ascending; ``more``: another page follows."""

    entries: tuple[tuple[bytes, int], ...]
    more: bool = False


@dataclass(frozen=True)
class ChunksDropped:
    dropped: int
    freed_bytes: int


@dataclass(frozen=True)
class Truncated:
    """Confirms a Truncate: the log now starts at ``before_seq``."""

    before_seq: int


@dataclass(frozen=True)
class LogTruncated:
    """The subscriber's cursor is below the retained log (which starts at ``before_seq``):
    nothing is delivered; it must restore from a snapshot and subscribe again."""

    before_seq: int


@dataclass(frozen=True)
class Presence:
    """The devices (signing keys) with a connection to the relay for this space now: sent
    right after Welcome and to every connection of the space whenever that set changes."""

    online: tuple[bytes, ...]


@dataclass(frozen=True)
class Hinted:
    """A prefetch hint another device of the space sent (forwarded as it came)."""

    hint: bytes


#: Frame types of the blob channel (the relay rate-limits them apart from envelopes).
BLOB_FRAME_TYPES = frozenset({0x08, 0x09, 0x0B, 0x0C})

Frame = (
    Hello
    | Auth
    | Subscribe
    | Publish
    | PushMembership
    | JoinRequest
    | JoinReply
    | PutChunk
    | GetChunk
    | Truncate
    | ListChunks
    | DropChunks
    | Hint
    | Challenge
    | Welcome
    | Deliver
    | Ack
    | CaughtUp
    | Membership
    | JoinForward
    | JoinResult
    | Error
    | ChunkAck
    | ChunkData
    | ChunkMissing
    | Truncated
    | LogTruncated
    | Presence
    | ChunkList
    | ChunksDropped
    | Hinted
)

_TYPE: dict[type, int] = {
    Hello: 0x01,
    Auth: 0x02,
    Subscribe: 0x03,
    Publish: 0x04,
    PushMembership: 0x05,
    JoinRequest: 0x06,
    JoinReply: 0x07,
    PutChunk: 0x08,
    GetChunk: 0x09,
    Truncate: 0x0A,
    ListChunks: 0x0B,
    DropChunks: 0x0C,
    Hint: 0x0D,
    Challenge: 0x81,
    Welcome: 0x82,
    Deliver: 0x83,
    Ack: 0x84,
    CaughtUp: 0x85,
    Membership: 0x86,
    JoinForward: 0x87,
    JoinResult: 0x88,
    Error: 0x89,
    ChunkAck: 0x8A,
    ChunkData: 0x8B,
    ChunkMissing: 0x8C,
    Truncated: 0x8D,
    LogTruncated: 0x8E,
    Presence: 0x8F,
    ChunkList: 0x90,
    ChunksDropped: 0x91,
    Hinted: 0x92,
}


def _chunk_ids(ids: object) -> tuple[bytes, ...]:
    if not isinstance(ids, tuple) or len(ids) > MAX_CHUNK_LIST:
        raise MalformedError(f"chunk_ids must be a tuple of at most {MAX_CHUNK_LIST} ids")
    return ids


def _bool(v: object, what: str) -> bytes:
    if not isinstance(v, bool):
        raise MalformedError(f"{what} must be a bool")
    return c.boolean(v)


def _list_count(count: int) -> int:
    if count > MAX_CHUNK_LIST:
        raise MalformedError(f"lists {count} chunks, limit {MAX_CHUNK_LIST}")
    return count


def encode_frame(msg: Frame) -> bytes:
    """Encode a frame; refuses fields of the wrong size/type or over their limits."""
    t = _TYPE.get(type(msg))
    if t is None:
        raise MalformedError(f"not a frame: {type(msg).__name__}")
    parts = [c.u8(t)]
    if isinstance(msg, Hello):
        parts += [
            c.fixed(msg.space_id, SPACE_ID_LEN, "space_id"),
            c.fixed(msg.sign_pk, SIGN_PK_LEN, "sign_pk"),
            c.u16(msg.proto_version),
        ]
    elif isinstance(msg, Auth):
        parts += [
            c.fixed(msg.signature, SIGNATURE_LEN, "signature"),
            c.blob32(msg.membership_log, MAX_LOG_BYTES, "membership_log"),
        ]
    elif isinstance(msg, Subscribe):
        parts.append(c.u64(msg.from_seq))
    elif isinstance(msg, Publish):
        parts.append(c.blob32(msg.envelope, MAX_ENVELOPE, "envelope"))
    elif isinstance(msg, PushMembership | Membership):
        parts.append(c.blob32(msg.log, MAX_LOG_BYTES, "log"))
    elif isinstance(msg, JoinRequest):
        parts += [
            c.fixed(msg.space_id, SPACE_ID_LEN, "space_id"),
            c.fixed(msg.invite_id, INVITE_ID_LEN, "invite_id"),
            c.blob32(msg.request, MAX_JOIN_REQUEST, "request"),
        ]
    elif isinstance(msg, JoinReply):
        parts += [
            c.u64(msg.request_id),
            _bool(msg.accepted, "accepted"),
            c.str16(msg.reason, MAX_REASON, "reason"),
            c.blob32(msg.log, MAX_LOG_BYTES, "log"),
        ]
    elif isinstance(msg, PutChunk | ChunkData):
        # length and data as separate parts: the (~1 MiB) data is copied once, by the join
        if not isinstance(msg.data, bytes | bytearray):
            raise MalformedError("chunk data must be bytes")
        if len(msg.data) > MAX_CHUNK_CIPHERTEXT:
            raise TooLargeError(
                f"chunk data is {len(msg.data)} bytes, limit {MAX_CHUNK_CIPHERTEXT}"
            )
        parts += [c.fixed(msg.chunk_id, CHUNK_ID_LEN, "chunk_id"), c.u32(len(msg.data)), msg.data]
    elif isinstance(msg, Hint | Hinted):
        parts.append(c.blob32(msg.hint, MAX_HINT, "hint"))
    elif isinstance(msg, GetChunk | ChunkMissing):
        parts.append(c.fixed(msg.chunk_id, CHUNK_ID_LEN, "chunk_id"))
    elif isinstance(msg, ChunkAck):
        parts += [c.fixed(msg.chunk_id, CHUNK_ID_LEN, "chunk_id"), _bool(msg.stored, "stored")]
    elif isinstance(msg, Challenge):
        parts.append(c.fixed(msg.nonce, NONCE_LEN, "nonce"))
    elif isinstance(msg, Welcome):
        parts += [c.u64(msg.head_seq), c.blob32(msg.log, MAX_LOG_BYTES, "log")]
    elif isinstance(msg, Deliver):
        parts += [c.u64(msg.relay_seq), c.blob32(msg.envelope, MAX_ENVELOPE, "envelope")]
    elif isinstance(msg, Ack):
        parts += [c.u64(msg.sender_seq), c.u64(msg.relay_seq), _bool(msg.duplicate, "duplicate")]
    elif isinstance(msg, CaughtUp):
        parts.append(c.u64(msg.head_seq))
    elif isinstance(msg, Truncate | Truncated | LogTruncated):
        parts.append(c.u64(msg.before_seq))
    elif isinstance(msg, JoinForward):
        parts += [c.u64(msg.request_id), c.blob32(msg.request, MAX_JOIN_REQUEST, "request")]
    elif isinstance(msg, Presence):
        if not isinstance(msg.online, tuple) or len(msg.online) > MAX_PRESENCE:
            raise MalformedError(f"online must be a tuple of at most {MAX_PRESENCE} keys")
        parts.append(c.u16(len(msg.online)))
        parts += [c.fixed(pk, SIGN_PK_LEN, "online sign_pk") for pk in msg.online]
    elif isinstance(msg, ListChunks):
        parts.append(c.fixed(msg.after, CHUNK_ID_LEN, "after"))
    elif isinstance(msg, DropChunks):
        ids = _chunk_ids(msg.chunk_ids)
        parts += [c.u32(msg.min_age_s), c.u16(len(ids))]
        parts += [c.fixed(cid, CHUNK_ID_LEN, "chunk_id") for cid in ids]
    elif isinstance(msg, ChunkList):
        if not isinstance(msg.entries, tuple) or len(msg.entries) > MAX_CHUNK_LIST:
            raise MalformedError(f"entries must be a tuple of at most {MAX_CHUNK_LIST}")
        parts += [_bool(msg.more, "more"), c.u16(len(msg.entries))]
        for cid, age in msg.entries:
            parts += [c.fixed(cid, CHUNK_ID_LEN, "chunk_id"), c.u32(age)]
    elif isinstance(msg, ChunksDropped):
        parts += [c.u32(msg.dropped), c.u64(msg.freed_bytes)]
    elif isinstance(msg, JoinResult):
        parts += [
            _bool(msg.ok, "ok"),
            c.str16(msg.reason, MAX_REASON, "reason"),
            c.blob32(msg.log, MAX_LOG_BYTES, "log"),
        ]
    else:  # Error
        parts += [
            c.str16(msg.code, MAX_CODE, "code"),
            c.str16(msg.message, MAX_REASON, "message"),
            _bool(msg.fatal, "fatal"),
        ]
    out = b"".join(parts)
    if len(out) > MAX_FRAME:  # pragma: no cover - field limits keep frames below MAX_FRAME
        raise TooLargeError(f"frame is {len(out)} bytes, limit {MAX_FRAME}")
    return out


def decode_frame(data: bytes, max_size: int = MAX_FRAME) -> Frame:
    """Decode one frame; raises a ProtocolError subclass on anything malformed or oversized."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError("frame: expected bytes")
    if len(data) > max_size:
        raise TooLargeError(f"frame is {len(data)} bytes, limit {max_size}")
    r = c.Reader(data, "frame")
    t = r.u8("type")
    msg: Frame
    if t == 0x01:
        msg = Hello(
            r.take(SPACE_ID_LEN, "space_id"), r.take(SIGN_PK_LEN, "sign_pk"), r.u16("proto_version")
        )
    elif t == 0x02:
        msg = Auth(r.take(SIGNATURE_LEN, "signature"), r.blob32(MAX_LOG_BYTES, "membership_log"))
    elif t == 0x03:
        msg = Subscribe(r.u64("from_seq"))
    elif t == 0x04:
        msg = Publish(r.blob32(MAX_ENVELOPE, "envelope"))
    elif t == 0x05:
        msg = PushMembership(r.blob32(MAX_LOG_BYTES, "log"))
    elif t == 0x06:
        msg = JoinRequest(
            r.take(SPACE_ID_LEN, "space_id"),
            r.take(INVITE_ID_LEN, "invite_id"),
            r.blob32(MAX_JOIN_REQUEST, "request"),
        )
    elif t == 0x07:
        msg = JoinReply(
            r.u64("request_id"),
            r.boolean("accepted"),
            r.str16(MAX_REASON, "reason"),
            r.blob32(MAX_LOG_BYTES, "log"),
        )
    elif t == 0x08:
        msg = PutChunk(r.take(CHUNK_ID_LEN, "chunk_id"), r.blob32(MAX_CHUNK_CIPHERTEXT, "data"))
    elif t == 0x09:
        msg = GetChunk(r.take(CHUNK_ID_LEN, "chunk_id"))
    elif t == 0x81:
        msg = Challenge(r.take(NONCE_LEN, "nonce"))
    elif t == 0x82:
        msg = Welcome(r.u64("head_seq"), r.blob32(MAX_LOG_BYTES, "log"))
    elif t == 0x83:
        msg = Deliver(r.u64("relay_seq"), r.blob32(MAX_ENVELOPE, "envelope"))
    elif t == 0x84:
        msg = Ack(r.u64("sender_seq"), r.u64("relay_seq"), r.boolean("duplicate"))
    elif t == 0x85:
        msg = CaughtUp(r.u64("head_seq"))
    elif t == 0x0A:
        msg = Truncate(r.u64("before_seq"))
    elif t == 0x0B:
        msg = ListChunks(r.take(CHUNK_ID_LEN, "after"))
    elif t == 0x0C:
        min_age = r.u32("min_age_s")
        count = _list_count(r.u16("chunk count"))
        msg = DropChunks(min_age, tuple(r.take(CHUNK_ID_LEN, "chunk_id") for _ in range(count)))
    elif t == 0x0D:
        msg = Hint(r.blob32(MAX_HINT, "hint"))
    elif t == 0x92:
        msg = Hinted(r.blob32(MAX_HINT, "hint"))
    elif t == 0x90:
        more = r.boolean("more")
        count = _list_count(r.u16("chunk count"))
        msg = ChunkList(
            tuple((r.take(CHUNK_ID_LEN, "chunk_id"), r.u32("age_s")) for _ in range(count)), more
        )
    elif t == 0x91:
        msg = ChunksDropped(r.u32("dropped"), r.u64("freed_bytes"))
    elif t == 0x8D:
        msg = Truncated(r.u64("before_seq"))
    elif t == 0x8E:
        msg = LogTruncated(r.u64("before_seq"))
    elif t == 0x8F:
        count = r.u16("online count")
        if count > MAX_PRESENCE:
            raise MalformedError(f"presence lists {count} devices, limit {MAX_PRESENCE}")
        msg = Presence(tuple(r.take(SIGN_PK_LEN, "online sign_pk") for _ in range(count)))
    elif t == 0x86:
        msg = Membership(r.blob32(MAX_LOG_BYTES, "log"))
    elif t == 0x87:
        msg = JoinForward(r.u64("request_id"), r.blob32(MAX_JOIN_REQUEST, "request"))
    elif t == 0x88:
        msg = JoinResult(
            r.boolean("ok"), r.str16(MAX_REASON, "reason"), r.blob32(MAX_LOG_BYTES, "log")
        )
    elif t == 0x89:
        msg = Error(r.str16(MAX_CODE, "code"), r.str16(MAX_REASON, "message"), r.boolean("fatal"))
    elif t == 0x8A:
        msg = ChunkAck(r.take(CHUNK_ID_LEN, "chunk_id"), r.boolean("stored"))
    elif t == 0x8B:
        msg = ChunkData(r.take(CHUNK_ID_LEN, "chunk_id"), r.blob32(MAX_CHUNK_CIPHERTEXT, "data"))
    elif t == 0x8C:
        msg = ChunkMissing(r.take(CHUNK_ID_LEN, "chunk_id"))
    else:
        raise MalformedError(f"unknown frame type 0x{t:02x}")
    r.end()
    return msg
