"""Clock skew: one device's wall clock two hours ahead, another's three days behind
(QMOI_SYNC_CLOCK_SKEW_S, read by agent/clock.py, shifts every wall-clock reading of that agent
and its CLI). They join, sync and converge like the rest; what really depends on time (an
invite that did expire) fails with a message that shows both clocks, and `doctor` names the
skew against the relay."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos.invariants import check_all, format_violations
from chaos.ledger import Ledger
from harness import Device, Relay, cli, create_space, invite, wait_until

from qmoi_sync.agent.clock import SKEW_ENV

pytestmark = pytest.mark.slow

AHEAD = 2 * 3600.0  # more than an invite's default lifetime (1 h)
BEHIND = -3 * 86400.0

Trio = tuple[Relay, Device, Device, Device]


def skewed(tmp: Path, name: str, skew: float | None) -> Device:
    dev = Device(tmp / f"home-{name}", tmp / f"folder-{name}", name)
    if skew is not None:
        dev.env[SKEW_ENV] = str(skew)
    cli(dev.home, "init", "--name", name, env=dev.env)
    return dev


def join_skewed(dev: Device, token: str) -> None:
    cli(dev.home, "join", token, "--folder", str(dev.folder), "--name", "notes", env=dev.env)
    dev.space = "notes"


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    tmp = tmp_path_factory.mktemp("skew")
    relay = Relay(tmp / "relay-data").start()
    a = skewed(tmp, "a", None)
    b = skewed(tmp, "b", AHEAD)
    c = skewed(tmp, "c", BEHIND)
    try:
        create_space(a, relay)
        a.start()
        for dev in (b, c):
            join_skewed(dev, invite(a))
            dev.start()
        yield relay, a, b, c
    finally:
        for dev in (a, b, c):
            dev.stop()
        relay.stop()


def test_joiner_clock_ahead_of_invite_lifetime_still_joins(trio: Trio) -> None:
    """Bug: the joiner refused an invite as expired by its own clock, so a device whose clock
    ran ahead by more than the invite's lifetime could never join. The admin's clock decides."""
    _relay, a, b, _c = trio
    names = {d["name"] for d in a.space_status()["devices"]}
    assert "b" in names, names
    assert b.space_status()["name"] == "notes"


def _write(dev: Device, ledger: Ledger, rel: str) -> str:
    lin = ledger.lineage()
    toks = [ledger.token(dev.name) for _ in range(2)]
    text = f"# lineage {lin}\n" + "".join(f"{t} from {dev.name}\n" for t in toks)
    dev.write(rel, text)
    ledger.text_written(dev.name, "create", rel, lin, toks, [])
    return lin


def _append(dev: Device, ledger: Ledger, rel: str, lineage: str) -> None:
    tok = ledger.token(dev.name)
    p = dev.folder / rel
    p.write_text(p.read_text() + f"{tok} appended on {dev.name}\n")
    ledger.text_written(dev.name, "append", rel, lineage, [tok], [])


def test_skewed_devices_converge(trio: Trio) -> None:
    relay, a, b, c = trio
    ledger = Ledger()
    lineages = {}
    for dev in (a, b, c):
        for i in range(3):
            lineages[f"{dev.name}/f{i}.txt"] = _write(dev, ledger, f"{dev.name}/f{i}.txt")
    wait_until(
        lambda: all((d.folder / "c/f2.txt").exists() for d in (a, b)), timeout=60, what="spread"
    )
    # Edits of the same files from every clock; a rename and a delete from the skewed ones.
    shared = "a/f0.txt"
    lin = lineages[shared]
    for dev in (b, c, a):
        wait_until(lambda dev=dev: (dev.folder / shared).exists(), timeout=60, what="shared")
        _append(dev, ledger, shared, lin)
    (b.folder / "c/f1.txt").rename(b.folder / "c/renamed-by-b.txt")
    ledger.moved("b", "c/f1.txt", "c/renamed-by-b.txt")
    victim = "b/f2.txt"
    wait_until(lambda: (c.folder / victim).exists(), timeout=60, what="victim on c")
    (c.folder / victim).unlink()
    ledger.kill_lineage("c", "delete", victim, lineages[victim])
    violations = check_all(relay, [a, b, c], ledger)
    assert not violations, format_violations(violations) + "\n" + ledger.tail()
    assert not (a.folder / victim).exists()
    assert (a.folder / "c/renamed-by-b.txt").exists()


def test_really_expired_invite_names_both_clocks(trio: Trio, tmp_path: Path) -> None:
    """A joiner three days behind thinks an expired invite is fine; the admin refuses it, and
    the message shows the expiry and the admin's clock."""
    _relay, a, _b, _c = trio
    token = invite(a, "notes", "--expires", "1s")
    issued = time.time()
    wait_until(lambda: time.time() > issued + 2, timeout=10, what="the invite to expire")
    d = skewed(tmp_path, "d", BEHIND)
    p = cli(
        d.home, "join", token, "--folder", str(d.folder), "--name", "late",
        check=False, timeout=120, env=d.env,
    )  # fmt: skip
    assert p.returncode != 0, p.stdout
    assert "invite_expired" in p.stderr and "expired at" in p.stderr, p.stderr
    assert "the admin device's clock says" in p.stderr, p.stderr
    assert not (d.folder).exists() or not any(d.folder.iterdir())


def test_doctor_names_the_skew(trio: Trio) -> None:
    _relay, _a, b, _c = trio
    p = cli(b.home, "doctor", "--json", check=False, env=b.env, timeout=120)
    report = json.loads(p.stdout)
    text = json.dumps(report)
    assert "relay clock behind by" in text, text[:2000]
