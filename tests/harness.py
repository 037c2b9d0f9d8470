"""Real-process test harness: a relay process and agent processes on loopback.

Everything waits on conditions with deadlines (`wait_until`); nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
DEFAULT_TIMEOUT = 20.0


def wait_until(
    cond: Callable[[], Any],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll `cond` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what} (last: {last_exc!r})"
            )
        time.sleep(interval)


def control_status(sock: Path, timeout: float = 30) -> dict[str, Any] | None:
    """The agent's status report through its control socket, normalized by the same model the
    CLI prints; None when no agent listens there."""
    from qmoi_sync.agent.control import AgentNotRunning, request_blocking
    from qmoi_sync.agent.status import StatusReport

    try:
        result = request_blocking(sock, {"cmd": "status"}, timeout)
    except AgentNotRunning:
        return None
    report: dict[str, Any] = json.loads(StatusReport.model_validate(result).model_dump_json())
    return report


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(
    home: Path | None,
    *args: str,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [PY, "-m", "qmoi_sync.agent"]
    if home is not None:
        cmd += ["--home", str(home)]
    cmd += list(args)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


@dataclass
class Relay:
    data: Path
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, extra: tuple[str, ...] = (), timeout: float = DEFAULT_TIMEOUT) -> Relay:
        if not self.port:
            self.port = free_port()
        self.log_path = self.data.parent / f"relay-{self.port}.log"
        logf = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "qmoi_sync.agent",
                "relay",
                "serve",
                "--host",
                "127.0.0.1",
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
        wait_until(lambda: self._listening(), timeout=timeout, what=f"relay on port {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"relay exited early:\n{self.log()}")
        return port_open(self.port)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class Device:
    home: Path
    folder: Path
    name: str
    proc: subprocess.Popen[str] | None = None
    space: str = "notes"
    # extra environment for the agent process (e.g. QMOI_SYNC_TEST_RESOURCES)
    env: dict[str, str] = field(default_factory=dict)
    # a command the agent process runs under (e.g. setpriv dropping capabilities)
    wrap: tuple[str, ...] = ()
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home.parent / f"agent-{self.name}.log"

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return cli(self.home, *args, check=check, timeout=timeout)

    def init(self) -> Device:
        self.cli("init", "--name", self.name)
        return self

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> Device:
        logf = open(self.log_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.wrap, PY, "-m", "qmoi_sync.agent", "--home", str(self.home), "run"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env},
        )
        wait_until(self._ready, timeout=timeout, what=f"agent {self.name} ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent {self.name} exited early:\n{self.log()}")
        st = self.status()
        return bool(st and st.get("agent_running"))

    def status(self) -> dict[str, Any] | None:
        """What `status --json` prints. A running agent is asked on its control socket directly,
        as the CLI does: a CLI process per poll costs ~0.4 s of CPU on the same two cores the
        agents under test need. With no agent answering, the CLI's offline report (or None)."""
        report = control_status(self.home / "control.sock")
        if report is not None:
            return report
        proc = self.cli("status", "--json", check=False, timeout=30)
        if proc.returncode not in (0, 3):
            return None
        return json.loads(proc.stdout)

    def space_status(self, name: str | None = None) -> dict[str, Any]:
        st = self.status() or {}
        for s in st.get("spaces", []):
            if name is None or name in (s["name"], s["id"]):
                return s
        raise KeyError(f"no space {name} in status of {self.name}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    # -- files ------------------------------------------------------------------------------
    def write(self, rel: str, text: str) -> None:
        p = self.folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def read(self, rel: str) -> str | None:
        try:
            return (self.folder / rel).read_text()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def tree(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for p in sorted(self.folder.rglob("*")):
            if p.is_file() and not p.name.startswith(".qmoi-tmp"):
                out[p.relative_to(self.folder).as_posix()] = p.read_bytes()
        return out


def create_space(dev: Device, relay: Relay | None, space: str = "notes") -> str:
    args = ["space", "create", space, "--folder", str(dev.folder)]
    if relay is not None:
        args += ["--relay", relay.url]
    dev.space = space
    return dev.cli(*args).stdout.strip().splitlines()[-1]


def invite(admin: Device, space: str = "notes", *extra: str) -> str:
    return admin.cli("invite", space, *extra).stdout.strip().splitlines()[-1]


def join(dev: Device, token: str, space: str = "notes", timeout: float = 60) -> None:
    dev.cli("join", token, "--folder", str(dev.folder), "--name", space, timeout=timeout)
    dev.space = space


@contextlib.contextmanager
def cluster(
    tmp: Path, names: tuple[str, ...] = ("a", "b"), with_relay: bool = True
) -> Iterator[tuple[Relay | None, list[Device]]]:
    """A relay and running, joined devices sharing space `notes`. Stops everything at exit."""
    relay = Relay(tmp / "relay-data").start() if with_relay else None
    devices = [Device(tmp / f"home-{n}", tmp / f"folder-{n}", n).init() for n in names]
    try:
        create_space(devices[0], relay)
        devices[0].start()
        for dev in devices[1:]:
            join(dev, invite(devices[0]))
            dev.start()
        yield relay, devices
    finally:
        for dev in devices:
            dev.stop()
        if relay is not None:
            relay.stop()


def ensure_running(relay: Relay | None, devices: list[Device]) -> None:
    """Start the relay and any device whose agent is not running (a module-scoped cluster
    shared by several tests stays usable after a test that stopped or killed something)."""
    if relay is not None and (relay.proc is None or relay.proc.poll() is not None):
        relay.start()
    for dev in devices:
        if dev.proc is None or dev.proc.poll() is not None:
            dev.start()


def trees_equal(devices: list[Device]) -> bool:
    first = devices[0].tree()
    return all(d.tree() == first for d in devices[1:])


def wait_converged(
    devices: list[Device], timeout: float = 30, what: str = "trees to converge"
) -> dict[str, bytes]:
    def check() -> dict[str, bytes] | None:
        if not trees_equal(devices):
            return None
        return devices[0].tree() or {"": b""}

    return wait_until(check, timeout=timeout, what=what)  # type: ignore[no-any-return]


def wait_idle(dev: Device, timeout: float = 30) -> None:
    wait_until(
        lambda: dev.space_status()["pending_out"] == 0,
        timeout=timeout,
        what=f"{dev.name} outbox empty",
    )


def grep_bytes(root: Path, needles: list[bytes]) -> list[tuple[str, bytes]]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for n in needles:
                if n in data:
                    hits.append((str(p), n))
    return hits


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


__all__ = [
    "Device",
    "Relay",
    "cli",
    "cluster",
    "create_space",
    "ensure_running",
    "free_port",
    "grep_bytes",
    "invite",
    "join",
    "trees_equal",
    "wait_converged",
    "wait_idle",
    "wait_until",
]
