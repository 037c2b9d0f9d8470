"""LAN peers: discovery tags, the peer handshake and the peer wire frames (sans-I/O).

Discovery (mDNS service type :data:`SERVICE_TYPE`). A device advertises one service instance per
space (random, opaque instance and host names) whose TXT record holds only::

    v = "1"                      the LAN protocol version
    t = hex(discovery_tag)       32 hex chars, rotating every TAG_WINDOW_S seconds

``discovery_tag = HMAC-SHA256(EpochKeys.discovery, b"qmoi-sync lan tag v1\\0" + window u64)[:16]``
with ``window = floor(unix_time / TAG_WINDOW_S)``. Only members (who hold the epoch's discovery
key) can compute or recognize a tag; a tag links to nothing once its window has passed. A device
inviting someone advertises an extra, short-lived instance with ``j = hex(invite_tag)`` instead
of ``t``, where ``invite_tag = HMAC-SHA256(invite secret, b"qmoi-sync lan invite v1\\0")[:16]``
(only the holder of the invite token can recognize it). The space id, the space name and the
device name never appear in clear.

Peer connection (one websocket, binary messages, ``type u8`` then the fields; same field
encodings as :mod:`.frames`)::

    client -> server  0x01 PeerHello      version u16 | tag 16 | client_nonce 32
    server -> client  0x81 PeerChallenge  version u16 | server sign_pk 32 | server_nonce 32
                                          | signature 64 (server_auth_message)
    client -> server  0x02 PeerAuth       client sign_pk 32 | signature 64 (client_auth_message)
                                          | membership log blob
    server -> client  0x82 PeerWelcome    membership log blob
    either            0x10 StreamEnvelope envelope blob         (the sender's own sealed stream)
    either            0x11 SyncRequest    request_id u32 | envelope blob   (payload StateRequest)
    either            0x12 SyncReply      request_id u32 | final bool | envelope blob (StateReply)
    either            0x13 DirectEnvelope envelope blob         (payload DeviceInfo)
    either            0x14 LogUpdate      membership log blob   (the sender's log grew)
    either            0x15 Bye            code str (<= 64) | message str (<= 1 KiB)
    either            0x16 ChunkGet       epoch u32 | chunk_id 32
    either            0x17 ChunkData      chunk_id 32 | ciphertext blob (<= MAX_CHUNK_CIPHERTEXT)
    either            0x18 ChunkMissing   chunk_id 32
    joiner -> admin   0x03 JoinAsk        invite_tag 16 | join request blob
    admin -> joiner   0x83 JoinAnswer     ok bool | reason str (<= 1 KiB) | log blob

The server proves itself first: a client reveals its own key only to a server that signed the
transcript with a key of the space's membership. Both signatures cover the space id (never sent:
both sides derive it from the tag), the tag, both nonces and both keys, with the role in the
signed context, so a signature cannot be replayed, reflected or moved to another space.

Envelopes that are not part of the sender's stream (state requests/replies, the device info sent
on connect) are sealed with ``seq = DIRECT_SEQ_BASE | stream_seq``, where ``stream_seq`` is the
sender's last stream sequence number at sealing time: they never enter replay windows, and a
StateReply thereby tells the requester that it covers the responder's stream up to
``stream_seq`` (see :func:`direct_seq`, :func:`covered_seq`).

Chunks of binary files (protocol/chunks.py) travel in the same sealed form as on the relay's
blob channel: a ``ChunkGet`` names a chunk id and the epoch of the manifest listing it, and is
answered by ``ChunkData`` (the AES-GCM ciphertext, which the server produces from its local
plaintext with that epoch's keys) or ``ChunkMissing``. The receiver verifies it exactly as one
from the relay (``ChunkKeys.decrypt``: AEAD and recomputed keyed id).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from . import _codec as c
from .chunks import CHUNK_ID_LEN, MAX_CHUNK_CIPHERTEXT
from .envelope import MAX_ENVELOPE
from .errors import MalformedError, TooLargeError
from .identity import SIGN_PK_LEN, SIGNATURE_LEN, verify
from .invite import MAX_JOIN_REQUEST
from .keys import SECRET_LEN, SPACE_ID_LEN
from .membership import MAX_LOG_BYTES

__all__ = [
    "DIRECT_SEQ_BASE",
    "LAN_PROTO_VERSION",
    "MAX_PEER_FRAME",
    "NONCE_LEN",
    "SERVICE_TYPE",
    "TAG_LEN",
    "TAG_WINDOW_S",
    "Advert",
    "Bye",
    "ChunkData",
    "ChunkGet",
    "ChunkMissing",
    "DirectEnvelope",
    "JoinAnswer",
    "JoinAsk",
    "LogUpdate",
    "PeerAuth",
    "PeerChallenge",
    "PeerFrame",
    "PeerHello",
    "PeerWelcome",
    "StreamEnvelope",
    "SyncReply",
    "SyncRequest",
    "bye_reason",
    "client_auth_message",
    "covered_seq",
    "decode_peer_frame",
    "direct_seq",
    "discovery_tag",
    "encode_peer_frame",
    "invite_tag",
    "invite_txt",
    "is_direct_seq",
    "parse_txt",
    "server_auth_message",
    "space_txt",
    "tag_window",
    "verify_peer_signature",
]

#: The mDNS/DNS-SD service type every agent advertises and browses.
SERVICE_TYPE = "_qmoi-sync._tcp.local."
#: Version in the TXT record and in PeerHello/PeerChallenge.
LAN_PROTO_VERSION = 1
TAG_LEN = 16
#: Discovery tags rotate every 10 minutes.
TAG_WINDOW_S = 600
NONCE_LEN = 32
#: Sequence numbers at or above this mark envelopes outside the sender's stream.
DIRECT_SEQ_BASE = 1 << 63
#: Largest peer frame: an envelope (or a membership log, which is smaller) plus framing.
MAX_PEER_FRAME = max(MAX_ENVELOPE, MAX_LOG_BYTES) + 1024
MAX_REASON = 1024
MAX_CODE = 64
_U32_MAX = 0xFFFFFFFF

_TAG_CONTEXT = b"qmoi-sync lan tag v1\0"
_INVITE_CONTEXT = b"qmoi-sync lan invite v1\0"
_AUTH_CONTEXT = b"qmoi-sync lan auth v1\0"


# -- discovery -------------------------------------------------------------------------------


def tag_window(now: float) -> int:
    """The discovery window a unix time falls in."""
    if now < 0:
        raise MalformedError("time must not be negative")
    return int(now // TAG_WINDOW_S)


def discovery_tag(discovery_key: bytes, window: int) -> bytes:
    """The 16-byte tag members advertise during ``window`` (see the module docstring)."""
    key = c.fixed(discovery_key, SECRET_LEN, "discovery key")
    return hmac.new(key, _TAG_CONTEXT + c.u64(window), hashlib.sha256).digest()[:TAG_LEN]


def invite_tag(secret: bytes) -> bytes:
    """The 16-byte tag an inviting device advertises for one invite (keyed by its secret)."""
    key = c.fixed(secret, SECRET_LEN, "invite secret")
    return hmac.new(key, _INVITE_CONTEXT, hashlib.sha256).digest()[:TAG_LEN]


def space_txt(tag: bytes) -> dict[str, str]:
    """TXT properties of a space advertisement."""
    return {"v": str(LAN_PROTO_VERSION), "t": c.fixed(tag, TAG_LEN, "tag").hex()}


def invite_txt(tag: bytes) -> dict[str, str]:
    """TXT properties of an invite advertisement."""
    return {"v": str(LAN_PROTO_VERSION), "j": c.fixed(tag, TAG_LEN, "invite tag").hex()}


@dataclass(frozen=True)
class Advert:
    """A parsed TXT record: ``kind`` is "space" (tag = discovery tag) or "invite"."""

    version: int
    kind: str
    tag: bytes


def _txt_value(props: Mapping[bytes, bytes | None], key: bytes) -> str | None:
    raw = props.get(key)
    if raw is None:
        return None
    if not isinstance(raw, bytes) or len(raw) > 64:
        raise MalformedError(f"TXT {key!r}: bad value")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError(f"TXT {key!r}: not ASCII") from None


def _hex_tag(text: str) -> bytes:
    if len(text) != 2 * TAG_LEN:
        raise MalformedError("TXT tag: wrong length")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise MalformedError("TXT tag: not hex") from None


def parse_txt(props: Mapping[bytes, bytes | None]) -> Advert:
    """Parse the TXT properties of a discovered service (hostile input: anyone can advertise).

    Raises MalformedError unless it is a well-formed space or invite advertisement of a version
    this code speaks."""
    if len(props) > 16:
        raise MalformedError("TXT: too many keys")
    version_text = _txt_value(props, b"v")
    if version_text is None or not version_text.isdigit() or len(version_text) > 5:
        raise MalformedError("TXT: missing or bad version")
    version = int(version_text)
    if version != LAN_PROTO_VERSION:
        raise MalformedError(f"TXT: unsupported LAN protocol version {version}")
    t = _txt_value(props, b"t")
    j = _txt_value(props, b"j")
    if (t is None) == (j is None):
        raise MalformedError("TXT: needs exactly one of t (space) or j (invite)")
    if t is not None:
        return Advert(version, "space", _hex_tag(t))
    assert j is not None
    return Advert(version, "invite", _hex_tag(j))


# -- handshake -------------------------------------------------------------------------------


def server_auth_message(
    space_id: bytes, tag: bytes, client_nonce: bytes, server_nonce: bytes, server_pk: bytes
) -> bytes:
    """What the server signs (it proves itself first, before the client reveals its key)."""
    return b"".join(
        (
            _AUTH_CONTEXT,
            b"server\0",
            c.fixed(space_id, SPACE_ID_LEN, "space_id"),
            c.fixed(tag, TAG_LEN, "tag"),
            c.fixed(client_nonce, NONCE_LEN, "client_nonce"),
            c.fixed(server_nonce, NONCE_LEN, "server_nonce"),
            c.fixed(server_pk, SIGN_PK_LEN, "server_pk"),
        )
    )


def client_auth_message(
    space_id: bytes,
    tag: bytes,
    client_nonce: bytes,
    server_nonce: bytes,
    server_pk: bytes,
    client_pk: bytes,
) -> bytes:
    """What the client signs once the server has proven membership."""
    return b"".join(
        (
            _AUTH_CONTEXT,
            b"client\0",
            c.fixed(space_id, SPACE_ID_LEN, "space_id"),
            c.fixed(tag, TAG_LEN, "tag"),
            c.fixed(client_nonce, NONCE_LEN, "client_nonce"),
            c.fixed(server_nonce, NONCE_LEN, "server_nonce"),
            c.fixed(server_pk, SIGN_PK_LEN, "server_pk"),
            c.fixed(client_pk, SIGN_PK_LEN, "client_pk"),
        )
    )


def verify_peer_signature(sign_pk: bytes, signature: bytes, message: bytes) -> None:
    """Raises SignatureError (a ProtocolError) unless ``signature`` is valid."""
    verify(sign_pk, signature, message)


# -- direct envelopes ------------------------------------------------------------------------


def direct_seq(stream_seq: int) -> int:
    """The sequence number of an envelope outside the stream, sealed after ``stream_seq``."""
    if isinstance(stream_seq, bool) or not isinstance(stream_seq, int):
        raise MalformedError("stream seq must be an int")
    if not 0 <= stream_seq < DIRECT_SEQ_BASE:
        raise MalformedError("stream seq out of range")
    return DIRECT_SEQ_BASE | stream_seq


def is_direct_seq(seq: int) -> bool:
    return seq >= DIRECT_SEQ_BASE


def covered_seq(seq: int) -> int:
    """The stream seq a direct envelope was sealed after (MalformedError for a stream seq)."""
    if not is_direct_seq(seq) or seq > c.U64_MAX:
        raise MalformedError("not a direct sequence number")
    return seq & ~DIRECT_SEQ_BASE


# -- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerHello:
    tag: bytes
    client_nonce: bytes
    version: int = LAN_PROTO_VERSION


@dataclass(frozen=True)
class PeerAuth:
    sign_pk: bytes
    signature: bytes
    log: bytes = b""


@dataclass(frozen=True)
class JoinAsk:
    invite_tag: bytes
    request: bytes


@dataclass(frozen=True)
class PeerChallenge:
    sign_pk: bytes
    server_nonce: bytes
    signature: bytes
    version: int = LAN_PROTO_VERSION


@dataclass(frozen=True)
class PeerWelcome:
    log: bytes


@dataclass(frozen=True)
class JoinAnswer:
    ok: bool
    reason: str = ""
    log: bytes = b""


@dataclass(frozen=True)
class StreamEnvelope:
    envelope: bytes


@dataclass(frozen=True)
class SyncRequest:
    request_id: int
    envelope: bytes


@dataclass(frozen=True)
class SyncReply:
    request_id: int
    final: bool
    envelope: bytes


@dataclass(frozen=True)
class DirectEnvelope:
    envelope: bytes


@dataclass(frozen=True)
class LogUpdate:
    log: bytes


@dataclass(frozen=True)
class Bye:
    code: str
    message: str = ""


@dataclass(frozen=True)
class ChunkGet:
    epoch: int
    chunk_id: bytes


@dataclass(frozen=True)
class ChunkData:
    chunk_id: bytes
    data: bytes


@dataclass(frozen=True)
class ChunkMissing:
    chunk_id: bytes


PeerFrame = (
    PeerHello
    | PeerAuth
    | JoinAsk
    | PeerChallenge
    | PeerWelcome
    | JoinAnswer
    | StreamEnvelope
    | SyncRequest
    | SyncReply
    | DirectEnvelope
    | LogUpdate
    | Bye
    | ChunkGet
    | ChunkData
    | ChunkMissing
)

_TYPE: dict[type, int] = {
    PeerHello: 0x01,
    PeerAuth: 0x02,
    JoinAsk: 0x03,
    StreamEnvelope: 0x10,
    SyncRequest: 0x11,
    SyncReply: 0x12,
    DirectEnvelope: 0x13,
    LogUpdate: 0x14,
    Bye: 0x15,
    ChunkGet: 0x16,
    ChunkData: 0x17,
    ChunkMissing: 0x18,
    PeerChallenge: 0x81,
    PeerWelcome: 0x82,
    JoinAnswer: 0x83,
}


def _bool(v: object, what: str) -> bytes:
    if not isinstance(v, bool):
        raise MalformedError(f"{what} must be a bool")
    return c.boolean(v)


def encode_peer_frame(msg: PeerFrame) -> bytes:
    """Encode one peer frame; refuses fields of the wrong size/type or over their limits."""
    t = _TYPE.get(type(msg))
    if t is None:
        raise MalformedError(f"not a peer frame: {type(msg).__name__}")
    parts = [c.u8(t)]
    if isinstance(msg, PeerHello):
        parts += [
            c.u16(msg.version),
            c.fixed(msg.tag, TAG_LEN, "tag"),
            c.fixed(msg.client_nonce, NONCE_LEN, "client_nonce"),
        ]
    elif isinstance(msg, PeerAuth):
        parts += [
            c.fixed(msg.sign_pk, SIGN_PK_LEN, "sign_pk"),
            c.fixed(msg.signature, SIGNATURE_LEN, "signature"),
            c.blob32(msg.log, MAX_LOG_BYTES, "log"),
        ]
    elif isinstance(msg, JoinAsk):
        parts += [
            c.fixed(msg.invite_tag, TAG_LEN, "invite_tag"),
            c.blob32(msg.request, MAX_JOIN_REQUEST, "request"),
        ]
    elif isinstance(msg, PeerChallenge):
        parts += [
            c.u16(msg.version),
            c.fixed(msg.sign_pk, SIGN_PK_LEN, "sign_pk"),
            c.fixed(msg.server_nonce, NONCE_LEN, "server_nonce"),
            c.fixed(msg.signature, SIGNATURE_LEN, "signature"),
        ]
    elif isinstance(msg, PeerWelcome | LogUpdate):
        parts.append(c.blob32(msg.log, MAX_LOG_BYTES, "log"))
    elif isinstance(msg, JoinAnswer):
        parts += [
            _bool(msg.ok, "ok"),
            c.str16(msg.reason, MAX_REASON, "reason"),
            c.blob32(msg.log, MAX_LOG_BYTES, "log"),
        ]
    elif isinstance(msg, StreamEnvelope | DirectEnvelope):
        parts.append(c.blob32(msg.envelope, MAX_ENVELOPE, "envelope"))
    elif isinstance(msg, SyncRequest):
        parts += [c.u32(msg.request_id), c.blob32(msg.envelope, MAX_ENVELOPE, "envelope")]
    elif isinstance(msg, SyncReply):
        parts += [
            c.u32(msg.request_id),
            _bool(msg.final, "final"),
            c.blob32(msg.envelope, MAX_ENVELOPE, "envelope"),
        ]
    elif isinstance(msg, ChunkGet):
        parts += [c.u32(msg.epoch), c.fixed(msg.chunk_id, CHUNK_ID_LEN, "chunk_id")]
    elif isinstance(msg, ChunkData):
        parts += [
            c.fixed(msg.chunk_id, CHUNK_ID_LEN, "chunk_id"),
            c.blob32(msg.data, MAX_CHUNK_CIPHERTEXT, "data"),
        ]
    elif isinstance(msg, ChunkMissing):
        parts.append(c.fixed(msg.chunk_id, CHUNK_ID_LEN, "chunk_id"))
    else:  # Bye
        parts += [c.str16(msg.code, MAX_CODE, "code"), c.str16(msg.message, MAX_REASON, "message")]
    out = b"".join(parts)
    if len(out) > MAX_PEER_FRAME:  # pragma: no cover - field limits keep frames below it
        raise TooLargeError(f"peer frame is {len(out)} bytes, limit {MAX_PEER_FRAME}")
    return out


def decode_peer_frame(data: bytes, max_size: int = MAX_PEER_FRAME) -> PeerFrame:
    """Decode one peer frame; raises a ProtocolError subclass on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError("peer frame: expected bytes")
    if len(data) > max_size:
        raise TooLargeError(f"peer frame is {len(data)} bytes, limit {max_size}")
    r = c.Reader(data, "peer frame")
    t = r.u8("type")
    msg: PeerFrame
    if t == 0x01:
        version = r.u16("version")
        msg = PeerHello(r.take(TAG_LEN, "tag"), r.take(NONCE_LEN, "client_nonce"), version)
    elif t == 0x02:
        msg = PeerAuth(
            r.take(SIGN_PK_LEN, "sign_pk"),
            r.take(SIGNATURE_LEN, "signature"),
            r.blob32(MAX_LOG_BYTES, "log"),
        )
    elif t == 0x03:
        msg = JoinAsk(r.take(TAG_LEN, "invite_tag"), r.blob32(MAX_JOIN_REQUEST, "request"))
    elif t == 0x10:
        msg = StreamEnvelope(r.blob32(MAX_ENVELOPE, "envelope"))
    elif t == 0x11:
        msg = SyncRequest(r.u32("request_id"), r.blob32(MAX_ENVELOPE, "envelope"))
    elif t == 0x12:
        msg = SyncReply(r.u32("request_id"), r.boolean("final"), r.blob32(MAX_ENVELOPE, "envelope"))
    elif t == 0x13:
        msg = DirectEnvelope(r.blob32(MAX_ENVELOPE, "envelope"))
    elif t == 0x14:
        msg = LogUpdate(r.blob32(MAX_LOG_BYTES, "log"))
    elif t == 0x15:
        msg = Bye(r.str16(MAX_CODE, "code"), r.str16(MAX_REASON, "message"))
    elif t == 0x16:
        msg = ChunkGet(r.u32("epoch"), r.take(CHUNK_ID_LEN, "chunk_id"))
    elif t == 0x17:
        msg = ChunkData(r.take(CHUNK_ID_LEN, "chunk_id"), r.blob32(MAX_CHUNK_CIPHERTEXT, "data"))
    elif t == 0x18:
        msg = ChunkMissing(r.take(CHUNK_ID_LEN, "chunk_id"))
    elif t == 0x81:
        version = r.u16("version")
        msg = PeerChallenge(
            r.take(SIGN_PK_LEN, "sign_pk"),
            r.take(NONCE_LEN, "server_nonce"),
            r.take(SIGNATURE_LEN, "signature"),
            version,
        )
    elif t == 0x82:
        msg = PeerWelcome(r.blob32(MAX_LOG_BYTES, "log"))
    elif t == 0x83:
        msg = JoinAnswer(
            r.boolean("ok"), r.str16(MAX_REASON, "reason"), r.blob32(MAX_LOG_BYTES, "log")
        )
    else:
        raise MalformedError(f"unknown peer frame type 0x{t:02x}")
    r.end()
    return msg


def bye_reason(code: str, message: str = "") -> Bye:
    """A Bye frame with its fields cut to their limits (never raises for long text)."""
    return Bye(code[:MAX_CODE], message.encode("utf-8")[:MAX_REASON].decode("utf-8", "ignore"))
