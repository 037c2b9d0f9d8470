"""Fault-injection helpers shared by tests/faults and bench/crash_soak.py: agents armed with a
crash point (agent/crashpoint.py), the checks that a killed agent's state reopens cleanly, and a
tiny tmpfs for full-disk tests.

Everything waits on conditions with deadlines; nothing sleeps blindly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

from harness import PY, Device, wait_until

from qmoi_sync.agent.crashpoint import ENV as CRASH_ENV
from qmoi_sync.agent.crashpoint import MARK

# Log lines that mean the state did not reopen cleanly after a kill.
BAD_STATE = re.compile(
    r"database is locked|database disk image is malformed|file is not a database|"
    r"no such table|Traceback",
)
TEMP_PREFIX = ".qmoi-tmp-"


def deaths(dev: Device) -> list[str]:
    """The crash points this device's agent died at so far (from its log), in order."""
    return [ln.split(MARK, 1)[1].strip() for ln in dev.log().splitlines() if MARK in ln]


# per device name: how many planned deaths its log showed when its agent was last started
_deaths_at_start: dict[str, int] = {}


def start_armed(dev: Device, spec: str | None, timeout: float = 90) -> bool:
    """Start ``dev``'s agent with crash point ``spec`` armed (None: disarmed). True once it is
    ready; False if it died at its crash point while starting (also a planned death). Any other
    early exit fails."""
    if spec is None:
        dev.env.pop(CRASH_ENV, None)
    else:
        dev.env[CRASH_ENV] = spec
    before = _deaths_at_start[dev.name] = len(deaths(dev))
    logf = open(dev.log_path, "a")  # noqa: SIM115 - lives as long as the process
    dev.proc = subprocess.Popen(
        [*dev.wrap, PY, "-m", "qmoi_sync.agent", "--home", str(dev.home), "run"],
        stdout=logf,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **dev.env},
    )

    def ready() -> bool | str:
        assert dev.proc is not None
        if dev.proc.poll() is not None:
            if len(deaths(dev)) > before:
                return "died"
            raise AssertionError(f"agent {dev.name} exited early:\n{dev.log()[-4000:]}")
        st = dev.status()
        return bool(st and st.get("agent_running"))

    got = wait_until(ready, timeout=timeout, what=f"agent {dev.name} ready (armed {spec})")
    if got == "died":
        dev.proc = None
        return False
    return True


def wait_planned_death(dev: Device, timeout: float = 60) -> str:
    """Wait until ``dev``'s agent (started by start_armed) has killed itself at its armed crash
    point; the point's name and hit count. Any other exit fails."""
    proc = dev.proc
    if proc is not None:
        try:
            wait_until(lambda: proc.poll() is not None, timeout=timeout, what=f"{dev.name} dies")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; armed {dev.env.get(CRASH_ENV)}") from None
        dev.proc = None
        if proc.returncode != -signal.SIGKILL:
            raise AssertionError(f"{dev.name} exited {proc.returncode}:\n{dev.log()[-4000:]}")
    got = deaths(dev)
    if len(got) <= _deaths_at_start.get(dev.name, 0):
        raise AssertionError(f"{dev.name} died but not at a crash point:\n{dev.log()[-4000:]}")
    return got[-1]


def db_integrity(dev: Device) -> str:
    """SQLite's own full check of the agent's state (run while the agent is stopped)."""
    con = sqlite3.connect(dev.home / "state.db", timeout=10)
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def stray_temps(folder: Path) -> list[str]:
    """Temp files of the agent's own still visible in a space folder."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob(f"{TEMP_PREFIX}*") if p.exists()
    )


def bad_state_lines(dev: Device) -> list[str]:
    return [ln for ln in dev.log().splitlines() if BAD_STATE.search(ln)]


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (needs root), unmounted (lazily if busy) at exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:

        def unmounted() -> bool:
            # a process that held a file there may still be exiting
            return subprocess.run(["umount", str(path)], capture_output=True).returncode == 0

        try:
            wait_until(unmounted, timeout=10, what=f"unmount {path}", interval=0.1)
        except AssertionError:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0
