from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from qmoi_sync.protocol import _codec as c
from qmoi_sync.protocol.errors import (
    MalformedError,
    MembershipError,
    ProtocolError,
    TooLargeError,
    WrongSpaceError,
)
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import WRAPPED_LEN, derive_epoch_keys, wrap_secret
from qmoi_sync.protocol.membership import (
    MAX_LOG_BYTES,
    MAX_OPS,
    Member,
    MemberOp,
    MembershipLog,
    OpKind,
    Role,
)

SPACE = b"S" * 16


@pytest.fixture
def log_alice(alice: DeviceIdentity, make_rng: Any) -> tuple[MembershipLog, bytes]:
    return MembershipLog.create(alice, 1000, space_id=SPACE, rng=make_rng(b"log"))


def test_create_genesis(alice: DeviceIdentity, log_alice: tuple[MembershipLog, bytes]) -> None:
    log, secret = log_alice
    assert len(secret) == 32
    assert len(log) == 1 and log.current_epoch == 0 and log.space_id == SPACE
    g = log.ops[0]
    assert g.kind is OpKind.genesis and g.index == 0 and g.prev == bytes(32)
    assert g.author == g.subject_key == alice.sign_pk and g.role is Role.admin
    assert log.members() == {alice.sign_pk: Member(alice.public, Role.admin)}
    assert log.is_member(alice.sign_pk) and log.role_of(alice.sign_pk) is Role.admin
    assert log.admins() == [alice.sign_pk]
    assert log.unwrap_epoch_secrets(alice) == {0: secret}
    assert log.head_hash == g.op_hash()
    assert "MembershipLog(" in repr(log)


def test_create_random_space_id(alice: DeviceIdentity) -> None:
    a, _ = MembershipLog.create(alice, 1)
    b, _ = MembershipLog.create(alice, 1)
    assert len(a.space_id) == 16 and a.space_id != b.space_id


def test_full_lifecycle_roundtrip(
    alice: DeviceIdentity, bob: DeviceIdentity, carol: DeviceIdentity, make_rng: Any
) -> None:
    log, s0 = MembershipLog.create(alice, 1000, space_id=SPACE)
    op = log.add_member(alice, bob.public, Role.member, {0: s0}, 1001)
    assert op.kind is OpKind.add and op.index == 1 and op.epoch == 0
    assert log.unwrap_epoch_secrets(bob) == {0: s0}
    rm, s1 = log.remove_member(alice, bob.sign_pk, 1002, rng=make_rng(b"e1"))
    assert rm.epoch == 1 and log.current_epoch == 1 and not log.is_member(bob.sign_pk)
    assert [w[0] for w in rm.wraps] == [alice.sign_pk]
    assert log.unwrap_epoch_secrets(alice) == {0: s0, 1: s1}
    # bob keeps only what he had
    assert log.unwrap_epoch_secrets(bob) == {0: s0}
    # carol joins later and can read all history
    log.add_member(alice, carol.public, Role.admin, {0: s0, 1: s1}, 1003)
    assert log.unwrap_epoch_secrets(carol) == {0: s0, 1: s1}
    log.set_role(carol, alice.sign_pk, Role.reader, 1004)
    assert log.role_of(alice.sign_pk) is Role.reader
    # bob can be re-added
    log.add_member(carol, bob.public, Role.reader, {0: s0, 1: s1}, 1005)
    data = log.to_bytes()
    again = MembershipLog.from_bytes(data, expected_space_id=SPACE)
    assert again.to_bytes() == data
    assert again.members() == log.members()
    assert again.current_epoch == 1 and again.head_hash == log.head_hash
    assert again.op_hashes() == log.op_hashes()
    assert log.copy().to_bytes() == data
    assert [o.kind for o in again] == [
        OpKind.genesis,
        OpKind.add,
        OpKind.remove,
        OpKind.add,
        OpKind.role,
        OpKind.add,
    ]
    # epoch keys derived from unwrapped secrets agree everywhere
    assert derive_epoch_keys(SPACE, 1, again.unwrap_epoch_secrets(carol)[1]).msg == (
        derive_epoch_keys(SPACE, 1, s1).msg
    )


def test_op_roundtrip(log_alice: tuple[MembershipLog, bytes]) -> None:
    op = log_alice[0].ops[0]
    assert MemberOp.from_bytes(op.to_bytes()) == op


def test_is_extension_of(alice: DeviceIdentity, bob: DeviceIdentity) -> None:
    log, s0 = MembershipLog.create(alice, 1000, space_id=SPACE)
    old = log.copy()
    assert log.is_extension_of(old) and old.is_extension_of(log)
    log.add_member(alice, bob.public, Role.member, {0: s0}, 1001)
    assert log.is_extension_of(old)
    assert not old.is_extension_of(log)
    # a fork: same genesis, different second op
    fork = old.copy()
    fork.add_member(alice, bob.public, Role.reader, {0: s0}, 1001)
    assert not log.is_extension_of(fork) and not fork.is_extension_of(log)
    other, _ = MembershipLog.create(alice, 1000, space_id=b"T" * 16)
    assert not log.is_extension_of(other)


# -- refusals through the API -----------------------------------------------------------------


def test_add_existing_member_refused(
    alice: DeviceIdentity, log_alice: tuple[MembershipLog, bytes]
) -> None:
    log, s0 = log_alice
    with pytest.raises(MembershipError, match="already a member"):
        log.add_member(alice, alice.public, Role.member, {0: s0}, 1)


def test_add_needs_all_epoch_secrets(
    alice: DeviceIdentity, bob: DeviceIdentity, carol: DeviceIdentity
) -> None:
    log, s0 = MembershipLog.create(alice, 1000, space_id=SPACE)
    log.add_member(alice, bob.public, Role.member, {0: s0}, 1)
    _, s1 = log.remove_member(alice, bob.sign_pk, 2)
    with pytest.raises(MembershipError, match="epoch 0"):
        log.add_member(alice, carol.public, Role.member, {1: s1}, 3)
    assert len(log) == 3


def test_remove_non_member_refused(
    alice: DeviceIdentity, bob: DeviceIdentity, log_alice: tuple[MembershipLog, bytes]
) -> None:
    log, _ = log_alice
    with pytest.raises(MembershipError, match="not a member"):
        log.remove_member(alice, bob.sign_pk, 1)


def test_last_admin_cannot_be_removed_or_demoted(
    alice: DeviceIdentity, bob: DeviceIdentity, log_alice: tuple[MembershipLog, bytes]
) -> None:
    log, s0 = log_alice
    log.add_member(alice, bob.public, Role.member, {0: s0}, 1)
    with pytest.raises(MembershipError, match="last admin"):
        log.remove_member(alice, alice.sign_pk, 2)
    with pytest.raises(MembershipError, match="last admin"):
        log.set_role(alice, alice.sign_pk, Role.member, 2)
    assert len(log) == 2 and log.current_epoch == 0
    # with a second admin, alice may leave
    log.set_role(alice, bob.sign_pk, Role.admin, 3)
    log.remove_member(alice, alice.sign_pk, 4)
    assert log.admins() == [bob.sign_pk]


def test_non_admin_cannot_author(
    alice: DeviceIdentity,
    bob: DeviceIdentity,
    carol: DeviceIdentity,
    log_alice: tuple[MembershipLog, bytes],
    craft: Any,
) -> None:
    log, s0 = log_alice
    log.add_member(alice, bob.public, Role.member, {0: s0}, 1)
    with pytest.raises(MembershipError, match="only an admin"):
        log.add_member(bob, carol.public, Role.member, {0: s0}, 2)
    with pytest.raises(MembershipError, match="only an admin"):
        log.remove_member(carol, bob.sign_pk, 2)
    # a hand-crafted op signed by the member is refused by append (and so by from_bytes)
    wraps = ((carol.sign_pk, 0, wrap_secret(carol.public, SPACE, 0, s0)),)
    forged = craft(
        log, bob, kind=OpKind.add, subject=carol.public, subject_key=carol.sign_pk, wraps=wraps
    )
    with pytest.raises(MembershipError, match="not an admin"):
        log.append(forged)
    outsider = craft(log, carol, kind=OpKind.role, subject_key=bob.sign_pk, role=Role.admin)
    with pytest.raises(MembershipError, match="author is not a member"):
        log.append(outsider)
    assert len(log) == 2


def test_role_unchanged_refused(
    alice: DeviceIdentity, log_alice: tuple[MembershipLog, bytes]
) -> None:
    with pytest.raises(MembershipError, match="unchanged"):
        log_alice[0].set_role(alice, alice.sign_pk, Role.admin, 1)


# -- hand-crafted ops breaking each rule ----------------------------------------------------


def _append_fails(log: MembershipLog, op: MemberOp, match: str) -> None:
    before = log.to_bytes()
    with pytest.raises(MembershipError, match=match):
        log.append(op)
    assert log.to_bytes() == before  # atomic


def test_append_rules(
    alice: DeviceIdentity,
    bob: DeviceIdentity,
    carol: DeviceIdentity,
    log_alice: tuple[MembershipLog, bytes],
    craft: Any,
    resign: Any,
) -> None:
    log, s0 = log_alice
    w_bob = ((bob.sign_pk, 0, wrap_secret(bob.public, SPACE, 0, s0)),)
    good = craft(
        log, alice, kind=OpKind.add, subject=bob.public, subject_key=bob.sign_pk, wraps=w_bob
    )
    _append_fails(log, resign(alice, dataclasses.replace(good, index=5)), "expected index 1")
    _append_fails(log, resign(alice, dataclasses.replace(good, prev=b"\x01" * 32)), "prev hash")
    _append_fails(
        log, resign(alice, dataclasses.replace(good, space_id=b"X" * 16)), "another space"
    )
    _append_fails(log, dataclasses.replace(good, created_at=5), "signature")
    _append_fails(log, resign(alice, dataclasses.replace(good, epoch=1)), "epoch")
    _append_fails(log, resign(alice, dataclasses.replace(good, wraps=())), "wrap every epoch")
    _append_fails(
        log, resign(alice, dataclasses.replace(good, subject_key=carol.sign_pk)), "subject_key"
    )
    _append_fails(log, resign(alice, dataclasses.replace(good, subject=None)), "subject")
    _append_fails(log, resign(alice, dataclasses.replace(good, kind=OpKind.genesis)), "genesis")
    bad_wrap = ((bob.sign_pk, 0, b"\x00" * (WRAPPED_LEN - 1)),)
    with pytest.raises(ProtocolError):
        log.append(resign(alice, dataclasses.replace(good, wraps=bad_wrap)))
    log.append(good)
    # remove rules
    w_alice1 = ((alice.sign_pk, 1, wrap_secret(alice.public, SPACE, 1, b"1" * 32)),)
    rm = craft(
        log,
        alice,
        kind=OpKind.remove,
        subject_key=bob.sign_pk,
        role=Role.member,
        epoch=1,
        wraps=w_alice1,
    )
    _append_fails(log, resign(alice, dataclasses.replace(rm, epoch=0)), "next epoch")
    _append_fails(log, resign(alice, dataclasses.replace(rm, wraps=())), "remaining member")
    _append_fails(
        log, resign(alice, dataclasses.replace(rm, wraps=w_alice1 * 2)), "remaining member"
    )
    _append_fails(log, resign(alice, dataclasses.replace(rm, role=Role.admin)), "former|current")
    _append_fails(log, resign(alice, dataclasses.replace(rm, subject=bob.public)), "must not carry")
    _append_fails(
        log, resign(alice, dataclasses.replace(rm, subject_key=carol.sign_pk)), "not a member"
    )
    # role rules
    ro = craft(log, alice, kind=OpKind.role, subject_key=bob.sign_pk, role=Role.reader)
    _append_fails(log, resign(alice, dataclasses.replace(ro, epoch=1)), "keep the epoch")
    _append_fails(log, resign(alice, dataclasses.replace(ro, wraps=w_alice1)), "no wraps")
    log.append(rm)
    assert log.current_epoch == 1


def test_crafted_removal_of_last_admin_refused(
    alice: DeviceIdentity, log_alice: tuple[MembershipLog, bytes], craft: Any
) -> None:
    log, _ = log_alice
    rm = craft(log, alice, kind=OpKind.remove, subject_key=alice.sign_pk, role=Role.admin, epoch=1)
    _append_fails(log, rm, "last admin")
    demote = craft(log, alice, kind=OpKind.role, subject_key=alice.sign_pk, role=Role.reader)
    _append_fails(log, demote, "last admin")


def test_genesis_rules(alice: DeviceIdentity, bob: DeviceIdentity, craft: Any, resign: Any) -> None:
    log, _ = MembershipLog.create(alice, 1000, space_id=SPACE)
    g = log.ops[0]
    for bad, match in [
        (dataclasses.replace(g, role=Role.member), "admin at epoch 0"),
        (dataclasses.replace(g, epoch=1), "admin at epoch 0"),
        (dataclasses.replace(g, wraps=()), "wrap the epoch-0 secret"),
        (dataclasses.replace(g, wraps=g.wraps * 2), "wrap the epoch-0 secret"),
        (dataclasses.replace(g, subject_key=bob.sign_pk, subject=bob.public), "self-signed"),
        (dataclasses.replace(g, kind=OpKind.add), "first op must be a genesis"),
    ]:
        with pytest.raises(MembershipError, match=match):
            MembershipLog(resign(alice, bad))
    # genesis signed by someone else than its subject
    forged = resign(bob, dataclasses.replace(g, author=bob.sign_pk))
    with pytest.raises(MembershipError):
        MembershipLog(forged)
    # a second genesis later in the log
    second = craft(
        log,
        alice,
        kind=OpKind.genesis,
        subject=alice.public,
        subject_key=alice.sign_pk,
        role=Role.admin,
        wraps=g.wraps,
    )
    with pytest.raises(MembershipError, match="genesis"):
        log.append(second)


# -- tampering with encoded logs -------------------------------------------------------------


@pytest.fixture
def three_op_log(alice: DeviceIdentity, bob: DeviceIdentity, carol: DeviceIdentity) -> bytes:
    log, s0 = MembershipLog.create(alice, 1000, space_id=SPACE)
    log.add_member(alice, bob.public, Role.member, {0: s0}, 1001)
    log.add_member(alice, carol.public, Role.admin, {0: s0}, 1002)
    return log.to_bytes()


def test_every_flipped_byte_is_refused(three_op_log: bytes) -> None:
    data = three_op_log
    # flip one bit in every position; never anything but a ProtocolError, never accepted
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(ProtocolError):
            MembershipLog.from_bytes(bytes(tampered))


def test_truncations_refused(three_op_log: bytes) -> None:
    for n in range(len(three_op_log)):
        with pytest.raises(ProtocolError):
            MembershipLog.from_bytes(three_op_log[:n])


def test_reordered_and_dropped_ops_refused(three_op_log: bytes) -> None:
    log = MembershipLog.from_bytes(three_op_log)
    ops = [o.to_bytes() for o in log.ops]

    def enc(parts: list[bytes]) -> bytes:
        return c.u8(1) + c.u32(len(parts)) + b"".join(c.u32(len(p)) + p for p in parts)

    assert MembershipLog.from_bytes(enc(ops)).head_hash == log.head_hash
    with pytest.raises(MembershipError):
        MembershipLog.from_bytes(enc([ops[0], ops[2], ops[1]]))
    with pytest.raises(MembershipError):
        MembershipLog.from_bytes(enc([ops[0], ops[2]]))
    with pytest.raises(MembershipError):
        MembershipLog.from_bytes(enc([ops[1], ops[0]]))
    with pytest.raises(MembershipError):
        MembershipLog.from_bytes(enc([ops[0], ops[1], ops[1]]))


def test_log_structure_refusals(three_op_log: bytes) -> None:
    with pytest.raises(MalformedError, match="empty"):
        MembershipLog.from_bytes(c.u8(1) + c.u32(0))
    with pytest.raises(MalformedError, match="version"):
        MembershipLog.from_bytes(b"\x02" + three_op_log[1:])
    with pytest.raises(MalformedError, match="trailing"):
        MembershipLog.from_bytes(three_op_log + b"\x00")
    with pytest.raises(TooLargeError):
        MembershipLog.from_bytes(c.u8(1) + c.u32(MAX_OPS + 1))
    with pytest.raises(TooLargeError):
        MembershipLog.from_bytes(b"\x01" + bytes(MAX_LOG_BYTES))
    with pytest.raises(MalformedError):
        MembershipLog.from_bytes("not bytes")  # type: ignore[arg-type]
    with pytest.raises(WrongSpaceError):
        MembershipLog.from_bytes(three_op_log, expected_space_id=b"Z" * 16)
    with pytest.raises(MalformedError):
        MemberOp.from_bytes(b"")


def test_unwrap_skips_garbage_wraps(alice: DeviceIdentity, bob: DeviceIdentity, craft: Any) -> None:
    # a faulty admin wrapping garbage cannot crash unwrapping; other epochs still open
    log, s0 = MembershipLog.create(alice, 1000, space_id=SPACE)
    garbage = ((bob.sign_pk, 0, b"\x07" * WRAPPED_LEN),)
    op = craft(
        log, alice, kind=OpKind.add, subject=bob.public, subject_key=bob.sign_pk, wraps=garbage
    )
    log.append(op)
    assert log.unwrap_epoch_secrets(bob) == {}
    assert log.unwrap_epoch_secrets(alice) == {0: s0}
