"""`qmoi-sync status` end to end, every field of the operator surface true to the situation: a
running agent with two spaces and a peer; pending up items and bytes while the relay is down and
back to 0 after it returns; the transfer rate during a burst; the peer online, then offline once
its agent stops; the human view on a pipe is plain text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Device, Relay, cli, create_space, invite, join, wait_until

Setup = tuple[Relay, Device, Device, Path]

SPACE_FIELDS = {
    "id", "name", "folder", "role", "state", "relay", "lan", "pending_out", "pending_out_bytes",
    "pending_in", "pending_in_bytes", "pending_up_files", "pending_up_bytes",
    "pending_down_files", "pending_down_bytes", "rate_up_bps", "rate_down_bps", "last_sync",
    "conflicts", "snapshot", "warnings", "devices",
}  # fmt: skip
DEVICE_FIELDS = {"name", "short_id", "role", "online", "path", "last_seen", "platform"}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    relay = Relay(tmp_path / "relay-data").start()
    a = Device(tmp_path / "home-a", tmp_path / "folder-a", "a").init()
    b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b").init()
    work = tmp_path / "work-a"
    try:
        create_space(a, relay, "notes")
        a.cli("space", "create", "work", "--folder", str(work), "--relay", relay.url)
        a.start()
        join(b, invite(a, "notes"))
        b.start()
        yield relay, a, b, work
    finally:
        for dev in (a, b):
            dev.stop()
        relay.stop()


def _spaces(dev: Device) -> dict[str, dict[str, Any]]:
    st = dev.status()
    assert st is not None and st["agent_running"]
    return {s["name"]: s for s in st["spaces"]}


def _device(space: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in space["devices"] if d["name"] == name)


def test_status_every_field(setup: Setup) -> None:
    relay, a, b, work = setup

    def settled() -> dict[str, dict[str, Any]] | None:
        spaces = _spaces(a)
        if set(spaces) != {"notes", "work"}:
            return None
        for s in spaces.values():
            if s["state"] != "idle" or not s["relay"]["connected"] or s["pending_out"]:
                return None
        peer = _device(spaces["notes"], "b") if len(spaces["notes"]["devices"]) == 2 else None
        if peer is None or not peer["online"] or not peer["last_seen"] or not peer["platform"]:
            return None
        return spaces

    spaces = wait_until(settled, timeout=60, what="a idle in both spaces, b online")
    for s in spaces.values():
        assert set(s) >= SPACE_FIELDS, SPACE_FIELDS - set(s)
        assert s["pending_out_bytes"] == 0 and s["pending_in"] == 0
        assert s["conflicts"] == 0 and s["relay"]["url"] == relay.url
        me = _device(s, "a")
        assert set(me) >= DEVICE_FIELDS and me["this_device"] and me["online"]
        assert me["role"] == "admin" and me["platform"]
    assert Path(spaces["work"]["folder"]).resolve() == work.resolve()
    assert [d["name"] for d in spaces["work"]["devices"]] == ["a"]
    peer = _device(spaces["notes"], "b")
    assert peer["role"] == "member" and peer["path"] in ("lan", "relay")
    assert len(peer["short_id"]) < len(peer["id"])

    # A burst: the rate over the last seconds is > 0 up on a, down on b.
    for i in range(40):
        a.write(f"burst/{i}.txt", f"{i}\n" + "x" * 4000)
    wait_until(lambda: _spaces(a)["notes"]["rate_up_bps"] > 0, what="a's up rate > 0")
    wait_until(lambda: _spaces(b)["notes"]["rate_down_bps"] > 0, what="b's down rate > 0")
    wait_until(lambda: b.read("burst/39.txt") is not None, what="the burst reaches b")

    # Relay down: pending items and bytes go up in both spaces...
    relay.stop()
    wait_until(
        lambda: all(not s["relay"]["connected"] for s in _spaces(a).values()), what="a offline"
    )
    a.write("offline.txt", "written while the relay is down\n")
    (work / "w.txt").write_text("work, offline\n")

    def pending_up() -> dict[str, dict[str, Any]] | None:
        spaces = _spaces(a)
        ok = all(s["pending_out"] > 0 and s["pending_out_bytes"] > 0 for s in spaces.values())
        return spaces if ok else None

    spaces = wait_until(pending_up, what="pending up in both spaces while the relay is down")
    for s in spaces.values():
        assert s["state"] == "offline"
        assert s["pending_out_bytes"] >= s["pending_out"] * 100  # sealed envelopes, not counts

    # ... and back to 0 after it returns (same port, same data).
    relay.start()
    wait_until(settled, timeout=60, what="both spaces drained after the relay is back")
    wait_until(lambda: b.read("offline.txt") is not None, what="offline change reaches b")
    assert _spaces(a)["notes"]["pending_out_bytes"] == 0

    # Human view on a pipe: plain text, one line per space and per device.
    out = cli(a.home, "status").stdout
    assert "\x1b" not in out
    assert "space   notes" in out and "space   work" in out
    assert "pending up 0 (0 B) down 0 (0 B)" in out
    assert any(f"  {peer['short_id']}  b  member  online" in line for line in out.splitlines())

    # The peer stops: offline for a (the relay says it left, its LAN connection is gone).
    b.stop()
    wait_until(lambda: not _device(_spaces(a)["notes"], "b")["online"], what="b offline for a")
    assert _device(_spaces(a)["notes"], "a")["online"]
