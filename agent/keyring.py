"""A space's key material as one device sees it: the verified membership log and the epoch
secrets wrapped to this device. Rebuilt whenever the log grows."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import EpochKeys, derive_epoch_keys, file_id_key
from qmoi_sync.protocol.membership import MembershipLog, Role


@dataclass
class Keyring:
    log: MembershipLog
    secrets: dict[int, bytes]
    epoch_keys: dict[int, EpochKeys] = field(default_factory=dict)

    @classmethod
    def build(cls, log: MembershipLog, identity: DeviceIdentity) -> Keyring:
        secrets = log.unwrap_epoch_secrets(identity)
        ring = cls(log=log, secrets=secrets)
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
