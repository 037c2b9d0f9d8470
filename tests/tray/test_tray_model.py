"""Unit tests of the tray's pure logic (agent/tray_model.py): state → icon/tooltip/menu,
action → control request, and the controller's behaviour with an injected control client."""

from __future__ import annotations

from typing import Any

import pytest

from qmoi_sync.agent.control import AgentNotRunning
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.status import (
    AgentStatus,
    DeviceStatus,
    PolicyStatus,
    RelayStatus,
    SpaceStatus,
    StatusReport,
)
from qmoi_sync.agent.tray_model import (
    COLOURS,
    SEPARATOR,
    MenuEntry,
    TrayController,
    TrayState,
    UnknownAction,
    View,
    build_menu,
    control_request,
    iter_actions,
    overall_state,
    render,
    space_line,
    tooltip,
)


def space(name: str, state: str = "idle", **kw: Any) -> SpaceStatus:
    fields: dict[str, Any] = {
        "id": f"id-{name}",
        "name": name,
        "folder": f"/home/u/{name}",
        "role": "admin",
        "state": state,
        "relay": RelayStatus(url="wss://r", connected=state not in ("offline",)),
        "pending_out": 0,
        "last_sync": "2026-11-25T14:48:21.295222+00:00",
        "conflicts": 0,
        "quarantined": 0,
        "files": 3,
        "warnings": [],
        "devices": [],
    }
    fields.update(kw)
    return SpaceStatus(**fields)


def report(*spaces: SpaceStatus, policy: str = "normal", running: bool = True) -> StatusReport:
    return StatusReport(
        device=DeviceStatus(id="D", short_id="D", name="laptop"),
        agent_running=running,
        spaces=list(spaces),
        agent=AgentStatus(
            pid=1,
            cpu_percent=0.0,
            rss_bytes=1,
            uptime_s=1.0,
            policy=PolicyStatus(state=policy),  # type: ignore[arg-type]
        )
        if running
        else None,
    )


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ((), TrayState.SYNCED),
        (("idle",), TrayState.SYNCED),
        (("idle", "idle"), TrayState.SYNCED),
        (("syncing", "idle"), TrayState.SYNCING),
        (("offline", "idle"), TrayState.OFFLINE),
        (("offline", "syncing"), TrayState.SYNCING),
        (("error", "syncing"), TrayState.ERROR),
        (("paused",), TrayState.PAUSED),
        (("paused", "paused"), TrayState.PAUSED),
        # A paused space does not hide the others' state, and is not itself a problem.
        (("paused", "idle"), TrayState.SYNCED),
        (("paused", "error"), TrayState.ERROR),
        (("paused", "offline"), TrayState.OFFLINE),
    ],
)
def test_overall_state(states: tuple[str, ...], expected: TrayState) -> None:
    r = report(*(space(f"s{i}", st) for i, st in enumerate(states)))
    assert overall_state(r) is expected


def test_no_agent_and_full_disk_are_errors() -> None:
    assert overall_state(None) is TrayState.ERROR
    assert overall_state(report(space("a"), running=False)) is TrayState.ERROR
    assert overall_state(report(space("a"), policy="disk_full")) is TrayState.ERROR
    assert overall_state(report(space("a"), policy="deferring_bulk")) is TrayState.SYNCED


def test_every_state_has_a_distinct_colour() -> None:
    assert set(COLOURS) == set(TrayState)
    assert len(set(COLOURS.values())) == len(TrayState)


def test_tooltip() -> None:
    assert tooltip(None) == "qmoi-sync: agent not running"
    assert tooltip(None, "timed out") == "qmoi-sync: agent not running (timed out)"
    assert tooltip(report()) == "qmoi-sync: no spaces yet"
    assert tooltip(report(space("a"))) == "qmoi-sync: synced, 1 space"
    r = report(space("a", conflicts=2), space("b", "paused"), space("c", "syncing"))
    assert tooltip(r) == "qmoi-sync: syncing, 3 spaces, paused: b, 2 conflicts"
    assert tooltip(report(space("a", "paused"))) == "qmoi-sync: paused, 1 space"
    # ASCII only (X WM_NAME is Latin-1) and bounded, whatever the space names.
    long = report(*(space(f"ünïcødé-{i}-" + "x" * 20, "paused") for i in range(9)), space("z"))
    text = tooltip(long)
    assert text.isascii() and len(text) <= 127 and text.endswith("...")


def test_space_line() -> None:
    assert space_line(space("notes")) == "notes — synced · 3 files"
    assert space_line(space("n", "syncing", pending_out=4, files=1, conflicts=1)) == (
        "n — syncing · 4 to send · 1 file · 1 conflict"
    )
    assert space_line(space("n", "paused")) == "n — paused · 3 files"


def _find(menu: tuple[MenuEntry, ...], text: str) -> MenuEntry:
    for e in menu:
        if e.text == text:
            return e
    raise AssertionError(f"{text!r} not in {[e.text for e in menu]}")


def test_menu_for_two_spaces() -> None:
    r = report(space("notes"), space("photos", "paused", warnings=["binary skipped: a.png"]))
    menu = build_menu(r)
    header = menu[0]
    assert header.text == tooltip(r) and not header.enabled
    notes = _find(menu, "notes — synced · 3 files")
    assert [e.text for e in notes.submenu if not e.separator][:2] == ["Open folder", "Pause"]
    assert notes.submenu[0].action == "open:id-notes"
    assert notes.submenu[1].action == "pause:id-notes"
    assert MenuEntry("folder: /home/u/notes") in notes.submenu
    assert MenuEntry("last sync: 2026-11-25 14:48:21 UTC") in notes.submenu
    photos = _find(menu, "photos — paused · 3 files")
    assert photos.submenu[1] == MenuEntry("Resume", "resume:id-photos")
    assert MenuEntry("binary skipped: a.png") in photos.submenu
    # Some paused, some not: both global toggles are offered.
    assert _find(menu, "Pause all").action == "pause_all"
    assert _find(menu, "Resume all").action == "resume_all"
    # Exactly one default item (what a left click does where menus are not supported).
    defaults = [e for e in menu if e.default]
    assert defaults == [MenuEntry("Open folder", "open:id-notes", default=True)]
    assert [e.action for e in menu[-2:]] == ["quit", "quit_stop_agent"]
    assert SEPARATOR in menu


def test_menu_global_toggles_follow_state() -> None:
    all_paused = iter_actions(build_menu(report(space("a", "paused"))))
    assert "resume_all" in all_paused and "pause_all" not in all_paused
    none_paused = iter_actions(build_menu(report(space("a"))))
    assert "pause_all" in none_paused and "resume_all" not in none_paused


def test_menu_without_agent_offers_refresh_and_quit_only() -> None:
    menu = build_menu(None)
    assert iter_actions(menu) == ["refresh", "quit"]
    assert [e for e in menu if e.default] == [MenuEntry("Refresh", "refresh", default=True)]


def test_control_requests() -> None:
    assert control_request("pause:abc") == {"cmd": "pause", "space": "abc"}
    assert control_request("resume:abc") == {"cmd": "resume", "space": "abc"}
    assert control_request("pause_all") == {"cmd": "pause", "space": None}
    assert control_request("resume_all") == {"cmd": "resume", "space": None}
    assert control_request("quit_stop_agent") == {"cmd": "stop"}
    for action in ("open:abc", "quit", "refresh", "pause:", "bogus"):
        assert control_request(action) is None, action


def test_control_requests_validate_against_the_control_api() -> None:
    """Every request the tray can send is a valid request of agent/control.py."""
    from qmoi_sync.agent.control import _REQUESTS

    r = report(space("a"), space("b", "paused"))
    for action in iter_actions(build_menu(r)):
        payload = control_request(action)
        if payload is not None:
            _REQUESTS[payload["cmd"]].model_validate({"v": 1, **payload})


class Recorder:
    """The controller's I/O, recorded: a scripted status source and what was asked."""

    def __init__(self, *reports: StatusReport | Exception) -> None:
        self.reports = list(reports)
        self.requests: list[dict[str, Any]] = []
        self.opened: list[str] = []
        self.quits = 0
        self.views: list[View] = []

    def request(self, payload: dict[str, Any]) -> Any:
        self.requests.append(payload)
        if payload["cmd"] == "status":
            nxt = self.reports[0] if len(self.reports) == 1 else self.reports.pop(0)
            if isinstance(nxt, Exception):
                raise nxt
            return nxt.model_dump(mode="json")
        if payload["cmd"] == "pause" and payload["space"] == "id-missing":
            raise UserError("no space named 'id-missing' on this device")
        return {"paused": ["a"]}

    def controller(self) -> TrayController:
        def quit_() -> None:
            self.quits += 1

        return TrayController(
            request=self.request,
            open_folder=self.opened.append,
            quit=quit_,
            on_view=self.views.append,
        )


def test_controller_refresh_and_actions() -> None:
    io = Recorder(report(space("a")), report(space("a", "paused")))
    c = io.controller()
    view = c.refresh()
    assert view.state is TrayState.SYNCED and io.views == [view]
    c.refresh()  # -> paused
    assert c.view.state is TrayState.PAUSED and len(io.views) == 2
    c.refresh()  # unchanged: no new view is pushed
    assert len(io.views) == 2
    c.invoke("resume:id-a")
    assert {"cmd": "resume", "space": "id-a"} in io.requests
    assert io.requests[-1] == {"cmd": "status"}  # refreshed right after the action
    c.invoke("open:id-a")
    assert io.opened == ["/home/u/a"]
    with pytest.raises(UnknownAction):
        c.invoke("pause:id-a")  # not offered while paused: the menu shows Resume
    with pytest.raises(UnknownAction):
        c.invoke("open:elsewhere")
    c.invoke("quit")
    assert io.quits == 1
    c.invoke("quit_stop_agent")
    assert io.requests[-1] == {"cmd": "stop"} and io.quits == 2


def test_controller_shows_agent_gone_and_back() -> None:
    io = Recorder(report(space("a")), AgentNotRunning("gone"), TimeoutError(), report(space("a")))
    c = io.controller()
    assert c.refresh().state is TrayState.SYNCED
    v = c.refresh()
    assert v.state is TrayState.ERROR and v.tooltip == "qmoi-sync: agent not running"
    assert iter_actions(v.menu) == ["refresh", "quit"]
    v = c.refresh()
    assert v.tooltip == "qmoi-sync: agent not running (TimeoutError)"
    assert c.refresh().state is TrayState.SYNCED


def test_controller_refused_action_raises_and_keeps_state() -> None:
    r = report(space("a"), space("missing"))
    r.spaces[1].id = "id-missing"
    io = Recorder(r)
    c = io.controller()
    c.refresh()
    with pytest.raises(UserError):
        c.invoke("pause:id-missing")
    assert c.view == render(r)


def test_popup_menu_for_backends_without_menus() -> None:
    """pystray's X backend only runs the default item on a left click: the default item then
    pops the (same) menu up, and is the only default."""
    from qmoi_sync.agent.tray_model import popup_entries

    r = report(space("a"))
    menu = build_menu(r, popup=True)
    assert menu[0] == MenuEntry("Menu...", "menu", default=True)
    assert [e for e in menu if e.default] == [menu[0]]
    shown = popup_entries(menu)
    assert "menu" not in iter_actions(shown)
    assert iter_actions(shown) == iter_actions(build_menu(r))

    popped: list[tuple[MenuEntry, ...]] = []
    io = Recorder(r)
    c = TrayController(
        request=io.request,
        open_folder=io.opened.append,
        quit=lambda: None,
        popup_menu=popped.append,
    )
    c.refresh()
    assert c.view.menu[0].action == "menu"
    c.invoke("menu")
    assert popped == [shown] and io.requests == [{"cmd": "status"}]
