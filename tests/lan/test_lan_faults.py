"""Faults between LAN peers, and a hostile relay repaired over the LAN (real agent processes in
network namespaces, real mDNS; tests/lan/lan_faults.py has the proxies).

Devices a and b do LAN on their LAN cable; each one's dial of the other goes through a
websocket-frame-aware fault proxy in its own namespace (the ``QMOI_SYNC_TEST_LAN_DIAL`` test
hook), and b reaches the relay (hub namespace) through a man in the middle that can play a
hostile relay. The tests run in order:

1. relay stopped, so the LAN is the only path: the LAN link is delayed, duplicates and reorders
   messages, is throttled, loses messages (the connection dies with them, as TCP would), is cut
   and partitioned while both devices edit; after it heals the devices converge with no line
   lost and nothing refused; the relay comes back and the chaos suite's invariants hold;
2. the relay withholds a's envelopes from b (all but one, which shows b the hole) while the LAN
   is partitioned: b lists the gap, cannot repair it through that relay (re-subscribing, or
   asking a through it — a's answer is withheld too); the LAN comes back and a's resync repairs
   it: b shows the gap repaired by "LAN resync" from a, and everything converges.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chaos.invariants import check_all, check_counters, check_ledger, format_violations
from chaos.ledger import Ledger
from harness import wait_until
from lan.lan_faults import LinkFaults, NsInjectingProxy
from lan.netns import LanNet, NsDevice, NsRelay
from resource_env import Readings
from security.sec_helpers import Withhold, device_identity

pytestmark = pytest.mark.slow

LAN_PORT = 47700
RELAY_PORT = 18766


@dataclass
class World:
    net: LanNet
    tmp: Path
    relay: NsRelay
    a: NsDevice
    b: NsDevice
    link: LinkFaults
    relay_mitm: NsInjectingProxy
    ledger: Ledger = field(default_factory=Ledger)
    lineages: dict[str, str] = field(default_factory=dict)

    def append(self, dev: NsDevice, rel: str) -> tuple[str, str]:
        """Add a line with a fresh token to ``dev``'s own file ``rel`` (only ``dev`` edits it:
        what is checked is the link, not concurrent edits of one line)."""
        lineage = self.lineages.setdefault(rel, self.ledger.lineage())
        current = dev.read(rel) or f"# lineage {lineage}\n"
        token = self.ledger.token(dev.name)
        dev.write(rel, current + f"{token}\n")
        self.ledger.text_written(dev.name, "append", rel, lineage, [token], [])
        return rel, token

    def round(self, n: int, wait: bool = True) -> None:
        """One edit on each device; with ``wait``, until the other device has both."""
        edits = [(self.b, *self.append(self.a, f"a-{n % 3}.txt"))]
        edits.append((self.a, *self.append(self.b, f"b-{n % 3}.txt")))
        if wait:
            for other, rel, token in edits:
                wait_until(
                    lambda o=other, r=rel, t=token: t in (o.read(r) or ""),
                    timeout=60,
                    what=f"{token} reaches {other.name} over the faulty LAN link",
                )


def lan_path(dev: NsDevice, other: str) -> str | None:
    for row in dev.space_status("notes")["devices"]:
        if row["name"] == other:
            return str(row["path"])
    return None


@pytest.fixture(scope="module")
def world(net: LanNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("lanfaults")
    relay = NsRelay(data=tmp / "relay-data", net=net)
    relay.port = RELAY_PORT
    a, b = (NsDevice(net, n, tmp / f"home-{n}", tmp / f"folder-{n}") for n in ("a", "b"))
    link = LinkFaults.between(net, "a", "b", LAN_PORT, seed=5)
    mitm = NsInjectingProxy(net.ns("b"), relay.url).start()
    w = World(net, tmp, relay, a, b, link, mitm)
    try:
        relay.start()
        for d, other in ((a, "b"), (b, "a")):
            d.init()
            readings = Readings(tmp / f"resources-{d.node}.json")
            readings.set()
            d.env["QMOI_SYNC_TEST_RESOURCES"] = str(readings.path)
            d.env["QMOI_SYNC_TEST_LAN_DIAL"] = link.dial_env(net, d.node, other, LAN_PORT)
            d.cli("config", "set", "lan.interfaces", "lan0")
        a.cli("space", "create", "notes", "--folder", str(a.folder), "--relay", relay.url,
              "--insecure")  # fmt: skip
        a.space = "notes"
        a.start()
        token = a.cli("invite", "notes").stdout.strip().splitlines()[-1]
        b.cli("join", token, "--folder", str(b.folder), "--name", "notes", "--insecure")
        b.space = "notes"
        # b's relay traffic goes through the man in the middle (transparent until a test says).
        with contextlib.closing(sqlite3.connect(b.home / "state.db")) as db, db:
            db.execute("UPDATE spaces SET relay_url=?", (mitm.url,))
        b.start()
        wait_until(mitm.connected, timeout=30, what="b reaches the relay through the proxy")
        wait_until(
            lambda: lan_path(a, "b") == "lan" and lan_path(b, "a") == "lan",
            timeout=60,
            what="a and b are LAN peers (through the fault proxies)",
        )
        assert link.connections >= 1, "the LAN session does not go through the proxies"
        yield w
    finally:
        for d in (a, b):
            d.stop()
        relay.stop()
        mitm.stop()
        link.stop()


def test_lan_link_faults_while_editing_converge(world: World) -> None:
    """About 8 s (+13 s module setup)."""
    w = world
    w.relay.stop()  # the LAN is the only path
    n = 0
    # Each phase edits until the proxies applied its fault a few times (messages are few: one
    # envelope per edit and direction), 20 rounds at most.
    phases: list[tuple[str, dict[str, Any]]] = [
        ("delay", {"delay": (0.05, 0.4)}),
        ("dup", {"dup": 0.4}),
        ("reorder", {"reorder": 0.4}),
        ("throttle", {"throttle_bps": 20_000.0}),
        ("drop_truncate", {"drop": 0.3}),  # that message and the connection are lost
    ]
    for fault, rules in phases:
        w.link.set(**rules)
        for _ in range(20):
            n += 1
            w.round(n)
            if sum(v for k, v in w.link.counts.items() if k.startswith(fault)) >= 3:
                break
    w.link.clear()
    for _ in range(2):
        n += 1
        w.round(n, wait=False)
        w.link.cut()  # mid-transfer: the round's envelopes may be on the wire
        n += 1
        w.round(n)
    # A partition: both keep editing, apart.
    w.link.partition(True)
    for _ in range(3):
        n += 1
        w.round(n, wait=False)
    assert w.link.live == 0
    w.link.partition(False)
    wait_until(lambda: w.a.tree() == w.b.tree(), timeout=90, what="a and b converge over the LAN")
    violations = check_ledger(w.a.tree(), w.ledger) + check_counters([w.a, w.b])
    assert not violations, format_violations(violations)
    counts = w.link.counts
    for fault in ("delay", "dup", "reorder", "throttle", "drop_truncate", "cut", "partition"):
        assert any(k.startswith(fault) for k in counts), (fault, counts)
    # The relay comes back: outboxes drain, and the chaos suite's invariants hold.
    w.relay.start()
    violations = check_all(w.relay, [w.a, w.b], w.ledger)
    assert not violations, format_violations(violations)


def test_relay_withholding_is_repaired_by_a_lan_peer(world: World) -> None:
    """About 11 s."""
    w = world
    a_pk = device_identity(w.a).public.sign_pk
    a_id = device_identity(w.a).public.device_id
    w.link.partition(True)
    withhold = Withhold(a_pk, allow=1)  # all of a's envelopes but the second, for good
    w.relay_mitm.rewrite = withhold
    try:
        w.a.write("withheld-1.txt", "first\n")
        wait_until(
            lambda: withhold.withheld and w.a.space_status("notes")["pending_out"] == 0,
            timeout=30,
            what="the relay stored a's edit and withheld it from b",
        )
        w.a.write("withheld-2.txt", "second\n")
        wait_until(
            lambda: any(
                g["id"] == a_id and g["held"] >= 1 for g in w.b.space_status("notes")["gaps"]
            ),
            timeout=30,
            what="b lists the gap in a's stream",
        )
        # Through this relay it cannot be repaired: re-subscribing brings the same, and a's
        # answer to b's request through the relay is withheld like everything of a's.
        wait_until(
            lambda: w.b.space_status("notes")["repair_requests"] >= 1,
            timeout=30,
            what="b asks through the relay",
        )
        assert w.b.read("withheld-1.txt") is None
        w.link.partition(False)
        wait_until(
            lambda: (
                w.b.read("withheld-1.txt") == "first\n" and w.b.read("withheld-2.txt") == "second\n"
            ),
            timeout=60,
            what="the LAN peer brings a's withheld edit",
        )
        wait_until(
            lambda: not [g for g in w.b.space_status("notes")["gaps"] if g["id"] == a_id],
            timeout=30,
            what="the gap is closed",
        )
        repaired = [r for r in w.b.space_status("notes")["repaired_gaps"] if r["id"] == a_id]
        assert repaired and repaired[-1]["how"] == "LAN resync", repaired
        assert repaired[-1]["by"] == a_id
        assert w.b.space_status("notes")["quarantined"] == 0
    finally:
        withhold.release()
        w.relay_mitm.rewrite = None
        w.link.partition(False)
    w.ledger.names |= {"withheld-1.txt", "withheld-2.txt"}
    violations = check_all(w.relay, [w.a, w.b], w.ledger)
    assert not violations, format_violations(violations)
