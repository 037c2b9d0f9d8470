"""Epoch keys: per-purpose subkeys derived from an epoch secret, and HPKE wrapping of secrets."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import DecryptError, MalformedError
from .identity import DeviceIdentity, DevicePublic, Rng

__all__ = [
    "SECRET_LEN",
    "SPACE_ID_LEN",
    "WRAPPED_LEN",
    "EpochKeys",
    "derive_epoch_keys",
    "file_id_key",
    "new_epoch_secret",
    "new_space_id",
    "unwrap_secret",
    "wrap_secret",
]

SPACE_ID_LEN = 16
SECRET_LEN = 32
#: HPKE output for a 32-byte secret: enc 32 | ciphertext 32 | tag 16.
WRAPPED_LEN = 80
MAX_EPOCH = 0xFFFFFFFF

_HPKE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
_PURPOSES = ("msg", "chunk_id", "chunk_enc", "snapshot", "discovery")


def _check_space(space_id: bytes) -> bytes:
    if not isinstance(space_id, bytes | bytearray) or len(space_id) != SPACE_ID_LEN:
        raise MalformedError(f"space_id must be {SPACE_ID_LEN} bytes")
    return bytes(space_id)


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise MalformedError("epoch must be an integer in 0..2**32-1")
    return epoch


def _check_secret(secret: bytes, what: str = "epoch secret") -> bytes:
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_LEN:
        raise MalformedError(f"{what} must be {SECRET_LEN} bytes")
    return bytes(secret)


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def new_space_id(rng: Rng | None = None) -> bytes:
    return (rng or os.urandom)(SPACE_ID_LEN)


def new_epoch_secret(rng: Rng | None = None) -> bytes:
    return (rng or os.urandom)(SECRET_LEN)


@dataclass(frozen=True, repr=False)
class EpochKeys:
    """Per-purpose 32-byte subkeys of one epoch. ``repr`` hides them."""

    msg: bytes
    chunk_id: bytes
    chunk_enc: bytes
    snapshot: bytes
    discovery: bytes

    def __repr__(self) -> str:
        return "EpochKeys(<hidden>)"


def derive_epoch_keys(space_id: bytes, epoch: int, secret: bytes) -> EpochKeys:
    """HKDF-SHA256(secret, salt=space_id, info=b"qmoi-sync v1 " + purpose + epoch u32).

    Purposes: ``msg``, ``chunk_id``, ``chunk_enc``, ``snapshot``, ``discovery`` (ASCII).
    """
    space_id = _check_space(space_id)
    ep = struct.pack(">I", _check_epoch(epoch))
    secret = _check_secret(secret)
    subkeys = {
        p: _hkdf(secret, space_id, b"qmoi-sync v1 " + p.encode("ascii") + ep) for p in _PURPOSES
    }
    return EpochKeys(**subkeys)


def file_id_key(space_id: bytes, epoch0_secret: bytes) -> bytes:
    """Space-lifetime key for deterministic file ids (from the epoch-0 secret; never rotates)."""
    return _hkdf(_check_secret(epoch0_secret), _check_space(space_id), b"qmoi-sync v1 file_id")


def _wrap_info(recipient: DevicePublic, space_id: bytes, epoch: int) -> bytes:
    return (
        b"qmoi-sync wrap v1\0"
        + space_id
        + struct.pack(">I", epoch)
        + recipient.sign_pk
        + recipient.kx_pk
    )


def wrap_secret(recipient: DevicePublic, space_id: bytes, epoch: int, secret: bytes) -> bytes:
    """HPKE base mode seal of ``secret`` to ``recipient.kx_pk``; info binds space, epoch, key.

    Returns :data:`WRAPPED_LEN` bytes. (HPKE draws its own randomness; wraps are not deterministic.)
    """
    space_id = _check_space(space_id)
    epoch = _check_epoch(epoch)
    secret = _check_secret(secret)
    pk = X25519PublicKey.from_public_bytes(recipient.kx_pk)
    return _HPKE.encrypt(secret, pk, info=_wrap_info(recipient, space_id, epoch))


def unwrap_secret(identity: DeviceIdentity, space_id: bytes, epoch: int, wrapped: bytes) -> bytes:
    """Open a wrap made by :func:`wrap_secret`; raises :class:`DecryptError`."""
    space_id = _check_space(space_id)
    epoch = _check_epoch(epoch)
    if not isinstance(wrapped, bytes | bytearray) or len(wrapped) != WRAPPED_LEN:
        raise DecryptError(f"wrapped secret must be {WRAPPED_LEN} bytes")
    try:
        info = _wrap_info(identity.public, space_id, epoch)
        out = _HPKE.decrypt(bytes(wrapped), identity.kx_private_key(), info=info)
    except (InvalidTag, ValueError):
        raise DecryptError("wrapped secret does not open with this device's key") from None
    if len(out) != SECRET_LEN:  # pragma: no cover - tag covers the length
        raise DecryptError("wrapped secret has the wrong length")
    return out
