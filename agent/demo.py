"""`qmoi-sync demo`: an embedded relay and two agents on temporary folders, syncing for real.

Everything runs as separate processes through the same CLI a user types, so what you watch is the
product, not a simulation. It makes a few edits (including a concurrent edit of one file on both
devices while one is offline), shows live status, and cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable


class DemoError(Exception):
    pass


def _say(msg: str) -> None:
    print(msg, flush=True)


def _cli(home: Path, *args: str) -> str:
    proc = subprocess.run(
        [PY, "-m", "qmoi_sync.agent", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise DemoError(f"`qmoi-sync {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _status_line(home: Path, label: str) -> str:
    out = subprocess.run(
        [PY, "-m", "qmoi_sync.agent", "--home", str(home), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        report = json.loads(out.stdout)
    except ValueError:
        return f"  {label}: (no status)"
    if not report.get("agent_running"):
        return f"  {label}: agent stopped"
    s = report["spaces"][0]
    return (
        f"  {label}: {s['state']:<8} relay {'up' if s['relay']['connected'] else 'down'}  "
        f"files {s['files']}  pending {s['pending_out']}  conflicts {s['conflicts']}"
    )


def run_demo(keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="qmoi-demo-"))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        log = open(root / f"{args[1] if args[0] == '--home' else 'relay'}.log", "ab")  # noqa: SIM115
        # The demo shows the relay path between two devices on this machine: LAN discovery
        # (mDNS on the real network) stays off for its agents.
        env = {**os.environ, "QMOI_SYNC_LAN": "off"}
        p = subprocess.Popen([PY, "-m", "qmoi_sync.agent", *args], stdout=log, stderr=log, env=env)
        procs.append(p)
        return p

    a_home, b_home = root / "laptop-home", root / "desktop-home"
    a_dir, b_dir = root / "laptop", root / "desktop"
    try:
        port = _free_port()
        url = f"ws://127.0.0.1:{port}"
        _say(f"qmoi-sync demo in {root}\n")
        _say(f"1. starting an embedded relay on {url} (it only ever sees ciphertext)")
        spawn(
            "relay",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data",
            str(root / "relay"),
        )
        _wait(lambda: _port_open(port), "the relay to listen")

        _say("2. creating two devices, 'laptop' and 'desktop'")
        _cli(a_home, "init", "--name", "laptop")
        _cli(b_home, "init", "--name", "desktop")
        a_dir.mkdir()
        (a_dir / "notes.md").write_text("# Shopping\n- milk\n- bread\n\n# Ideas\n- sync tool\n")
        (a_dir / "todo").mkdir()
        (a_dir / "todo" / "today.txt").write_text("write the demo\n")
        space_id = _cli(a_home, "space", "create", "notes", "--folder", str(a_dir), "--relay", url)
        _say(f"   laptop created space 'notes' ({space_id.strip()[:12]}…) on {a_dir}")
        a_proc = spawn("--home", str(a_home), "run")
        _wait(lambda: _agent_up(a_home), "the laptop agent")

        token = _cli(a_home, "invite", "notes").strip().splitlines()[-1]
        _say(f"3. laptop invites desktop with a one-time token: {token[:24]}…")
        _cli(b_home, "join", token, "--folder", str(b_dir), "--name", "notes")
        b_proc = spawn("--home", str(b_home), "run")
        _wait(lambda: _agent_up(b_home), "the desktop agent")
        took = _wait(lambda: _read(b_dir / "notes.md") is not None, "the first sync")
        _say(f"   desktop received the folder in {took * 1000:.0f} ms")
        _say(_status_line(a_home, "laptop ") + "\n" + _status_line(b_home, "desktop"))

        _say("\n4. a live edit on the laptop…")
        t0 = time.monotonic()
        (a_dir / "todo" / "today.txt").write_text("write the demo\nship it\n")
        _wait(lambda: _read(b_dir / "todo" / "today.txt") == "write the demo\nship it\n", "edit")
        _say(f"   …is on the desktop {1000 * (time.monotonic() - t0):.0f} ms later")

        _say("\n5. the desktop goes offline; both devices edit notes.md concurrently")
        b_proc.send_signal(signal.SIGTERM)
        b_proc.wait(timeout=30)
        (a_dir / "notes.md").write_text(
            "# Shopping\n- milk\n- bread\n- coffee\n\n# Ideas\n- sync tool\n"
        )
        _say("   laptop added '- coffee' to the shopping list")
        (b_dir / "notes.md").write_text(
            "# Shopping\n- milk\n- bread\n\n# Ideas\n- sync tool\n- merge, don't copy\n"
        )
        _say("   desktop (offline) added an idea")
        _say(_status_line(b_home, "desktop"))
        _say("   desktop comes back…")
        spawn("--home", str(b_home), "run")
        expected = (
            "# Shopping\n- milk\n- bread\n- coffee\n\n# Ideas\n- sync tool\n- merge, don't copy\n"
        )
        took = _wait(
            lambda: _read(a_dir / "notes.md") == expected and _read(b_dir / "notes.md") == expected,
            "the concurrent edits to merge",
        )
        _say(f"   merged on both devices in {took:.2f} s, no conflict copy:\n")
        for line in expected.splitlines():
            _say(f"     {line}")
        conflicts = [p.name for p in a_dir.rglob("*sync-conflict*")]
        if conflicts:
            raise DemoError(f"unexpected conflict copies: {conflicts}")
        _say("\n" + _status_line(a_home, "laptop ") + "\n" + _status_line(b_home, "desktop"))
        _say("\n6. the relay's storage holds no file names or contents:")
        leaked = _grep(root / "relay", [b"coffee", b"notes.md", b"Shopping"])
        _say("   checked: nothing readable" if not leaked else f"   LEAK: {leaked}")
        _say("\ndemo finished: stopping agents and relay")
        a_proc.send_signal(signal.SIGTERM)
        return 0 if not leaked else 1
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if keep:
            _say(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _agent_up(home: Path) -> bool:
    return (home / "control.sock").exists()


def _grep(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            data = Path(dirpath, f).read_bytes()
            hits += [f"{f}:{n.decode()}" for n in needles if n in data]
    return hits
