"""`qmoi-sync doctor` against real relays and agents (and a few pure checks)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from harness import Device, Relay, cli, cluster, create_space, free_port, wait_until
from tlscert import self_signed
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from qmoi_sync.agent.doctor import check_disks, check_inotify, probe_relay, relay_checks


def _lines(out: str) -> dict[str, tuple[str, str]]:
    """check name -> (STATUS, message) from the readable output."""
    result = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("OK", "WARN", "FAIL"):
            name, _, msg = rest.strip().partition(": ")
            result[name] = (status.strip(), msg)
    return result


def _doctor_json(dev: Device, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = cli(dev.home, "doctor", "--json", check=False, env=env)
    return proc.returncode, json.loads(proc.stdout)


def test_all_ok_with_running_relay_and_agent(tmp_path: Path) -> None:
    with cluster(tmp_path, names=("a",)) as (relay, (a,)):
        assert relay is not None
        a.write("x/y/z.txt", "hello\n")
        wait_until(lambda: a.space_status()["files"] == 1, what="file ingested")
        wait_until(lambda: a.space_status()["relay"]["connected"], what="agent connected")
        proc = cli(a.home, "doctor")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        checks = _lines(proc.stdout)
        expected = {
            "home",
            "device key",
            "folder notes",
            "disk",
            "inotify",
            f"relay {relay.url}",
            f"clock {relay.url}",
            "agent",
            "sync notes",
        }
        assert expected <= set(checks), proc.stdout
        for name, (status, msg) in checks.items():
            # Disk may legitimately warn on a nearly full CI machine; everything else is OK.
            assert status == "OK" or name == "disk", f"{name}: {status} {msg}"
        assert "round trip" in checks[f"relay {relay.url}"][1]
        assert checks["folder notes"][1].endswith("(3 directories, read/write)")
        assert proc.stdout.rstrip().endswith("0 failure(s)")

        code, report = _doctor_json(a)
        assert code == 0 and report["ok"] is True and report["schema_version"] == 1
        by_name = {c["name"]: c for c in report["checks"]}
        assert 0 < by_name[f"relay {relay.url}"]["data"]["rtt_ms"] < 1000
        assert abs(by_name[f"clock {relay.url}"]["data"]["skew_s"]) < 2
        assert by_name["inotify"]["data"]["dirs"] == 3
        assert by_name["device key"]["data"]["mode"] == "600"


def test_stopped_relay_fails_readably(tmp_path: Path) -> None:
    with cluster(tmp_path, names=("a",)) as (relay, (a,)):
        assert relay is not None
        relay.stop()
        proc = cli(a.home, "doctor", check=False)
        assert proc.returncode == 1, proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
        checks = _lines(proc.stdout)
        status, msg = checks[f"relay {relay.url}"]
        assert status == "FAIL"
        assert msg == f"connection refused by 127.0.0.1:{relay.port}"
        lines = proc.stdout.splitlines()
        fix = lines[lines.index(f"FAIL  relay {relay.url}: {msg}") + 1]
        assert fix.startswith("      fix: is the relay running?")
        assert f"TCP port {relay.port}" in fix
        assert checks["agent"][0] == "OK"  # the agent itself runs
        code, report = _doctor_json(a)
        assert code == 1 and report["ok"] is False
        failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
        assert failed == [f"relay {relay.url}"]


def test_agent_not_running_key_mode_and_missing_folder(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay-data").start()
    try:
        dev = Device(tmp_path / "home", tmp_path / "folder", "d").init()
        create_space(dev, relay)
        os.chmod(dev.home / "device.key", 0o644)
        dev.folder.rmdir()
        proc = cli(dev.home, "doctor", check=False)
        assert proc.returncode == 1
        checks = _lines(proc.stdout)
        assert checks["device key"][0] == "FAIL"
        assert f"chmod 600 {dev.home / 'device.key'}" in proc.stdout
        assert checks["folder notes"] == (
            "FAIL",
            f"{dev.folder} does not exist (moved, deleted, or an unmounted drive?)",
        )
        assert checks["agent"] == ("FAIL", "not running: nothing syncs")
        assert checks[f"relay {relay.url}"][0] == "OK"
    finally:
        relay.stop()


def test_uninitialized_home(tmp_path: Path) -> None:
    proc = cli(tmp_path / "nothing", "doctor", check=False)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"FAIL  home: {tmp_path / 'nothing'} does not exist\n")
    assert "init --name NAME" in proc.stdout


def test_wss_relay_tls_is_verified(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    relay = Relay(tmp_path / "relay-data")
    relay.start(extra=("--tls-cert", str(cert), "--tls-key", str(key)))
    url = f"wss://127.0.0.1:{relay.port}"
    try:
        dev = Device(tmp_path / "home", tmp_path / "folder", "t").init()
        dev.cli("space", "create", "notes", "--folder", str(dev.folder), "--relay", url)
        proc = cli(dev.home, "doctor", check=False)
        status, msg = _lines(proc.stdout)[f"relay {url}"]
        assert status == "FAIL"
        assert msg.startswith("TLS certificate of 127.0.0.1 is not trusted: ")
        assert "self-signed certificate" in msg
        # Trusting the relay's certificate (a private CA) makes it pass, still verified.
        proc = cli(dev.home, "doctor", check=False, env={"SSL_CERT_FILE": str(cert)})
        status, msg = _lines(proc.stdout)[f"relay {url}"]
        assert status == "OK", msg
        assert msg.endswith("(TLS verified)")
        assert _lines(proc.stdout)[f"clock {url}"][0] == "OK"
    finally:
        relay.stop()


def test_clock_skew_is_read_from_the_handshake_date_header() -> None:
    async def main() -> None:
        async def handler(ws: ServerConnection) -> None:
            await ws.wait_closed()

        def late_clock(_conn: ServerConnection, _req: Request, response: Response) -> Response:
            del response.headers["Date"]
            response.headers["Date"] = email.utils.formatdate(time.time() - 300, usegmt=True)
            return response

        port = free_port()
        async with serve(handler, "127.0.0.1", port, process_response=late_clock):
            probe = await probe_relay(f"ws://127.0.0.1:{port}", timeout=5)
        assert probe.error is None
        assert probe.skew_s is not None and abs(probe.skew_s + 300) < 2
        checks = relay_checks(f"ws://127.0.0.1:{port}", probe)
        assert [c.status for c in checks] == ["ok", "warn"]
        assert re.match(r"relay clock behind by (299|300)\.\d s \(±0\.5 s\)", checks[1].message)
        assert "timedatectl set-ntp true" in (checks[1].fix or "")

    asyncio.run(main())


def test_not_a_websocket_server() -> None:
    async def main() -> None:
        async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(http, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            probe = await probe_relay(f"ws://127.0.0.1:{port}", timeout=5)
        assert probe.error == f"127.0.0.1:{port} answered HTTP 404 instead of a websocket upgrade"

    asyncio.run(main())


def test_inotify_limits(tmp_path: Path) -> None:
    proc = tmp_path / "inotify"
    proc.mkdir()
    (proc / "max_user_instances").write_text("128\n")
    (proc / "max_user_watches").write_text("8192\n")
    assert check_inotify(100, 1, proc).status == "ok"
    warn = check_inotify(5000, 1, proc)
    assert warn.status == "warn"
    fail = check_inotify(10000, 1, proc)
    assert fail.status == "fail"
    assert fail.fix is not None
    assert fail.fix.startswith("sudo sysctl fs.inotify.max_user_watches=524288")
    assert "/etc/sysctl.d/" in fail.fix
    big = check_inotify(600000, 1, proc)
    assert "max_user_watches=2097152" in (big.fix or "")
    assert check_inotify(10, 200, proc).status == "fail"


def test_disk_check_reports_each_filesystem_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    checks = check_disks([tmp_path, tmp_path / "a"])
    assert len(checks) == 1
    vfs = os.statvfs(tmp_path)
    assert checks[0].data["free_bytes"] == vfs.f_bavail * vfs.f_frsize
