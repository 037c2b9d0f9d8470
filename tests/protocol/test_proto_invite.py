from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import pytest

from qmoi_sync.protocol.errors import (
    InviteError,
    MalformedError,
    ProtocolError,
    SignatureError,
    TooLargeError,
)
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.invite import (
    MAX_TOKEN_LEN,
    TOKEN_PREFIX,
    Invite,
    build_join_request,
    decode_invite,
    invite_id,
    parse_join_request,
    verify_join_proof,
    verify_join_request,
)
from qmoi_sync.protocol.membership import Role

SPACE = b"S" * 16


@pytest.fixture
def invite(alice: DeviceIdentity, make_rng: Any) -> Invite:
    return Invite.new(
        SPACE, alice.sign_pk, 2000, "wss://relay.example:8443/q", Role.member, rng=make_rng(b"i")
    )


def test_token_roundtrip(invite: Invite) -> None:
    token = invite.encode()
    assert token.startswith(TOKEN_PREFIX) and "=" not in token
    assert decode_invite(token) == invite
    assert decode_invite(f"  {token}\n") == invite
    no_url = Invite(SPACE, None, invite.inviter, invite.secret, 5, Role.reader)
    assert decode_invite(no_url.encode()) == no_url
    assert invite.secret.hex() not in repr(invite)
    assert len(invite.invite_id) == 16 and invite.invite_id == invite_id(invite.secret)


def test_expiry(invite: Invite) -> None:
    assert not invite.is_expired(1999)
    assert invite.is_expired(2000)
    assert invite.is_expired(3000.5)


def test_mistyped_token_checksum(invite: Invite) -> None:
    token = invite.encode()
    i = len(TOKEN_PREFIX) + 20
    typo = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    with pytest.raises(InviteError, match=r"corrupted \(checksum mismatch\)") as ei:
        decode_invite(typo)
    assert ei.value.code == "invite_invalid"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "qmoi1-",
        "qmoi1-AAAA",
        "qmoi2-AAAA",
        "hello world",
        "qmoi1-!!!!",
        "qmoi1-ab+/",
        "qmoi1-A",
        "qmoi1-" + "A" * (MAX_TOKEN_LEN + 1),
        "qmoi1-ÄÖÜ",
    ],
)
def test_garbage_tokens(token: str) -> None:
    with pytest.raises(InviteError) as ei:
        decode_invite(token)
    assert ei.value.code == "invite_invalid"


def _token_from_body(body: bytes) -> str:
    raw = body + hashlib.sha256(body).digest()[:4]
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_structurally_bad_tokens_with_valid_checksum(invite: Invite) -> None:
    good = base64.urlsafe_b64decode(invite.encode()[6:] + "==")[:-4]
    for body, match in [
        (b"\x02" + good[1:], "version"),
        (good[:-3], "malformed"),
        (good + b"x", "malformed"),
        (good[:89] + b"\x09" + good[90:], "role code"),
    ]:
        with pytest.raises(InviteError, match=match):
            decode_invite(_token_from_body(body))
    with pytest.raises(InviteError):
        decode_invite(123)  # type: ignore[arg-type]


def test_join_request_roundtrip_and_verify(invite: Invite, bob: DeviceIdentity) -> None:
    req = build_join_request(invite, bob.public, "Bob's phone")
    body = parse_join_request(req)
    assert body.joiner == bob.public and body.name == "Bob's phone"
    assert body.space_id == SPACE and body.invite_id == invite.invite_id
    verify_join_proof(body, invite.secret)
    verify_join_request(body, invite, 1000)


def test_join_proof_mismatch(invite: Invite, bob: DeviceIdentity, carol: DeviceIdentity) -> None:
    body = parse_join_request(build_join_request(invite, bob.public, "bob"))
    with pytest.raises(InviteError, match="another invite") as ei:
        verify_join_proof(body, b"\x00" * 32)
    assert ei.value.code == "invite_invalid"
    # same invite id but forged proof
    forged = type(body)(body.space_id, body.invite_id, body.joiner, body.name, b"\x00" * 32)
    with pytest.raises(InviteError, match="proof"):
        verify_join_proof(forged, invite.secret)
    # the relay swaps the joiner's key or renames the device: proof no longer matches
    swapped = type(body)(body.space_id, body.invite_id, carol.public, body.name, body.proof)
    with pytest.raises(InviteError, match="proof"):
        verify_join_proof(swapped, invite.secret)
    renamed = type(body)(body.space_id, body.invite_id, body.joiner, "evil", body.proof)
    with pytest.raises(InviteError, match="proof"):
        verify_join_proof(renamed, invite.secret)


def test_verify_join_request_expired_and_wrong_space(invite: Invite, bob: DeviceIdentity) -> None:
    body = parse_join_request(build_join_request(invite, bob.public, "bob"))
    with pytest.raises(InviteError) as ei:
        verify_join_request(body, invite, 2000)
    assert ei.value.code == "invite_expired"
    other = Invite(b"T" * 16, None, invite.inviter, invite.secret, 2000)
    with pytest.raises(InviteError, match="another space"):
        verify_join_request(body, other, 1)


def test_parse_join_request_refusals(invite: Invite, bob: DeviceIdentity) -> None:
    req = build_join_request(invite, bob.public, "bob")
    for n in range(len(req)):
        with pytest.raises(MalformedError):
            parse_join_request(req[:n])
    with pytest.raises(MalformedError):
        parse_join_request(req + b"\x00")
    with pytest.raises(MalformedError, match="version"):
        parse_join_request(b"\x05" + req[1:])
    with pytest.raises(TooLargeError):
        parse_join_request(b"\x01" * 5000)
    bad_key = bytearray(req)
    bad_key[1 + 16 + 16 + 40] ^= 1  # the joiner's kx key
    with pytest.raises(SignatureError):
        parse_join_request(bytes(bad_key))
    long_name = req[: 1 + 16 + 16 + 128] + struct.pack(">H", 129) + b"n" * 129 + bytes(32)
    with pytest.raises(TooLargeError):
        parse_join_request(long_name)
    with pytest.raises(ProtocolError):
        build_join_request(invite, bob.public, "n" * 129)
