"""LAN discovery between two devices whose clocks are 30 minutes apart (real agents in network
namespaces, real mDNS, a real relay; b's clock is shifted with QMOI_SYNC_CLOCK_SKEW_S).

Discovery tags rotate every 10 minutes with one window of tolerance, so devices more than about
10 minutes apart never recognized each other's tags: they synced through the relay only. A
device whose clock is off its relay's by more than a minute now computes its tags on the relay's
clock (measured at the relay handshake), finds its LAN peer, and says so in `status`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_until
from lan.netns import LanNet, NetnsUnavailable, NsDevice, NsRelay, lan_net

from qmoi_sync.agent.clock import SKEW_ENV

pytestmark = pytest.mark.slow

BEHIND = -1800.0  # three tag windows


@pytest.fixture(scope="module")
def net() -> Iterator[LanNet]:
    try:
        with lan_net(["a", "b"]) as n:
            yield n
    except NetnsUnavailable as exc:
        pytest.skip(f"LAN tests need network namespaces: {exc}")


def test_devices_30_minutes_apart_find_each_other_on_the_lan(net: LanNet, tmp_path: Path) -> None:
    relay = NsRelay(data=tmp_path / "relay-data", net=net)
    a = NsDevice(net, "a", tmp_path / "home-a", tmp_path / "folder-a")
    b = NsDevice(net, "b", tmp_path / "home-b", tmp_path / "folder-b")
    b.env[SKEW_ENV] = str(BEHIND)
    try:
        relay.start()
        for d in (a, b):
            d.init()
        a.cli("space", "create", "notes", "--folder", str(a.folder), "--relay", relay.url,
              "--insecure")  # fmt: skip
        a.space = "notes"
        a.start()
        token = a.cli("invite", "notes").stdout.strip().splitlines()[-1]
        b.cli("join", token, "--folder", str(b.folder), "--name", "notes", "--insecure",
              timeout=60)  # fmt: skip
        b.space = "notes"
        b.start()

        def peers(dev: NsDevice) -> int:
            return int(dev.space_status("notes")["lan"]["peers"])

        wait_until(lambda: peers(a) >= 1 and peers(b) >= 1, timeout=90, what="LAN peers found")
        warnings = b.space_status("notes")["warnings"]
        assert any(
            "30.0 min behind the relay's" in w and "LAN discovery follows the relay's clock" in w
            for w in warnings
        ), warnings
        assert not [w for w in a.space_status("notes")["warnings"] if "clock" in w]
        # The relay goes away: an edit on the skewed device still reaches a, over the LAN.
        relay.stop()
        b.write("from-b.txt", "written on b, whose clock is 30 min behind\n")
        wait_until(
            lambda: a.read("from-b.txt") == "written on b, whose clock is 30 min behind\n",
            timeout=60,
            what="b's file reaches a over the LAN with the relay down",
        )
    finally:
        for d in (a, b):
            d.stop()
        relay.stop()
