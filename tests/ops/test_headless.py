"""The agent as a service runs it: `run --headless` (JSON lines), SIGTERM, SIGHUP."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from harness import PY, Device, Relay, cluster, create_space, wait_converged, wait_until

from qmoi_sync.agent.home import Home
from qmoi_sync.agent.membership_ops import create_space as create_space_record
from qmoi_sync.agent.store import Store

STOPPED_LINE = "agent stopped: every batch finished, database closed"


class HeadlessDevice(Device):
    """A device whose agent runs `run --headless`: stdout and stderr kept apart."""

    @property
    def err_path(self) -> Path:
        return self.home.parent / f"agent-{self.name}.err"

    def start(self) -> HeadlessDevice:
        out = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        err = open(self.err_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "qmoi_sync.agent", "--home", str(self.home), "run", "--headless"],
            stdout=out,
            stderr=err,
            text=True,
        )
        wait_until(self._ready, what=f"headless agent {self.name} ready")
        return self

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines()]


def test_headless_prints_json_lines(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay-data").start()
    dev = HeadlessDevice(tmp_path / "home", tmp_path / "folder", "h").init()
    try:
        create_space(dev, relay)
        dev.start()
        dev.write("a.txt", "json please\n")
        wait_until(lambda: dev.space_status()["files"] == 1, what="file ingested")
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: any(r["msg"].startswith("reloaded configuration") for r in dev.records()),
            what="reload logged",
        )
        dev.proc.send_signal(signal.SIGTERM)
        assert dev.proc.wait(timeout=30) == 0
    finally:
        dev.stop()
        relay.stop()
    lines = dev.log().splitlines()
    assert lines, "no output"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for rec in records:
        assert set(rec) >= {"ts", "level", "logger", "msg"}, rec
        assert rec["level"] in ("debug", "info", "warning", "error", "critical")
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("agent running: device ") for m in msgs)
    assert "reloaded configuration: nothing changed" in msgs
    assert msgs[-1] == STOPPED_LINE
    assert dev.err_path.read_text() == ""


def test_sigterm_mid_burst_loses_nothing(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        assert a.proc is not None
        expected = {f"burst/f{i:03}.txt": f"file {i}\n" * 20 for i in range(100)}
        for i, (rel, text) in enumerate(expected.items()):
            a.write(rel, text)
            if i == 50:
                a.proc.send_signal(signal.SIGTERM)  # the loop keeps writing while it stops
        assert a.proc.wait(timeout=60) == 0, a.log()
        log = a.log()
        assert STOPPED_LINE in log
        assert "Traceback" not in log
        a.start()

        def all_on_b() -> bool:
            return all(b.read(rel) == text for rel, text in expected.items())

        wait_until(all_on_b, timeout=60, what="all 100 files on b after the restart")
        tree = wait_converged([a, b])
        assert {k: v.decode() for k, v in tree.items() if k.startswith("burst/")} == expected


async def _add_space_while_running(home: Path, folder: Path, relay_url: str) -> str:
    """What an out-of-process `space add` does: a row in the agent's database (WAL lets a second
    writer in), then SIGHUP for the running agent to pick it up."""
    h = Home(home)
    store = await Store.open(h.db_path)
    try:
        record = await create_space_record(
            store, h.load_identity(), h.root, "work", folder, relay_url, False
        )
    finally:
        await store.close()
    return record.space_id


def test_sighup_reloads_name_and_spaces_without_dropping_connections(tmp_path: Path) -> None:
    with cluster(tmp_path) as (relay, (a, b)):
        assert relay is not None and a.proc is not None
        for d in (a, b):
            wait_until(lambda d=d: d.space_status()["relay"]["connected"], what="connected")
        wait_until(
            lambda: any(m["name"] == "a" for m in b.space_status()["devices"]),
            what="b knows a's name",
        )
        opened_before = relay.log().count("connection open")
        pid = a.proc.pid

        config_path = a.home / "device.json"
        config = json.loads(config_path.read_text())
        config["name"] = "a-renamed"
        config_path.write_text(json.dumps(config))
        work = tmp_path / "work-a"
        space_id = asyncio.run(_add_space_while_running(a.home, work, relay.url))
        a.proc.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            st = a.status() or {}
            return st.get("device", {}).get("name") == "a-renamed" and len(st["spaces"]) == 2

        wait_until(reloaded, what="status shows the new name and the new space")
        wait_until(lambda: a.space_status("work")["relay"]["connected"], what="work connected")
        (work / "plan.txt").write_text("new space syncs\n")
        wait_until(lambda: a.space_status("work")["files"] == 1, what="work ingests")
        # The other device learns the new name (DeviceInfo travels end-to-end encrypted).
        wait_until(
            lambda: any(m["name"] == "a-renamed" for m in b.space_status()["devices"]),
            what="b sees a-renamed",
        )
        # Same process; the existing link was kept: the only new relay connection is "work"'s.
        assert a.proc.pid == pid and a.proc.poll() is None
        assert relay.log().count("connection open") == opened_before + 1
        assert (
            f"reloaded configuration: device name 'a' -> 'a-renamed'; "
            f"started space work ({space_id[:8]})"
        ) in a.log()
        a.write("still.txt", "notes still syncs\n")
        wait_until(lambda: b.read("still.txt") == "notes still syncs\n", what="notes a→b")
