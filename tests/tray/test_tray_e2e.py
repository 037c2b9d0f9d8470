"""End to end: ``qmoi-sync tray`` on a real X server (Xvfb) with a real tray host (trayer),
talking to a real agent (tests/harness.py) over the real control socket.

What is real and what is not:
* the icon is pystray's X backend embedded by trayer (XEMBED); the test waits for its window,
  checks it was reparented into the tray, reads its title (the tooltip) and takes screenshots,
  kept under tests/tray/artifacts/ (gitignored; paths are printed);
* menu actions are driven through ``--test-actions-file``: the tray process reads action ids
  and calls the pystray ``MenuItem`` objects of its current menu, i.e. the very callbacks a
  click runs (clicking a menu through X is brittle, and pystray's X backend shows no menu);
  nothing is mocked on the way to the agent, which must report the change in
  ``qmoi-sync status --json``;
* ``xdg-open`` is replaced (on the tray's PATH) by a script that records its argument: the
  system boundary, so no file manager is needed.

Skipped only when Xvfb cannot start (or the tray extra, pystray + Pillow, is not installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import PY, Device, Relay, create_space, wait_until

# Not importorskip for pystray: importing it connects to $DISPLAY.
if importlib.util.find_spec("pystray") is None or importlib.util.find_spec("PIL") is None:
    pytest.skip(
        "the tray extra (pystray, Pillow) is not installed: pip install -e '.[tray]'",
        allow_module_level=True,
    )

from PIL import Image, ImageGrab

from qmoi_sync.agent.tray_model import COLOURS, TrayState

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DEADLINE = 30.0


def _need(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"{tool} is not installed (apt-get install {tool}; .ci/run installs it)")
    return exe


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def display() -> Iterator[str]:
    """A fresh Xvfb on a display number it picks itself (-displayfd: no collisions)."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb cannot start: not installed (apt-get install xvfb)")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(w), "-screen", "0", "800x600x24", "-nolisten", "tcp", "-noreset"],
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(w)
    number = b""
    deadline = time.monotonic() + DEADLINE
    try:
        while not number.endswith(b"\n"):
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(r, 16) if ready else b""
            if not chunk:
                _stop(proc)
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.skip(f"Xvfb cannot start: {err.strip()[-500:] or 'no display number'}")
            number += chunk
    finally:
        os.close(r)
    try:
        yield f":{int(number)}"
    finally:
        _stop(proc)


def _tray_owner(disp: str) -> int:
    """The window owning the system tray selection (0: none)."""
    import Xlib.display

    d = Xlib.display.Display(disp)
    try:
        atom = d.intern_atom(f"_NET_SYSTEM_TRAY_S{d.get_default_screen()}")
        owner = d.get_selection_owner(atom)
        return 0 if owner in (0, None) else int(owner.id)
    finally:
        d.close()


@pytest.fixture
def tray_host(display: str, tmp_path: Path) -> Iterator[str]:
    """trayer, a freedesktop system tray (XEMBED) on top of the screen."""
    trayer = _need("trayer")
    log = open(tmp_path / "trayer.log", "wb")  # noqa: SIM115 - lives as long as trayer
    proc = subprocess.Popen(
        [trayer, "--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32",
         "--transparent", "false", "--tint", "0x202020", "--SetDockType", "true"],
        env={**os.environ, "DISPLAY": display},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: _tray_owner(display), timeout=DEADLINE, what="trayer to own the tray")
        yield display
    finally:
        _stop(proc)
        log.close()


@dataclass
class TrayProc:
    proc: subprocess.Popen[bytes]
    display: str
    actions: Path
    log: Path

    def act(self, action: str) -> None:
        """Ask the tray to run one menu action; wait for its result line."""
        done = self.actions.with_name(self.actions.name + ".done")
        before = done.read_text().count("\n") if done.exists() else 0
        with open(self.actions, "a") as f:
            f.write(action + "\n")

        def result() -> str | None:
            if self.proc.poll() is not None and action not in ("quit", "quit_stop_agent"):
                raise AssertionError(f"tray exited ({self.proc.returncode}):\n{self.log_text()}")
            lines = done.read_text().splitlines() if done.exists() else []
            return lines[before] if len(lines) > before else None

        line = wait_until(result, timeout=DEADLINE, what=f"tray action {action}")
        assert line == f"{action} ok", line

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_tray(home: Path, disp: str, tmp_path: Path, *extra: str) -> TrayProc:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    opener = bindir / "xdg-open"
    opener.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> "{tmp_path / "opened.txt"}"\n')
    opener.chmod(0o755)
    actions = tmp_path / "actions.txt"
    log = tmp_path / "tray.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [PY, "-m", "qmoi_sync.agent", "--home", str(home), "tray",
             "--test-actions-file", str(actions), *extra],
            env={**os.environ, "DISPLAY": disp, "PYSTRAY_BACKEND": "xorg",
                 "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"},
            stdout=logf,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return TrayProc(proc, disp, actions, log)


def _xdotool(disp: str, *args: str) -> str:
    out = subprocess.run(
        [_need("xdotool"), *args],
        env={**os.environ, "DISPLAY": disp},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def icon_window(tray: TrayProc, title_prefix: str) -> int:
    """Wait for the tray icon window whose title (the tooltip) starts with ``title_prefix``."""

    def find() -> int | None:
        if tray.proc.poll() is not None:
            raise AssertionError(f"tray exited ({tray.proc.returncode}):\n{tray.log_text()}")
        ids = _xdotool(tray.display, "search", "--name", f"^{re.escape(title_prefix)}")
        return int(ids.split()[0]) if ids else None

    return int(wait_until(find, timeout=DEADLINE, what=f"tray icon titled {title_prefix!r}"))


def embedded_in_tray(disp: str, window: int) -> bool:
    """True once the tray host reparented (XEMBED-docked) the icon window."""
    import Xlib.display

    d = Xlib.display.Display(disp)
    try:
        tree = d.create_resource_object("window", window).query_tree()
        return bool(tree.parent.id != d.screen().root.id)
    finally:
        d.close()


def screenshot(disp: str, window: int, name: str) -> Image.Image:
    """Save the whole screen as an artifact; return the icon's region."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ImageGrab.grab(xdisplay=disp)
    path = ARTIFACTS / f"{name}.png"
    shot.save(path)
    print(f"tray screenshot: {path}")
    geo = dict(
        line.split("=", 1)
        for line in _xdotool(disp, "getwindowgeometry", "--shell", str(window)).splitlines()
    )
    x, y, w, h = (int(geo[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
    return shot.crop((x, y, x + w, y + h)).convert("RGB")


def shows_colour(region: Image.Image, state: TrayState) -> bool:
    """The icon region is mostly the state's colour (resampling blurs only the edges)."""
    want = COLOURS[state]
    colours = region.getcolors(region.width * region.height) or []
    close = sum(
        n for n, c in colours if all(abs(a - b) <= 12 for a, b in zip(c, want, strict=True))
    )
    return close >= region.width * region.height // 4


def wait_state(dev: Device, state: str) -> None:
    wait_until(
        lambda: dev.space_status()["state"] == state,
        timeout=DEADLINE,
        what=f"{dev.name} to report the space {state}",
    )


@contextlib.contextmanager
def one_device(tmp_path: Path, start_agent: bool) -> Iterator[tuple[Device, str]]:
    relay = Relay(tmp_path / "relay-data").start()
    dev = Device(tmp_path / "home", tmp_path / "folder", "laptop").init()
    try:
        space_id = create_space(dev, relay)
        dev.write("hello.txt", "hello\n")
        if start_agent:
            dev.start()
        yield dev, space_id
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            dev.cli("stop", check=False, timeout=30)
        dev.stop()
        relay.stop()


def test_tray_attaches_shows_state_and_menu_actions_reach_the_agent(
    tray_host: str, tmp_path: Path
) -> None:
    with one_device(tmp_path, start_agent=True) as (dev, space_id):
        tray = start_tray(dev.home, tray_host, tmp_path, "--no-start")
        try:
            win = icon_window(tray, "qmoi-sync: synced, 1 space")
            wait_until(lambda: embedded_in_tray(tray_host, win), what="the icon docked in trayer")
            region = screenshot(tray_host, win, "tray-synced")
            assert shows_colour(region, TrayState.SYNCED), region.getcolors(4096)

            # Pause through the menu callback: the agent pauses the space, the icon follows.
            tray.act(f"pause:{space_id}")
            wait_state(dev, "paused")
            win = icon_window(tray, "qmoi-sync: paused, 1 space")
            region = screenshot(tray_host, win, "tray-paused")
            assert shows_colour(region, TrayState.PAUSED), region.getcolors(4096)

            tray.act(f"resume:{space_id}")
            wait_until(
                lambda: dev.space_status()["state"] in ("idle", "syncing"),
                timeout=DEADLINE,
                what="the space resumed",
            )
            icon_window(tray, "qmoi-sync: synced")
            tray.act("pause_all")
            wait_state(dev, "paused")
            icon_window(tray, "qmoi-sync: paused")
            tray.act("resume_all")
            wait_until(lambda: dev.space_status()["state"] != "paused", what="resumed (all)")

            tray.act(f"open:{space_id}")
            opened = tmp_path / "opened.txt"
            wait_until(opened.exists, what="xdg-open to run")
            assert opened.read_text().splitlines() == [str(dev.folder.resolve())]

            # Quit leaves the agent running.
            tray.act("quit")
            assert tray.proc.wait(timeout=DEADLINE) == 0, tray.log_text()
            st = dev.status()
            assert st is not None and st["agent_running"]
            assert "Traceback" not in tray.log_text(), tray.log_text()
        finally:
            _stop(tray.proc)


def test_tray_starts_the_agent_and_quit_can_stop_it(tray_host: str, tmp_path: Path) -> None:
    with one_device(tmp_path, start_agent=False) as (dev, space_id):
        st = dev.status()
        assert st is not None and not st["agent_running"]
        tray = start_tray(dev.home, tray_host, tmp_path)
        try:
            win = icon_window(tray, "qmoi-sync: synced, 1 space")
            st = dev.status()
            assert st is not None and st["agent_running"] and st["spaces"][0]["id"] == space_id
            assert st["agent"]["pid"] != tray.proc.pid
            agent_log = dev.home / "agent.log"
            assert "agent running" in agent_log.read_text(), "the agent logs to HOME/agent.log"
            screenshot(tray_host, win, "tray-started-agent")

            tray.act("quit_stop_agent")
            assert tray.proc.wait(timeout=DEADLINE) == 0, tray.log_text()
            wait_until(
                lambda: not (dev.status() or {"agent_running": True})["agent_running"],
                timeout=DEADLINE,
                what="the agent to stop",
            )
        finally:
            _stop(tray.proc)


def test_tray_without_a_display_says_so(tmp_path: Path) -> None:
    dev = Device(tmp_path / "home", tmp_path / "folder", "laptop").init()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run(
        [sys.executable, "-m", "qmoi_sync.agent", "--home", str(dev.home), "tray"],
        env={**env, "PYSTRAY_BACKEND": "xorg"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert out.returncode == 2, out
    assert out.stderr.startswith("qmoi-sync: no usable graphical session"), out.stderr
    assert "Traceback" not in out.stderr


def test_left_click_pops_up_the_menu_and_a_chosen_item_reaches_the_agent(
    tray_host: str, tmp_path: Path
) -> None:
    """Real input, no hook: pystray's X backend has no menu of its own, so a left click on the
    icon pops up the tray's Tk menu (agent/tray_popup.py); keyboard navigation picks
    "Pause all" (header and separators are skipped: space, Open folder, Pause all)."""
    pytest.importorskip("tkinter", reason="tkinter (python3-tk) is not available")
    with one_device(tmp_path, start_agent=True) as (dev, _space_id):
        tray = start_tray(dev.home, tray_host, tmp_path, "--no-start")
        try:
            win = icon_window(tray, "qmoi-sync: synced, 1 space")
            wait_until(lambda: embedded_in_tray(tray_host, win), what="the icon docked in trayer")
            _xdotool(tray_host, "mousemove", "--window", str(win), "5", "5", "click", "1")
            wait_until(
                lambda: _xdotool(tray_host, "search", "--onlyvisible", "--class", "Menu"),
                timeout=DEADLINE,
                what="the popup menu",
            )
            screenshot(tray_host, win, "tray-popup-menu")
            _xdotool(tray_host, "key", "Down", "Down", "Down", "Return")
            wait_state(dev, "paused")
            icon_window(tray, "qmoi-sync: paused, 1 space")
            wait_until(
                lambda: not _xdotool(tray_host, "search", "--onlyvisible", "--class", "Menu"),
                what="the popup menu to close",
            )
            tray.act("quit")
            assert tray.proc.wait(timeout=DEADLINE) == 0, tray.log_text()
        finally:
            _stop(tray.proc)
