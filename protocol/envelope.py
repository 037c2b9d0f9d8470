"""Envelopes: one sealed, signed message from one device to its space.

Layout (big-endian)::

    header = version u8 (1) | suite u8 (1) | space_id 16 | epoch u32 | sender sign_pk 32
             | seq u64 | salt 16                                   (78 bytes)
    body   = header | ct_len u32 | ciphertext | commitment 32 | signature 64

* per-message keys = HKDF-SHA256(epoch msg key, salt=salt, info=b"qmoi-sync msg v1" + header),
  64 bytes = AEAD key 32 | commitment key 32;
* AEAD = ChaCha20-Poly1305, nonce = 12 zero bytes (the key is unique per message), AD = header;
* commitment = HMAC-SHA256(commitment key, header), checked in constant time before decryption;
* signature = Ed25519(sender) over everything before it.

Sequence numbers start at 1 (0 is refused) — see :mod:`.replay`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import _codec as c
from .errors import (
    DecryptError,
    MalformedError,
    NotAMemberError,
    TooLargeError,
    UnknownEpochError,
    UnknownSuiteError,
    WrongSpaceError,
)
from .identity import SIGN_PK_LEN, SIGNATURE_LEN, DeviceIdentity, Rng, verify
from .keys import SPACE_ID_LEN

__all__ = [
    "ENVELOPE_VERSION",
    "HEADER_LEN",
    "MAX_ENVELOPE",
    "MAX_PLAINTEXT",
    "MIN_ENVELOPE",
    "SUITE_CHACHA20_ED25519",
    "EnvelopeHeader",
    "OpenedEnvelope",
    "open_envelope",
    "parse_header",
    "seal",
    "verify_envelope_signature",
]

ENVELOPE_VERSION = 1
#: Suite 1: HKDF-SHA256 + ChaCha20-Poly1305 + HMAC-SHA256 commitment + Ed25519.
SUITE_CHACHA20_ED25519 = 1
SALT_LEN = 16
HEADER_LEN = 1 + 1 + SPACE_ID_LEN + 4 + SIGN_PK_LEN + 8 + SALT_LEN
TAG_LEN = 16
COMMITMENT_LEN = 32
#: Largest accepted envelope, all fields included.
MAX_ENVELOPE = 8 * 1024 * 1024
_OVERHEAD = HEADER_LEN + 4 + TAG_LEN + COMMITMENT_LEN + SIGNATURE_LEN
MIN_ENVELOPE = _OVERHEAD
#: Largest plaintext that fits in :data:`MAX_ENVELOPE`.
MAX_PLAINTEXT = MAX_ENVELOPE - _OVERHEAD
_NONCE = bytes(12)
_MSG_INFO = b"qmoi-sync msg v1"


@dataclass(frozen=True)
class EnvelopeHeader:
    version: int
    suite: int
    space_id: bytes
    epoch: int
    sender: bytes
    seq: int
    salt: bytes

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                c.u8(self.version),
                c.u8(self.suite),
                c.fixed(self.space_id, SPACE_ID_LEN, "space_id"),
                c.u32(self.epoch),
                c.fixed(self.sender, SIGN_PK_LEN, "sender"),
                c.u64(self.seq),
                c.fixed(self.salt, SALT_LEN, "salt"),
            )
        )


@dataclass(frozen=True)
class OpenedEnvelope:
    header: EnvelopeHeader
    plaintext: bytes


@dataclass(frozen=True)
class _Parsed:
    header: EnvelopeHeader
    header_bytes: bytes
    ciphertext: bytes
    commitment: bytes
    signed: bytes
    signature: bytes


def _message_keys(msg_key: bytes, salt: bytes, header: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_MSG_INFO + header).derive(
        msg_key
    )
    return okm[:32], okm[32:]


def _commit(commit_key: bytes, header: bytes) -> bytes:
    return hmac.new(commit_key, header, hashlib.sha256).digest()


def seal(
    identity: DeviceIdentity,
    space_id: bytes,
    epoch: int,
    msg_key: bytes,
    seq: int,
    plaintext: bytes,
    salt: bytes | None = None,
    rng: Rng | None = None,
) -> bytes:
    """Encrypt, commit and sign ``plaintext``; returns the envelope bytes."""
    if salt is None:
        salt = (rng or os.urandom)(SALT_LEN)
    if not isinstance(msg_key, bytes | bytearray) or len(msg_key) != 32:
        raise MalformedError("msg_key must be 32 bytes")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise MalformedError("seq must be an integer >= 1")
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise MalformedError("plaintext must be bytes")
    if len(plaintext) > MAX_PLAINTEXT:
        raise TooLargeError(f"plaintext is {len(plaintext)} bytes, limit {MAX_PLAINTEXT}")
    header = EnvelopeHeader(
        ENVELOPE_VERSION,
        SUITE_CHACHA20_ED25519,
        bytes(space_id),
        epoch,
        identity.public.sign_pk,
        seq,
        bytes(salt),
    ).to_bytes()
    aead_key, commit_key = _message_keys(bytes(msg_key), bytes(salt), header)
    ct = ChaCha20Poly1305(aead_key).encrypt(_NONCE, bytes(plaintext), header)
    signed = header + c.u32(len(ct)) + ct + _commit(commit_key, header)
    return signed + identity.sign(signed)


def _parse(data: bytes) -> _Parsed:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError("envelope: expected bytes")
    if len(data) > MAX_ENVELOPE:
        raise TooLargeError(f"envelope is {len(data)} bytes, limit {MAX_ENVELOPE}")
    r = c.Reader(data, "envelope")
    version = r.u8("version")
    if version != ENVELOPE_VERSION:
        raise UnknownSuiteError(f"envelope version {version} is not supported")
    suite = r.u8("suite")
    if suite != SUITE_CHACHA20_ED25519:
        raise UnknownSuiteError(f"envelope suite {suite} is not supported")
    space_id = r.take(SPACE_ID_LEN, "space_id")
    epoch = r.u32("epoch")
    sender = r.take(SIGN_PK_LEN, "sender")
    seq = r.u64("seq")
    if seq == 0:
        raise MalformedError("envelope: seq 0 is not allowed (sequences start at 1)")
    salt = r.take(SALT_LEN, "salt")
    header_bytes = bytes(data[:HEADER_LEN])
    ct = r.blob32(MAX_ENVELOPE, "ciphertext")
    if len(ct) < TAG_LEN:
        raise MalformedError("envelope: ciphertext is shorter than its tag")
    commitment = r.take(COMMITMENT_LEN, "commitment")
    signed_len = r.pos
    signature = r.take(SIGNATURE_LEN, "signature")
    r.end()
    header = EnvelopeHeader(version, suite, space_id, epoch, sender, seq, salt)
    return _Parsed(header, header_bytes, ct, commitment, bytes(data[:signed_len]), signature)


def parse_header(data: bytes) -> EnvelopeHeader:
    """Check an envelope's structure and limits (no crypto) and return its header."""
    return _parse(data).header


def verify_envelope_signature(data: bytes) -> EnvelopeHeader:
    """Structure + sender signature (needs no key: what the relay checks). Returns the header."""
    p = _parse(data)
    verify(p.header.sender, p.signature, p.signed)
    return p.header


def open_envelope(
    data: bytes,
    expected_space_id: bytes,
    msg_keys: Mapping[int, bytes],
    is_member: Callable[[bytes], bool],
) -> OpenedEnvelope:
    """Fully check and decrypt an envelope.

    Order: structure/suite → space (WrongSpaceError) → sender membership (NotAMemberError) →
    signature (SignatureError) → epoch key known (UnknownEpochError, a DecryptError) →
    key commitment (DecryptError) → AEAD (DecryptError). Replay is the caller's job
    (:class:`.replay.ReplayWindow`).
    """
    p = _parse(data)
    h = p.header
    if h.space_id != expected_space_id:
        raise WrongSpaceError("envelope belongs to another space")
    if not is_member(h.sender):
        raise NotAMemberError("envelope sender is not a member of the space")
    verify(h.sender, p.signature, p.signed)
    msg_key = msg_keys.get(h.epoch)
    if msg_key is None:
        raise UnknownEpochError(f"no key for epoch {h.epoch}")
    aead_key, commit_key = _message_keys(msg_key, h.salt, p.header_bytes)
    if not hmac.compare_digest(_commit(commit_key, p.header_bytes), p.commitment):
        raise DecryptError("envelope key commitment does not match")
    try:
        plaintext = ChaCha20Poly1305(aead_key).decrypt(_NONCE, p.ciphertext, p.header_bytes)
    except InvalidTag:
        raise DecryptError("envelope ciphertext does not authenticate") from None
    return OpenedEnvelope(h, plaintext)
