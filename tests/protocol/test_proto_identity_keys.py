from __future__ import annotations

from typing import Any

import pytest

from qmoi_sync.protocol import errors
from qmoi_sync.protocol.errors import (
    DecryptError,
    InviteError,
    MalformedError,
    ProtocolError,
    SignatureError,
    UnknownEpochError,
)
from qmoi_sync.protocol.identity import (
    DEVICE_PUBLIC_LEN,
    DeviceIdentity,
    DevicePublic,
    device_id,
    is_valid_device_id,
    verify,
)
from qmoi_sync.protocol.keys import (
    WRAPPED_LEN,
    derive_epoch_keys,
    file_id_key,
    unwrap_secret,
    wrap_secret,
)
from qmoi_sync.protocol.version import PROTO_VERSION, __version__

SPACE = bytes(range(16))
SECRET = b"\x42" * 32


def test_versions() -> None:
    assert __version__ == "0.1.0"
    assert PROTO_VERSION == 1


def test_error_codes_and_messages() -> None:
    e = errors.MalformedError("bad thing")
    assert e.code == "malformed" and str(e) == "bad thing" and isinstance(e, ProtocolError)
    assert errors.TooLargeError("x").code == "too_large"
    assert errors.SignatureError("x").code == "bad_signature"
    assert errors.ReplayError("x").code == "replay"
    assert errors.UnknownSuiteError("x").code == "unknown_suite"
    assert errors.WrongSpaceError("x").code == "wrong_space"
    assert errors.NotAMemberError("x").code == "not_a_member"
    assert errors.DecryptError("x").code == "decrypt_failed"
    assert UnknownEpochError("x").code == "unknown_epoch"
    assert isinstance(UnknownEpochError("x"), DecryptError)
    assert errors.PathError("x").code == "bad_path"
    assert errors.MembershipError("x").code == "bad_membership"
    assert InviteError("invite_used", "spent").code == "invite_used"
    assert ProtocolError("c", "m").code == "c"
    assert "MalformedError" in repr(e)


def test_identity_roundtrip_and_determinism(alice: DeviceIdentity, make_rng: Any) -> None:
    raw = alice.to_private_bytes()
    assert len(raw) == 64
    again = DeviceIdentity.from_private_bytes(raw)
    assert again.public == alice.public
    assert DeviceIdentity.generate(make_rng(b"alice")).public == alice.public
    assert alice.kx_private_bytes() == raw[32:]
    assert alice.sign_pk == alice.public.sign_pk
    # repr never leaks key material
    assert raw.hex() not in repr(alice)
    assert alice.public.device_id in repr(alice)


def test_generate_random_identities_differ() -> None:
    assert DeviceIdentity.generate().public != DeviceIdentity.generate().public


def test_from_private_bytes_rejects_wrong_length() -> None:
    with pytest.raises(MalformedError):
        DeviceIdentity.from_private_bytes(b"\x00" * 63)


def test_device_public_roundtrip(alice: DeviceIdentity) -> None:
    pub = alice.public
    data = pub.to_bytes()
    assert len(data) == DEVICE_PUBLIC_LEN == 128
    assert DevicePublic.from_bytes(data) == pub


@pytest.mark.parametrize("size", [0, 1, 127, 129, 1000])
def test_device_public_rejects_wrong_size(alice: DeviceIdentity, size: int) -> None:
    data = (alice.public.to_bytes() * 10)[:size]
    with pytest.raises(MalformedError, match="128 bytes"):
        DevicePublic.from_bytes(data)


def test_device_public_rejects_bad_kx_signature(alice: DeviceIdentity, bob: DeviceIdentity) -> None:
    data = bytearray(alice.public.to_bytes())
    data[40] ^= 1  # kx_pk changed
    with pytest.raises(SignatureError):
        DevicePublic.from_bytes(bytes(data))
    # someone else's kx key under alice's signing key
    mixed = alice.public.sign_pk + bob.public.kx_pk + bob.public.kx_sig
    with pytest.raises(SignatureError):
        DevicePublic.from_bytes(mixed)


def test_device_public_rejects_non_bytes() -> None:
    with pytest.raises(MalformedError):
        DevicePublic.from_bytes("x" * 128)  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        DevicePublic(b"a", b"b" * 32, b"c" * 64)


def test_device_id_format(alice: DeviceIdentity) -> None:
    did = alice.public.device_id
    groups = did.split("-")
    assert len(did) == 4 * 9 + 3
    assert [len(g) for g in groups] == [9, 9, 9, 9]
    assert did == device_id(alice.sign_pk)
    assert alice.public.short_id == did[:7]
    assert is_valid_device_id(did)
    assert is_valid_device_id(did.lower())
    # a single typo is caught by the check character
    typo = ("B" if did[0] != "B" else "C") + did[1:]
    assert not is_valid_device_id(typo)
    assert not is_valid_device_id("nope")
    with pytest.raises(MalformedError):
        device_id(b"short")


def test_sign_and_verify(alice: DeviceIdentity, bob: DeviceIdentity) -> None:
    sig = alice.sign(b"hello")
    verify(alice.sign_pk, sig, b"hello")
    alice.public.verify(sig, b"hello")
    with pytest.raises(SignatureError):
        verify(alice.sign_pk, sig, b"hellO")
    with pytest.raises(SignatureError):
        verify(bob.sign_pk, sig, b"hello")
    with pytest.raises(SignatureError):
        verify(alice.sign_pk, sig[:-1], b"hello")
    with pytest.raises(SignatureError):
        verify(b"\x00" * 31, sig, b"hello")


def test_epoch_keys_deterministic_and_distinct() -> None:
    k = derive_epoch_keys(SPACE, 0, SECRET)
    assert k == derive_epoch_keys(SPACE, 0, SECRET)
    values = [k.msg, k.chunk_id, k.chunk_enc, k.snapshot, k.discovery]
    assert all(len(v) == 32 for v in values)
    assert len(set(values)) == 5
    assert derive_epoch_keys(SPACE, 1, SECRET).msg != k.msg
    assert derive_epoch_keys(bytes(16), 0, SECRET).msg != k.msg
    assert SECRET.hex() not in repr(k) and k.msg.hex() not in repr(k)
    fid = file_id_key(SPACE, SECRET)
    assert len(fid) == 32 and fid not in values


@pytest.mark.parametrize(
    ("space", "epoch", "secret"),
    [(b"x" * 15, 0, SECRET), (SPACE, -1, SECRET), (SPACE, 2**32, SECRET), (SPACE, 0, b"s" * 31)],
)
def test_epoch_keys_reject_bad_inputs(space: bytes, epoch: int, secret: bytes) -> None:
    with pytest.raises(MalformedError):
        derive_epoch_keys(space, epoch, secret)


def test_wrap_unwrap(alice: DeviceIdentity, bob: DeviceIdentity) -> None:
    wrapped = wrap_secret(bob.public, SPACE, 3, SECRET)
    assert len(wrapped) == WRAPPED_LEN
    assert unwrap_secret(bob, SPACE, 3, wrapped) == SECRET
    with pytest.raises(DecryptError):
        unwrap_secret(alice, SPACE, 3, wrapped)  # not the recipient
    with pytest.raises(DecryptError):
        unwrap_secret(bob, SPACE, 4, wrapped)  # epoch is bound
    with pytest.raises(DecryptError):
        unwrap_secret(bob, bytes(16), 3, wrapped)  # space is bound
    tampered = bytearray(wrapped)
    tampered[50] ^= 1
    with pytest.raises(DecryptError):
        unwrap_secret(bob, SPACE, 3, bytes(tampered))
    with pytest.raises(DecryptError):
        unwrap_secret(bob, SPACE, 3, wrapped[:-1])
    with pytest.raises(DecryptError):
        unwrap_secret(bob, SPACE, 3, b"\x00" * WRAPPED_LEN)
