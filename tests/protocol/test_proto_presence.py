"""Presence frame (relay -> client): which devices of a space are connected to the relay."""

from __future__ import annotations

import struct

import pytest

from qmoi_sync.protocol.errors import MalformedError, ProtocolError
from qmoi_sync.protocol.frames import MAX_PRESENCE, Presence, decode_frame, encode_frame

PK1 = bytes(range(32))
PK2 = bytes(range(1, 33))


@pytest.mark.parametrize("online", [(), (PK1,), (PK1, PK2)])
def test_presence_roundtrip(online: tuple[bytes, ...]) -> None:
    data = encode_frame(Presence(online))
    assert data[0] == 0x8F
    assert len(data) == 1 + 2 + 32 * len(online)
    assert decode_frame(data) == Presence(online)


def test_presence_truncated_and_trailing() -> None:
    data = encode_frame(Presence((PK1, PK2)))
    for cut in range(1, len(data)):
        with pytest.raises(ProtocolError):
            decode_frame(data[:cut])
    with pytest.raises(ProtocolError):
        decode_frame(data + b"\x00")


def test_presence_refusals() -> None:
    with pytest.raises(MalformedError):
        encode_frame(Presence((b"short",)))
    with pytest.raises(MalformedError):
        encode_frame(Presence([PK1]))  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        encode_frame(Presence((PK1,) * (MAX_PRESENCE + 1)))
    with pytest.raises(MalformedError, match="limit"):
        decode_frame(b"\x8f" + struct.pack(">H", MAX_PRESENCE + 1))
