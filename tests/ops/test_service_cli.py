"""`qmoi-sync service install|uninstall` through the real CLI.

Nothing here touches a real systemd user session: the non-dry-run tests point systemctl at a
runtime directory with no user bus (so `systemctl --user` genuinely fails to connect) and a
temporary XDG_CONFIG_HOME.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness import Device, cli
from ops_helpers import qmoi_sync_exe, unit_directives, verify_unit

from qmoi_sync.agent import service
from qmoi_sync.agent.home import Home, UserError


def _env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "no-user-bus"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "XDG_RUNTIME_DIR": str(runtime),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus",
    }


def _unit_path(tmp_path: Path) -> Path:
    return tmp_path / "cfg/systemd/user/qmoi-sync.service"


def _init(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    cli(home, "init", "--name", "svc")
    return home


def test_install_dry_run_prints_unit_and_commands(tmp_path: Path) -> None:
    home = _init(tmp_path)
    proc = cli(home, "service", "install", "--dry-run", env=_env(tmp_path))
    out = proc.stdout
    unit = _unit_path(tmp_path)
    assert out.startswith(f"would write {unit}:\n")
    assert not unit.exists(), "--dry-run must not write anything"
    body = out.split(":\n", 1)[1].split("\nwould run: ")[0] + "\n"
    d = unit_directives(body)
    # `python -m qmoi_sync.agent` ran it: the console script beside the interpreter is used.
    assert d["ExecStart"] == [f"{qmoi_sync_exe()} --home {home} run --headless"]
    assert d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["WantedBy"] == ["default.target"]
    assert out.rstrip().endswith(
        "would run: systemctl --user daemon-reload\n"
        "would run: systemctl --user enable --now qmoi-sync.service"
    )
    # What it would write is a valid user unit.
    path = tmp_path / "printed.service"
    path.write_text(body)
    vproc = verify_unit(path, user=True, tmp=tmp_path)
    assert vproc.returncode == 0 and not vproc.stderr.strip(), vproc.stderr


def test_install_uses_the_console_script_that_ran(tmp_path: Path) -> None:
    home = _init(tmp_path)
    exe = qmoi_sync_exe()
    proc = subprocess.run(
        [str(exe), "--home", str(home), "service", "install", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **_env(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ExecStart={exe} --home {home} run --headless\n" in proc.stdout


def test_xdg_config_home_default_and_relative(tmp_path: Path) -> None:
    assert service.systemd_user_dir({"XDG_CONFIG_HOME": "/x/cfg"}) == Path("/x/cfg/systemd/user")
    # A relative XDG_CONFIG_HOME is invalid per the XDG spec and ignored.
    assert service.systemd_user_dir({"XDG_CONFIG_HOME": "cfg"}, user_home=tmp_path) == (
        tmp_path / ".config/systemd/user"
    )
    assert service.systemd_user_dir({}, user_home=tmp_path) == tmp_path / ".config/systemd/user"


def test_install_without_user_session_writes_unit_and_says_what_to_run(tmp_path: Path) -> None:
    home = _init(tmp_path)
    proc = cli(home, "service", "install", check=False, env=_env(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    unit = _unit_path(tmp_path)
    assert f"wrote {unit}" in proc.stdout
    assert "systemctl --user is unavailable here" in proc.stdout
    assert "  systemctl --user daemon-reload\n" in proc.stdout
    assert "  systemctl --user enable --now qmoi-sync.service\n" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert unit_directives(unit.read_text())["ExecStart"] == [
        f"{qmoi_sync_exe()} --home {home} run --headless"
    ]

    # Uninstall cannot disable it without a session either: it keeps the file (disable needs it)
    # and prints the full manual sequence.
    proc = cli(home, "service", "uninstall", check=False, env=_env(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert unit.exists()
    assert "  systemctl --user disable --now qmoi-sync.service\n" in proc.stdout
    assert f"  rm {unit}\n" in proc.stdout


def test_uninstall_dry_run_and_nothing_installed(tmp_path: Path) -> None:
    home = _init(tmp_path)
    unit = _unit_path(tmp_path)
    proc = cli(home, "service", "uninstall", "--dry-run", env=_env(tmp_path))
    assert proc.stdout.splitlines() == [
        "would run: systemctl --user disable --now qmoi-sync.service",
        f"would remove {unit}",
        "would run: systemctl --user daemon-reload",
    ]
    proc = cli(home, "service", "uninstall", env=_env(tmp_path))
    assert "nothing to do" in proc.stdout


def test_install_refuses_uninitialized_home(tmp_path: Path) -> None:
    proc = cli(tmp_path / "empty", "service", "install", check=False, env=_env(tmp_path))
    assert proc.returncode == 2
    assert "init --name NAME" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not _unit_path(tmp_path).exists()


def test_install_refuses_while_a_foreground_agent_runs(tmp_path: Path) -> None:
    dev = Device(tmp_path / "home", tmp_path / "folder", "fg").init()
    dev.start()
    try:
        proc = cli(dev.home, "service", "install", check=False, env=_env(tmp_path))
    finally:
        dev.stop()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "already running" in proc.stderr and "qmoi-sync stop" in proc.stderr
    assert not _unit_path(tmp_path).exists()


def test_launchd_install_dry_run_and_unsupported_platform(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init("mac")
    lines: list[str] = []
    assert service.install(home, True, "darwin", lines.append, user_home=tmp_path) == 0
    plist_path = tmp_path / "Library/LaunchAgents/com.qmoi-sync.agent.plist"
    assert lines[0] == f"would write {plist_path}:"
    assert "<string>--headless</string>" in lines[1]
    assert lines[-1] == f"would run: launchctl load -w {plist_path}"
    assert not plist_path.exists()
    with pytest.raises(UserError, match=r"Linux .* and macOS"):
        service.install(home, True, "win32", lines.append)


def test_systemd_quote() -> None:
    q = service.systemd_quote
    assert q("/usr/bin/qmoi-sync") == "/usr/bin/qmoi-sync"
    assert q("/a b/c") == '"/a b/c"'
    assert q("100%") == "100%%"
    assert q("$HOME") == "$$HOME"
    assert q('a"b') == '"a\\"b"'
    assert q(";") == '";"'
    assert q("") == '""'
