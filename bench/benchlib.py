"""Shared helpers for the benchmark scenarios: real processes, control socket, inotify, results.

Everything here drives qmoi-sync exactly as a user does: the `qmoi-sync` console script for
`relay serve`, `init`, `space create`, `invite`, `join` and `run`. Only *status polling* skips
the CLI and speaks the agent's control socket directly (one JSON line each way, the same request
`qmoi-sync status --json` sends): a CLI subprocess per poll would cost ~0.3 s of CPU on the very
cores the agents are being measured on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import json
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CLI = shutil.which("qmoi-sync", path=str(Path(sys.executable).parent)) or shutil.which("qmoi-sync")

#: Set by run.py --profile: agents are started through bench/profiled_agent.py, which runs the
#: real CLI under cProfile / pyinstrument and writes the profile to this directory on exit.
PROFILE_ENV = "QMOI_BENCH_PROFILE_DIR"
PROFILER_ENV = "QMOI_BENCH_PROFILER"
#: Set by run.py --lan: leave LAN discovery/sync on (default: off, so the relay path is measured).
LAN_ENV = "QMOI_BENCH_LAN"


class BenchError(Exception):
    pass


# -------------------------------------------------------------------------- waiting, timing


def wait_until(
    cond: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.01,
) -> Any:
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
            raise BenchError(f"timed out after {timeout}s waiting for {what} (last: {last_exc!r})")
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank-with-interpolation percentile (numpy's default 'linear')."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -------------------------------------------------------------------------- processes


def _cmd(*args: str) -> list[str]:
    if CLI is None:
        raise BenchError("the qmoi-sync console script is not installed (pip install -e .)")
    return [CLI, *args]


def run_cli(home: Path | None, *args: str, timeout: float = 120) -> str:
    cmd = _cmd(*(["--home", str(home)] if home else []), *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc.stdout


def _agent_argv(*args: str) -> list[str]:
    """argv for a long-running agent/relay: the console script, or the profiling wrapper."""
    if os.environ.get(PROFILE_ENV) and os.environ.get(PROFILER_ENV) != "py-spy":
        return [sys.executable, str(BENCH_DIR / "profiled_agent.py"), *args]
    return _cmd(*args)


def _attach_py_spy(pid: int, role: str) -> subprocess.Popen[bytes] | None:
    """With --profile py-spy: sample `pid` until it exits (collapsed stacks, all threads)."""
    out = os.environ.get(PROFILE_ENV)
    if not out or os.environ.get(PROFILER_ENV) != "py-spy":
        return None
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise BenchError("py-spy is not installed (pip install py-spy)")
    Path(out).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--idle",
            "--threads",
            "-o",
            str(Path(out) / f"{role}-{pid}.txt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_proc(
    proc: subprocess.Popen[bytes] | None,
    timeout: float = 30,
    spy: subprocess.Popen[bytes] | None = None,
) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if spy is not None:
        try:
            spy.wait(timeout=30)  # py-spy writes its output when the target exits
        except subprocess.TimeoutExpired:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)


@dataclass
class Relay:
    data: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data.parent / "relay.log"

    def start(self) -> Relay:
        self.port = self.port or free_port()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                _agent_argv(
                    "relay",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--data",
                    str(self.data),
                ),
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        self.spy = _attach_py_spy(self.proc.pid, "relay")
        wait_until(self._listening, timeout=30, what="relay listening")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"relay exited early:\n{self.log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def stop(self) -> None:
        _stop_proc(self.proc, spy=self.spy)
        self.proc = self.spy = None


@dataclass
class Device:
    home: Path
    folder: Path
    name: str
    space: str = "bench"
    proc: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home.parent / f"agent-{self.name}.log"
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cli(self, *args: str, timeout: float = 120) -> str:
        return run_cli(self.home, *args, timeout=timeout)

    def init(self) -> Device:
        self.cli("init", "--name", self.name)
        if not os.environ.get(LAN_ENV):
            # The scenarios measure the relay path: LAN discovery off (`run.py --lan` keeps it).
            self.cli("config", "set", "lan.enabled", "false")
        return self

    def create_space(self, relay_url: str) -> str:
        out = self.cli(
            "space", "create", self.space, "--folder", str(self.folder), "--relay", relay_url
        )
        return out.strip().splitlines()[-1]

    def invite(self) -> str:
        return self.cli("invite", self.space).strip().splitlines()[-1]

    def join(self, token: str) -> None:
        self.cli("join", token, "--folder", str(self.folder), "--name", self.space, timeout=120)

    def start(self, wait: bool = True) -> Device:
        with open(self.log_path, "ab") as logf:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                _agent_argv("--home", str(self.home), "run"),
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        self.spy = _attach_py_spy(self.proc.pid, f"agent-{self.name}")
        if wait:
            wait_until(self._ready, timeout=60, what=f"agent {self.name} ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"agent {self.name} exited early:\n{self.log()}")
        st = self.status()
        return bool(st and st.get("agent_running"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any] | None:
        """The agent's status report through its control socket (None if it does not answer)."""
        return control_request(self.home / "control.sock", {"cmd": "status"})

    def space_status(self) -> dict[str, Any]:
        st = self.status() or {}
        for s in st.get("spaces", []):
            if s["name"] == self.space:
                return s  # type: ignore[no-any-return]
        raise KeyError(self.space)

    def idle(self) -> bool:
        """Outbox empty, link caught up, owner lock free."""
        s = self.space_status()
        return bool(s["state"] == "idle" and s["pending_out"] == 0)

    def wait_idle(self, timeout: float = 120) -> None:
        wait_until(self.idle, timeout=timeout, what=f"{self.name} idle", interval=0.02)

    def stop(self) -> None:
        _stop_proc(self.proc, spy=self.spy)
        self.proc = self.spy = None


def control_request(path: Path, payload: dict[str, Any], timeout: float = 30) -> Any:
    """One control-socket request; None when no agent listens there."""
    from qmoi_sync.agent.control import AgentNotRunning, request_blocking
    from qmoi_sync.agent.home import UserError

    try:
        return request_blocking(path, payload, timeout)
    except AgentNotRunning:
        return None
    except UserError as exc:
        raise BenchError(f"control request {payload} refused: {exc}") from exc


@dataclass
class Cluster:
    tmp: Path
    relay: Relay
    a: Device
    b: Device


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"qmoi-bench-{prefix}-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def cluster(
    tmp: Path,
    space_url: Callable[[Relay], str] | None = None,
    before_a_starts: Callable[[Device], None] | None = None,
    start_b: bool = True,
) -> Iterator[Cluster]:
    """Relay + device a (space creator, running) + device b (joined; running if `start_b`).

    `space_url(relay)` gives the URL the space is created with (e.g. a proxy in front of the
    relay); the invite carries it, so b uses it too.
    """
    relay = Relay(tmp / "relay-data")
    a = Device(tmp / "home-a", tmp / "folder-a", "a")
    b = Device(tmp / "home-b", tmp / "folder-b", "b")
    try:
        relay.start()
        a.init()
        b.init()
        a.create_space(space_url(relay) if space_url else relay.url)
        if before_a_starts is not None:
            before_a_starts(a)
        a.start()
        b.join(a.invite())
        if start_b:
            b.start()
        yield Cluster(tmp, relay, a, b)
    except BaseException:
        for d in (a, b):
            if d.log_path.exists():
                tail = d.log()[-3000:]
                print(f"--- agent {d.name} log tail ---\n{tail}", file=sys.stderr)
        raise
    finally:
        for d in (b, a):
            d.stop()
        relay.stop()


# -------------------------------------------------------------------------- inotify (Linux)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
_EVENT = struct.Struct("iIII")


class Inotify:
    """Minimal inotify on one directory via libc (no extra dependency).

    The agent materializes a file by writing a temp file and renaming it into place, so the
    moment the new content becomes readable is an IN_MOVED_TO for the final name.
    """

    def __init__(self, directory: Path, mask: int = IN_MOVED_TO | IN_CLOSE_WRITE) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(name, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = self._libc.inotify_add_watch(self.fd, str(directory).encode(), mask)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch({directory}) failed")
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    @staticmethod
    def available() -> bool:
        return sys.platform.startswith("linux")

    def read(self, timeout_ms: float) -> list[str]:
        """Names of entries with events, waiting up to `timeout_ms` for the first one."""
        if not self.poller.poll(timeout_ms):
            return []
        names: list[str] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return names
            off = 0
            while off < len(buf):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, off)
                off += _EVENT.size
                names.append(buf[off : off + length].rstrip(b"\0").decode(errors="replace"))
                off += length

    def drain(self) -> None:
        while self.read(0):
            pass

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------- results


def machine_info() -> dict[str, Any]:
    pkgs = {}
    for name in (
        "qmoi-sync",
        "pycrdt",
        "websockets",
        "aiosqlite",
        "watchfiles",
        "cryptography",
        "pydantic",
        "psutil",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pkgs[name] = metadata.version(name)
    info: dict[str, Any] = {
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "packages": pkgs,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import psutil

        info["memory_total_mb"] = round(psutil.virtual_memory().total / 2**20)
        info["cpu_affinity"] = len(psutil.Process().cpu_affinity() or [])
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(BENCH_DIR.parent),
                "status",
                "--porcelain",
                "agent",
                "relay",
                "protocol",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        info["git_rev"] = rev + ("+dirty" if dirty else "")
    return info


def write_result(scenario: str, result: dict[str, Any], quick: bool) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    doc = {
        "scenario": scenario,
        "quick": quick,
        "timestamp": now.isoformat(timespec="seconds"),
        "machine": machine_info(),
        **result,
    }
    path = RESULTS_DIR / f"{scenario}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def verdict(value: float, target: float) -> str:
    return "MET" if value <= target else "MISSED"


def memory_reports(*devices: Device) -> None:
    """With ``--profile memory``: each agent appends its memory breakdown (bench/memprobe.py)."""
    out = os.environ.get(PROFILE_ENV)
    if not out or os.environ.get(PROFILER_ENV) != "memory":
        return
    for d in devices:
        report = Path(out) / f"{d.home.name}-{d.pid}.mem.txt"
        os.kill(d.pid, signal.SIGUSR1)
        wait_until(report.exists, timeout=120, what=f"memory report of {d.name}")
