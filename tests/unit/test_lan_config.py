"""LAN settings (config.json) and the CLI that edits them; which tags a space recognizes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harness import cli

from qmoi_sync.agent import lan_config as C
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.peer_sync import SpaceLan
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog, Role


def test_defaults_and_per_space_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(C.KILL_SWITCH_ENV, raising=False)
    s = C.load_settings(tmp_path)
    assert s.lan.enabled and s.lan.port == C.DEFAULT_LAN_PORT and s.lan.interfaces == []
    assert s.lan_enabled_for("abc")
    C.set_value(s, "lan.enabled", "false", "abc")
    assert not s.lan_enabled_for("abc") and s.lan_enabled_for("other")
    C.set_value(s, "lan.enabled", "on", "abc")
    assert s.lan_enabled_for("abc")
    C.set_value(s, "lan.enabled", "off", None)
    assert not s.lan_enabled_for("abc") and not s.lan_enabled_for("other")
    C.set_value(s, "lan.port", "0", None)
    C.set_value(s, "lan.interfaces", "eth0, wlan0", None)
    C.save_settings(tmp_path, s)
    assert os.stat(C.settings_path(tmp_path)).st_mode & 0o777 == 0o600
    again = C.load_settings(tmp_path)
    assert again == s and again.lan.interfaces == ["eth0", "wlan0"]
    C.set_value(again, "lan.interfaces", "all", None)
    assert again.lan.interfaces == []


def test_kill_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    s = C.DeviceSettings()
    monkeypatch.setenv(C.KILL_SWITCH_ENV, "off")
    assert not s.lan_enabled_for("x")
    monkeypatch.setenv(C.KILL_SWITCH_ENV, "on")
    assert s.lan_enabled_for("x")


@pytest.mark.parametrize(
    ("key", "value", "space"),
    [
        ("lan.enabled", "maybe", None),
        ("lan.port", "70000", None),
        ("lan.port", "x", None),
        ("lan.interfaces", "eth0;rm -rf", None),
        ("lan.colour", "blue", None),
        ("lan.port", "1", "abc"),
    ],
)
def test_bad_values_are_refused(key: str, value: str, space: str | None) -> None:
    with pytest.raises(UserError):
        C.set_value(C.DeviceSettings(), key, value, space)


def test_broken_file_is_a_readable_error(tmp_path: Path) -> None:
    C.settings_path(tmp_path).write_text('{"lan": {"port": "many"}}')
    with pytest.raises(UserError, match="not a valid config file"):
        C.load_settings(tmp_path)


def test_cli_config_set_get(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cli(home, "init", "--name", "dev")
    folder = tmp_path / "notes"
    space_id = cli(home, "space", "create", "notes", "--folder", str(folder)).stdout.split()[-1]
    assert cli(home, "config", "set", "lan.port", "47999").stdout.strip() == "lan.port = 47999"
    cli(home, "config", "set", "--space", "notes", "lan.enabled", "false")
    data = json.loads((home / "config.json").read_text())
    assert data["lan"]["port"] == 47999
    assert data["spaces"][space_id]["lan"]["enabled"] is False
    got = json.loads(cli(home, "config", "get", "--space", "notes", "--json").stdout)
    assert got == {"lan.enabled": False, "effective lan.enabled": False}
    bad = cli(home, "config", "set", "lan.port", "99999", check=False)
    assert bad.returncode == 2 and "out of range" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli(home, "config", "set", "--space", "nope", "lan.enabled", "false", check=False)
    assert bad.returncode == 2 and "no space named" in bad.stderr


class _Rt:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self.sync = type("S", (), {"space_bytes": keyring.space_id, "on_sealed": None})()


def test_accepted_tags_cover_skew_and_recent_epochs() -> None:
    admin, other = DeviceIdentity.generate(), DeviceIdentity.generate()
    log, s0 = MembershipLog.create(admin, time.time())
    log.add_member(admin, other.public, Role.member, {0: s0}, time.time())
    space = SpaceLan(_Rt(Keyring.build(log, admin)), admin.public.sign_pk)  # type: ignore[arg-type]
    now = 1_800_000_000.0
    tag = space.current_tag(now)
    assert tag is not None
    accepted = space.accepted_tags(now)
    # a peer whose clock is one window behind or ahead is still recognized
    assert space.current_tag(now - L.TAG_WINDOW_S) in accepted
    assert space.current_tag(now + L.TAG_WINDOW_S) in accepted
    assert space.current_tag(now + 2 * L.TAG_WINDOW_S) not in accepted
    # after a revocation the new epoch's tag is advertised; a member that has not heard of it
    # yet still advertises the previous epoch's tag, which is still recognized
    log.remove_member(admin, other.public.sign_pk, time.time())
    space.rt.keyring = Keyring.build(log, admin)
    new_tag = space.current_tag(now)
    assert new_tag != tag
    assert {new_tag, tag} <= space.accepted_tags(now)
