"""Folder operations of agent/materialize.py: root-confined, never through a symlink, never
replacing or deleting anything that is not an empty folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmoi_sync.agent.materialize import (
    UnsafePathError,
    make_dir,
    remove_dir,
    rename_dir,
    stat_dir,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "space"
    r.mkdir()
    return r


def test_make_dir_creates_parents_and_is_idempotent(root: Path) -> None:
    st = make_dir(root, "a/b/c")
    assert (root / "a/b/c").is_dir()
    assert st.inode == os.stat(root / "a/b/c").st_ino
    assert make_dir(root, "a/b/c").inode == st.inode
    assert stat_dir(root, "a/b/c") == st


def test_make_dir_refuses_symlinks_files_and_escapes(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePathError):
        make_dir(root, "link/inner")
    with pytest.raises(UnsafePathError):
        make_dir(root, "link")  # the link itself is not a folder
    (root / "file").write_text("x")
    with pytest.raises(UnsafePathError):
        make_dir(root, "file")
    with pytest.raises(UnsafePathError):
        make_dir(root, "../escape")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape").exists()
    assert stat_dir(root, "link") is None and stat_dir(root, "file") is None


def test_rename_dir_moves_the_folder_and_never_replaces(root: Path) -> None:
    (root / "src/sub").mkdir(parents=True)
    (root / "src/sub/f.txt").write_text("f")
    inode = os.stat(root / "src").st_ino
    st = rename_dir(root, "src", "deep/dst")
    assert st is not None and st.inode == inode
    assert (root / "deep/dst/sub/f.txt").read_text() == "f"
    # Anything at the target (even an empty folder, which rename(2) would replace): refused.
    (root / "other").mkdir()
    assert rename_dir(root, "deep/dst", "other") is None
    assert (root / "deep/dst/sub/f.txt").exists()
    assert rename_dir(root, "missing", "x") is None


def test_rename_dir_refuses_a_symlink_source_or_target(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    (root / "d").mkdir()
    assert rename_dir(root, "link", "moved") is None  # a link is not a folder to move
    with pytest.raises(UnsafePathError):
        rename_dir(root, "d", "link/d")
    assert (root / "d").is_dir() and list(outside.iterdir()) == []


def test_remove_dir_only_when_empty(root: Path, tmp_path: Path) -> None:
    (root / "full").mkdir()
    (root / "full/keep.local").write_text("ignored data")
    assert remove_dir(root, "full") is False
    assert (root / "full/keep.local").exists()
    (root / "empty").mkdir()
    assert remove_dir(root, "empty") is True and not (root / "empty").exists()
    assert remove_dir(root, "empty") is True  # already gone
    (root / "file").write_text("x")
    assert remove_dir(root, "file") is None and (root / "file").exists()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert remove_dir(root, "link") is None and outside.is_dir()
    with pytest.raises(UnsafePathError):
        remove_dir(root, "link/x")
