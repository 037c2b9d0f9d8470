"""The units' sandbox settings hold for the real relay and agent, exercised end to end.

No systemd manager runs here, so the two kernel mechanisms are applied directly:
- `MemoryDenyWriteExecute=yes` is the kernel's PR_SET_MDWE (systemd uses it where available):
  the relay and both agents run under it and sync.
- `SystemCallFilter=` / `RestrictAddressFamilies=`: the relay and an agent run under strace while
  they sync, reload and stop; every system call and socket family they used must be inside the
  unit's allow list, expanded by `systemd-analyze syscall-filter`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from harness import PY, Device, Relay, cli, create_space, free_port, invite, join, wait_until
from ops_helpers import (
    RELAY_UNIT,
    USER_UNIT,
    mdwe_prefix,
    syscall_set,
    traced_syscalls,
    unit_directives,
)


def _target_pid(proc: subprocess.Popen[str] | None) -> int:
    """The traced program's pid: strace's child, or the process itself (exec wrappers)."""
    assert proc is not None
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    exe = Path(f"/proc/{proc.pid}/exe")
    if exe.exists() and exe.resolve().name == "strace":
        kids = children.read_text().split()
        assert len(kids) == 1, kids
        return int(kids[0])
    return proc.pid


def _stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.kill(_target_pid(proc), signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WrappedRelay(Relay):
    prefix: list[str]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc)
        self.proc = None

    def start(self, extra: tuple[str, ...] = ()) -> WrappedRelay:
        if not self.port:
            self.port = free_port()
        self.log_path = self.data.parent / f"relay-{self.port}.log"
        logf = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                PY,
                "-m",
                "qmoi_sync.agent",
                "relay",
                "serve",
                "--port",
                str(self.port),
                "--data",
                str(self.data),
                *extra,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_until(self._listening, what=f"relay on port {self.port}", timeout=60)
        return self


class WrappedDevice(Device):
    prefix: list[str]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc)
        self.proc = None

    def start(self) -> WrappedDevice:
        logf = open(self.log_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, PY, "-m", "qmoi_sync.agent", "--home", str(self.home), "run"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_until(self._ready, what=f"agent {self.name} ready", timeout=60)
        return self


def _relay(tmp: Path, prefix: list[str]) -> WrappedRelay:
    r = WrappedRelay(tmp / "relay-data")
    r.prefix = prefix
    return r


def _device(tmp: Path, name: str, prefix: list[str]) -> WrappedDevice:
    d = WrappedDevice(tmp / f"home-{name}", tmp / f"folder-{name}", name)
    d.prefix = prefix
    return d


def _exercise(relay: Relay, a: Device, b: Device) -> None:
    """Create, join, sync both ways, edit, delete, reload: the paths a service goes through."""
    create_space(a, relay)
    a.start()
    join(b, invite(a))
    b.start()
    a.write("one.txt", "from a\n")
    wait_until(lambda: b.read("one.txt") == "from a\n", what="a→b", timeout=60)
    b.write("dir/two.txt", "from b\n")
    wait_until(lambda: a.read("dir/two.txt") == "from b\n", what="b→a", timeout=60)
    a.write("one.txt", "from a, edited\n")
    wait_until(lambda: b.read("one.txt") == "from a, edited\n", what="edit a→b", timeout=60)
    (b.folder / "dir/two.txt").unlink()
    wait_until(lambda: a.read("dir/two.txt") is None, what="delete b→a", timeout=60)
    os.kill(_target_pid(a.proc), signal.SIGHUP)
    wait_until(lambda: "reloaded configuration" in a.log(), what="reload", timeout=60)


def test_mdwe_blocks_writable_executable_memory() -> None:
    prefix = mdwe_prefix()
    proc = subprocess.run(
        [
            *prefix,
            PY,
            "-c",
            "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "PermissionError" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_relay_and_agents_work_under_memory_deny_write_execute(tmp_path: Path) -> None:
    prefix = mdwe_prefix()
    relay = _relay(tmp_path, prefix).start()
    a = _device(tmp_path, "a", prefix).init()
    b = _device(tmp_path, "b", prefix).init()
    try:
        _exercise(relay, a, b)
        assert cli(a.home, "doctor", check=False).returncode == 0
    finally:
        for d in (a, b):
            d.stop()
        relay.stop()
    for log in (relay.log(), a.log(), b.log()):
        assert "Traceback" not in log and "PermissionError" not in log


def _strace() -> str:
    exe = shutil.which("strace")
    if exe is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    probe = subprocess.run(
        [exe, "-f", "-qq", "-o", os.devnull, "/bin/true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr!r}")
    return exe


def _allowed(unit: Path) -> set[str]:
    """The unit's SystemCallFilter= lines, applied in order (allow list, then ~ removals)."""
    allowed: set[str] = set()
    for value in unit_directives(unit.read_text())["SystemCallFilter"]:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= syscall_set(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def _families(unit: Path) -> set[str]:
    (value,) = unit_directives(unit.read_text())["RestrictAddressFamilies"]
    return set(value.split())


@pytest.mark.slow
def test_syscalls_and_socket_families_stay_inside_the_units_filters(tmp_path: Path) -> None:
    strace = _strace()
    relay_trace, agent_trace = tmp_path / "relay.trace", tmp_path / "agent.trace"
    relay = _relay(tmp_path, [strace, "-f", "-qq", "-o", str(relay_trace)]).start()
    a = _device(tmp_path, "a", [strace, "-f", "-qq", "-o", str(agent_trace)]).init()
    b = _device(tmp_path, "b", []).init()
    try:
        _exercise(relay, a, b)
    finally:
        for d in (a, b):
            d.stop()  # SIGTERM: the shutdown path is traced too
        relay.stop()

    relay_calls, relay_fams = traced_syscalls(relay_trace)
    relay_allowed = _allowed(RELAY_UNIT)
    if os.geteuid() == 0:
        # SQLite fchown()s its journal/WAL files to the database owner only when running as
        # root; the relay unit's DynamicUser is never root.
        relay_allowed.add("fchown")
    assert "epoll_wait" in relay_calls and "accept4" in relay_calls  # the trace is real
    assert relay_calls - relay_allowed == set(), "relay system calls outside SystemCallFilter="
    assert relay_fams and relay_fams <= _families(RELAY_UNIT), relay_fams

    agent_calls, agent_fams = traced_syscalls(agent_trace)
    assert "inotify_add_watch" in agent_calls and "connect" in agent_calls
    assert agent_calls - _allowed(USER_UNIT) == set(), "agent system calls outside the filter"
    assert agent_fams and agent_fams <= _families(USER_UNIT), agent_fams
