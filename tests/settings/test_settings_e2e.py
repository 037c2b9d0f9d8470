"""Settings sync end to end: a relay and two real agent processes, real settings files outside
the space folders, real watchers. Every wait has a deadline; nothing sleeps blindly."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import Device, Relay, cluster, grep_bytes, wait_idle, wait_until
from settings_helpers import (
    SLOW_POLL,
    add,
    conflicts,
    leaves,
    settings_doc,
    shared_values,
    wait_shared,
    wait_value,
)

from qmoi_sync.agent.settings_formats import canon

VSCODE = """{
    // Appearance
    "workbench.colorTheme": "Default Dark+",
    "editor.fontSize": 14, // points
    "editor.tabSize": 4,
    /* wrapping:
       off | on | bounded */
    "editor.wordWrap": "off",
    "files.exclude": {
        "**/.git": true,
    },
    "types": {
        "int": 1,
        "big": 12345678901234567890,
        "float": 2.5,
        "whole float": 3.0,
        "bool": false,
        "null": null,
        "list": [1, "x", {"y": true}, []],
        "unicode": "Zoë ✓ 日本",
        "empty": {}
    },
}
"""

RUFF = """# ruff, shared by every machine
line-length = 100  # wide screens
target-version = "py311"

[lint]
# the rules
select = ["E", "F"]
ignore = []  # nothing yet

[format]
quote-style = "double"
"""

GITCONFIG = """# git, shared
[user]
\tname = Alice Example
\temail = alice@example.com
[core]
\teditor = vim  # the one true editor
\tautocrlf = input
[pull]
\trebase = false
"""


@dataclass
class Case:
    fmt: str
    name: str
    a_path: str
    b_path: str
    a_text: str
    b_initial: str | None  # None: no file on b; "": an empty file; else its content
    # (key path, text on a's side before, after, the new value) — a substring edit of the file
    a_edit: tuple[tuple[str, ...], str, str, Any]
    b_edit: tuple[tuple[str, ...], str, str, Any]
    # the same key on both: (key, a before, a after, a value, b before, b after, b value)
    both: tuple[tuple[str, ...], str, str, Any, str, str, Any]


CASES = [
    Case(
        "json",
        "vscode",
        "a-home/.config/Code/User/settings.json",
        "b-elsewhere/vscode/settings.jsonc",
        VSCODE,
        None,
        (("editor.fontSize",), '"editor.fontSize": 14,', '"editor.fontSize": 16,', 16),
        (("editor.tabSize",), '"editor.tabSize": 4', '"editor.tabSize": 2', 2),
        (
            ("editor.wordWrap",),
            '"editor.wordWrap": "off"',
            '"editor.wordWrap": "on"',
            "on",
            '"editor.wordWrap": "off"',
            '"editor.wordWrap": "bounded"',
            "bounded",
        ),
    ),
    Case(
        "toml",
        "ruff",
        "a-home/.config/ruff/ruff.toml",
        "b-elsewhere/projects/ruff.toml",
        RUFF,
        RUFF,
        (("line-length",), "line-length = 100", "line-length = 120", 120),
        (("lint", "ignore"), "ignore = []", 'ignore = ["E501"]', ["E501"]),
        (
            ("format", "quote-style"),
            'quote-style = "double"',
            'quote-style = "single"',
            "single",
            'quote-style = "double"',
            'quote-style = "preserve"',
            "preserve",
        ),
    ),
    Case(
        "ini",
        "git",
        "a-home/.gitconfig",
        "b-elsewhere/home/.gitconfig",
        GITCONFIG,
        "",
        (("core", "autocrlf"), "autocrlf = input", "autocrlf = true", "true"),
        (("pull", "rebase"), "rebase = false", "rebase = true", "true"),
        (
            ("user", "email"),
            "email = alice@example.com",
            "email = alice@work.example",
            "alice@work.example",
            "email = alice@example.com",
            "email = alice@home.example",
            "alice@home.example",
        ),
    ),
]


def _edit(path: Path, old: str, new: str, by_rename: bool = False) -> str:
    """Replace one substring; ``by_rename``: save as many editors do (temp file + rename)."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}:\n{text}"
    new_text = text.replace(old, new, 1)
    if by_rename:
        tmp = path.with_name(path.name + ".swp-save")
        tmp.write_text(new_text)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    else:
        path.write_text(new_text)
    return new_text


def _same_leaves(x: dict[Any, Any] | None, y: dict[Any, Any] | None) -> bool:
    if x is None or y is None:
        return False
    return {k: canon(v) for k, v in x.items()} == {k: canon(v) for k, v in y.items()}


def _dump(devs: list[Device]) -> str:
    return "\n".join(f"--- {d.name}\n{d.log()[-3000:]}" for d in devs)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.fmt for c in CASES])
def test_two_devices_merge_a_settings_file(tmp_path: Path, case: Case) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        fa, fb = tmp_path / case.a_path, tmp_path / case.b_path
        fa.parent.mkdir(parents=True)
        fa.write_text(case.a_text)
        fa.chmod(0o600)  # kept through every write-back
        if case.b_initial is not None:
            fb.parent.mkdir(parents=True)
            fb.write_text(case.b_initial)
        add(a, fa, case.name)
        add(b, fb, case.name)
        # b's file (missing, empty or a copy) ends up with every value, types and all
        try:
            wait_until(
                lambda: _same_leaves(leaves(fb, case.fmt), leaves(fa, case.fmt)),
                what="b's file holds the shared settings",
            )
        except AssertionError:
            raise AssertionError(
                f"{fb.read_text() if fb.exists() else '-'}\n{_dump([a, b])}"
            ) from None
        assert fa.read_text() == case.a_text  # a's file never rewritten when nothing changed
        if case.b_initial == case.a_text:
            assert fb.read_text() == case.a_text
        b_before = fb.read_text()
        assert settings_doc(a, case.name)["path"] == str(fa)
        assert settings_doc(b, case.name)["path"] == str(fb)

        # b goes offline; both edit a different key, and the same key
        b.stop()
        key1, a_old, a_new, v1 = case.a_edit
        ka, a_old3, a_new3, va, b_old3, b_new3, vb = case.both
        _edit(fa, a_old, a_new, by_rename=True)
        a_text = _edit(fa, a_old3, a_new3, by_rename=True)
        wait_shared(a, case.name, ".".join(key1), v1)
        wait_shared(a, case.name, ".".join(ka), va)
        wait_idle(a)
        key2, b_old, b_new, v2 = case.b_edit
        _edit(fb, b_old, b_new)
        b_text = _edit(fb, b_old3, b_new3)  # later than a's edit: b's value wins
        b.start()

        # both changes survive on both; untouched parts of each file are byte-identical
        want_a = a_text.replace(b_old, b_new, 1).replace(a_new3, b_new3, 1)
        try:
            wait_until(lambda: fa.read_text() == want_a, what="a's file merged")
            want_b = b_text.replace(a_old, a_new, 1)
            wait_until(lambda: fb.read_text() == want_b, what="b's file merged")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\na: {fa.read_text()}\nb: {fb.read_text()}\n{_dump([a, b])}"
            ) from None
        for f in (fa, fb):
            got = leaves(f, case.fmt)
            assert got is not None
            assert got[key1] == v1 and got[key2] == v2 and got[ka] == vb
        assert b_before != fb.read_text()
        assert stat.S_IMODE(fa.stat().st_mode) == 0o600
        assert not [p.name for p in fa.parent.iterdir() if p.name != fa.name]  # no temp files

        # the same key: one winner on both devices, the loser listed by `conflicts`
        for dev in (a, b):
            wait_until(
                lambda dev=dev: len(conflicts(dev)) == 1,
                interval=SLOW_POLL,
                what=f"{dev.name}: one conflict",
            )
            (item,) = conflicts(dev)
            assert item["kind"] == "setting" and item["document"] == case.name
            assert item["key"] == ".".join(ka)
            assert item["winner"]["value"] == vb and item["winner"]["device_name"] == "b"
            assert [lo["value"] for lo in item["losers"]] == [va]
            assert item["losers"][0]["device_name"] == "a"
        text = a.cli("conflicts").stdout
        assert f"settings {case.name}: {'.'.join(ka)}" in text and json.dumps(va) in text

        # changing the key again settles it everywhere
        _edit(fa, b_new3, a_new3)
        wait_value(fb, case.fmt, ka, va)
        wait_until(lambda: conflicts(b) == [], interval=SLOW_POLL, what="conflict settled")


@pytest.mark.slow
def test_types_round_trip_through_the_relay(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        fa, fb = tmp_path / "a.json", tmp_path / "sub" / "b.json"
        fa.write_text(VSCODE)
        add(a, fa, "vscode")
        add(b, fb, "vscode")
        wait_until(lambda: fb.exists() and leaves(fb, "json") is not None, what="b's file")
        # b's file was created from the shared document: plain JSON, strictly equal with types
        got = json.loads(fb.read_text())
        want = {k: v for k, v in json.loads(_strip_jsonc(VSCODE)).items()}
        assert canon(got) == canon(want)
        t = got["types"]
        assert type(t["int"]) is int and type(t["big"]) is int and t["big"] == 12345678901234567890
        assert type(t["whole float"]) is float and t["bool"] is False and t["null"] is None
        assert t["list"] == [1, "x", {"y": True}, []] and t["empty"] == {}
        assert t["unicode"] == "Zoë ✓ 日本"

        # a settings file deleted (or emptied) is written again, not taken as "delete every key"
        b_text = fb.read_text()
        fb.unlink()
        wait_until(lambda: fb.exists() and fb.read_text() == b_text, what="b's file recreated")
        fb.write_text("")
        wait_until(lambda: fb.read_text() == b_text, what="b's emptied file refilled")
        assert fa.read_text() == VSCODE
        assert shared_values(a, "vscode")["editor.fontSize"] == 14


def _strip_jsonc(text: str) -> str:
    from qmoi_sync.agent.settings_jsonc import ParsedJsonc

    tree = ParsedJsonc(text).tree()
    out: dict[str, Any] = {}
    for path, value in tree.leaves.items():
        node = out
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = value
    return json.dumps(out)


@pytest.mark.slow
def test_invalid_file_is_held_then_merged(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        fa, fb = tmp_path / "a" / "settings.json", tmp_path / "b" / "settings.json"
        fa.parent.mkdir()
        fa.write_text(VSCODE)
        add(a, fa, "vscode")
        add(b, fb, "vscode")
        wait_value(fb, "json", ("editor.fontSize",), 14)

        half_saved = VSCODE[: VSCODE.index('"editor.tabSize"') + 10]
        fa.write_text(half_saved)

        def warned() -> str | None:
            st = a.space_status()
            hits = [w for w in st["warnings"] if str(fa) in w and "not valid JSON" in w]
            return hits[0] if hits and settings_doc(a, "vscode")["state"] == "invalid" else None

        warning = wait_until(warned, interval=SLOW_POLL, what="invalid-file warning on a")
        assert "line 5" in warning  # the parse error, with its position
        status = json.loads(a.cli("status", "--json").stdout)
        (doc,) = status["spaces"][0]["settings"]
        assert doc["state"] == "invalid" and "line 5" in doc["error"]

        # meanwhile b changes a key: a's invalid file is never overwritten
        _edit(fb, '"editor.fontSize": 14', '"editor.fontSize": 20')
        wait_shared(a, "vscode", "editor.fontSize", 20)
        wait_idle(b)
        assert fa.read_text() == half_saved
        # ... and nothing of the invalid file was synced
        assert shared_values(b, "vscode")["editor.tabSize"] == 4

        # fixed (with a change of its own): synced again, b's change merged into it
        fixed = VSCODE.replace('"editor.tabSize": 4', '"editor.tabSize": 8')
        fa.write_text(fixed)
        want = fixed.replace('"editor.fontSize": 14,', '"editor.fontSize": 20,')
        wait_until(lambda: fa.read_text() == want, what="a's fixed file merged")
        wait_value(fb, "json", ("editor.tabSize",), 8)
        wait_until(
            lambda: not any("not valid" in w for w in a.space_status()["warnings"]),
            interval=SLOW_POLL,
            what="warning cleared",
        )
        assert settings_doc(a, "vscode")["state"] == "ok"


LOCAL_FONT = "LocalOnlyFont-7f3a9c"
TOKEN = "ghp_SECRETtoken_4b8e1d"
LOCAL_ZOOM = "zoom-level-local-9d2e"


@pytest.mark.slow
def test_device_local_keys_and_secrets_never_leave(tmp_path: Path) -> None:
    with cluster(tmp_path) as (relay, (a, b)):
        assert relay is not None
        fa, fb = tmp_path / "a" / "settings.json", tmp_path / "b" / "settings.json"
        fa.parent.mkdir()
        fb.parent.mkdir()
        fa.write_text('{\n    "editor.fontSize": 14\n}\n')
        add(a, fa, "vscode")
        out = a.cli(
            "settings", "local", "notes", "vscode", "window.zoomLevel", "terminal.integrated.*"
        ).stdout
        assert "window.zoomLevel" in out and "terminal.integrated.*" in out
        fb.write_text(
            "{\n"
            '    "window.zoomLevel": "b-zoom",\n'
            '    "terminal.integrated.fontFamily": "B Mono"\n'
            "}\n"
        )
        add(b, fb, "vscode")
        wait_value(fb, "json", ("editor.fontSize",), 14)

        # a gets a device-local value and a credential; b changes its own local value
        fa.write_text(
            "{\n"
            '    "editor.fontSize": 15,\n'
            f'    "window.zoomLevel": "{LOCAL_ZOOM}",\n'
            f'    "terminal.integrated.fontFamily": "{LOCAL_FONT}",\n'
            f'    "github.copilot.authToken": "{TOKEN}"\n'
            "}\n"
        )
        wait_value(fb, "json", ("editor.fontSize",), 15)
        wait_idle(a)
        got_b = leaves(fb, "json")
        assert got_b is not None
        assert got_b[("window.zoomLevel",)] == "b-zoom"  # never overwritten
        assert got_b[("terminal.integrated.fontFamily",)] == "B Mono"
        assert ("github.copilot.authToken",) not in got_b
        assert set(shared_values(b, "vscode")) == {"editor.fontSize"}
        doc = settings_doc(a, "vscode")
        assert doc["secret_keys"] == ["github.copilot.authToken"] and doc["local_keys"] == 2
        assert any(
            "look like credentials" in w and "--allow-secret" in w
            for w in a.space_status()["warnings"]
        )
        # b's own local edit does not travel either
        fb.write_text(fb.read_text().replace("b-zoom", "b-zoom-2"))
        fa_before = fa.read_text()
        fb.write_text(fb.read_text().replace('"editor.fontSize": 15', '"editor.fontSize": 16'))
        wait_value(fa, "json", ("editor.fontSize",), 16)
        assert fa.read_text() == fa_before.replace('"editor.fontSize": 15', '"editor.fontSize": 16')

        # not in the relay's data, not even in a's own CRDT state (so never sealed)
        wait_idle(a)
        wait_idle(b)
        needles = [v.encode() for v in (TOKEN, LOCAL_FONT, LOCAL_ZOOM, "b-zoom-2")]
        assert grep_bytes(relay.data, needles) == []
        assert grep_bytes(a.home, needles) == []
        assert grep_bytes(b.home, needles) == []

        # allow-listing the credential syncs it from then on
        a.cli("settings", "local", "notes", "vscode", "--allow-secret", "github.copilot.authToken")
        wait_value(fb, "json", ("github.copilot.authToken",), TOKEN)


@pytest.mark.slow
def test_shared_agent_options(tmp_path: Path) -> None:
    with cluster(tmp_path) as (relay1, (a, b)):
        assert relay1 is not None
        # lan.enabled: set on one device, applied on both
        a.cli("settings", "set", "notes", "qmoi-sync", "lan.enabled", "false")

        def lan_option(dev: Device) -> Any:
            out = json.loads(dev.cli("settings", "get", "notes", "qmoi-sync", "--json").stdout)
            return out["options"]["lan.enabled"]["value"]

        for dev in (a, b):
            wait_until(lambda dev=dev: lan_option(dev) is False, interval=SLOW_POLL, what="lan")
        bad = a.cli("settings", "set", "notes", "qmoi-sync", "lan.enabled", "maybe", check=False)
        assert bad.returncode == 2 and "true or false" in bad.stderr

        # relays: moving the space to another relay moves every device
        relay2 = Relay(tmp_path / "relay2-data").start()
        try:
            a.cli("settings", "set", "notes", "qmoi-sync", "relays", json.dumps([relay2.url]))
            for dev in (a, b):
                wait_until(
                    lambda dev=dev: (
                        dev.space_status()["relay"]["url"] == relay2.url
                        and dev.space_status()["relay"]["connected"]
                    ),
                    interval=SLOW_POLL,
                    what=f"{dev.name} on relay 2",
                )
            relay1.stop()
            a.write("after-move.txt", "through relay 2\n")
            wait_until(lambda: b.read("after-move.txt") == "through relay 2\n", what="via relay 2")
            b.write("back.txt", "b to a\n")
            wait_until(lambda: a.read("back.txt") == "b to a\n", what="b to a via relay 2")
            # a device that starts now (or a restart) still uses the new relay
            b.stop()
            b.start()
            wait_until(
                lambda: b.space_status()["relay"]["connected"], interval=SLOW_POLL, what="b back"
            )
            assert b.space_status()["relay"]["url"] == relay2.url
            # The relay move leaves no sequence gap behind on either device (one open since
            # the move would be reported by now); a device that first meets a sender on the
            # new relay is covered by tests/unit/test_relay_order.py (full-state envelopes).
            for dev in (a, b):
                assert dev.space_status()["gaps"] == [], dev.space_status()["gaps"]
        finally:
            relay2.stop()


@pytest.mark.slow
def test_remove_keeps_the_file_and_stops_syncing(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        fa, fb = tmp_path / "a.toml", tmp_path / "b.toml"
        fa.write_text(RUFF)
        add(a, fa, "ruff")
        add(b, fb, "ruff")
        wait_value(fb, "toml", ("line-length",), 100)
        listing = json.loads(b.cli("settings", "list", "--json").stdout)
        (doc,) = listing["spaces"][0]["settings"]
        assert doc["name"] == "ruff" and doc["path"] == str(fb) and doc["format"] == "toml"

        b.cli("settings", "remove", "notes", "ruff")
        b_text = fb.read_text()
        _edit(fa, "line-length = 100", "line-length = 101")
        wait_shared(b, "ruff", "line-length", 101)  # the document still syncs ...
        assert fb.read_text() == b_text  # ... the file no longer does
        # removed from the space: a stops syncing its file too, and says so
        b.cli("settings", "remove", "notes", "ruff", "--everywhere")
        wait_until(
            lambda: settings_doc(a, "ruff")["state"] == "removed",
            interval=SLOW_POLL,
            what="a sees the removal",
        )
        shutil.copy(fa, tmp_path / "keep.toml")
        assert fa.read_text() == (tmp_path / "keep.toml").read_text()
