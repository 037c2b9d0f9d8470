"""Invites: an out-of-band token proving the right to ask to join a space (it holds no space key).

Token: ``qmoi1-`` + base64url (no padding) of::

    version u8 (1) | space_id 16 | inviter sign_pk 32 | secret 32 | expires_at u64 | role u8
    | relay_url str16 (empty = none, <= MAX_URL bytes) | space_name str16 (<= MAX_SPACE_NAME)
    | checksum 4 (SHA-256 of the above)[:4]

Join request (the joiner -> relay -> the inviting admin device)::

    version u8 (1) | space_id 16 | invite_id 16 | joiner DevicePublic 128 | name str16 (<= 128)
    | proof 32

``proof = HMAC-SHA256(secret, b"qmoi-sync join v1" + space_id + invite_id + joiner.to_bytes()
+ name str16)`` — the name is bound too, so the relay cannot rename the joiner.
Expiry and single use are enforced by the admin device that issued the invite.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

from . import _codec as c
from .errors import InviteError, MalformedError, ProtocolError, TooLargeError
from .identity import DEVICE_PUBLIC_LEN, SIGN_PK_LEN, DevicePublic, Rng
from .keys import SECRET_LEN, SPACE_ID_LEN
from .membership import Role, role_from_code, role_to_code

__all__ = [
    "INVITE_ID_LEN",
    "MAX_DEVICE_NAME",
    "MAX_SPACE_NAME",
    "MAX_TOKEN_LEN",
    "MAX_URL",
    "TOKEN_PREFIX",
    "Invite",
    "JoinRequestBody",
    "build_join_request",
    "decode_invite",
    "invite_id",
    "parse_join_request",
    "verify_join_proof",
    "verify_join_request",
]

TOKEN_PREFIX = "qmoi1-"
#: Longest relay URL in an invite (UTF-8 bytes).
MAX_URL = 1024
#: Longest token accepted by :func:`decode_invite` (characters).
MAX_TOKEN_LEN = 2048
#: Longest device name in a join request (UTF-8 bytes).
MAX_DEVICE_NAME = 128
#: Longest space name carried in a token, in UTF-8 bytes.
MAX_SPACE_NAME = 128
#: Largest join request body.
MAX_JOIN_REQUEST = 4096
INVITE_ID_LEN = 16
CHECKSUM_LEN = 4
_VERSION = 1
_JOIN_CONTEXT = b"qmoi-sync join v1"
_ID_CONTEXT = b"qmoi-sync invite id v1"
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def invite_id(secret: bytes) -> bytes:
    """Public 16-byte id of an invite (SHA-256 of a context + the secret, truncated)."""
    c.fixed(secret, SECRET_LEN, "invite secret")
    return hashlib.sha256(_ID_CONTEXT + bytes(secret)).digest()[:INVITE_ID_LEN]


def _invalid(message: str) -> InviteError:
    return InviteError(InviteError.INVALID, message)


@dataclass(frozen=True, repr=False)
class Invite:
    space_id: bytes
    relay_url: str | None
    inviter: bytes
    secret: bytes
    expires_at: int
    role: Role = Role.member
    space_name: str = ""
    """The inviter's name for the space (a label for the joiner; not secret, not trusted)."""

    @classmethod
    def new(
        cls,
        space_id: bytes,
        inviter: bytes,
        expires_at: int,
        relay_url: str | None = None,
        role: Role = Role.member,
        rng: Rng | None = None,
    ) -> Invite:
        return cls(space_id, relay_url, inviter, (rng or os.urandom)(SECRET_LEN), expires_at, role)

    @property
    def invite_id(self) -> bytes:
        return invite_id(self.secret)

    def is_expired(self, now: float | int) -> bool:
        return now >= self.expires_at

    def encode(self) -> str:
        url = self.relay_url or ""
        body = b"".join(
            (
                c.u8(_VERSION),
                c.fixed(self.space_id, SPACE_ID_LEN, "space_id"),
                c.fixed(self.inviter, SIGN_PK_LEN, "inviter"),
                c.fixed(self.secret, SECRET_LEN, "secret"),
                c.u64(self.expires_at),
                c.u8(role_to_code(self.role)),
                c.str16(url, MAX_URL, "relay_url"),
                c.str16(self.space_name, MAX_SPACE_NAME, "space_name"),
            )
        )
        body += hashlib.sha256(body).digest()[:CHECKSUM_LEN]
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode("ascii")

    def __repr__(self) -> str:
        return (
            f"Invite(space_id={self.space_id.hex()}, relay_url={self.relay_url!r}, "
            f"expires_at={self.expires_at}, role={self.role.value}, secret=<hidden>)"
        )


def decode_invite(token: str) -> Invite:
    """Parse an invite token; every problem is an ``InviteError("invite_invalid", ...)``."""
    if not isinstance(token, str):
        raise _invalid("invite token must be text")
    if len(token) > 2 * MAX_TOKEN_LEN:
        raise _invalid(f"invite token is too long ({len(token)} characters)")
    token = token.strip()
    if len(token) > MAX_TOKEN_LEN:
        raise _invalid(f"invite token is too long ({len(token)} > {MAX_TOKEN_LEN} characters)")
    if not token.startswith(TOKEN_PREFIX):
        raise _invalid(f"not a qmoi-sync invite token (expected it to start with {TOKEN_PREFIX!r})")
    b64 = token[len(TOKEN_PREFIX) :]
    # Checked explicitly: the base64 decoder would silently *drop* foreign characters.
    if not set(b64) <= _B64URL:
        raise _invalid("invite token contains characters that are not base64url")
    try:
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        raise _invalid("invite token is not valid base64url") from None
    if len(raw) < 1 + CHECKSUM_LEN:
        raise _invalid("invite token is truncated")
    body, checksum = raw[:-CHECKSUM_LEN], raw[-CHECKSUM_LEN:]
    if not hmac.compare_digest(hashlib.sha256(body).digest()[:CHECKSUM_LEN], checksum):
        raise _invalid("invite token is corrupted (checksum mismatch)")
    try:
        r = c.Reader(body, "invite token")
        version = r.u8("version")
        if version != _VERSION:
            raise _invalid(f"invite token version {version} is not supported")
        space_id = r.take(SPACE_ID_LEN, "space_id")
        inviter = r.take(SIGN_PK_LEN, "inviter")
        secret = r.take(SECRET_LEN, "secret")
        expires_at = r.u64("expires_at")
        role = role_from_code(r.u8("role"))
        url = r.str16(MAX_URL, "relay_url")
        space_name = r.str16(MAX_SPACE_NAME, "space_name")
        r.end()
    except InviteError:
        raise
    except ProtocolError as e:
        raise _invalid(f"invite token is malformed: {e}") from None
    return Invite(space_id, url or None, inviter, secret, expires_at, role, space_name)


@dataclass(frozen=True)
class JoinRequestBody:
    space_id: bytes
    invite_id: bytes
    joiner: DevicePublic
    name: str
    proof: bytes

    def proof_input(self) -> bytes:
        return _proof_input(self.space_id, self.invite_id, self.joiner, self.name)


def _proof_input(space_id: bytes, iid: bytes, joiner: DevicePublic, name: str) -> bytes:
    return (
        _JOIN_CONTEXT
        + c.fixed(space_id, SPACE_ID_LEN, "space_id")
        + c.fixed(iid, INVITE_ID_LEN, "invite_id")
        + joiner.to_bytes()
        + c.str16(name, MAX_DEVICE_NAME, "device name")
    )


def _proof(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def build_join_request(invite: Invite, joiner: DevicePublic, name: str) -> bytes:
    """The request body the joiner sends (inside a ``JoinRequest`` frame)."""
    iid = invite.invite_id
    data = _proof_input(invite.space_id, iid, joiner, name)
    return b"".join(
        (
            c.u8(_VERSION),
            invite.space_id,
            iid,
            joiner.to_bytes(),
            c.str16(name, MAX_DEVICE_NAME, "device name"),
            _proof(invite.secret, data),
        )
    )


def parse_join_request(data: bytes) -> JoinRequestBody:
    """Decode a join request body (structure + the joiner's key signature, not the proof)."""
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_JOIN_REQUEST:
        raise TooLargeError(f"join request is {len(data)} bytes, limit {MAX_JOIN_REQUEST}")
    r = c.Reader(data, "join request")
    version = r.u8("version")
    if version != _VERSION:
        raise MalformedError(f"join request version {version} is not supported")
    space_id = r.take(SPACE_ID_LEN, "space_id")
    iid = r.take(INVITE_ID_LEN, "invite_id")
    joiner = DevicePublic.from_bytes(r.take(DEVICE_PUBLIC_LEN, "joiner"))
    name = r.str16(MAX_DEVICE_NAME, "device name")
    proof = r.take(32, "proof")
    r.end()
    return JoinRequestBody(space_id, iid, joiner, name, proof)


def verify_join_proof(body: JoinRequestBody, secret: bytes) -> None:
    """Check the request was made with ``secret``; raises ``InviteError("invite_invalid")``."""
    c.fixed(secret, SECRET_LEN, "invite secret")
    if not hmac.compare_digest(body.invite_id, invite_id(secret)):
        raise _invalid("join request is for another invite")
    expected = _proof(bytes(secret), body.proof_input())
    if not hmac.compare_digest(expected, body.proof):
        raise _invalid("join proof does not match the invite secret")


def verify_join_request(body: JoinRequestBody, invite: Invite, now: float | int) -> None:
    """What the issuing admin checks: right space, not expired, proof (single use is the
    caller's bookkeeping: raise ``InviteError("invite_used", ...)`` for a spent invite)."""
    if body.space_id != invite.space_id:
        raise _invalid("join request is for another space")
    if invite.is_expired(now):
        raise InviteError(InviteError.EXPIRED, "the invite has expired")
    verify_join_proof(body, invite.secret)
