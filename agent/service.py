"""`qmoi-sync service install|uninstall`: run the agent as a per-user service.

Linux: a systemd *user* unit in ``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config``), enabled
and started with ``systemctl --user``. macOS: a launchd agent in ``~/Library/LaunchAgents``, loaded
with ``launchctl``. The service runs ``qmoi-sync --home HOME run --headless`` with the executable
that ran this command, so a pipx or venv install keeps pointing at itself.

The unit text here is the one shipped as ``packaging/qmoi-sync.service`` (rendered with
``%h/.local/bin/qmoi-sync`` and no ``--home``); a test keeps the two identical.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qmoi_sync.agent.home import AgentLock, Home, UserError

UNIT_NAME = "qmoi-sync.service"
LAUNCHD_LABEL = "com.qmoi-sync.agent"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_UNAVAILABLE = 2

# Only options that work in an unprivileged user manager without user namespaces: seccomp-based
# filters (allowed because NoNewPrivileges is set) and personality/realtime locks. Namespace
# sandboxing (ProtectSystem, PrivateTmp, ProtectHome...) needs PrivateUsers in a user manager,
# which fails where unprivileged user namespaces are disabled, and ProtectHome would hide the very
# folders the agent syncs.
SYSTEMD_USER_UNIT = """\
# qmoi-sync agent: a systemd user service (`qmoi-sync service install` writes this file with the
# right paths; see packaging/README.md).
[Unit]
Description=qmoi-sync agent (end-to-end encrypted folder sync)
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=exec
ExecStart={exec_start}
# SIGHUP reloads device.json and the spaces table without dropping connections.
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM: the batch in progress finishes, the database is closed cleanly.
KillSignal=SIGTERM
TimeoutStopSec=60s
Restart=on-failure
RestartSec=5s
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
# AF_NETLINK: interface enumeration (getifaddrs) for LAN discovery.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=default.target
"""

PACKAGED_EXEC_START = "%h/.local/bin/qmoi-sync run --headless"

# packaging/com.qmoi-sync.agent.plist: launchd expands neither ~ nor $HOME, so the shipped file
# goes through /bin/sh; `service install` writes absolute paths instead.
PACKAGED_LAUNCHD_ARGS = [
    "/bin/sh",
    "-c",
    'mkdir -p "$HOME/Library/Logs/qmoi-sync" && exec "$HOME/.local/bin/qmoi-sync" run --headless'
    ' >>"$HOME/Library/Logs/qmoi-sync/agent.log" 2>&1',
]


# -- rendering -------------------------------------------------------------------------------
def systemd_quote(arg: str) -> str:
    """One ExecStart word: `%` and `$` escaped, quoted when it holds anything systemd splits on."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not any(c.isspace() or c in "\"'\\;" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd_unit(argv: Sequence[str]) -> str:
    return SYSTEMD_USER_UNIT.format(exec_start=" ".join(systemd_quote(a) for a in argv))


def render_launchd_plist(argv: Sequence[str], log_file: Path | None) -> bytes:
    plist: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(argv),
        "RunAtLoad": True,
        # Restart after a crash, not after a clean `qmoi-sync stop`.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        # launchd sends SIGTERM on unload; give the agent time to finish its batch.
        "ExitTimeOut": 60,
        "ProcessType": "Standard",
        "Umask": 0o077,
    }
    if log_file is not None:
        plist["StandardOutPath"] = str(log_file)
        plist["StandardErrorPath"] = str(log_file)
    return plistlib.dumps(plist, sort_keys=False)


def agent_command(home: Home) -> list[str]:
    """The command line the service runs: this very qmoi-sync, this device home."""
    return [*qmoi_sync_executable(), "--home", str(home.root), "run", "--headless"]


def qmoi_sync_executable() -> list[str]:
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    # The console script itself (pipx symlink or venv bin/): keep the unresolved path so a pipx
    # upgrade, which swaps the venv behind the symlink, keeps working.
    if argv0 is not None and argv0.name == "qmoi-sync" and argv0.exists():
        return [str(argv0.absolute())]
    beside = Path(sys.executable).parent / "qmoi-sync"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("qmoi-sync")
    if found:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "qmoi_sync.agent"]


# -- platform plans --------------------------------------------------------------------------
@dataclass
class Plan:
    """What install/uninstall does: a file to write or remove, then commands to run."""

    path: Path
    content: bytes | None  # None: remove the file
    commands: list[list[str]] = field(default_factory=list)
    manual: list[str] = field(default_factory=list)  # what to run by hand if commands can't
    tool: str = ""


def systemd_user_dir(env: Mapping[str, str] | None = None, user_home: Path | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    config = Path(base) if base and Path(base).is_absolute() else None
    if config is None:
        config = (user_home or Path.home()) / ".config"
    return config / "systemd" / "user"


def launchd_paths(user_home: Path | None = None) -> tuple[Path, Path]:
    root = user_home or Path.home()
    return (
        root / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist",
        root / "Library" / "Logs" / "qmoi-sync" / "agent.log",
    )


def _platform_kind(platform: str) -> str:
    if platform.startswith("linux"):
        return "systemd"
    if platform == "darwin":
        return "launchd"
    raise UserError(
        f"`service install` supports Linux (systemd) and macOS (launchd), not {platform}; "
        "run `qmoi-sync run --headless` under your platform's service manager"
    )


def install_plan(home: Home, platform: str = sys.platform, user_home: Path | None = None) -> Plan:
    argv = agent_command(home)
    if _platform_kind(platform) == "systemd":
        path = systemd_user_dir(user_home=user_home) / UNIT_NAME
        cmds = [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", UNIT_NAME],
        ]
        return Plan(
            path=path,
            content=render_systemd_unit(argv).encode(),
            commands=cmds,
            manual=[shlex.join(c) for c in cmds]
            + [
                f"loginctl enable-linger {_user()}   # keep syncing while logged out",
            ],
            tool="systemctl --user",
        )
    path, log_file = launchd_paths(user_home)
    cmds = [["launchctl", "load", "-w", str(path)]]
    return Plan(
        path=path,
        content=render_launchd_plist(argv, log_file),
        commands=cmds,
        manual=[shlex.join(c) for c in cmds],
        tool="launchctl",
    )


def uninstall_plan(platform: str = sys.platform, user_home: Path | None = None) -> Plan:
    if _platform_kind(platform) == "systemd":
        path = systemd_user_dir(user_home=user_home) / UNIT_NAME
        cmds = [["systemctl", "--user", "disable", "--now", UNIT_NAME]]
        after = ["systemctl", "--user", "daemon-reload"]
        return Plan(
            path=path,
            content=None,
            commands=[*cmds, after],
            manual=[shlex.join(c) for c in cmds]
            + [f"rm {shlex.quote(str(path))}", shlex.join(after)],
            tool="systemctl --user",
        )
    path, _log = launchd_paths(user_home)
    cmds = [["launchctl", "unload", "-w", str(path)]]
    return Plan(
        path=path,
        content=None,
        commands=cmds,
        manual=[shlex.join(c) for c in cmds] + [f"rm {shlex.quote(str(path))}"],
        tool="launchctl",
    )


def _user() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "$USER"


# -- running ---------------------------------------------------------------------------------
Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found ({exc.strerror})")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{shlex.join(cmd)} timed out")


def _systemd_active(run: Runner) -> bool:
    return run(["systemctl", "--user", "is-active", "--quiet", UNIT_NAME]).returncode == 0


def _launchd_loaded(run: Runner) -> bool:
    return run(["launchctl", "list", LAUNCHD_LABEL]).returncode == 0


def _unavailable(plan: Plan, action: str, err: str, out: Callable[[str], None]) -> int:
    out(f"qmoi-sync: {plan.tool} is unavailable here: {err.strip() or 'no detail'}")
    if "systemctl" in plan.tool:
        out(
            "  (a user service needs a systemd user session: log in on a console or over ssh, "
            "not via su/sudo/a container shell)"
        )
    out(f"The {action} is not finished. Run these yourself in your login session:")
    for line in plan.manual:
        out(f"  {line}")
    return EXIT_UNAVAILABLE


def install(
    home: Home,
    dry_run: bool = False,
    platform: str = sys.platform,
    out: Callable[[str], None] = print,
    run: Runner = _run,
    user_home: Path | None = None,
) -> int:
    if not home.is_initialized():
        raise UserError(
            f"no device identity in {home.root}: run `qmoi-sync --home {home.root} init --name "
            "NAME` first (a service for an empty home would only crash-loop)"
        )
    plan = install_plan(home, platform, user_home)
    assert plan.content is not None
    if dry_run:
        out(f"would write {plan.path}:")
        out(plan.content.decode().rstrip("\n"))
        for cmd in plan.commands:
            out(f"would run: {shlex.join(cmd)}")
        return EXIT_OK

    kind = _platform_kind(platform)
    agent_running = AgentLock(home.lock_path).is_held_by_other()
    if agent_running:
        managed = _systemd_active(run) if kind == "systemd" else _launchd_loaded(run)
        if not managed:
            raise UserError(
                f"an agent is already running for {home.root} outside the service manager; "
                "stop it first (`qmoi-sync stop`), then run `service install` again"
            )
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "launchd":
        _path, log_file = launchd_paths(user_home)
        log_file.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(plan.path, plan.content)
    out(f"wrote {plan.path}")

    if kind == "launchd" and _launchd_loaded(run):
        # Reload so a changed plist takes effect (load on a loaded job is a no-op).
        run(["launchctl", "unload", str(plan.path)])
    was_active = kind == "systemd" and agent_running
    for i, cmd in enumerate(plan.commands):
        res = run(cmd)
        if res.returncode != 0:
            if i == 0:
                return _unavailable(plan, "install", res.stderr or res.stdout, out)
            out(f"qmoi-sync: `{shlex.join(cmd)}` failed: {(res.stderr or res.stdout).strip()}")
            out(_diagnose_hint(kind))
            return EXIT_FAILURE
    if was_active:
        res = run(["systemctl", "--user", "restart", UNIT_NAME])
        if res.returncode != 0:
            out(f"qmoi-sync: restarting {UNIT_NAME} failed: {res.stderr.strip()}")
            out(_diagnose_hint(kind))
            return EXIT_FAILURE
    if kind == "systemd":
        out(f"{UNIT_NAME} enabled and started (logs: journalctl --user -u {UNIT_NAME} -f)")
        out(f"to keep syncing while logged out: loginctl enable-linger {_user()}")
    else:
        _p, log_file = launchd_paths(user_home)
        out(f"{LAUNCHD_LABEL} loaded (logs: {log_file})")
    return EXIT_OK


def uninstall(
    dry_run: bool = False,
    platform: str = sys.platform,
    out: Callable[[str], None] = print,
    run: Runner = _run,
    user_home: Path | None = None,
) -> int:
    plan = uninstall_plan(platform, user_home)
    kind = _platform_kind(platform)
    if dry_run:
        if kind == "systemd":
            out(f"would run: {shlex.join(plan.commands[0])}")
            out(f"would remove {plan.path}")
            out(f"would run: {shlex.join(plan.commands[1])}")
        else:
            out(f"would run: {shlex.join(plan.commands[0])}")
            out(f"would remove {plan.path}")
        return EXIT_OK
    if not plan.path.exists():
        out(f"no service installed ({plan.path} does not exist); nothing to do")
        return EXIT_OK
    first = run(plan.commands[0])
    if first.returncode != 0 and not _benign_stop_error(kind, first):
        # Keep the file: `systemctl --user disable` needs it to find the enablement links.
        return _unavailable(plan, "uninstall", first.stderr or first.stdout, out)
    plan.path.unlink()
    out(f"removed {plan.path}")
    for cmd in plan.commands[1:]:
        res = run(cmd)
        if res.returncode != 0:
            out(f"qmoi-sync: `{shlex.join(cmd)}` failed: {(res.stderr or res.stdout).strip()}")
            return EXIT_FAILURE
    out("service stopped and removed")
    return EXIT_OK


def _benign_stop_error(kind: str, res: subprocess.CompletedProcess[str]) -> bool:
    """launchctl unload on a job that is not loaded is fine: we only want it gone."""
    text = (res.stderr + res.stdout).lower()
    return kind == "launchd" and ("could not find" in text or "not loaded" in text)


def _diagnose_hint(kind: str) -> str:
    if kind == "systemd":
        return (
            f"  see: systemctl --user status {UNIT_NAME}; journalctl --user -u {UNIT_NAME} -e; "
            "and `qmoi-sync doctor`"
        )
    return "  see: launchctl list com.qmoi-sync.agent; ~/Library/Logs/qmoi-sync/agent.log"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
