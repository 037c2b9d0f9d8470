from __future__ import annotations

import struct

import pytest

from qmoi_sync.protocol.envelope import MAX_ENVELOPE
from qmoi_sync.protocol.errors import MalformedError, ProtocolError, TooLargeError
from qmoi_sync.protocol.frames import (
    AUTH_CONTEXT,
    MAX_FRAME,
    PROTO_VERSION,
    Ack,
    Auth,
    CaughtUp,
    Challenge,
    Deliver,
    Error,
    Frame,
    Hello,
    JoinForward,
    JoinReply,
    JoinRequest,
    JoinResult,
    Membership,
    Publish,
    PushMembership,
    Subscribe,
    Welcome,
    auth_message,
    decode_frame,
    encode_frame,
)
from qmoi_sync.protocol.identity import DeviceIdentity, verify
from qmoi_sync.protocol.payload import (
    INDEX_DOC_ID,
    MAX_ITEMS,
    MAX_REPAIR_GAPS,
    MAX_REPAIR_PARTS,
    MAX_RESPONDERS,
    DeviceInfo,
    DocUpdate,
    Payload,
    RepairGap,
    RepairReply,
    RepairRequest,
    StateReply,
    StateRequest,
    Updates,
    decode_payload,
    encode_payload,
)

SPACE = b"S" * 16
PK = b"P" * 32

FRAMES: list[Frame] = [
    Hello(SPACE, PK),
    Hello(SPACE, PK, 7),
    Auth(b"s" * 64, b"log bytes"),
    Auth(b"s" * 64),
    Subscribe(0),
    Subscribe(2**64 - 1),
    Publish(b"envelope"),
    PushMembership(b"log"),
    JoinRequest(SPACE, b"i" * 16, b"request"),
    JoinReply(42, True, "", b"log"),
    JoinReply(43, False, "invite expired — sorry", b""),
    Challenge(b"n" * 32),
    Welcome(10, b"log"),
    Deliver(11, b"env"),
    Ack(1, 2, True),
    Ack(1, 2),
    CaughtUp(99),
    Membership(b"log"),
    JoinForward(5, b"req"),
    JoinResult(True, "welcome", b"log"),
    JoinResult(False),
    Error("quota", "you are over your quota ✋", True),
    Error("x", ""),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_frame_roundtrip(frame: Frame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    # every truncation and any trailing byte is refused
    for n in range(len(data)):
        with pytest.raises(MalformedError):
            decode_frame(data[:n])
    with pytest.raises(MalformedError, match="trailing"):
        decode_frame(data + b"\x00")


def test_proto_version() -> None:
    assert PROTO_VERSION == 1
    assert Hello(SPACE, PK).proto_version == 1


def test_auth_message(alice: DeviceIdentity) -> None:
    nonce = b"n" * 32
    msg = auth_message(nonce, SPACE, alice.sign_pk)
    assert msg == b"qmoi-sync relay auth v1\0" + nonce + SPACE + alice.sign_pk
    assert msg.startswith(AUTH_CONTEXT)
    verify(alice.sign_pk, alice.sign(msg), msg)
    with pytest.raises(MalformedError):
        auth_message(b"short", SPACE, alice.sign_pk)


def test_decode_frame_refusals() -> None:
    with pytest.raises(MalformedError, match="unknown frame type 0x7f"):
        decode_frame(b"\x7f")
    with pytest.raises(MalformedError):
        decode_frame(b"")
    with pytest.raises(TooLargeError):
        decode_frame(b"\x04" + bytes(MAX_FRAME))
    with pytest.raises(TooLargeError):
        decode_frame(encode_frame(Publish(b"x" * 100)), max_size=50)
    # bool must be 0/1
    ack = bytearray(encode_frame(Ack(1, 2, True)))
    ack[-1] = 2
    with pytest.raises(MalformedError, match="0 or 1"):
        decode_frame(bytes(ack))
    # blob length over its limit
    with pytest.raises(TooLargeError):
        decode_frame(b"\x04" + struct.pack(">I", MAX_ENVELOPE + 1))
    with pytest.raises(TooLargeError):
        decode_frame(b"\x87" + struct.pack(">QI", 1, 5000))
    # invalid UTF-8 in a string
    bad = b"\x89" + struct.pack(">H", 2) + b"\xff\xfe" + struct.pack(">H", 0) + b"\x00"
    with pytest.raises(MalformedError, match="UTF-8"):
        decode_frame(bad)
    # code over 64 bytes
    bad = b"\x89" + struct.pack(">H", 65) + b"c" * 65 + struct.pack(">H", 0) + b"\x00"
    with pytest.raises(TooLargeError):
        decode_frame(bad)
    with pytest.raises(MalformedError):
        decode_frame("text")  # type: ignore[arg-type]


def test_encode_frame_refusals() -> None:
    with pytest.raises(MalformedError):
        encode_frame(Hello(b"short", PK))
    with pytest.raises(MalformedError):
        encode_frame(Subscribe(-1))
    with pytest.raises(MalformedError):
        encode_frame(Ack(1, 2, 1))  # type: ignore[arg-type]
    with pytest.raises(TooLargeError):
        encode_frame(Error("c" * 65, "m"))
    with pytest.raises(TooLargeError):
        encode_frame(Error("c", "m" * 1025))
    with pytest.raises(TooLargeError):
        encode_frame(JoinResult(False, "é" * 513))  # 1026 bytes of UTF-8
    with pytest.raises(TooLargeError):
        encode_frame(Publish(b"x" * (MAX_ENVELOPE + 1)))
    with pytest.raises(MalformedError):
        encode_frame("nope")  # type: ignore[arg-type]


def test_max_envelope_fits_in_a_frame() -> None:
    data = encode_frame(Deliver(1, b"x" * MAX_ENVELOPE))
    assert len(data) <= MAX_FRAME
    assert decode_frame(data) == Deliver(1, b"x" * MAX_ENVELOPE)


# -- payloads -----------------------------------------------------------------------------------

PAYLOADS = [
    Updates([DocUpdate(INDEX_DOC_ID, b"\x01\x02"), DocUpdate(b"d" * 16, b"")]),
    Updates([]),
    StateReply([DocUpdate(b"d" * 16, b"upd")]),
    StateRequest([(INDEX_DOC_ID, b"sv"), (b"e" * 16, b"")]),
    DeviceInfo("Alice's laptop ☕", "linux", "0.1.0"),
    DeviceInfo(""),
    RepairRequest(b"r" * 16, [b"A" * 32], [RepairGap(b"A" * 32, 3, 9)], [(b"e" * 16, b"\x00")]),
    RepairRequest(b"r" * 16),
    RepairReply(b"r" * 16, b"B" * 32, 2, 3, [(b"A" * 32, 9)], [DocUpdate(b"d" * 16, b"u")]),
    RepairReply(b"r" * 16, b"B" * 32),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_payload_roundtrip(payload: Payload) -> None:
    data = encode_payload(payload)
    assert decode_payload(data) == payload
    for n in range(len(data)):
        with pytest.raises(MalformedError):
            decode_payload(data[:n])
    with pytest.raises(MalformedError):
        decode_payload(data + b"\x00")


def test_repair_payload_refusals() -> None:
    """Kinds 7/8 (agent/relay_repair.py): bounded counts, a gap is 1 <= first <= top, a part
    is below its count — refused on decode as on encode."""
    rid, pk = b"r" * 16, b"A" * 32
    gap = pk + struct.pack(">QQ", 5, 4)  # first > top
    with pytest.raises(MalformedError, match="gap 0"):
        decode_payload(b"\x07" + rid + b"\x00" + struct.pack(">H", 1) + gap + bytes(4))
    with pytest.raises(TooLargeError, match="responders"):
        decode_payload(b"\x07" + rid + bytes([MAX_RESPONDERS + 1]) + pk * (MAX_RESPONDERS + 1))
    with pytest.raises(TooLargeError, match="gaps"):
        decode_payload(b"\x07" + rid + b"\x00" + struct.pack(">H", MAX_REPAIR_GAPS + 1))
    for part, parts in ((3, 3), (0, 0), (0, MAX_REPAIR_PARTS + 1)):
        with pytest.raises(MalformedError, match="part"):
            decode_payload(b"\x08" + rid + pk + struct.pack(">HHH", part, parts, 0) + bytes(4))
        with pytest.raises(MalformedError, match="part"):
            encode_payload(RepairReply(rid, pk, part, parts))
    with pytest.raises(MalformedError):
        encode_payload(RepairRequest(rid, gaps=[RepairGap(pk, 0, 1)]))
    with pytest.raises(TooLargeError):
        encode_payload(RepairRequest(rid, responders=[pk] * (MAX_RESPONDERS + 1)))
    with pytest.raises(MalformedError):
        encode_payload(RepairRequest(b"short"))


def test_payload_refusals() -> None:
    with pytest.raises(MalformedError, match="unknown payload kind"):
        decode_payload(b"\x09")
    with pytest.raises(TooLargeError):
        decode_payload(b"\x01" + struct.pack(">I", MAX_ITEMS + 1))
    with pytest.raises(MalformedError, match="cannot fit"):
        decode_payload(b"\x01" + struct.pack(">I", 1000))
    with pytest.raises(MalformedError):
        encode_payload(Updates([DocUpdate(b"short", b"")]))
    with pytest.raises(TooLargeError):
        encode_payload(DeviceInfo("n" * 129))
    with pytest.raises(TooLargeError):
        encode_payload(DeviceInfo("n", "p" * 65))
    with pytest.raises(TooLargeError):
        encode_payload(StateRequest([(INDEX_DOC_ID, b"")] * (MAX_ITEMS + 1)))
    with pytest.raises(MalformedError):
        encode_payload(object())  # type: ignore[arg-type]
    bad_name = b"\x02" + struct.pack(">H", 1) + b"\xff" + bytes(4)
    with pytest.raises(MalformedError, match="UTF-8"):
        decode_payload(bad_name)
    with pytest.raises(ProtocolError):
        decode_payload(b"\x02" + struct.pack(">H", 200) + b"n" * 200 + bytes(4))
