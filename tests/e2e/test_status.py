"""`qmoi-sync status [--json]` against real agents: the JSON schema scripts rely on, the outbox
count while the relay is down, and the not-running case (clear message, exit code 3)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from harness import Device, Relay, cli, cluster, ensure_running, wait_until

STATES = {"idle", "syncing", "offline", "error"}
Pair = tuple[Relay, Device, Device]


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with cluster(tmp_path_factory.mktemp("status")) as (relay, (a, b)):
        assert relay is not None
        yield relay, a, b


@pytest.fixture
def pair(_shared: Pair) -> Pair:
    relay, a, b = _shared
    ensure_running(relay, [a, b])
    return _shared


def _status_json(dev: Device) -> tuple[int, dict[str, Any]]:
    proc = cli(dev.home, "status", "--json", check=False)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _check_schema(report: dict[str, Any], dev: Device, running: bool) -> dict[str, Any]:
    assert set(report) >= {"device", "agent_running", "spaces"}, report.keys()
    device = report["device"]
    assert isinstance(device["id"], str) and re.fullmatch(r"[A-Z2-7-]{20,}", device["id"]), device
    assert device["name"] == dev.name
    assert report["agent_running"] is running
    assert isinstance(report["spaces"], list) and len(report["spaces"]) == 1
    space = report["spaces"][0]
    for key, typ in {
        "id": str,
        "name": str,
        "folder": str,
        "state": str,
        "relay": dict,
        "pending_out": int,
        "conflicts": int,
        "warnings": list,
        "offenders": list,
        "gaps": list,
    }.items():
        assert isinstance(space.get(key), typ), f"{key}: {space.get(key)!r}"
    assert "last_sync" in space
    assert space["last_sync"] is None or isinstance(space["last_sync"], str)
    assert re.fullmatch(r"[0-9a-f]{32}", space["id"]), space["id"]
    assert space["name"] == "notes"
    assert Path(space["folder"]).resolve() == dev.folder.resolve()
    assert space["state"] in STATES, space["state"]
    assert isinstance(space["relay"]["connected"], bool)
    assert isinstance(space["relay"]["url"], str) and space["relay"]["url"].startswith("ws://")
    assert all(isinstance(w, str) for w in space["warnings"])
    assert space["pending_out"] >= 0 and space["conflicts"] >= 0
    return space


def test_status_json_schema_and_pending_out(pair: Pair) -> None:
    relay, a, b = pair
    a.write("hello.txt", "hello\n")
    wait_until(lambda: b.read("hello.txt") == "hello\n", what="a first sync")

    def settled(dev: Device) -> dict[str, Any] | None:
        code, report = _status_json(dev)
        assert code == 0
        space = _check_schema(report, dev, running=True)
        ok = space["state"] == "idle" and space["pending_out"] == 0
        return space if ok and space["relay"]["connected"] else None

    for dev in (a, b):
        space = wait_until(lambda dev=dev: settled(dev), what=f"{dev.name} idle")
        assert space["relay"]["url"] == relay.url
        assert space["conflicts"] == 0
        assert space["last_sync"] is not None
        datetime.fromisoformat(space["last_sync"])
    assert a.space_status()["id"] == b.space_status()["id"]

    # Relay down: the space goes offline and local changes pile up in the outbox.
    relay.stop()
    wait_until(
        lambda: (st := a.space_status())["state"] == "offline" and not st["relay"]["connected"],
        what="a offline",
    )
    a.write("one.txt", "1\n")
    first = wait_until(
        lambda: a.space_status()["pending_out"], what="pending_out > 0 while relay down"
    )
    a.write("two.txt", "2\n")
    a.write("hello.txt", "hello\nedited offline\n")
    second = wait_until(
        lambda: (n := a.space_status()["pending_out"]) > first and n,
        what="pending_out grows with more offline changes",
    )
    code, report = _status_json(a)
    assert code == 0
    space = _check_schema(report, a, running=True)
    assert space["state"] == "offline" and space["pending_out"] >= second

    # Relay back (same port, same data): the outbox drains to 0 and b has everything.
    relay.start()
    wait_until(lambda: settled(a), what="a back to idle with an empty outbox")
    wait_until(
        lambda: b.read("two.txt") == "2\n" and b.read("hello.txt") == "hello\nedited offline\n",
        what="offline changes reach b",
    )


def test_status_when_agent_not_running(pair: Pair) -> None:
    _relay, a, _b = pair
    code, report = _status_json(a)
    assert code == 0 and report["agent_running"] is True
    a.stop()

    human = cli(a.home, "status", check=False)
    assert human.returncode == 3, (human.returncode, human.stdout, human.stderr)
    text = (human.stdout + human.stderr).lower()
    assert "not running" in text, text
    assert "traceback" not in text

    code, report = _status_json(a)
    assert code == 3
    assert report["agent_running"] is False
    assert report["device"]["name"] == "a"
    space = report["spaces"][0]
    assert space["name"] == "notes"
    assert space["relay"]["connected"] is False
