"""Writing a settings file back: atomic, mode kept, symlinks followed, never over a newer save."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qmoi_sync.agent.settings_sync import _read, write_settings_atomic


def test_write_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    f = tmp_path / "settings.json"
    f.write_text("{}")
    f.chmod(0o640)
    _data, st = _read(f)
    assert write_settings_atomic(f, b'{"a": 1}', st)
    assert f.read_bytes() == b'{"a": 1}'
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_write_refuses_when_the_file_changed_since_it_was_read(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("a = 1\n")
    _data, st = _read(f)
    f.write_text("a = 2  # saved by the user meanwhile\n")
    assert not write_settings_atomic(f, b"a = 3\n", st)
    assert f.read_text() == "a = 2  # saved by the user meanwhile\n"
    # a file created meanwhile is not clobbered either
    g = tmp_path / "new.ini"
    g.write_text("[x]\n")
    assert not write_settings_atomic(g, b"[y]\n", None)


def test_missing_file_and_folder_are_created(tmp_path: Path) -> None:
    f = tmp_path / "deep" / "er" / "settings.json"
    assert _read(f) == (None, None)
    assert write_settings_atomic(f, b"{}\n", None)
    assert f.read_bytes() == b"{}\n"


def test_symlinked_settings_file_is_written_through_the_link(tmp_path: Path) -> None:
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = dotfiles / "gitconfig"
    real.write_text("[user]\n")
    link = tmp_path / ".gitconfig"
    link.symlink_to(real)
    _data, st = _read(link)
    assert write_settings_atomic(link, b"[user]\n\tname = A\n", st)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "[user]\n\tname = A\n"
