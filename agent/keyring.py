"""A space's key material as one device sees it: the verified membership log and the epoch
secrets wrapped to this device. Rebuilt whenever the log grows.

It also answers "could this sender have sealed an envelope of that epoch?" from each device's
*tenures* (stretches of membership). A device removed when epoch ``r`` started may have sealed
envelopes of epochs ``< r`` while it was a member; those stay acceptable (a device catching up,
or joining later, must still get them) until this device has seen, in relay order, an envelope of
epoch ``>= r`` (the *fence*): anything of the old epoch after that was sealed after the removal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import EpochKeys, derive_epoch_keys, file_id_key
from qmoi_sync.protocol.membership import MembershipLog, OpKind, Role


@dataclass
class Tenure:
    """One stretch of membership: from the epoch in force when the device was added up to (not
    including) the epoch its removal started; ``end`` is None while it is still a member."""

    start: int
    end: int | None
    role: Role


def tenures(log: MembershipLog) -> dict[bytes, list[Tenure]]:
    out: dict[bytes, list[Tenure]] = {}
    for op in log:
        if op.kind in (OpKind.genesis, OpKind.add):
            out.setdefault(op.subject_key, []).append(Tenure(op.epoch, None, op.role))
        elif op.kind is OpKind.role:
            out[op.subject_key][-1].role = op.role
        elif op.kind is OpKind.remove:
            out[op.subject_key][-1].end = op.epoch
    return out


@dataclass
class Keyring:
    log: MembershipLog
    secrets: dict[int, bytes]
    epoch_keys: dict[int, EpochKeys] = field(default_factory=dict)
    tenures: dict[bytes, list[Tenure]] = field(default_factory=dict)

    @classmethod
    def build(cls, log: MembershipLog, identity: DeviceIdentity) -> Keyring:
        secrets = log.unwrap_epoch_secrets(identity)
        ring = cls(log=log, secrets=secrets, tenures=tenures(log))
        for epoch, secret in secrets.items():
            ring.epoch_keys[epoch] = derive_epoch_keys(log.space_id, epoch, secret)
        return ring

    @property
    def space_id(self) -> bytes:
        return self.log.space_id

    @property
    def current_epoch(self) -> int:
        return self.log.current_epoch

    def can_write(self) -> bool:
        return self.current_epoch in self.epoch_keys

    @property
    def msg_key(self) -> bytes:
        return self.epoch_keys[self.current_epoch].msg

    def msg_keys(self) -> dict[int, bytes]:
        return {e: k.msg for e, k in self.epoch_keys.items()}

    @property
    def file_id_key(self) -> bytes:
        return file_id_key(self.log.space_id, self.secrets[0])

    def is_member(self, sign_pk: bytes) -> bool:
        return self.log.is_member(sign_pk)

    def role_of(self, sign_pk: bytes) -> Role | None:
        return self.log.role_of(sign_pk) if self.log.is_member(sign_pk) else None

    def ever_member(self, sign_pk: bytes) -> bool:
        """True if the log ever listed this key (current or removed member)."""
        return sign_pk in self.tenures

    def sender_role(self, sender: bytes, epoch: int, fence: int) -> Role | None:
        """The role under which ``sender`` may have sealed an envelope of ``epoch``, or None if
        it cannot have: never a member, not yet a member in that epoch, or removed before it —
        or removed when epoch ``r > epoch`` started while this device has already seen an
        envelope of epoch ``>= r`` (``fence``) in relay order."""
        for t in self.tenures.get(sender, ()):
            if epoch < t.start:
                continue
            if t.end is None:
                return t.role
            if epoch < t.end and fence < t.end:
                return t.role
        return None
