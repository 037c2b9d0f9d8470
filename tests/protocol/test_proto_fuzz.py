"""Fuzz the decoders: on any input they return a value or raise a ProtocolError, nothing else."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoi_sync.protocol.envelope import parse_header, seal, verify_envelope_signature
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.frames import Ack, Error, JoinReply, decode_frame, encode_frame
from qmoi_sync.protocol.identity import DeviceIdentity, DevicePublic
from qmoi_sync.protocol.invite import Invite, build_join_request, decode_invite, parse_join_request
from qmoi_sync.protocol.membership import MemberOp, MembershipLog, Role
from qmoi_sync.protocol.payload import (
    DeviceInfo,
    DocUpdate,
    Updates,
    decode_payload,
    encode_payload,
)
from qmoi_sync.protocol.replay import ReplayWindow

DECODERS: list[Callable[[bytes], object]] = [
    decode_frame,
    decode_payload,
    parse_header,
    verify_envelope_signature,
    MembershipLog.from_bytes,
    MemberOp.from_bytes,
    parse_join_request,
    DevicePublic.from_bytes,
    ReplayWindow.from_bytes,
]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_protocol_errors(fn: Callable[[Any], object], data: Any) -> None:
    try:
        fn(data)
    except ProtocolError as e:
        assert e.code and str(e)


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda f: f.__qualname__)
@FUZZ
@given(data=st.binary(max_size=600))
def test_decoders_on_random_bytes(decoder: Callable[[bytes], object], data: bytes) -> None:
    _only_protocol_errors(decoder, data)


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda f: f.__qualname__)
@FUZZ
@given(first=st.integers(0, 255), data=st.binary(max_size=300))
def test_decoders_with_plausible_first_byte(
    decoder: Callable[[bytes], object], first: int, data: bytes
) -> None:
    # type/kind/version bytes are small: steer past the first check into the field decoders
    _only_protocol_errors(
        decoder, bytes([first % 0x0A if first < 128 else 0x80 + first % 10]) + data
    )


@FUZZ
@given(token=st.text(max_size=300))
def test_decode_invite_on_random_text(token: str) -> None:
    _only_protocol_errors(decode_invite, token)
    _only_protocol_errors(decode_invite, "qmoi1-" + token)


def _valid_samples() -> list[tuple[Callable[[bytes], object], bytes]]:
    alice = DeviceIdentity.from_private_bytes(bytes(range(64)))
    bob = DeviceIdentity.from_private_bytes(bytes(range(64, 128)))
    log, s0 = MembershipLog.create(alice, 1000, space_id=b"S" * 16)
    log.add_member(
        alice,
        bob.public,
        Role.member,
        {0: s0},
        1001,
    )
    env = seal(alice, b"S" * 16, 0, b"k" * 32, 1, b"hello", salt=bytes(16))
    inv = Invite(b"S" * 16, "wss://x", alice.sign_pk, b"s" * 32, 99)
    w = ReplayWindow()
    for s in (1, 3, 7):
        w.accept(s)
    return [
        (MembershipLog.from_bytes, log.to_bytes()),
        (verify_envelope_signature, env),
        (decode_frame, encode_frame(JoinReply(1, True, "ok", log.to_bytes()))),
        (decode_frame, encode_frame(Ack(1, 2, False))),
        (decode_frame, encode_frame(Error("c", "m", True))),
        (decode_payload, encode_payload(Updates([DocUpdate(bytes(16), b"u" * 20)]))),
        (decode_payload, encode_payload(DeviceInfo("n", "p", "v"))),
        (parse_join_request, build_join_request(inv, bob.public, "bob")),
        (ReplayWindow.from_bytes, w.to_bytes()),
    ]


SAMPLES = _valid_samples()


@pytest.mark.parametrize("idx", range(len(SAMPLES)))
@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10**6),
    extra=st.binary(max_size=8),
)
def test_mutated_valid_inputs(
    idx: int, edits: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    decoder, good = SAMPLES[idx]
    data = bytearray(good)
    for pos, val in edits:
        data[pos % len(data)] = val
    data = data[: max(1, cut % (len(data) + 1))] + extra if cut % 3 == 0 else data
    _only_protocol_errors(decoder, bytes(data))


def test_length_fields_pointing_past_the_end() -> None:
    for decoder in DECODERS:
        for prefix in (b"\x01", b"\x04", b"\x83", b"\x02"):
            _only_protocol_errors(decoder, prefix + struct.pack(">I", 0xFFFFFFFF) + b"abc")
