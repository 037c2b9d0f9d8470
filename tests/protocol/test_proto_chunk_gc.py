"""Blob garbage-collection frames: ListChunks / ChunkList and DropChunks / ChunksDropped."""

from __future__ import annotations

import struct

import pytest

from qmoi_sync.protocol.errors import MalformedError, ProtocolError
from qmoi_sync.protocol.frames import (
    BLOB_FRAME_TYPES,
    MAX_CHUNK_LIST,
    ChunkList,
    ChunksDropped,
    DropChunks,
    Frame,
    ListChunks,
    decode_frame,
    encode_frame,
)

C1 = bytes(range(32))
C2 = bytes(range(1, 33))

FRAMES: list[Frame] = [
    ListChunks(),
    ListChunks(C1),
    DropChunks(0, ()),
    DropChunks(86_400, (C1, C2)),
    ChunkList(()),
    ChunkList(((C1, 0), (C2, 2**32 - 1)), more=True),
    ChunksDropped(2, 2 * 1024 * 1024),
]


@pytest.mark.parametrize("frame", FRAMES, ids=repr)
def test_roundtrip_and_every_truncation_refused(frame: Frame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    for cut in range(1, len(data)):
        with pytest.raises(ProtocolError):
            decode_frame(data[:cut])
    with pytest.raises(ProtocolError):
        decode_frame(data + b"\x00")


def test_requests_ride_the_blob_channel_rate_limits() -> None:
    assert encode_frame(ListChunks())[0] in BLOB_FRAME_TYPES
    assert encode_frame(DropChunks(0, ()))[0] in BLOB_FRAME_TYPES


def test_refusals() -> None:
    with pytest.raises(MalformedError):
        encode_frame(ListChunks(b"short"))
    with pytest.raises(MalformedError):
        encode_frame(DropChunks(0, (C1,) * (MAX_CHUNK_LIST + 1)))
    with pytest.raises(MalformedError):
        encode_frame(DropChunks(0, [C1]))  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        encode_frame(DropChunks(-1, (C1,)))
    with pytest.raises(MalformedError):
        encode_frame(ChunkList(((C1, -5),)))
    with pytest.raises(MalformedError, match="limit"):
        decode_frame(b"\x0c" + struct.pack(">IH", 0, MAX_CHUNK_LIST + 1))
    with pytest.raises(MalformedError, match="limit"):
        decode_frame(b"\x90\x00" + struct.pack(">H", MAX_CHUNK_LIST + 1))
