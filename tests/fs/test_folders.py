"""Folders between two real agents (real relay, real files, real watchers): every folder is an
index entry of kind "dir", so empty folders travel, a folder rename is one move, a folder the
user kept stays, and a tree delete never takes files the other device has not synced or ignores.

One relay and one joined pair for the module (start-up is the slow part); every test works in
its own top-level folder and checks only that folder.
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Device, cluster, wait_until

pytestmark = pytest.mark.slow

Pair = tuple[Device, Device]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with cluster(tmp_path_factory.mktemp("folders")) as (_relay, (a, b)):
        a.write(".qmoiignore", "*.local\nbuild/\n")
        wait_until(lambda: b.read(".qmoiignore") is not None, what=".qmoiignore on b")
        yield a, b


def _dirs(dev: Device, top: str) -> set[str]:
    """Every folder at or under ``top`` (relative, '/'-separated)."""
    root = dev.folder
    out: set[str] = set()
    if (root / top).is_dir():
        out.add(top)
    for dirpath, dirnames, _files in os.walk(root / top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".qmoi-tmp")]
        rel = Path(dirpath).relative_to(root).as_posix()
        out.update(f"{rel}/{d}" for d in dirnames)
    return out


def _tree(dev: Device, top: str) -> dict[str, bytes]:
    return {p: d for p, d in dev.tree().items() if p.startswith(top + "/")}


def _same(a: Device, b: Device, top: str) -> bool:
    return _dirs(a, top) == _dirs(b, top) and _tree(a, top) == _tree(b, top)


def _sync_marker(a: Device, b: Device, rel: str) -> None:
    """Write a file on a and wait for it on b: everything a sent before has been applied."""
    a.write(rel, rel + "\n")
    wait_until(lambda: b.read(rel) == rel + "\n", what=f"marker {rel} on {b.name}")


def test_empty_folders_created_and_deleted_both_ways(pair: Pair) -> None:
    a, b = pair
    (a.folder / "ed/one/two/three").mkdir(parents=True)
    (a.folder / "ed/solo").mkdir()
    want = {"ed", "ed/one", "ed/one/two", "ed/one/two/three", "ed/solo"}
    wait_until(lambda: _dirs(b, "ed") == want, what="nested empty folders on b")

    (b.folder / "ed/from-b").mkdir()
    wait_until(lambda: (a.folder / "ed/from-b").is_dir(), what="b's empty folder on a")

    (a.folder / "ed/one/two/three").rmdir()
    (a.folder / "ed/solo").rmdir()
    want = {"ed", "ed/one", "ed/one/two", "ed/from-b"}
    wait_until(lambda: _dirs(b, "ed") == want, what="empty folders deleted on b")
    _sync_marker(b, a, "ed/marker.txt")
    assert _dirs(a, "ed") == want


def test_folder_rename_is_one_move(pair: Pair) -> None:
    a, b = pair
    a.write("mv/proj/x.txt", "x\n")
    a.write("mv/proj/sub/y.txt", "y\n")
    (a.folder / "mv/proj/empty").mkdir()
    wait_until(lambda: _same(a, b, "mv") and b.read("mv/proj/sub/y.txt"), what="tree on b")
    inode = os.stat(b.folder / "mv/proj").st_ino
    sub_inode = os.stat(b.folder / "mv/proj/sub").st_ino

    os.rename(a.folder / "mv/proj", a.folder / "mv/renamed")
    want = {"mv", "mv/renamed", "mv/renamed/sub", "mv/renamed/empty"}
    wait_until(lambda: _dirs(b, "mv") == want, what="renamed folder on b")
    wait_until(lambda: _same(a, b, "mv"), what="same tree after the rename")
    # b renamed the folder itself (same inode), not file by file into a new one.
    assert os.stat(b.folder / "mv/renamed").st_ino == inode
    assert os.stat(b.folder / "mv/renamed/sub").st_ino == sub_inode

    # An empty folder moved into another folder: one move too.
    empty_inode = os.stat(b.folder / "mv/renamed/empty").st_ino
    os.rename(a.folder / "mv/renamed/empty", a.folder / "mv/renamed/sub/empty2")
    wait_until(lambda: (b.folder / "mv/renamed/sub/empty2").is_dir(), what="moved empty on b")
    assert os.stat(b.folder / "mv/renamed/sub/empty2").st_ino == empty_inode
    wait_until(lambda: _same(a, b, "mv"), what="same tree after the second move")


def test_kept_folder_stays_and_tree_delete_removes_it(pair: Pair) -> None:
    a, b = pair
    for rel in ("kf/keep/f1.txt", "kf/keep/f2.txt", "kf/tree/h.txt", "kf/tree/sub/g.txt"):
        a.write(rel, rel + "\n")
    wait_until(lambda: b.read("kf/tree/sub/g.txt") is not None, what="files on b")

    # All files of a folder deleted, the folder kept by the user: it stays on b.
    (a.folder / "kf/keep/f1.txt").unlink()
    (a.folder / "kf/keep/f2.txt").unlink()
    wait_until(lambda: not _tree(b, "kf/keep"), what="files deleted on b")
    _sync_marker(a, b, "kf/marker1.txt")
    assert (b.folder / "kf/keep").is_dir()

    shutil.rmtree(a.folder / "kf/tree")
    wait_until(lambda: not (b.folder / "kf/tree").exists(), what="tree deleted on b")
    assert _same(a, b, "kf")


def test_tree_delete_keeps_ignored_files_and_does_not_come_back(pair: Pair) -> None:
    a, b = pair
    a.write("ig/tree/doc.txt", "doc\n")
    wait_until(lambda: b.read("ig/tree/doc.txt") == "doc\n", what="doc on b")
    b.write("ig/tree/deep/notes.local", "b's own, ignored\n")
    # The folder is not ignored (only its file is): it travels, empty.
    wait_until(lambda: (a.folder / "ig/tree/deep").is_dir(), what="deep on a")
    assert a.read("ig/tree/deep/notes.local") is None

    shutil.rmtree(a.folder / "ig/tree")
    wait_until(lambda: b.read("ig/tree/doc.txt") is None, what="doc deleted on b")
    # The ignored file, and the folders holding it, are never deleted with the tree ...
    assert b.read("ig/tree/deep/notes.local") == "b's own, ignored\n"
    # ... and the folders b kept for it are not sent back to a as new ones.
    _sync_marker(b, a, "ig/m2.txt")
    _sync_marker(a, b, "ig/m3.txt")
    assert not (a.folder / "ig/tree").exists()

    # Once the user empties it, b lets it go (the delete still stands).
    shutil.rmtree(b.folder / "ig/tree/deep")
    _sync_marker(a, b, "ig/m4.txt")
    wait_until(lambda: not (b.folder / "ig/tree").exists(), what="emptied folder removed on b")


def test_ignored_folder_not_sent(pair: Pair) -> None:
    a, b = pair
    (a.folder / "ign/build/out").mkdir(parents=True)
    (a.folder / "ign/src").mkdir(parents=True)
    wait_until(lambda: (b.folder / "ign/src").is_dir(), what="src on b")
    _sync_marker(a, b, "ign/marker.txt")
    assert not (b.folder / "ign/build").exists()


def test_delete_beats_nothing_an_add_inside_survives(pair: Pair) -> None:
    """a deletes a folder while b (offline) adds a file inside it: the file survives, with its
    folder, on both devices; the rest of the tree is gone."""
    a, b = pair
    a.write("cc/box/old.txt", "old\n")
    (a.folder / "cc/box/empty").mkdir()
    wait_until(lambda: (b.folder / "cc/box/empty").is_dir(), what="box on b")
    b.stop()
    try:
        shutil.rmtree(a.folder / "cc/box")
        b.write("cc/box/new.txt", "added on b\n")
        wait_until(lambda: a.space_status()["pending_out"] == 0, what="a's delete sent")
    finally:
        b.start()
    wait_until(lambda: a.read("cc/box/new.txt") == "added on b\n", what="new.txt on a")
    wait_until(lambda: b.read("cc/box/old.txt") is None, what="old.txt deleted on b")
    wait_until(lambda: _same(a, b, "cc"), what="same tree")
    assert _dirs(a, "cc") == {"cc", "cc/box"}


def test_folders_made_while_down_are_picked_up(pair: Pair) -> None:
    a, b = pair
    (a.folder / "dn/gone").mkdir(parents=True)
    wait_until(lambda: (b.folder / "dn/gone").is_dir(), what="dn/gone on b")
    a.stop()
    try:
        (a.folder / "dn/new/deeper").mkdir(parents=True)
        (a.folder / "dn/gone").rmdir()
    finally:
        a.start()
    wait_until(lambda: _dirs(b, "dn") == {"dn", "dn/new", "dn/new/deeper"}, what="rescan sent")


def test_file_replaced_by_empty_folder_and_back(pair: Pair) -> None:
    a, b = pair
    a.write("fx/thing", "a file\n")
    wait_until(lambda: b.read("fx/thing") == "a file\n", what="file on b")
    (a.folder / "fx/thing").unlink()
    (a.folder / "fx/thing").mkdir()
    wait_until(lambda: (b.folder / "fx/thing").is_dir(), what="empty folder on b")
    (b.folder / "fx/thing").rmdir()
    b.write("fx/thing", "a file again\n")
    wait_until(lambda: a.read("fx/thing") == "a file again\n", what="file again on a")
    assert _same(a, b, "fx")


def test_nfc_and_nfd_folders_both_kept(pair: Pair) -> None:
    a, b = pair
    nfc = unicodedata.normalize("NFC", "nf/caf\u00e9")
    nfd = unicodedata.normalize("NFD", nfc)
    (a.folder / nfc).mkdir(parents=True)
    (b.folder / nfd).mkdir(parents=True)
    want = {"nf", nfc, nfd}
    wait_until(lambda: _dirs(a, "nf") == want and _dirs(b, "nf") == want, what="both folders")


def test_remote_folder_never_created_through_a_symlink(pair: Pair, tmp_path: Path) -> None:
    a, b = pair
    outside = tmp_path / "outside"
    outside.mkdir()
    (b.folder / "sl").mkdir()
    os.symlink(outside, b.folder / "sl/link")  # b's own link, pointing outside the space
    wait_until(
        lambda: any("sl/link" in w for w in a.space_status().get("warnings") or []),
        what="the outside link recorded on a",
    )
    (a.folder / "sl/link/inner").mkdir(parents=True)  # a real folder on a, same path

    def refused() -> bool:
        return any("cannot create folder sl/link/inner" in w for w in _warnings(b))

    wait_until(refused, what="b refuses to create a folder through its symlink")
    assert list(outside.iterdir()) == []
    assert os.readlink(b.folder / "sl/link") == str(outside)


def _warnings(dev: Device) -> list[str]:
    return list(dev.space_status().get("warnings") or [])
