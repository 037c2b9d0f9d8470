"""Invite abuse against real processes: the session's relay and running admin agent ``a``, joiners
through the CLI (and one that bypasses it).

Every refusal must be a readable one-line error (exit code 2, no traceback) and must leave the
space's membership unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import time

import pytest
from harness import Device, Relay, invite, join, wait_until
from security.sec_helpers import Wire, World

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.invite import Invite, build_join_request, decode_invite

pytestmark = pytest.mark.timeout(90)

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclasses.dataclass
class Joins:
    world: World
    #: one device that never gets in: every refused join is tried from it.
    outsider: Device
    n: int = 0

    @property
    def admin(self) -> Device:
        return self.world.a

    @property
    def relay(self) -> Relay:
        return self.world.relay

    def device(self) -> Device:
        self.n += 1
        name = f"j{self.n}"
        tmp = self.world.tmp
        return Device(tmp / f"home-{name}", tmp / f"folder-{name}", name).init()

    def members(self) -> int:
        """Members in the admin's membership log (read from its database, as saved before the
        admin answers a join)."""
        return len(self.world.members_known_to(self.admin))

    def try_join(self, token: str) -> subprocess.CompletedProcess[str]:
        dev = self.outsider
        return dev.cli("join", token, "--folder", str(dev.folder), "--timeout", "30", check=False)


@pytest.fixture(scope="module")
def joins(world: World) -> Joins:
    tmp = world.tmp
    return Joins(world, Device(tmp / "home-outsider", tmp / "folder-outsider", "outsider").init())


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, one readable line naming the problem, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qmoi-sync: "), proc.stderr
    for n in needles:
        assert n in last.lower(), f"{n!r} not in {last!r}"
    return last


def assert_not_joined(dev: Device) -> None:
    db = dev.home / "state.db"
    if not db.exists():
        return
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM spaces").fetchone()[0] == 0, (
            "a refused joiner must hold no space"
        )


def corrupt_one_char(token: str) -> str:
    """Change one base64url character in the middle of the token (not a padding-only bit)."""
    i = len(token) // 2
    repl = B64URL[(B64URL.index(token[i]) + 1) % len(B64URL)]
    return token[:i] + repl + token[i + 1 :]


async def _raw_join(relay: Relay, inv: Invite) -> F.JoinResult:
    """A joiner that skips the CLI's own checks and asks the admin directly via the relay."""
    joiner = DeviceIdentity.generate()
    w = await Wire.open(relay.url)
    await w.send(
        F.JoinRequest(
            space_id=inv.space_id,
            invite_id=inv.invite_id,
            request=build_join_request(inv, joiner.public, "sneaky"),
        )
    )
    res = await w.recv(timeout=20)
    assert isinstance(res, F.JoinResult), res
    return res


async def test_reused_invite_is_refused(joins: Joins) -> None:
    before = joins.members()
    token = invite(joins.admin)
    join(joins.device(), token)
    assert joins.members() == before + 1

    assert_user_error(joins.try_join(token), "join refused", "used")
    assert_not_joined(joins.outsider)
    # Single use is the admin's check (the CLI only relays): a hand-made request gets the same.
    res = await _raw_join(joins.relay, decode_invite(token))
    assert not res.ok and "used" in res.reason, res
    assert joins.members() == before + 1


async def test_expired_invite_is_refused(joins: Joins) -> None:
    before = joins.members()
    token = invite(joins.admin, "notes", "--expires", "1s")
    expires_at = decode_invite(token).expires_at
    wait_until(lambda: time.time() >= expires_at + 0.05, timeout=5, what="invite expiry")
    assert_user_error(joins.try_join(token), "expired")
    assert_not_joined(joins.outsider)
    # The CLI refuses before asking; the admin enforces expiry too for a joiner that skips it.
    res = await _raw_join(joins.relay, decode_invite(token))
    assert not res.ok and "expired" in res.reason, res
    assert joins.members() == before


def test_corrupted_token_is_a_clear_checksum_error(joins: Joins) -> None:
    bad = corrupt_one_char(invite(joins.admin))
    assert_user_error(joins.try_join(bad), "cannot use this invite", "checksum")
    assert_not_joined(joins.outsider)


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("hello", "not a qmoi-sync invite"),
        ("qmoi1-!!!!", "base64url"),
        ("qmoi1-" + "A" * 5000, "too long"),
    ],
    ids=["no_prefix", "not_base64", "huge"],
)
def test_garbage_tokens(joins: Joins, token: str, why: str) -> None:
    assert_user_error(joins.try_join(token), "cannot use this invite", why)
    assert_not_joined(joins.outsider)


def test_forged_secret_with_a_valid_checksum(joins: Joins) -> None:
    """A token re-encoded with another secret passes the checksum (it is not a MAC) but the
    admin knows no such invite: refused, nothing added."""
    before = joins.members()
    real = decode_invite(invite(joins.admin))
    forged = dataclasses.replace(real, secret=os.urandom(32)).encode()
    assert_user_error(joins.try_join(forged), "join refused", "invite_invalid")
    assert_not_joined(joins.outsider)
    assert joins.members() == before
