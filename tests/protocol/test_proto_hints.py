"""Prefetch hints (protocol/hints.py) and their relay frames (Hint 0x0d, Hinted 0x92)."""

from __future__ import annotations

import struct

import pytest

from qmoi_sync.protocol.chunks import MAX_CHUNK
from qmoi_sync.protocol.envelope import open_envelope, seal
from qmoi_sync.protocol.errors import (
    DecryptError,
    MalformedError,
    NotAMemberError,
    ProtocolError,
    SignatureError,
    TooLargeError,
    WrongSpaceError,
)
from qmoi_sync.protocol.frames import Hint, Hinted, decode_frame, encode_frame
from qmoi_sync.protocol.hints import (
    MAX_HINT,
    MAX_HINT_ENTRIES,
    MAX_HINT_OFFSET,
    HintEntry,
    PrefetchHint,
    decode_hint,
    encode_hint,
    hint_key,
    open_hint,
    seal_hint,
)
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys

SPACE = bytes(range(16))
OTHER_SPACE = bytes(range(1, 17))
ALICE = DeviceIdentity.from_private_bytes(bytes(range(64)))
MALLORY = DeviceIdentity.from_private_bytes(bytes(range(64, 128)))
MSG = derive_epoch_keys(SPACE, 0, b"s" * 32).msg
HINT = PrefetchHint(
    b"t" * 16, 0, (HintEntry(0, b"a" * 32, 1_000_000), HintEntry(1_000_000, b"b" * 32, 5))
)


def _members(pk: bytes) -> bool:
    return pk == ALICE.public.sign_pk


def test_body_roundtrip_and_layout() -> None:
    body = encode_hint(HINT)
    assert len(body) == 1 + 16 + 4 + 2 + 2 * (8 + 32 + 4)
    assert decode_hint(body) == HINT
    full = PrefetchHint(b"t" * 16, 3, tuple(HintEntry(i, b"c" * 32, 1) for i in range(512)))
    assert decode_hint(encode_hint(full)) == full


def test_sealed_roundtrip_and_fits_a_frame() -> None:
    full = PrefetchHint(b"t" * 16, 0, (HintEntry(7, b"c" * 32, MAX_CHUNK),) * MAX_HINT_ENTRIES)
    sealed = seal_hint(ALICE, SPACE, 0, MSG, 1_700_000_000_000_000, full)
    assert len(sealed) <= MAX_HINT
    opened = open_hint(sealed, SPACE, {0: MSG}, _members)
    assert (opened.sender, opened.seq, opened.hint) == (
        ALICE.public.sign_pk,
        1_700_000_000_000_000,
        full,
    )
    frame = encode_frame(Hint(sealed))
    assert frame[0] == 0x0D and decode_frame(frame) == Hint(sealed)
    assert decode_frame(encode_frame(Hinted(sealed))) == Hinted(sealed)


def test_refused_senders_spaces_and_tampering() -> None:
    sealed = seal_hint(ALICE, SPACE, 0, MSG, 5, HINT)
    with pytest.raises(WrongSpaceError):
        open_hint(sealed, OTHER_SPACE, {0: MSG}, _members)
    # a non-member's hint, even sealed with the right key
    with pytest.raises(NotAMemberError):
        open_hint(seal_hint(MALLORY, SPACE, 0, MSG, 5, HINT), SPACE, {0: MSG}, _members)
    flipped = bytearray(sealed)
    flipped[100] ^= 1
    with pytest.raises(SignatureError):
        open_hint(bytes(flipped), SPACE, {0: MSG}, _members)
    with pytest.raises(DecryptError):
        open_hint(sealed, SPACE, {1: MSG}, _members)  # no key for its epoch


def test_hints_and_envelopes_never_open_as_each_other() -> None:
    hint = seal_hint(ALICE, SPACE, 0, MSG, 5, HINT)
    with pytest.raises(DecryptError):
        open_envelope(hint, SPACE, {0: MSG}, _members)
    envelope = seal(ALICE, SPACE, 0, MSG, 5, encode_hint(HINT))
    with pytest.raises(DecryptError):
        open_hint(envelope, SPACE, {0: MSG}, _members)


def test_oversized_hint_refused_before_any_crypto() -> None:
    with pytest.raises(TooLargeError):
        open_hint(b"\x01" * (MAX_HINT + 1), SPACE, {0: MSG}, _members)
    with pytest.raises(TooLargeError):
        encode_frame(Hint(b"x" * (MAX_HINT + 1)))
    with pytest.raises(TooLargeError):
        decode_frame(b"\x0d" + struct.pack(">I", MAX_HINT + 1) + b"x" * (MAX_HINT + 1))


def _body(version: int = 1, count: int = 1, entries: bytes | None = None) -> bytes:
    if entries is None:
        entries = struct.pack(">Q", 0) + b"c" * 32 + struct.pack(">I", 10)
    return bytes([version]) + b"t" * 16 + struct.pack(">IH", 0, count) + entries


@pytest.mark.parametrize(
    "body",
    [
        _body(version=2),
        _body(count=0, entries=b""),
        _body(count=2),  # says two, holds one
        _body() + b"\x00",  # trailing byte
        _body(entries=struct.pack(">Q", 0) + b"c" * 32 + struct.pack(">I", 0)),  # empty chunk
        _body(entries=struct.pack(">Q", 0) + b"c" * 32 + struct.pack(">I", MAX_CHUNK + 1)),
        _body(entries=struct.pack(">Q", MAX_HINT_OFFSET) + b"c" * 32 + struct.pack(">I", 1)),
        _body(count=MAX_HINT_ENTRIES + 1, entries=b""),
        b"",
    ],
)
def test_malformed_bodies_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_hint(body)
    # sealed by a member, still refused when opened
    with pytest.raises(ProtocolError):
        open_hint(seal(ALICE, SPACE, 0, hint_key(MSG), 9, body), SPACE, {0: MSG}, _members)


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(MalformedError):
        encode_hint(PrefetchHint(b"t" * 16, 0, ()))
    with pytest.raises(MalformedError):
        encode_hint(PrefetchHint(b"t" * 16, 0, (HintEntry(0, b"c" * 32, 0),)))
    with pytest.raises(MalformedError):
        encode_hint(PrefetchHint(b"t" * 15, 0, (HintEntry(0, b"c" * 32, 1),)))
    with pytest.raises(MalformedError):
        encode_hint(PrefetchHint(b"t" * 16, 0, (HintEntry(-1, b"c" * 32, 1),)))
