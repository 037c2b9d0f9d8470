"""Device identities: an Ed25519 signing key plus an X25519 key-agreement key.

The X25519 public key is signed by the Ed25519 key (``kx_sig``) so that a :class:`DevicePublic`
is one self-authenticating 128-byte blob.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import MalformedError, SignatureError

__all__ = [
    "DEVICE_PUBLIC_LEN",
    "KX_SIG_CONTEXT",
    "PRIVATE_LEN",
    "SIGNATURE_LEN",
    "SIGN_PK_LEN",
    "DeviceIdentity",
    "DevicePublic",
    "Rng",
    "device_id",
    "verify",
]

Rng = Callable[[int], bytes]
"""Randomness source: ``rng(n)`` returns ``n`` random bytes (default :func:`os.urandom`)."""

SIGN_PK_LEN = 32
KX_PK_LEN = 32
SIGNATURE_LEN = 64
#: ``DevicePublic.to_bytes()`` length: sign_pk 32 | kx_pk 32 | kx_sig 64.
DEVICE_PUBLIC_LEN = SIGN_PK_LEN + KX_PK_LEN + SIGNATURE_LEN
#: ``DeviceIdentity.to_private_bytes()`` length: ed25519 seed 32 | x25519 private 32.
PRIVATE_LEN = 64
KX_SIG_CONTEXT = b"qmoi-sync kx v1\0"

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


def _luhn32(group: str) -> str:
    """Luhn mod 32 check character over the base32 alphabet."""
    factor = 2
    total = 0
    for ch in reversed(group):
        addend = factor * _B32.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _B32[(32 - total % 32) % 32]


def device_id(sign_pk: bytes) -> str:
    """Display id: base32 of SHA-256(sign_pk)[:20], 4 groups of 8 + a Luhn-32 check character.

    Display only; the protocol always compares full keys.
    """
    if not isinstance(sign_pk, bytes | bytearray) or len(sign_pk) != SIGN_PK_LEN:
        raise MalformedError("sign_pk must be 32 bytes")
    raw = base64.b32encode(hashlib.sha256(bytes(sign_pk)).digest()[:20]).decode("ascii")
    groups = [raw[i : i + 8] for i in range(0, 32, 8)]
    return "-".join(g + _luhn32(g) for g in groups)


def is_valid_device_id(text: str) -> bool:
    """True if ``text`` is a well-formed display id whose check characters all match."""
    parts = text.strip().upper().split("-")
    if len(parts) != 4:
        return False
    for p in parts:
        if len(p) != 9 or any(c not in _B32 for c in p):
            return False
        if _luhn32(p[:8]) != p[8]:
            return False
    return True


def _load_sign_pk(sign_pk: bytes) -> Ed25519PublicKey:
    if not isinstance(sign_pk, bytes | bytearray) or len(sign_pk) != SIGN_PK_LEN:
        raise SignatureError("signing key must be 32 bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(sign_pk))
    except (ValueError, TypeError):  # pragma: no cover - OpenSSL accepts any 32 bytes today
        raise SignatureError("signing key is not a valid Ed25519 public key") from None


def verify(sign_pk: bytes, signature: bytes, data: bytes) -> None:
    """Verify an Ed25519 signature; raise :class:`SignatureError` if it does not check out."""
    key = _load_sign_pk(sign_pk)
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_LEN:
        raise SignatureError("signature must be 64 bytes")
    try:
        key.verify(bytes(signature), bytes(data))
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None


@dataclass(frozen=True)
class DevicePublic:
    """The public half of a device identity (128 bytes on the wire)."""

    sign_pk: bytes
    kx_pk: bytes
    kx_sig: bytes

    def __post_init__(self) -> None:
        for name, value, size in (
            ("sign_pk", self.sign_pk, SIGN_PK_LEN),
            ("kx_pk", self.kx_pk, KX_PK_LEN),
            ("kx_sig", self.kx_sig, SIGNATURE_LEN),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise MalformedError(f"DevicePublic.{name} must be {size} bytes")

    def to_bytes(self) -> bytes:
        return self.sign_pk + self.kx_pk + self.kx_sig

    @classmethod
    def from_bytes(cls, data: bytes) -> DevicePublic:
        """Decode and verify ``kx_sig``; raises MalformedError / SignatureError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedError("device public key: expected bytes")
        data = bytes(data)
        if len(data) != DEVICE_PUBLIC_LEN:
            raise MalformedError(
                f"device public key must be {DEVICE_PUBLIC_LEN} bytes, got {len(data)}"
            )
        pub = cls(data[:32], data[32:64], data[64:])
        pub.check()
        return pub

    def check(self) -> None:
        """Verify that ``kx_pk`` is signed by ``sign_pk``."""
        try:
            verify(self.sign_pk, self.kx_sig, KX_SIG_CONTEXT + self.kx_pk)
        except SignatureError:
            raise SignatureError(
                "device key-agreement key is not signed by its device key"
            ) from None

    @property
    def device_id(self) -> str:
        return device_id(self.sign_pk)

    @property
    def short_id(self) -> str:
        """First 7 characters of the display id (used in conflict names)."""
        return self.device_id[:7]

    def verify(self, signature: bytes, data: bytes) -> None:
        verify(self.sign_pk, signature, data)


@dataclass(frozen=True, repr=False, eq=False)
class DeviceIdentity:
    """A device's private keys. ``repr`` never shows key material."""

    _sign: Ed25519PrivateKey
    _kx: X25519PrivateKey
    _public: DevicePublic = field(init=False)

    def __post_init__(self) -> None:
        sign_pk = self._sign.public_key().public_bytes(_RAW, _RAW_PUB)
        kx_pk = self._kx.public_key().public_bytes(_RAW, _RAW_PUB)
        kx_sig = self._sign.sign(KX_SIG_CONTEXT + kx_pk)
        object.__setattr__(self, "_public", DevicePublic(sign_pk, kx_pk, kx_sig))

    @classmethod
    def generate(cls, rng: Rng | None = None) -> DeviceIdentity:
        if rng is None:
            rng = os.urandom
        return cls.from_private_bytes(rng(PRIVATE_LEN))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> DeviceIdentity:
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) != PRIVATE_LEN:
            raise MalformedError(f"device private key must be {PRIVATE_LEN} bytes")
        data = bytes(data)
        try:
            sign = Ed25519PrivateKey.from_private_bytes(data[:32])
            kx = X25519PrivateKey.from_private_bytes(data[32:])
        except ValueError:  # pragma: no cover - any 32 bytes are valid for both
            raise MalformedError("device private key is not valid") from None
        return cls(sign, kx)

    def to_private_bytes(self) -> bytes:
        return self._sign.private_bytes(_RAW, _RAW_PRIV, _NOENC) + self.kx_private_bytes()

    def kx_private_bytes(self) -> bytes:
        return self._kx.private_bytes(_RAW, _RAW_PRIV, _NOENC)

    def kx_private_key(self) -> X25519PrivateKey:
        return self._kx

    @property
    def public(self) -> DevicePublic:
        return self._public

    @property
    def sign_pk(self) -> bytes:
        return self._public.sign_pk

    def sign(self, data: bytes) -> bytes:
        return self._sign.sign(bytes(data))

    def __repr__(self) -> str:
        return f"DeviceIdentity({self._public.device_id})"
