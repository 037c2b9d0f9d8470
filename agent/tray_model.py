"""The tray's logic, free of any GUI toolkit: status report → icon state, tooltip and menu;
menu action → control request. ``agent/tray.py`` is the thin pystray glue around it.

Everything here is pure (no I/O, no pystray, no Pillow) except :class:`TrayController`, whose
I/O (the control request, opening a folder, quitting) is injected.

Action ids are plain strings, so the same ids name menu entries, drive the test hook
(``qmoi-sync tray --test-actions-file``) and appear in logs:

=====================  ==================================================================
``open:<space id>``    open the space's folder in the file manager
``pause:<space id>``   control request ``{"cmd": "pause", "space": <id>}``
``resume:<space id>``  control request ``{"cmd": "resume", "space": <id>}``
``pause_all``          ``{"cmd": "pause", "space": null}``
``resume_all``         ``{"cmd": "resume", "space": null}``
``refresh``            poll the agent now
``menu``               pop the menu up (backends that show no menu: the left-click default)
``quit``               quit the tray (the agent keeps running)
``quit_stop_agent``    ``{"cmd": "stop"}``, then quit the tray
=====================  ==================================================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import ValidationError

from qmoi_sync.agent.control import AgentNotRunning
from qmoi_sync.agent.status import SpaceStatus, StatusReport

log = logging.getLogger("qmoi_sync.tray")

POLL_INTERVAL_S = 2.0
APP_NAME = "qmoi-sync"


class TrayState(Enum):
    """What the icon shows, worst first (see :func:`overall_state`)."""

    ERROR = "error"
    SYNCING = "syncing"
    OFFLINE = "offline"
    PAUSED = "paused"
    SYNCED = "synced"


#: Icon colours (RGB): green synced, blue syncing, amber paused, red error, grey offline.
COLOURS: dict[TrayState, tuple[int, int, int]] = {
    TrayState.SYNCED: (46, 160, 67),
    TrayState.SYNCING: (31, 111, 235),
    TrayState.PAUSED: (219, 154, 4),
    TrayState.ERROR: (207, 34, 46),
    TrayState.OFFLINE: (110, 118, 129),
}

_SPACE_WORDS = {
    "idle": "synced",
    "syncing": "syncing",
    "offline": "offline",
    "error": "error",
    "paused": "paused",
}


@dataclass(frozen=True)
class View:
    """One rendering of the agent's status for the tray."""

    state: TrayState
    tooltip: str
    menu: tuple[MenuEntry, ...]


@dataclass(frozen=True)
class MenuEntry:
    """A menu item (``action`` None = an informational, disabled line), or a separator."""

    text: str = ""
    action: str | None = None
    submenu: tuple[MenuEntry, ...] = ()
    default: bool = False
    separator: bool = False

    @property
    def enabled(self) -> bool:
        return self.action is not None or bool(self.submenu)


SEPARATOR = MenuEntry(separator=True)


def overall_state(report: StatusReport | None) -> TrayState:
    """The icon's state. No agent → error. Every space paused → paused. Otherwise, ignoring
    paused spaces, the worst of: error (a space refused/removed, or the disk is full),
    syncing, offline (relay unreachable); synced when nothing is wrong (or there are no
    spaces)."""
    if report is None or not report.agent_running:
        return TrayState.ERROR
    spaces = report.spaces
    if spaces and all(s.state == "paused" for s in spaces):
        return TrayState.PAUSED
    active = [s.state for s in spaces if s.state != "paused"]
    if "error" in active:
        return TrayState.ERROR
    if report.agent is not None and report.agent.policy.state == "disk_full":
        return TrayState.ERROR
    if "syncing" in active:
        return TrayState.SYNCING
    if "offline" in active:
        return TrayState.OFFLINE
    return TrayState.SYNCED


def space_line(space: SpaceStatus) -> str:
    """``notes — synced · 12 files`` plus what needs attention."""
    parts = [_SPACE_WORDS.get(space.state, space.state)]
    if space.state == "syncing" and space.pending_out:
        parts.append(f"{space.pending_out} to send")
    parts.append(f"{space.files} file{'s' if space.files != 1 else ''}")
    if space.conflicts:
        parts.append(f"{space.conflicts} conflict{'s' if space.conflicts != 1 else ''}")
    return f"{space.name} — {' · '.join(parts)}"


def tooltip(report: StatusReport | None, problem: str | None = None) -> str:
    """A short summary for the icon's tooltip/title: ASCII (the X backend puts it in the
    Latin-1 WM_NAME) and at most 127 characters (the Windows limit)."""
    state = overall_state(report)
    if report is None or not report.agent_running:
        text = f"{APP_NAME}: agent not running" + (f" ({problem})" if problem else "")
    elif not report.spaces:
        text = f"{APP_NAME}: no spaces yet"
    else:
        n = len(report.spaces)
        text = f"{APP_NAME}: {state.value}, {n} space{'s' if n != 1 else ''}"
        paused = [s.name for s in report.spaces if s.state == "paused"]
        if paused and state is not TrayState.PAUSED:
            text += f", paused: {', '.join(paused)}"
        conflicts = sum(s.conflicts for s in report.spaces)
        if conflicts:
            text += f", {conflicts} conflict{'s' if conflicts != 1 else ''}"
    text = text.encode("ascii", "replace").decode()  # space names may be anything
    return text if len(text) <= 127 else text[:124] + "..."


def build_menu(
    report: StatusReport | None, problem: str | None = None, popup: bool = False
) -> tuple[MenuEntry, ...]:
    """The menu: a status header, one submenu per space (its state and details, open folder,
    pause/resume), open folder of the first space as the default action, pause/resume all,
    quit (tray only, or tray and agent).

    ``popup``: the toolkit shows no menu, only a left click that runs the default item; then
    the default item is a "Menu..." entry (action ``menu``) that pops this menu up."""
    entries: list[MenuEntry] = [MenuEntry(tooltip(report, problem))]
    spaces = report.spaces if report is not None and report.agent_running else []
    if spaces:
        entries.append(SEPARATOR)
    for space in spaces:
        details = [MenuEntry(f"folder: {space.folder}")]
        if space.pending_out:
            details.append(MenuEntry(f"{space.pending_out} change(s) waiting to be sent"))
        if space.last_sync:
            details.append(MenuEntry(f"last sync: {space.last_sync[:19].replace('T', ' ')} UTC"))
        details += [MenuEntry(w) for w in space.warnings[:3]]
        toggle = (
            MenuEntry("Resume", f"resume:{space.id}")
            if space.state == "paused"
            else MenuEntry("Pause", f"pause:{space.id}")
        )
        entries.append(
            MenuEntry(
                space_line(space),
                submenu=(
                    MenuEntry("Open folder", f"open:{space.id}"),
                    toggle,
                    SEPARATOR,
                    *details,
                ),
            )
        )
    entries.append(SEPARATOR)
    if spaces:
        entries.append(MenuEntry("Open folder", f"open:{spaces[0].id}", default=True))
        if any(s.state != "paused" for s in spaces):
            entries.append(MenuEntry("Pause all", "pause_all"))
        if any(s.state == "paused" for s in spaces):
            entries.append(MenuEntry("Resume all", "resume_all"))
        entries.append(SEPARATOR)
    entries.append(MenuEntry("Refresh", "refresh", default=not spaces))
    entries.append(MenuEntry("Quit", "quit"))
    if report is not None and report.agent_running:
        entries.append(MenuEntry("Quit and stop the agent", "quit_stop_agent"))
    if popup:
        plain = [MenuEntry(e.text, e.action, e.submenu, False, e.separator) for e in entries]
        return (MenuEntry("Menu...", "menu", default=True), *plain)
    return tuple(entries)


def popup_entries(menu: tuple[MenuEntry, ...]) -> tuple[MenuEntry, ...]:
    """The menu a popup shows: without its own "Menu..." entry."""
    return tuple(e for e in menu if e.action != "menu")


def render(report: StatusReport | None, problem: str | None = None, popup: bool = False) -> View:
    return View(overall_state(report), tooltip(report, problem), build_menu(report, problem, popup))


def iter_actions(menu: Sequence[MenuEntry]) -> list[str]:
    """Every action id reachable in a menu (depth first)."""
    out: list[str] = []
    for entry in menu:
        if entry.action is not None:
            out.append(entry.action)
        out += iter_actions(entry.submenu)
    return out


def control_request(action: str) -> dict[str, Any] | None:
    """The control request an action sends (None: the action sends none)."""
    verb, _, arg = action.partition(":")
    if verb in ("pause", "resume") and arg:
        return {"cmd": verb, "space": arg}
    if action in ("pause_all", "resume_all"):
        return {"cmd": action.removesuffix("_all"), "space": None}
    if action == "quit_stop_agent":
        return {"cmd": "stop"}
    return None


class UnknownAction(ValueError):
    pass


Requester = Callable[[dict[str, Any]], Any]


@dataclass
class TrayController:
    """Holds the latest status and performs actions; the toolkit glue calls :meth:`refresh`
    every ``POLL_INTERVAL_S`` and :meth:`invoke` from menu callbacks (any thread).

    ``request(payload)`` sends one control request and returns its result; it raises
    ``AgentNotRunning`` (or ``OSError``) when nobody listens and ``UserError`` when the agent
    refuses. ``open_folder(path)`` opens a folder; ``quit()`` ends the tray's main loop;
    ``on_view(view)`` is called after every refresh whose view changed.
    """

    request: Requester
    open_folder: Callable[[str], None]
    quit: Callable[[], None]
    on_view: Callable[[View], None] = lambda view: None
    #: Set when the toolkit shows no menu: pops the given entries up (action ``menu``).
    popup_menu: Callable[[tuple[MenuEntry, ...]], None] | None = None
    report: StatusReport | None = None
    problem: str | None = None
    view: View = field(default_factory=lambda: render(None))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.view = render(None, popup=self.popup_menu is not None)

    def refresh(self) -> View:
        try:
            report: StatusReport | None = StatusReport.model_validate(
                self.request({"cmd": "status"})
            )
            problem = None
        except AgentNotRunning:
            report, problem = None, None
        except ValidationError as exc:
            report, problem = None, f"unreadable status: {exc.error_count()} error(s)"
        except Exception as exc:  # not running, timed out, refused: shown, never raised
            report, problem = None, _short_error(exc)
        with self._lock:
            self.report, self.problem = report, problem
            view = render(report, problem, popup=self.popup_menu is not None)
            changed = view != self.view
            self.view = view
        if changed:
            self.on_view(view)
        return view

    def invoke(self, action: str) -> Any:
        """Perform one menu action; returns the control result (if any). Raises
        :class:`UnknownAction` for an action the current menu does not offer."""
        with self._lock:
            offered = iter_actions(self.view.menu)
            report = self.report
        if action not in offered:
            raise UnknownAction(f"{action!r} is not in the current menu ({', '.join(offered)})")
        log.info("tray action %s", action)
        result: Any = None
        verb, _, arg = action.partition(":")
        if action == "menu" and self.popup_menu is not None:
            self.popup_menu(popup_entries(self.view.menu))
            return None
        if verb == "open":
            space = _space(report, arg)
            self.open_folder(space.folder)
        elif action == "quit":
            self.quit()
            return None
        else:
            payload = control_request(action)
            if payload is not None:
                result = self.request(payload)
            if action == "quit_stop_agent":
                self.quit()
                return result
        self.refresh()
        return result


def _space(report: StatusReport | None, space_id: str) -> SpaceStatus:
    for s in report.spaces if report is not None else []:
        if s.id == space_id:
            return s
    raise UnknownAction(f"no space {space_id}")


def _short_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 60 else text[:59] + "…"
