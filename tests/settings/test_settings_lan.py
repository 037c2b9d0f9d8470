"""The shared `lan.enabled` option, applied by every device of a space: real agents in private
network namespaces with real mDNS (tests/lan/netns.py; needs root, skipped otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_until
from lan.netns import LanNet, NetnsUnavailable, NsDevice, NsRelay, lan_net

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def net() -> Iterator[LanNet]:
    try:
        with lan_net(["a", "b"]) as n:
            yield n
    except NetnsUnavailable as exc:
        pytest.skip(f"needs network namespaces: {exc}")


def _lan(dev: NsDevice) -> dict[str, object]:
    lan = dev.space_status("notes")["lan"]
    assert isinstance(lan, dict)
    return lan


def test_lan_enabled_is_applied_on_every_device(net: LanNet, tmp_path: Path) -> None:
    relay = NsRelay(data=tmp_path / "relay-data", net=net).start()
    a = NsDevice(net, "a", tmp_path / "home-a", tmp_path / "folder-a").init()
    b = NsDevice(net, "b", tmp_path / "home-b", tmp_path / "folder-b").init()
    try:
        for d in (a, b):
            d.cli("config", "set", "lan.interfaces", "lan0")
        a.cli(
            "space",
            "create",
            "notes",
            "--folder",
            str(a.folder),
            "--relay",
            relay.url,
            "--insecure",
        )
        a.space = "notes"
        a.start()
        token = a.cli("invite", "notes").stdout.strip().splitlines()[-1]
        b.cli("join", token, "--folder", str(b.folder), "--name", "notes", "--insecure")
        b.space = "notes"
        b.start()
        for d in (a, b):
            wait_until(lambda d=d: _lan(d).get("peers") == 1, interval=0.2, what="LAN peers")

        # switched off on one device: every device of the space stops its LAN sync
        a.cli("settings", "set", "notes", "qmoi-sync", "lan.enabled", "false")
        for d in (a, b):
            wait_until(lambda d=d: _lan(d)["enabled"] is False, interval=0.2, what="LAN off")
        a.write("via-relay.txt", "the relay still carries it\n")
        wait_until(lambda: b.read("via-relay.txt") is not None, what="a -> b via the relay")
        assert _lan(b)["enabled"] is False

        # and back on
        b.cli("settings", "set", "notes", "qmoi-sync", "lan.enabled", "true")
        for d in (a, b):
            wait_until(lambda d=d: _lan(d).get("peers") == 1, interval=0.2, what="LAN again")
    finally:
        a.stop()
        b.stop()
        relay.stop()
