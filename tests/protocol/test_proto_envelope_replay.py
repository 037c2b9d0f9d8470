from __future__ import annotations

import struct
from typing import Any

import pytest

from qmoi_sync.protocol.envelope import (
    HEADER_LEN,
    MAX_ENVELOPE,
    MAX_PLAINTEXT,
    EnvelopeHeader,
    open_envelope,
    parse_header,
    seal,
    verify_envelope_signature,
)
from qmoi_sync.protocol.errors import (
    DecryptError,
    MalformedError,
    NotAMemberError,
    ProtocolError,
    ReplayError,
    SignatureError,
    TooLargeError,
    UnknownEpochError,
    UnknownSuiteError,
    WrongSpaceError,
)
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.replay import MAX_SPARSE, ReplayWindow

SPACE = b"S" * 16
K0 = b"\x01" * 32
K1 = b"\x02" * 32
KEYS = {0: K0, 1: K1}


def everyone(_: bytes) -> bool:
    return True


def _seal(ident: DeviceIdentity, pt: bytes = b"hello", seq: int = 1, epoch: int = 0) -> bytes:
    return seal(ident, SPACE, epoch, KEYS[epoch], seq, pt, salt=b"\x09" * 16)


def test_roundtrip(alice: DeviceIdentity) -> None:
    env = _seal(alice, b"payload bytes", seq=7, epoch=1)
    h = parse_header(env)
    assert h == EnvelopeHeader(1, 1, SPACE, 1, alice.sign_pk, 7, b"\x09" * 16)
    assert h.to_bytes() == env[:HEADER_LEN] and HEADER_LEN == 78
    assert verify_envelope_signature(env) == h
    opened = open_envelope(env, SPACE, KEYS, lambda pk: pk == alice.sign_pk)
    assert opened.plaintext == b"payload bytes" and opened.header == h


def test_deterministic_with_injected_salt_and_rng(alice: DeviceIdentity, make_rng: Any) -> None:
    assert _seal(alice) == _seal(alice)
    a = seal(alice, SPACE, 0, K0, 1, b"x", rng=make_rng(b"r"))
    b = seal(alice, SPACE, 0, K0, 1, b"x", rng=make_rng(b"r"))
    c = seal(alice, SPACE, 0, K0, 1, b"x")
    assert a == b and a != c


def test_empty_and_max_plaintext(alice: DeviceIdentity) -> None:
    assert open_envelope(_seal(alice, b""), SPACE, KEYS, everyone).plaintext == b""
    big = _seal(alice, b"z" * MAX_PLAINTEXT)
    assert len(big) == MAX_ENVELOPE
    assert open_envelope(big, SPACE, KEYS, everyone).plaintext == b"z" * MAX_PLAINTEXT
    with pytest.raises(TooLargeError):
        _seal(alice, b"z" * (MAX_PLAINTEXT + 1))


def test_seal_rejects_bad_inputs(alice: DeviceIdentity) -> None:
    with pytest.raises(MalformedError, match="seq"):
        seal(alice, SPACE, 0, K0, 0, b"x")
    with pytest.raises(MalformedError, match="msg_key"):
        seal(alice, SPACE, 0, b"short", 1, b"x")
    with pytest.raises(MalformedError):
        seal(alice, b"short", 0, K0, 1, b"x")
    with pytest.raises(MalformedError):
        seal(alice, SPACE, 2**32, K0, 1, b"x")


def test_wrong_space(alice: DeviceIdentity) -> None:
    with pytest.raises(WrongSpaceError):
        open_envelope(_seal(alice), b"T" * 16, KEYS, everyone)


def test_non_member_sender(alice: DeviceIdentity, bob: DeviceIdentity) -> None:
    with pytest.raises(NotAMemberError):
        open_envelope(_seal(bob), SPACE, KEYS, lambda pk: pk == alice.sign_pk)


def test_unknown_epoch(alice: DeviceIdentity) -> None:
    env = _seal(alice, epoch=1)
    with pytest.raises(UnknownEpochError) as ei:
        open_envelope(env, SPACE, {0: K0}, everyone)
    assert ei.value.code == "unknown_epoch"


def test_wrong_key_is_commitment_mismatch(alice: DeviceIdentity) -> None:
    env = _seal(alice)
    with pytest.raises(DecryptError, match="commitment"):
        open_envelope(env, SPACE, {0: b"\x03" * 32}, everyone)


def _resign(ident: DeviceIdentity, env: bytes) -> bytes:
    body = env[:-64]
    return body + ident.sign(body)


def test_tampered_ciphertext(alice: DeviceIdentity) -> None:
    env = bytearray(_seal(alice))
    env[HEADER_LEN + 4] ^= 1
    # unsigned tampering: signature catches it
    with pytest.raises(SignatureError):
        open_envelope(bytes(env), SPACE, KEYS, everyone)
    # a member re-signing a tampered ciphertext: the AEAD catches it
    with pytest.raises(DecryptError, match="authenticate"):
        open_envelope(_resign(alice, bytes(env)), SPACE, KEYS, everyone)


def test_tampered_commitment(alice: DeviceIdentity) -> None:
    env = bytearray(_seal(alice))
    env[-64 - 1] ^= 1
    with pytest.raises(DecryptError, match="commitment"):
        open_envelope(_resign(alice, bytes(env)), SPACE, KEYS, everyone)


@pytest.mark.parametrize("offset", [2, 18, 22, 54, 62, 77])
def test_tampered_header(alice: DeviceIdentity, offset: int) -> None:
    env = bytearray(_seal(alice))
    env[offset] ^= 1
    with pytest.raises(ProtocolError):
        open_envelope(bytes(env), SPACE, KEYS, everyone)


def test_tampered_header_resigned(alice: DeviceIdentity) -> None:
    # seq changed and re-signed by the sender: per-message keys bind the header -> fails
    env = bytearray(_seal(alice, seq=1))
    struct.pack_into(">Q", env, 54, 2)
    with pytest.raises(DecryptError):
        open_envelope(_resign(alice, bytes(env)), SPACE, KEYS, everyone)


def test_wrong_signature(alice: DeviceIdentity, bob: DeviceIdentity) -> None:
    env = _seal(alice)
    forged = _resign(bob, env)  # bob signs an envelope claiming alice as sender
    with pytest.raises(SignatureError):
        verify_envelope_signature(forged)
    with pytest.raises(SignatureError):
        open_envelope(forged, SPACE, KEYS, everyone)
    bad = env[:-1] + bytes([env[-1] ^ 1])
    with pytest.raises(SignatureError):
        verify_envelope_signature(bad)


@pytest.mark.parametrize(("offset", "what"), [(0, "version"), (1, "suite")])
def test_unknown_version_or_suite(alice: DeviceIdentity, offset: int, what: str) -> None:
    env = bytearray(_seal(alice))
    env[offset] = 2
    with pytest.raises(UnknownSuiteError, match=what):
        parse_header(bytes(env))


def test_structure_refusals(alice: DeviceIdentity) -> None:
    env = _seal(alice)
    for n in range(len(env)):
        with pytest.raises(MalformedError):
            parse_header(env[:n])
    with pytest.raises(MalformedError, match="trailing"):
        parse_header(env + b"\x00")
    with pytest.raises(TooLargeError):
        parse_header(b"\x01" * (MAX_ENVELOPE + 1))
    zero_seq = bytearray(env)
    struct.pack_into(">Q", zero_seq, 54, 0)
    with pytest.raises(MalformedError, match="seq 0"):
        parse_header(bytes(zero_seq))
    huge_len = bytearray(env)
    struct.pack_into(">I", huge_len, HEADER_LEN, 0xFFFFFFFF)
    with pytest.raises(TooLargeError):
        parse_header(bytes(huge_len))
    short_ct = env[:HEADER_LEN] + struct.pack(">I", 3) + b"abc" + bytes(96)
    with pytest.raises(MalformedError, match="tag"):
        parse_header(short_ct)
    with pytest.raises(MalformedError):
        parse_header("text")  # type: ignore[arg-type]


# -- replay ------------------------------------------------------------------------------------


def test_replay_in_order() -> None:
    w = ReplayWindow()
    assert not w.seen(1)
    for s in range(1, 6):
        w.accept(s)
    assert w.watermark == 5 and w.pending_gaps() == 0
    with pytest.raises(ReplayError):
        w.accept(3)
    assert w.mark(5) is False


def test_replay_zero_and_invalid_never_accepted() -> None:
    w = ReplayWindow()
    assert w.seen(0) and w.seen(-1) and w.seen(2**64)
    with pytest.raises(ReplayError):
        w.accept(0)


def test_reordered_seqs_accepted_once() -> None:
    w = ReplayWindow()
    order = [3, 1, 5, 2, 4, 7]
    for s in order:
        w.accept(s)
    for s in order:
        with pytest.raises(ReplayError):
            w.accept(s)
    assert w.watermark == 5 and w.pending_gaps() == 1 and w.highest == 7
    assert not w.seen(6)
    w.accept(6)
    assert w.watermark == 7 and w.pending_gaps() == 0


def test_replay_persistence_roundtrip() -> None:
    w = ReplayWindow()
    for s in [1, 2, 4, 9, 10]:
        w.accept(s)
    again = ReplayWindow.from_bytes(w.to_bytes())
    assert again.to_bytes() == w.to_bytes()
    assert [again.seen(s) for s in range(1, 12)] == [w.seen(s) for s in range(1, 12)]
    assert "watermark=2" in repr(again)


def test_replay_from_bytes_refusals() -> None:
    good = ReplayWindow()
    good.accept(5)
    data = good.to_bytes()
    for n in range(len(data)):
        with pytest.raises(MalformedError):
            ReplayWindow.from_bytes(data[:n])
    with pytest.raises(MalformedError):
        ReplayWindow.from_bytes(data + b"\x00")
    with pytest.raises(MalformedError, match="version"):
        ReplayWindow.from_bytes(b"\x09" + data[1:])
    # unsorted / duplicate / below-watermark seqs
    bad = b"\x01" + struct.pack(">QI", 0, 2) + struct.pack(">QQ", 9, 5)
    with pytest.raises(MalformedError, match="increasing"):
        ReplayWindow.from_bytes(bad)
    bad = b"\x01" + struct.pack(">QI", 10, 1) + struct.pack(">Q", 3)
    with pytest.raises(MalformedError):
        ReplayWindow.from_bytes(bad)
    with pytest.raises(TooLargeError):
        ReplayWindow.from_bytes(b"\x01" + struct.pack(">QI", 0, MAX_SPARSE + 1))


def test_replay_sparse_cap_advances_watermark() -> None:
    w = ReplayWindow(max_sparse=4)
    for s in [10, 20, 30, 40]:
        w.accept(s)
    assert w.watermark == 0 and w.pending_gaps() == 4
    w.accept(50)  # over the cap: watermark jumps to 10
    assert w.watermark == 10 and w.pending_gaps() == 4
    assert w.seen(5)  # a very late arrival below the new watermark is dropped
    assert not w.seen(15)
    w.accept(11)
    assert w.watermark == 11


def test_replay_default_cap_bounded() -> None:
    w = ReplayWindow()
    for s in range(2, 4 + 2 * MAX_SPARSE, 2):  # only even seqs: a gap everywhere
        w.mark(s)
    assert w.pending_gaps() <= MAX_SPARSE
    assert w.watermark > 0


def test_replay_window_advance_to_covers_below_and_keeps_above() -> None:
    w = ReplayWindow()
    for s in (1, 2, 5, 9, 10, 12):
        w.mark(s)
    assert w.above() == [5, 9, 10, 12]
    w.advance_to(8)  # 3..8 covered (a full state): 9, 10 follow contiguously, 11 is missing
    assert (w.watermark, w.above()) == (10, [12])
    assert w.seen(7) and not w.seen(11)
    w.advance_to(4)  # below the watermark: nothing changes
    assert (w.watermark, w.above()) == (10, [12])
    assert ReplayWindow.from_bytes(w.to_bytes()).above() == [12]
    with pytest.raises(MalformedError):
        w.advance_to(-1)
