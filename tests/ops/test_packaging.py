"""packaging/: the systemd units verify, the plist parses, the generator and the shipped files
agree, the relay container recipe is coherent, and the wheel installs into a clean venv."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ops_helpers import (
    CONTAINERFILE,
    PLIST,
    RELAY_UNIT,
    ROOT,
    USER_UNIT,
    qmoi_sync_exe,
    systemd_analyze,
    unit_directives,
    verify_unit,
    with_exec,
)

from qmoi_sync.agent import service
from qmoi_sync.agent.home import Home
from qmoi_sync.protocol.version import __version__


def _assert_verified(proc: subprocess.CompletedProcess[str]) -> None:
    # verify exits 0 on unknown keys or unparsable values (it only warns): any output is a failure.
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_user_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "qmoi-sync.service"
    text = with_exec(USER_UNIT.read_text(), "%h/.local/bin/qmoi-sync", qmoi_sync_exe())
    unit.write_text(text)
    _assert_verified(verify_unit(unit, user=True, tmp=tmp_path))


def test_relay_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "qmoi-sync-relay.service"
    unit.write_text(with_exec(RELAY_UNIT.read_text(), "/usr/local/bin/qmoi-sync", qmoi_sync_exe()))
    _assert_verified(verify_unit(unit, user=False, tmp=tmp_path))


def test_generated_unit_verifies_with_awkward_home(tmp_path: Path) -> None:
    """What `service install` writes (space and % in the home path) is a valid unit."""
    home = Home(tmp_path / "my home 100%")
    plan = service.install_plan(home, platform="linux", user_home=tmp_path)
    assert plan.content is not None
    text = plan.content.decode()
    assert '"--home"' not in text
    assert f'"{tmp_path}/my home 100%%"' in text
    unit = tmp_path / "qmoi-sync.service"
    unit.write_text(text)
    _assert_verified(verify_unit(unit, user=True, tmp=tmp_path))


def test_shipped_user_unit_is_the_generator_output() -> None:
    assert USER_UNIT.read_text() == service.SYSTEMD_USER_UNIT.format(
        exec_start=service.PACKAGED_EXEC_START
    )
    d = unit_directives(USER_UNIT.read_text())
    assert d["ExecStart"] == ["%h/.local/bin/qmoi-sync run --headless"]
    assert d["Restart"] == ["on-failure"]
    assert d["WantedBy"] == ["default.target"]
    # Nothing that needs user namespaces in a user manager, nothing that hides the user's folders.
    for absent in ("ProtectHome", "ProtectSystem", "PrivateTmp", "PrivateUsers", "DynamicUser"):
        assert absent not in d


def test_relay_unit_hardening() -> None:
    d = unit_directives(RELAY_UNIT.read_text())
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "qmoi-sync-relay",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], (key, d.get(key))
    assert "@system-service" in d["SystemCallFilter"]
    (exec_start,) = d["ExecStart"]
    assert exec_start.startswith("/usr/local/bin/qmoi-sync relay serve --host ")
    assert exec_start.endswith("--data ${STATE_DIRECTORY}")


def test_relay_unit_exposure_score(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the relay unit 'OK' (exposure <= 2.0 of 10)."""
    unit = tmp_path / "qmoi-sync-relay.service"
    unit.write_text(with_exec(RELAY_UNIT.read_text(), "/usr/local/bin/qmoi-sync", qmoi_sync_exe()))
    proc = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exposure {m.group(1)} > 2.0:\n{proc.stdout}"


def test_shipped_plist() -> None:
    data = PLIST.read_bytes()
    plist = plistlib.loads(data)
    assert plist["Label"] == "com.qmoi-sync.agent"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    args = plist["ProgramArguments"]
    assert args[:2] == ["/bin/sh", "-c"]
    assert '"$HOME/.local/bin/qmoi-sync" run --headless' in args[2]
    assert data == service.render_launchd_plist(service.PACKAGED_LAUNCHD_ARGS, None)


def test_launchd_plan(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    plan = service.install_plan(home, platform="darwin", user_home=tmp_path)
    assert plan.path == tmp_path / "Library/LaunchAgents/com.qmoi-sync.agent.plist"
    assert plan.content is not None
    plist = plistlib.loads(plan.content)
    assert plist["ProgramArguments"] == [
        *service.qmoi_sync_executable(),
        "--home",
        str(home.root),
        "run",
        "--headless",
    ]
    assert plist["StandardOutPath"] == str(tmp_path / "Library/Logs/qmoi-sync/agent.log")
    assert plan.commands == [["launchctl", "load", "-w", str(plan.path)]]
    un = service.uninstall_plan(platform="darwin", user_home=tmp_path)
    assert un.commands == [["launchctl", "unload", "-w", str(plan.path)]]


# -- container -------------------------------------------------------------------------------
def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_relay_containerfile_is_coherent() -> None:
    ins = _instructions(CONTAINERFILE.read_text())
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("VOLUME", '["/data"]') in final
    (expose,) = [rest for w, rest in final if w == "EXPOSE"]
    cmd = next(rest for w, rest in final if w == "CMD")
    port = cmd.split('"--port", "')[1].split('"')[0]
    assert expose == f"{port}/tcp"
    assert '"--data", "/data"' in cmd
    entry = next(rest for w, rest in final if w == "ENTRYPOINT")
    assert entry == '["qmoi-sync", "relay", "serve"]'
    # Every COPY source exists in the repository (the build context is the repo root).
    for w, rest in ins:
        if w == "COPY" and "--from" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), src


def _container_engine() -> str | None:
    for engine in ("podman", "docker"):
        exe = shutil.which(engine)
        if exe and subprocess.run([exe, "info"], capture_output=True, timeout=30).returncode == 0:
            return exe
    return None


@pytest.mark.slow
def test_relay_container_builds(tmp_path: Path) -> None:
    engine = _container_engine()
    if engine is None:
        pytest.skip("no working container engine here (podman/docker daemon not available)")
    tag = f"qmoi-sync-relay-test:{os.getpid()}"
    proc = subprocess.run(
        [engine, "build", "-f", str(CONTAINERFILE), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    try:
        run = subprocess.run(
            [engine, "run", "--rm", "--entrypoint", "qmoi-sync", tag, "--version"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.stdout.strip() == f"qmoi-sync {__version__}", run.stderr
        who = subprocess.run(
            [engine, "run", "--rm", "--entrypoint", "id", tag, "-u"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert who.stdout.strip() != "0"
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=120)


# -- the wheel -------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_installs_into_clean_venv(tmp_path: Path) -> None:
    """Build the wheel from exactly what the Containerfile copies, install it (dependencies
    from PyPI) into a fresh venv, and run the console script from there."""
    src = tmp_path / "src"
    src.mkdir()
    for w, rest in _instructions(CONTAINERFILE.read_text()):
        if w == "COPY" and "--from" not in rest:
            *sources, _dest = rest.split()
            for name in sources:
                path = ROOT / name
                if path.is_dir():
                    shutil.copytree(
                        path, src / name, ignore=shutil.ignore_patterns("__pycache__", ".*cache")
                    )
                else:
                    shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "-w", str(dist), "--no-deps", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("qmoi_sync-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert install.returncode == 0, install.stderr
    version = subprocess.run(
        [str(venv / "bin/qmoi-sync"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the repo: the installed package, not the source tree
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"qmoi-sync {__version__}"
    # The three packages and their markers are in the wheel, and the service command runs.
    check = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import importlib.resources as r, qmoi_sync.agent.doctor, qmoi_sync.relay.server;"
            "import qmoi_sync.protocol as p; print(r.files(p).joinpath('py.typed').is_file())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert check.stdout.strip() == "True", check.stderr
    home = tmp_path / "h"
    subprocess.run(
        [str(venv / "bin/qmoi-sync"), "--home", str(home), "init", "--name", "w"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    dry = subprocess.run(
        [str(venv / "bin/qmoi-sync"), "--home", str(home), "service", "install", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "XDG_CONFIG_HOME": str(tmp_path / "cfg")},
    )
    assert dry.returncode == 0, dry.stderr
    assert f"ExecStart={venv}/bin/qmoi-sync --home {home} run --headless" in dry.stdout
