"""The membership log: a hash-chained, Ed25519-signed list of operations per space.

Rules checked from genesis by :meth:`MembershipLog.append` (and so by ``from_bytes``):

* op ``index`` is sequential from 0, ``prev`` is the SHA-256 of the previous op's full encoding
  (32 zero bytes for genesis), ``space_id`` is the log's;
* the signature is by ``author`` over ``SIGN_CONTEXT + encoding-without-signature``;
* genesis (index 0 only) is self-signed by its subject, role admin, epoch 0, with exactly one wrap
  (epoch 0, to the creator);
* every later op is authored by a device that is an admin *at that point*;
* ``add``: the subject is not a member; epoch unchanged; wraps = every epoch 0..current, once each,
  all to the subject (history stays readable to new members);
* ``remove``: the subject is a member; ``role`` records its former role; epoch = current + 1;
  wraps = exactly one per remaining member, all for the new epoch;
* ``role``: the subject is a member, the role changes, epoch unchanged, no wraps;
* the last admin can be neither removed nor demoted.

Limits: :data:`MAX_OPS` ops, :data:`MAX_LOG_BYTES` encoded, :data:`MAX_WRAPS_PER_OP` wraps per op.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from . import _codec as c
from .errors import (
    DecryptError,
    MalformedError,
    MembershipError,
    ProtocolError,
    TooLargeError,
    WrongSpaceError,
)
from .identity import (
    DEVICE_PUBLIC_LEN,
    SIGN_PK_LEN,
    SIGNATURE_LEN,
    DeviceIdentity,
    DevicePublic,
    Rng,
    verify,
)
from .keys import (
    MAX_EPOCH,
    SECRET_LEN,
    SPACE_ID_LEN,
    WRAPPED_LEN,
    new_epoch_secret,
    new_space_id,
    unwrap_secret,
    wrap_secret,
)

__all__ = [
    "MAX_LOG_BYTES",
    "MAX_OPS",
    "MAX_OP_BYTES",
    "MAX_WRAPS_PER_OP",
    "OP_VERSION",
    "SIGN_CONTEXT",
    "Member",
    "MemberOp",
    "MembershipLog",
    "OpKind",
    "Role",
    "Wrap",
]

#: Maximum number of ops in one log.
MAX_OPS = 10_000
#: Maximum size of an encoded log (``MembershipLog.to_bytes()``).
MAX_LOG_BYTES = 4 * 1024 * 1024
#: Maximum size of one encoded op.
MAX_OP_BYTES = 1024 * 1024
#: Maximum number of wraps in one op (bounds both members and epochs).
MAX_WRAPS_PER_OP = 4096
OP_VERSION = 1
LOG_VERSION = 1
SIGN_CONTEXT = b"qmoi-sync membership v1\0"
ZERO_HASH = bytes(32)

Wrap = tuple[bytes, int, bytes]
"""``(recipient sign_pk, epoch, wrapped secret)``."""


class Role(enum.Enum):
    admin = "admin"
    member = "member"
    reader = "reader"


class OpKind(enum.Enum):
    genesis = "genesis"
    add = "add"
    remove = "remove"
    role = "role"


_ROLE_CODE = {Role.admin: 0, Role.member: 1, Role.reader: 2}
_CODE_ROLE = {v: k for k, v in _ROLE_CODE.items()}
_KIND_CODE = {OpKind.genesis: 0, OpKind.add: 1, OpKind.remove: 2, OpKind.role: 3}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}


def role_to_code(role: Role) -> int:
    return _ROLE_CODE[role]


def role_from_code(code: int) -> Role:
    try:
        return _CODE_ROLE[code]
    except KeyError:
        raise MalformedError(f"unknown role code {code}") from None


@dataclass(frozen=True)
class Member:
    public: DevicePublic
    role: Role


@dataclass(frozen=True)
class MemberOp:
    """One signed membership operation (see the module docstring for the rules)."""

    index: int
    prev: bytes
    space_id: bytes
    kind: OpKind
    author: bytes
    subject: DevicePublic | None
    subject_key: bytes
    role: Role
    epoch: int
    wraps: tuple[Wrap, ...]
    created_at: int
    signature: bytes

    # -- encoding ---------------------------------------------------------------------------
    # version u8 | index u32 | prev 32 | space_id 16 | kind u8 | author 32
    # | has_subject u8 [| subject 128] | subject_key 32 | role u8 | epoch u32 | created_at u64
    # | n_wraps u16 | (recipient 32 | epoch u32 | wrapped 80)* | signature 64

    def signed_bytes(self) -> bytes:
        """The encoding without the signature (what the author signs, after SIGN_CONTEXT)."""
        if not isinstance(self.kind, OpKind) or not isinstance(self.role, Role):
            raise MalformedError("membership op: kind/role have the wrong type")
        if len(self.wraps) > MAX_WRAPS_PER_OP:
            raise TooLargeError(
                f"membership op has {len(self.wraps)} wraps, limit {MAX_WRAPS_PER_OP}"
            )
        parts = [
            c.u8(OP_VERSION),
            c.u32(self.index),
            c.fixed(self.prev, 32, "prev"),
            c.fixed(self.space_id, SPACE_ID_LEN, "space_id"),
            c.u8(_KIND_CODE[self.kind]),
            c.fixed(self.author, SIGN_PK_LEN, "author"),
        ]
        if self.subject is None:
            parts.append(c.u8(0))
        else:
            parts += [c.u8(1), self.subject.to_bytes()]
        parts += [
            c.fixed(self.subject_key, SIGN_PK_LEN, "subject_key"),
            c.u8(_ROLE_CODE[self.role]),
            c.u32(self.epoch),
            c.u64(self.created_at),
            c.u16(len(self.wraps)),
        ]
        for recipient, epoch, wrapped in self.wraps:
            parts += [
                c.fixed(recipient, SIGN_PK_LEN, "wrap recipient"),
                c.u32(epoch),
                c.fixed(wrapped, WRAPPED_LEN, "wrapped secret"),
            ]
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + c.fixed(self.signature, SIGNATURE_LEN, "signature")

    def op_hash(self) -> bytes:
        """SHA-256 of the full encoding (signature included): the next op's ``prev``."""
        return hashlib.sha256(self.to_bytes()).digest()

    def verify_signature(self) -> None:
        verify(self.author, self.signature, SIGN_CONTEXT + self.signed_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> MemberOp:
        """Decode (structure only: the chain rules are checked by :meth:`MembershipLog.append`)."""
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_OP_BYTES:
            raise TooLargeError(f"membership op is {len(data)} bytes, limit {MAX_OP_BYTES}")
        r = c.Reader(data, "membership op")
        version = r.u8("version")
        if version != OP_VERSION:
            raise MalformedError(f"membership op: unknown version {version}")
        index = r.u32("index")
        prev = r.take(32, "prev")
        space_id = r.take(SPACE_ID_LEN, "space_id")
        kind_code = r.u8("kind")
        kind = _CODE_KIND.get(kind_code)
        if kind is None:
            raise MalformedError(f"membership op: unknown kind {kind_code}")
        author = r.take(SIGN_PK_LEN, "author")
        has_subject = r.boolean("has_subject")
        subject: DevicePublic | None = None
        if has_subject:
            subject = DevicePublic.from_bytes(r.take(DEVICE_PUBLIC_LEN, "subject"))
        subject_key = r.take(SIGN_PK_LEN, "subject_key")
        role = role_from_code(r.u8("role"))
        epoch = r.u32("epoch")
        created_at = r.u64("created_at")
        n_wraps = r.u16("wrap count")
        if n_wraps > MAX_WRAPS_PER_OP:
            raise TooLargeError(f"membership op has {n_wraps} wraps, limit {MAX_WRAPS_PER_OP}")
        wraps: list[Wrap] = []
        for _ in range(n_wraps):
            recipient = r.take(SIGN_PK_LEN, "wrap recipient")
            wepoch = r.u32("wrap epoch")
            wrapped = r.take(WRAPPED_LEN, "wrapped secret")
            wraps.append((recipient, wepoch, wrapped))
        signature = r.take(SIGNATURE_LEN, "signature")
        r.end()
        return cls(
            index=index,
            prev=prev,
            space_id=space_id,
            kind=kind,
            author=author,
            subject=subject,
            subject_key=subject_key,
            role=role,
            epoch=epoch,
            wraps=tuple(wraps),
            created_at=created_at,
            signature=signature,
        )


def _unix(now: float | int) -> int:
    if isinstance(now, bool) or not isinstance(now, int | float) or now < 0:
        raise MalformedError("now must be a non-negative unix timestamp")
    return int(now)


def _sign_op(author: DeviceIdentity, op: MemberOp) -> MemberOp:
    sig = author.sign(SIGN_CONTEXT + op.signed_bytes())
    return MemberOp(
        index=op.index,
        prev=op.prev,
        space_id=op.space_id,
        kind=op.kind,
        author=op.author,
        subject=op.subject,
        subject_key=op.subject_key,
        role=op.role,
        epoch=op.epoch,
        wraps=op.wraps,
        created_at=op.created_at,
        signature=sig,
    )


class MembershipLog:
    """A verified membership log. Always holds at least the genesis op."""

    def __init__(self, genesis: MemberOp) -> None:
        """Start a log from a genesis op (verified). Prefer :meth:`create` / :meth:`from_bytes`."""
        self._ops: list[MemberOp] = []
        self._encoded: list[bytes] = []
        self._hashes: list[bytes] = []
        self._members: dict[bytes, Member] = {}
        self._epoch = 0
        self._size = 5  # version u8 + count u32
        self._space_id = genesis.space_id
        self.append(genesis)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        creator: DeviceIdentity,
        now: float | int,
        space_id: bytes | None = None,
        rng: Rng | None = None,
    ) -> tuple[MembershipLog, bytes]:
        """New space: genesis by ``creator`` (admin, epoch 0). Returns ``(log, epoch0_secret)``."""
        if space_id is None:
            space_id = new_space_id(rng)
        space_id = c.fixed(space_id, SPACE_ID_LEN, "space_id")
        secret = new_epoch_secret(rng)
        pub = creator.public
        unsigned = MemberOp(
            index=0,
            prev=ZERO_HASH,
            space_id=space_id,
            kind=OpKind.genesis,
            author=pub.sign_pk,
            subject=pub,
            subject_key=pub.sign_pk,
            role=Role.admin,
            epoch=0,
            wraps=((pub.sign_pk, 0, wrap_secret(pub, space_id, 0, secret)),),
            created_at=_unix(now),
            signature=bytes(SIGNATURE_LEN),
        )
        return cls(_sign_op(creator, unsigned)), secret

    @classmethod
    def from_bytes(cls, data: bytes, expected_space_id: bytes | None = None) -> MembershipLog:
        """Decode and fully verify a log from genesis. Raises a ProtocolError subclass."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedError("membership log: expected bytes")
        if len(data) > MAX_LOG_BYTES:
            raise TooLargeError(f"membership log is {len(data)} bytes, limit {MAX_LOG_BYTES}")
        r = c.Reader(data, "membership log")
        version = r.u8("version")
        if version != LOG_VERSION:
            raise MalformedError(f"membership log: unknown version {version}")
        count = r.count(MAX_OPS, "op count")
        if count == 0:
            raise MalformedError("membership log is empty (no genesis op)")
        log: MembershipLog | None = None
        for i in range(count):
            op = MemberOp.from_bytes(r.blob32(MAX_OP_BYTES, f"op {i}"))
            if log is None:
                if expected_space_id is not None and op.space_id != expected_space_id:
                    raise WrongSpaceError("membership log belongs to another space")
                log = cls(op)
            else:
                log.append(op)
        r.end()
        assert log is not None
        return log

    def to_bytes(self) -> bytes:
        parts = [c.u8(LOG_VERSION), c.u32(len(self._ops))]
        for enc in self._encoded:
            parts += [c.u32(len(enc)), enc]
        return b"".join(parts)

    def copy(self) -> MembershipLog:
        return MembershipLog.from_ops(self._ops)

    @classmethod
    def from_ops(cls, ops: list[MemberOp] | tuple[MemberOp, ...]) -> MembershipLog:
        if not ops:
            raise MalformedError("membership log is empty (no genesis op)")
        log = cls(ops[0])
        for op in ops[1:]:
            log.append(op)
        return log

    # -- verification -----------------------------------------------------------------------

    def _fail(self, op: MemberOp, why: str) -> MembershipError:
        return MembershipError(f"membership op {op.index} ({op.kind.value}) refused: {why}")

    def append(self, op: MemberOp) -> None:
        """Verify ``op`` against the current state and append it (nothing changes on error)."""
        if not isinstance(op, MemberOp):
            raise MalformedError("append() expects a MemberOp")
        if len(self._ops) >= MAX_OPS:
            raise TooLargeError(f"membership log already holds the maximum of {MAX_OPS} ops")
        encoded = op.to_bytes()
        if len(encoded) > MAX_OP_BYTES:
            raise TooLargeError(f"membership op is {len(encoded)} bytes, limit {MAX_OP_BYTES}")
        if self._size + 4 + len(encoded) > MAX_LOG_BYTES:
            raise TooLargeError(f"membership log would exceed {MAX_LOG_BYTES} bytes")
        if op.index != len(self._ops):
            raise self._fail(op, f"expected index {len(self._ops)}")
        expected_prev = self._hashes[-1] if self._hashes else ZERO_HASH
        if op.prev != expected_prev:
            raise self._fail(op, "prev hash does not match the previous op")
        if op.space_id != self._space_id:
            raise self._fail(op, "op belongs to another space")
        try:
            op.verify_signature()
        except ProtocolError:
            raise self._fail(op, "signature by author does not verify") from None
        if op.subject is not None:
            if op.subject.sign_pk != op.subject_key:
                raise self._fail(op, "subject_key does not match the subject's key")
            try:
                op.subject.check()
            except ProtocolError:
                raise self._fail(op, "subject's key-agreement key is not signed") from None
        new_members, new_epoch = self._apply(op)
        # commit
        self._ops.append(op)
        self._encoded.append(encoded)
        self._hashes.append(hashlib.sha256(encoded).digest())
        self._members = new_members
        self._epoch = new_epoch
        self._size += 4 + len(encoded)

    def _apply(self, op: MemberOp) -> tuple[dict[bytes, Member], int]:
        members = dict(self._members)
        epoch = self._epoch
        for recipient, wepoch, wrapped in op.wraps:
            if len(recipient) != SIGN_PK_LEN or len(wrapped) != WRAPPED_LEN:
                raise self._fail(op, "a wrap does not decode")
            if not 0 <= wepoch <= MAX_EPOCH:
                raise self._fail(op, "a wrap has an invalid epoch")
        if op.kind is OpKind.genesis:
            if op.index != 0:
                raise self._fail(op, "genesis is only allowed as the first op")
            if op.subject is None or op.author != op.subject_key:
                raise self._fail(op, "genesis must be self-signed by its subject")
            if op.role is not Role.admin or op.epoch != 0:
                raise self._fail(op, "genesis must make its subject admin at epoch 0")
            if len(op.wraps) != 1 or op.wraps[0][:2] != (op.subject_key, 0):
                raise self._fail(op, "genesis must wrap the epoch-0 secret to its creator")
            members[op.subject_key] = Member(op.subject, Role.admin)
            return members, 0
        if op.index == 0:
            raise self._fail(op, "the first op must be a genesis op")
        author = members.get(op.author)
        if author is None:
            raise self._fail(op, "author is not a member")
        if author.role is not Role.admin:
            raise self._fail(op, "author is not an admin")
        admins = sum(1 for m in members.values() if m.role is Role.admin)
        if op.kind is OpKind.add:
            if op.subject is None:
                raise self._fail(op, "add needs the subject's public keys")
            if op.subject_key in members:
                raise self._fail(op, "subject is already a member")
            if op.epoch != epoch:
                raise self._fail(op, "add must not change the epoch")
            expected = [(op.subject_key, e) for e in range(epoch + 1)]
            if [w[:2] for w in op.wraps] != expected:
                raise self._fail(op, "add must wrap every epoch secret 0..current to the subject")
            members[op.subject_key] = Member(op.subject, op.role)
            return members, epoch
        if op.subject is not None:
            raise self._fail(op, f"{op.kind.value} must not carry subject public keys")
        target = members.get(op.subject_key)
        if target is None:
            raise self._fail(op, "subject is not a member")
        if op.kind is OpKind.remove:
            if op.role is not target.role:
                raise self._fail(op, "remove must record the subject's current role")
            if target.role is Role.admin and admins <= 1:
                raise self._fail(op, "cannot remove the last admin")
            if op.epoch != epoch + 1:
                raise self._fail(op, "remove must start the next epoch")
            del members[op.subject_key]
            recipients = sorted(w[0] for w in op.wraps)
            if recipients != sorted(members) or any(w[1] != op.epoch for w in op.wraps):
                raise self._fail(op, "remove must wrap the new secret to every remaining member")
            return members, op.epoch
        # role change
        if op.role is target.role:
            raise self._fail(op, "role is unchanged")
        if target.role is Role.admin and admins <= 1:
            raise self._fail(op, "cannot demote the last admin")
        if op.epoch != epoch or op.wraps:
            raise self._fail(op, "role change must keep the epoch and carry no wraps")
        members[op.subject_key] = Member(target.public, op.role)
        return members, epoch

    # -- building ops -------------------------------------------------------------------------

    def _new_op(
        self,
        author: DeviceIdentity,
        now: float | int,
        kind: OpKind,
        subject: DevicePublic | None,
        subject_key: bytes,
        role: Role,
        epoch: int,
        wraps: tuple[Wrap, ...],
    ) -> MemberOp:
        """Build, sign and append an op."""
        unsigned = MemberOp(
            index=len(self._ops),
            prev=self.head_hash,
            space_id=self._space_id,
            kind=kind,
            author=author.public.sign_pk,
            subject=subject,
            subject_key=bytes(subject_key),
            role=role,
            epoch=epoch,
            wraps=wraps,
            created_at=_unix(now),
            signature=bytes(SIGNATURE_LEN),
        )
        op = _sign_op(author, unsigned)
        self.append(op)
        return op

    def _check_author(self, author: DeviceIdentity) -> None:
        if self.role_of(author.public.sign_pk) is not Role.admin:
            raise MembershipError("only an admin can change the membership")

    def add_member(
        self,
        author: DeviceIdentity,
        subject: DevicePublic,
        role: Role,
        epoch_secrets: dict[int, bytes],
        now: float | int,
    ) -> MemberOp:
        """Append an ``add`` op wrapping every epoch secret (0..current) to ``subject``."""
        self._check_author(author)
        if not isinstance(role, Role):
            raise MembershipError("role must be a Role")
        if subject.sign_pk in self._members:
            raise MembershipError("device is already a member")
        wraps: list[Wrap] = []
        for e in range(self._epoch + 1):
            secret = epoch_secrets.get(e)
            if secret is None or len(secret) != SECRET_LEN:
                raise MembershipError(f"the secret of epoch {e} is needed to add a member")
            wraps.append((subject.sign_pk, e, wrap_secret(subject, self._space_id, e, secret)))
        return self._new_op(
            author, now, OpKind.add, subject, subject.sign_pk, role, self._epoch, tuple(wraps)
        )

    def remove_member(
        self,
        author: DeviceIdentity,
        subject_key: bytes,
        now: float | int,
        rng: Rng | None = None,
    ) -> tuple[MemberOp, bytes]:
        """Append a ``remove`` op: new epoch, its fresh secret wrapped to every remaining member.

        Returns ``(op, new_epoch_secret)``.
        """
        self._check_author(author)
        target = self._members.get(subject_key)
        if target is None:
            raise MembershipError("device is not a member")
        new_epoch = self._epoch + 1
        if new_epoch > MAX_EPOCH:  # pragma: no cover - unreachable within MAX_OPS
            raise MembershipError("epoch counter exhausted")
        secret = new_epoch_secret(rng)
        wraps = tuple(
            (pk, new_epoch, wrap_secret(m.public, self._space_id, new_epoch, secret))
            for pk, m in sorted(self._members.items())
            if pk != subject_key
        )
        op = self._new_op(
            author, now, OpKind.remove, None, subject_key, target.role, new_epoch, wraps
        )
        return op, secret

    def set_role(
        self, author: DeviceIdentity, subject_key: bytes, role: Role, now: float | int
    ) -> MemberOp:
        """Append a ``role`` op changing a member's role."""
        self._check_author(author)
        if not isinstance(role, Role):
            raise MembershipError("role must be a Role")
        if subject_key not in self._members:
            raise MembershipError("device is not a member")
        return self._new_op(author, now, OpKind.role, None, subject_key, role, self._epoch, ())

    # -- queries --------------------------------------------------------------------------------

    @property
    def ops(self) -> tuple[MemberOp, ...]:
        return tuple(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[MemberOp]:
        return iter(tuple(self._ops))

    @property
    def space_id(self) -> bytes:
        return self._space_id

    @property
    def current_epoch(self) -> int:
        return self._epoch

    @property
    def head_hash(self) -> bytes:
        return self._hashes[-1]

    def op_hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def members(self) -> dict[bytes, Member]:
        return dict(self._members)

    def is_member(self, sign_pk: bytes) -> bool:
        return sign_pk in self._members

    def role_of(self, sign_pk: bytes) -> Role | None:
        m = self._members.get(sign_pk)
        return None if m is None else m.role

    def admins(self) -> list[bytes]:
        return sorted(pk for pk, m in self._members.items() if m.role is Role.admin)

    def is_extension_of(self, other: MembershipLog) -> bool:
        """True if ``other``'s ops are a prefix of this log's (equal logs included)."""
        if other.space_id != self._space_id or len(other) > len(self):
            return False
        return self._hashes[: len(other)] == list(other.op_hashes())

    def unwrap_epoch_secrets(self, identity: DeviceIdentity) -> dict[int, bytes]:
        """Every epoch secret wrapped to ``identity`` anywhere in the log.

        A wrap that does not open (e.g. garbage from a faulty admin) is skipped; if an epoch's
        secret is wrapped more than once, the first wrap that opens wins.
        """
        me = identity.public.sign_pk
        out: dict[int, bytes] = {}
        for op in self._ops:
            for recipient, epoch, wrapped in op.wraps:
                if recipient != me or epoch in out:
                    continue
                try:
                    out[epoch] = unwrap_secret(identity, self._space_id, epoch, wrapped)
                except DecryptError:
                    continue
        return out

    def __repr__(self) -> str:
        return (
            f"MembershipLog(ops={len(self._ops)}, epoch={self._epoch}, "
            f"members={len(self._members)}, head={self.head_hash.hex()[:12]})"
        )
