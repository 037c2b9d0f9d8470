"""``qmoi-sync tray``: the system tray icon (pystray glue around ``agent/tray_model.py``).

Threads (``Icon.run`` owns the main thread):

* main thread: ``icon.run()``, the toolkit loop; clicks run menu callbacks here.
* the updater (pystray's setup thread) polls the agent every ``POLL_INTERVAL_S``. With the X
  backend it never touches the icon: it wakes the X loop, which applies the new view (image,
  tooltip, menu) or quits in its own thread (see ``_install_x_hook`` for why). With other
  backends it applies views itself, as pystray allows.
* with ``--test-actions-file F``, a hook thread reads action ids from F and calls the very
  pystray ``MenuItem`` objects of the current menu: the same callbacks a click runs.
* the X backend shows no menu: a left click runs the default item, "Menu...", which pops the
  same menu up with Tk (``agent/tray_popup.py``, its own thread).

Callbacks never touch the icon: they call the control API (through the controller) and leave
the new view to the updater.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qmoi_sync.agent.control import AgentNotRunning, request
from qmoi_sync.agent.home import Home, UserError
from qmoi_sync.agent.tray_model import (
    APP_NAME,
    POLL_INTERVAL_S,
    MenuEntry,
    TrayController,
    TrayState,
    View,
)

log = logging.getLogger("qmoi_sync.tray")

AGENT_START_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 10.0


# -- the agent -------------------------------------------------------------------------------


def control(home: Home, payload: dict[str, Any]) -> Any:
    """One control request, from any thread that has no running event loop."""
    return asyncio.run(request(home.control_path, payload, timeout=CONTROL_TIMEOUT_S))


def agent_answers(home: Home) -> bool:
    try:
        control(home, {"cmd": "status"})
    except (AgentNotRunning, OSError):
        return False
    return True


def ensure_agent(home: Home, timeout: float = AGENT_START_TIMEOUT_S) -> int | None:
    """Attach to the running agent, or start one detached (``qmoi-sync --home H run``, output
    appended to ``H/agent.log``) and wait until it answers. Returns the pid it started, if any.

    Not ``run --headless``: that also announces this device to its peers as headless, and a
    device showing a tray icon is not."""
    if agent_answers(home):
        return None
    if not home.is_initialized():
        raise UserError(f"no device in {home.root}: run `qmoi-sync init --name NAME` first")
    with open(home.log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmoi_sync.agent", "--home", str(home.root), "run"],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the tray and its terminal
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while not agent_answers(home):
        if proc.poll() is not None and not agent_answers(home):
            tail = _tail(home.log_path)
            raise UserError(f"the agent exited (code {proc.returncode}) while starting:\n{tail}")
        if time.monotonic() > deadline:
            raise UserError(f"the agent did not answer within {timeout:g}s (see {home.log_path})")
        time.sleep(0.1)  # polling a process we just started; there is nothing to await
    threading.Thread(target=proc.wait, name="agent-reaper", daemon=True).start()
    log.info("started the agent (pid %d), logging to %s", proc.pid, home.log_path)
    return proc.pid


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def open_folder(path: str) -> None:
    """Open a folder in the desktop's file manager (xdg-open / open / Explorer)."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    exe = shutil.which(opener)
    if exe is None:
        raise UserError(f"cannot open {path}: {opener} not found")
    proc = subprocess.Popen(
        [exe, path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    threading.Thread(target=proc.wait, name="opener-reaper", daemon=True).start()


# -- pystray glue ----------------------------------------------------------------------------


def _import_pystray() -> Any:
    try:
        import pystray
    except ImportError as exc:
        raise UserError(
            f"the tray needs the optional extra: pip install 'qmoi-sync[tray]' ({exc})"
        ) from exc
    except Exception as exc:  # the X backend connects at import time
        raise UserError(f"no usable graphical session for the tray icon: {exc}") from exc
    return pystray


class Tray:
    def __init__(self, home: Home, test_actions_file: Path | None = None) -> None:
        self.home = home
        self.pystray = _import_pystray()
        from qmoi_sync.agent.tray_icons import draw_icon

        self._draw_icon = draw_icon
        self.test_actions_file = test_actions_file
        self._quit = threading.Event()
        self._ended = threading.Event()
        self._wake = threading.Event()
        self._pending: View | None = None
        self._pending_lock = threading.Lock()
        #: action id -> the pystray MenuItem currently showing it (rebuilt with the menu)
        self.items: dict[str, Any] = {}
        from qmoi_sync.agent import tray_popup

        # pystray's plain X11 backend shows no menu: a left click runs the default item,
        # which then pops up the same menu with Tk (agent/tray_popup.py).
        needs_popup = not self.pystray.Icon.HAS_MENU and tray_popup.available()
        self.controller = TrayController(
            request=lambda payload: control(home, payload),
            open_folder=open_folder,
            quit=self._request_quit,
            on_view=self._view_changed,
            popup_menu=self._popup if needs_popup else None,
        )
        view = self.controller.view
        self.icon = self.pystray.Icon(
            APP_NAME,
            icon=self._draw_icon(view.state),
            title=view.tooltip,
            menu=self._menu(view.menu),
        )
        self._shown_state: TrayState = view.state
        self._x_hook = self._install_x_hook()

    # -- callbacks (any thread; never touch the icon) -----------------------------------------

    def _request_quit(self) -> None:
        self._quit.set()
        self._wake.set()

    def _popup(self, entries: tuple[MenuEntry, ...]) -> None:
        from qmoi_sync.agent import tray_popup

        def run(action: str) -> None:
            item = self.items.get(action)
            if item is not None:
                item(self.icon)  # the same pystray item (and callback) as everywhere else

        tray_popup.popup(entries, run)

    def _view_changed(self, view: View) -> None:
        with self._pending_lock:
            self._pending = view
        self._wake.set()

    def _callback(self, action: str) -> Callable[[Any, Any], str | None]:
        """A menu callback. It must not raise (an exception ends pystray's X event loop): it
        returns None on success, else the error (logged), which the test hook reports."""

        def run(icon: Any, item: Any) -> str | None:
            del icon, item
            try:
                self.controller.invoke(action)
            except Exception as exc:
                log.warning("tray action %s failed: %s", action, exc)
                return str(exc) or type(exc).__name__
            return None

        return run

    # -- menu ---------------------------------------------------------------------------------

    def _menu(self, entries: tuple[MenuEntry, ...]) -> Any:
        items: dict[str, Any] = {}
        menu = self.pystray.Menu(*self._items(entries, items))
        self.items = items
        return menu

    def _items(self, entries: tuple[MenuEntry, ...], index: dict[str, Any]) -> list[Any]:
        ps = self.pystray
        out: list[Any] = []
        for e in entries:
            if e.separator:
                out.append(ps.Menu.SEPARATOR)
            elif e.submenu:
                out.append(ps.MenuItem(e.text, ps.Menu(*self._items(e.submenu, index))))
            elif e.action is not None:
                item = ps.MenuItem(e.text, self._callback(e.action), default=e.default)
                index[e.action] = item
                out.append(item)
            else:
                out.append(ps.MenuItem(e.text, None, enabled=False))
        return out

    # -- the updater thread (pystray's setup thread) -------------------------------------------
    #
    # pystray's X backend runs a call made from another thread by sending its own window a
    # ClientMessage and waiting for the result, over the python-xlib connection its event loop
    # is blocked on. Under load that loses wake-ups: we saw the loop asleep in select() with
    # the message already read off the socket, so an icon update never showed, or quit never
    # ended the loop. With the X backend the updater therefore never touches the icon: it
    # sends ``_QMOI_SYNC_APPLY`` to the icon window over a second connection of its own, and
    # the X loop applies the pending view (or quits) itself, in its own thread, where every
    # pystray call is direct. Other backends are called from the updater as pystray allows.

    APPLY_ATOM = "_QMOI_SYNC_APPLY"

    def _install_x_hook(self) -> bool:
        icon = self.icon
        handlers = getattr(icon, "_message_handlers", None)
        display = getattr(icon, "_display", None)
        if handlers is None or display is None or getattr(icon, "_window", None) is None:
            return False
        import Xlib.X

        # pystray handles ButtonPress (left click: the default item) but its window does not
        # select it, so X never delivers a click; select it.
        icon._window.change_attributes(
            event_mask=Xlib.X.ExposureMask | Xlib.X.StructureNotifyMask | Xlib.X.ButtonPressMask
        )
        atom = display.intern_atom(self.APPLY_ATOM)
        previous = handlers.get(Xlib.X.ClientMessage, lambda event: None)

        def on_client_message(event: Any) -> None:
            if event.client_type == atom:
                self._apply_in_loop()
            else:
                previous(event)

        handlers[Xlib.X.ClientMessage] = on_client_message
        return True

    def _apply_in_loop(self) -> None:
        """In the X loop's thread: show, apply the pending view, or stop. Never raises (an
        exception would end pystray's loop)."""
        try:
            if self._quit.is_set():
                self.icon.stop()
                return
            if not self.icon.visible:
                # One dock request: pystray's visible setter would also redraw through
                # _update_icon, which sends a second one (see _set_image).
                self.icon._icon_valid = True
                self.icon.visible = True
            self._apply_pending()
        except Exception:
            log.exception("tray update failed")

    def _send_to_loop(self) -> None:
        """Wake the X loop with ``_QMOI_SYNC_APPLY``, over a connection of our own."""
        window = self.icon._window
        try:
            import Xlib.display
            import Xlib.protocol.event

            d = Xlib.display.Display()
            try:
                target = d.create_resource_object("window", window.id)
                event = Xlib.protocol.event.ClientMessage(
                    window=target,
                    client_type=d.intern_atom(self.APPLY_ATOM),
                    data=(32, [0] * 5),
                )
                target.send_event(event, event_mask=0)
                d.flush()
            finally:
                d.close()
        except Exception as exc:  # the window may be gone already
            log.debug("X loop not reached: %s", exc)

    def _updater(self, icon: Any) -> None:
        in_loop = self._x_hook
        if in_loop:
            self._send_to_loop()  # shows the icon
        else:
            icon.visible = True
        next_poll = 0.0
        while not self._quit.is_set():
            if time.monotonic() >= next_poll:
                self.controller.refresh()
                next_poll = time.monotonic() + POLL_INTERVAL_S
            if in_loop:
                with self._pending_lock:
                    pending = self._pending is not None
                if pending:
                    self._send_to_loop()
            else:
                self._apply_pending()
            self._wake.wait(timeout=max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
        if not in_loop:
            icon.stop()
            return
        # The loop stops itself; this thread must end now (pystray's stop() joins it).
        threading.Thread(target=self._stop_loop, name="tray-stop", daemon=True).start()

    def _stop_loop(self) -> None:
        for _ in range(30):
            self._send_to_loop()
            if self._ended.wait(1.0):
                return
        log.error("the tray's X loop did not stop")

    def _set_image(self, image: Any) -> None:
        icon = self.icon
        if not self._x_hook:
            icon.icon = image
            return
        # X backend, in its loop: redraw in place. pystray's icon setter re-sends the XEMBED
        # dock request on every change; the tray host then re-embeds the icon each time, and
        # quick re-embedding left trayer confused (the icon undocked, clicks lost).
        icon._icon = image
        icon._icon_data = None
        icon._draw()

    def _apply_pending(self) -> None:
        with self._pending_lock:
            view, self._pending = self._pending, None
        if view is None:
            return
        icon = self.icon
        if view.state is not self._shown_state:
            self._set_image(self._draw_icon(view.state))
            self._shown_state = view.state
        icon.title = view.tooltip
        icon.menu = self._menu(view.menu)  # pystray's setter also updates the shown menu

    # -- test hook ------------------------------------------------------------------------------

    def _test_hook(self, path: Path) -> None:
        """Read action ids (one a line) appended to ``path`` and call the current menu's
        pystray item for each — exactly what a click on it calls. Results are appended to
        ``path.done`` as ``<action> ok`` or ``<action> error: <message>``."""
        done = path.with_name(path.name + ".done")
        seen = 0
        while not self._quit.is_set():
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            for action in lines[seen:]:
                action = action.strip()
                if not action:
                    continue
                item = self.items.get(action)
                if item is None:
                    outcome = f"error: {action!r} is not in the current menu"
                else:
                    error = item(self.icon)  # pystray MenuItem.__call__ → our callback
                    outcome = "ok" if error is None else f"error: {error}"
                with open(done, "a") as f:
                    f.write(f"{action} {outcome}\n")
            seen = len(lines)
            self._quit.wait(0.05)

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> None:
        hook: threading.Thread | None = None
        if self.test_actions_file is not None:
            hook = threading.Thread(
                target=self._test_hook, args=(self.test_actions_file,), daemon=True
            )
            hook.start()
        try:
            self.icon.run(setup=self._updater)
        finally:
            self._ended.set()
            if hook is not None:  # let it record the result of the action that quit
                hook.join(timeout=CONTROL_TIMEOUT_S)


def run_tray(home: Home, *, start_agent: bool = True, test_actions_file: Path | None = None) -> int:
    """The ``qmoi-sync tray`` command."""
    tray = Tray(home, test_actions_file)  # fails early (no extra, no display) before any start
    if start_agent:
        ensure_agent(home)
    tray.run()
    return 0
