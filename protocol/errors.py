"""Protocol errors.

Every decoder in :mod:`qmoi_sync.protocol` raises a subclass of :class:`ProtocolError` (and nothing
else) on bad input. Each error has a stable machine-readable ``code`` and a human-readable message
(``str(err)``). Messages never contain secret material.
"""

from __future__ import annotations

__all__ = [
    "DecryptError",
    "InviteError",
    "MalformedError",
    "MembershipError",
    "NotAMemberError",
    "PathError",
    "ProtocolError",
    "ReplayError",
    "SignatureError",
    "TooLargeError",
    "UnknownEpochError",
    "UnknownSuiteError",
    "WrongSpaceError",
]


class ProtocolError(Exception):
    """Base class: ``ProtocolError(code, message)``."""

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class _FixedCodeError(ProtocolError):
    """A ProtocolError whose code is fixed by its class: construct with just a message."""

    CODE = "protocol_error"

    def __init__(self, message: str) -> None:
        super().__init__(self.CODE, message)


class MalformedError(_FixedCodeError):
    """Bytes that do not follow the documented layout (truncated, garbage, trailing data...)."""

    CODE = "malformed"


class TooLargeError(_FixedCodeError):
    """An input or a field over its documented size/count limit."""

    CODE = "too_large"


class SignatureError(_FixedCodeError):
    """An Ed25519 signature did not verify (or the key was unusable)."""

    CODE = "bad_signature"


class ReplayError(_FixedCodeError):
    """A sequence number that was already accepted."""

    CODE = "replay"


class UnknownSuiteError(_FixedCodeError):
    """Unknown version or cipher suite; there is no negotiation."""

    CODE = "unknown_suite"


class WrongSpaceError(_FixedCodeError):
    """The message belongs to another space."""

    CODE = "wrong_space"


class NotAMemberError(_FixedCodeError):
    """The sender is not a member of the space."""

    CODE = "not_a_member"


class DecryptError(_FixedCodeError):
    """Decryption failed: wrong key, key-commitment mismatch or tampered ciphertext."""

    CODE = "decrypt_failed"


class UnknownEpochError(DecryptError):
    """The envelope's key epoch is not one we hold a key for (maybe a membership update is due)."""

    CODE = "unknown_epoch"


class InviteError(ProtocolError):
    """Invite problems; ``code`` is ``invite_invalid``, ``invite_expired`` or ``invite_used``."""

    INVALID = "invite_invalid"
    EXPIRED = "invite_expired"
    USED = "invite_used"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class PathError(_FixedCodeError):
    """A relative path that is unsafe or unportable."""

    CODE = "bad_path"


class MembershipError(_FixedCodeError):
    """A membership op or log that breaks the chain rules (including role violations)."""

    CODE = "bad_membership"
