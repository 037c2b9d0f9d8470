"""protocol/lan.py: discovery tags, TXT parsing, handshake signatures, peer frames."""

from __future__ import annotations

import os
import random

import pytest

from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.chunks import MAX_CHUNK_CIPHERTEXT
from qmoi_sync.protocol.errors import MalformedError, ProtocolError, SignatureError, TooLargeError
from qmoi_sync.protocol.identity import DeviceIdentity

KEY = bytes(range(32))


def test_tag_rotates_per_window_and_is_keyed() -> None:
    w = L.tag_window(1_700_000_000)
    assert w == 1_700_000_000 // L.TAG_WINDOW_S
    a = L.discovery_tag(KEY, w)
    assert len(a) == L.TAG_LEN
    assert a == L.discovery_tag(KEY, w)
    assert a != L.discovery_tag(KEY, w + 1)
    assert a != L.discovery_tag(bytes(32), w)
    # the same instant in the same window gives the same tag on every device
    assert L.tag_window(w * L.TAG_WINDOW_S) == L.tag_window(w * L.TAG_WINDOW_S + 599)
    with pytest.raises(MalformedError):
        L.discovery_tag(b"short", w)
    with pytest.raises(MalformedError):
        L.tag_window(-1)


def test_invite_tag_depends_on_the_secret_only() -> None:
    s = os.urandom(32)
    assert L.invite_tag(s) == L.invite_tag(s)
    assert L.invite_tag(s) != L.invite_tag(os.urandom(32))
    assert L.invite_tag(s) != L.discovery_tag(s, 0)


def test_txt_round_trip_and_nothing_in_clear() -> None:
    tag = L.discovery_tag(KEY, 7)
    txt = L.space_txt(tag)
    assert set(txt) == {"v", "t"}
    props = {k.encode(): v.encode() for k, v in txt.items()}
    assert L.parse_txt(props) == L.Advert(1, "space", tag)
    inv = L.invite_txt(tag)
    props = {k.encode(): v.encode() for k, v in inv.items()}
    assert L.parse_txt(props) == L.Advert(1, "invite", tag)


@pytest.mark.parametrize(
    "props",
    [
        {},
        {b"v": b"1"},
        {b"v": b"2", b"t": b"00" * 16},
        {b"v": b"x", b"t": b"00" * 16},
        {b"v": None, b"t": b"00" * 16},
        {b"v": b"1", b"t": b"00" * 15},
        {b"v": b"1", b"t": b"zz" * 16},
        {b"v": b"1", b"t": b"00" * 16, b"j": b"00" * 16},
        {b"v": b"1", b"t": "é".encode() * 16},
        {b"v": b"1", b"t": b"0" * 100},
        {b"v": b"1", b"t": b"00" * 16, **{f"k{i}".encode(): b"" for i in range(20)}},
    ],
)
def test_txt_refuses_malformed(props: dict[bytes, bytes | None]) -> None:
    with pytest.raises(MalformedError):
        L.parse_txt(props)


def test_handshake_signatures_bind_role_space_tag_nonces_keys() -> None:
    server, client = DeviceIdentity.generate(), DeviceIdentity.generate()
    space, tag = os.urandom(16), os.urandom(16)
    cn, sn = os.urandom(32), os.urandom(32)
    spk, cpk = server.public.sign_pk, client.public.sign_pk
    smsg = L.server_auth_message(space, tag, cn, sn, spk)
    sig = server.sign(smsg)
    L.verify_peer_signature(spk, sig, smsg)
    for other in (
        L.server_auth_message(os.urandom(16), tag, cn, sn, spk),
        L.server_auth_message(space, os.urandom(16), cn, sn, spk),
        L.server_auth_message(space, tag, os.urandom(32), sn, spk),
        L.server_auth_message(space, tag, cn, os.urandom(32), spk),
    ):
        with pytest.raises(SignatureError):
            L.verify_peer_signature(spk, sig, other)
    cmsg = L.client_auth_message(space, tag, cn, sn, spk, cpk)
    csig = client.sign(cmsg)
    L.verify_peer_signature(cpk, csig, cmsg)
    # no reflection: a server signature never passes as a client one, and vice versa
    assert smsg[: len(cmsg)] != cmsg[: len(smsg)]
    with pytest.raises(SignatureError):
        L.verify_peer_signature(spk, sig, L.client_auth_message(space, tag, cn, sn, spk, spk))
    with pytest.raises(SignatureError):
        L.verify_peer_signature(cpk, csig, L.client_auth_message(space, tag, cn, sn, cpk, cpk))


def test_direct_seq() -> None:
    assert L.direct_seq(0) == L.DIRECT_SEQ_BASE
    assert L.covered_seq(L.direct_seq(41)) == 41
    assert L.is_direct_seq(L.direct_seq(5))
    assert not L.is_direct_seq(5)
    with pytest.raises(MalformedError):
        L.covered_seq(5)
    with pytest.raises(MalformedError):
        L.direct_seq(L.DIRECT_SEQ_BASE)
    with pytest.raises(MalformedError):
        L.direct_seq(-1)


FRAMES: list[L.PeerFrame] = [
    L.PeerHello(tag=b"t" * 16, client_nonce=b"n" * 32),
    L.PeerAuth(sign_pk=b"k" * 32, signature=b"s" * 64, log=b"log"),
    L.JoinAsk(invite_tag=b"j" * 16, request=b"req"),
    L.PeerChallenge(sign_pk=b"k" * 32, server_nonce=b"n" * 32, signature=b"s" * 64),
    L.PeerWelcome(log=b""),
    L.JoinAnswer(ok=True, reason="", log=b"log"),
    L.JoinAnswer(ok=False, reason="invite_used: nope"),
    L.StreamEnvelope(envelope=b"e" * 100),
    L.SyncRequest(request_id=7, envelope=b"e"),
    L.SyncReply(request_id=0xFFFFFFFF, final=True, envelope=b"e"),
    L.DirectEnvelope(envelope=b"e"),
    L.LogUpdate(log=b"l"),
    L.Bye(code="not_a_member", message="é"),
    L.ChunkGet(epoch=3, chunk_id=b"c" * 32),
    L.ChunkData(chunk_id=b"c" * 32, data=b"ct" * 100),
    L.ChunkMissing(chunk_id=b"c" * 32),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_peer_frames_round_trip(frame: L.PeerFrame) -> None:
    assert L.decode_peer_frame(L.encode_peer_frame(frame)) == frame


def test_peer_frames_refuse_bad_fields() -> None:
    with pytest.raises(MalformedError):
        L.encode_peer_frame(L.PeerHello(tag=b"short", client_nonce=b"n" * 32))
    with pytest.raises(MalformedError):
        L.encode_peer_frame(L.SyncReply(request_id=1, final=1, envelope=b""))  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        L.encode_peer_frame(L.SyncRequest(request_id=-1, envelope=b""))
    with pytest.raises(TooLargeError):
        L.decode_peer_frame(b"\x10" + b"\0" * L.MAX_PEER_FRAME)
    with pytest.raises(MalformedError):
        L.decode_peer_frame(b"\x7e")
    with pytest.raises(MalformedError):
        L.decode_peer_frame(L.encode_peer_frame(FRAMES[0]) + b"x")
    assert L.bye_reason("c" * 100, "m" * 5000).code == "c" * 64


def test_chunk_frames_refuse_bad_ids_and_oversized_data() -> None:
    with pytest.raises(MalformedError):
        L.encode_peer_frame(L.ChunkGet(epoch=0, chunk_id=b"short"))
    with pytest.raises(MalformedError):
        L.encode_peer_frame(L.ChunkGet(epoch=-1, chunk_id=b"c" * 32))
    too_big = b"x" * (MAX_CHUNK_CIPHERTEXT + 1)
    with pytest.raises(TooLargeError):
        L.encode_peer_frame(L.ChunkData(chunk_id=b"c" * 32, data=too_big))
    # A peer announcing more ciphertext than a chunk can have is refused before anything is
    # taken from the frame (the websocket already capped the frame at MAX_PEER_FRAME).
    forged = b"\x17" + b"c" * 32 + (MAX_CHUNK_CIPHERTEXT + 1).to_bytes(4, "big") + too_big
    with pytest.raises(TooLargeError):
        L.decode_peer_frame(forged)
    with pytest.raises(MalformedError):
        L.decode_peer_frame(b"\x18" + b"c" * 31)


def test_peer_frame_decoder_never_raises_anything_else() -> None:
    rng = random.Random(1)
    encoded = [L.encode_peer_frame(f) for f in FRAMES]
    for _ in range(3000):
        data = bytearray(rng.choice(encoded))
        for _ in range(rng.randint(1, 4)):
            op = rng.randint(0, 2)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1 and data:
                del data[rng.randrange(len(data)) :]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            L.decode_peer_frame(bytes(data))
        except ProtocolError:
            pass
