"""Shared pieces of the operator-surface tests: paths, the systemd tools, sandbox wrappers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
USER_UNIT = PACKAGING / "qmoi-sync.service"
RELAY_UNIT = PACKAGING / "qmoi-sync-relay.service"
PLIST = PACKAGING / "com.qmoi-sync.agent.plist"
CONTAINERFILE = PACKAGING / "relay.Containerfile"
PY = sys.executable


def qmoi_sync_exe() -> Path:
    """The venv's console script (what a unit's ExecStart would point at)."""
    beside = Path(sys.executable).parent / "qmoi-sync"
    if beside.exists():
        return beside
    found = shutil.which("qmoi-sync")
    assert found, "the qmoi-sync console script is not installed in this environment"
    return Path(found)


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return exe


def verify_unit(unit: Path, user: bool, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze [--user] verify unit`; skips only if the tool cannot run here at all."""
    cmd = [systemd_analyze()]
    env = dict(os.environ)
    runtime: str | None = None
    if user:
        # The user manager wants a runtime dir even for an offline verify. A short one: socket
        # units of other packages (gpg-agent) put their sockets there, and a socket path has
        # a 108-byte limit that a deep pytest tmp dir (xdist workers add a level) exceeds.
        runtime = tempfile.mkdtemp(prefix="qs-xdg-")
        env["XDG_RUNTIME_DIR"] = runtime
        cmd.append("--user")
    cmd += ["verify", str(unit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    finally:
        if runtime is not None:
            shutil.rmtree(runtime, ignore_errors=True)
    if proc.returncode != 0 and "Failed to initialize manager" in proc.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()}")
    return proc


def with_exec(unit_text: str, placeholder: str, exe: Path) -> str:
    assert placeholder in unit_text, f"{placeholder} not in the unit"
    return unit_text.replace(placeholder, str(exe))


def unit_directives(text: str) -> dict[str, list[str]]:
    """key -> values (a key may repeat), ignoring comments and section headers."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- sandbox emulation -----------------------------------------------------------------------
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Runs argv[1:] with the kernel's memory-deny-write-execute (what systemd's
# MemoryDenyWriteExecute= enforces, via PR_SET_MDWE where available); inherited across exec.
MDWE_PRELUDE = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE failed: errno {{ctypes.get_errno()}}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe_prefix() -> list[str]:
    probe = subprocess.run(
        [PY, "-c", MDWE_PRELUDE, "/bin/true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux >= 6.3): {probe.stderr.strip()}")
    return [PY, "-c", MDWE_PRELUDE]


def syscall_set(filter_expr: str) -> set[str]:
    """Expand a systemd syscall group (recursively) with `systemd-analyze syscall-filter`."""
    out = subprocess.run(
        [systemd_analyze(), "syscall-filter", filter_expr],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            names |= syscall_set(item)
        else:
            names.add(item)
    return names


_SYSCALL_RE = re.compile(r"^\d+\s+([a-z0-9_]+)\(")
_FAMILY_RE = re.compile(r"^\d+\s+socket(?:pair)?\((AF_[A-Z0-9]+)")


def traced_syscalls(trace: Path) -> tuple[set[str], set[str]]:
    """(system calls, socket address families) in an `strace -f -o trace` file."""
    calls: set[str] = set()
    families: set[str] = set()
    for line in trace.read_text(errors="replace").splitlines():
        m = _SYSCALL_RE.match(line)
        if m:
            calls.add(m.group(1))
        f = _FAMILY_RE.match(line)
        if f:
            families.add(f.group(1))
    return calls, families
