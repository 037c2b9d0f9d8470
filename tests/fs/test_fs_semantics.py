"""File-system semantics between two real agents (real relay, real files, real watchers): the
exec bit, case-only renames, folder renames and tree deletes, file <-> folder replacement and
ignore files.

Starting a relay and two joined agents is the slow part (~10 s), so the module shares one pair;
every test works in its own top-level folder and checks only that folder.
"""

from __future__ import annotations

import os
import shutil
import stat
import unicodedata
from collections.abc import Iterator

import pytest
from harness import Device, cluster, wait_until

pytestmark = pytest.mark.slow

Pair = tuple[Device, Device]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with cluster(tmp_path_factory.mktemp("fs")) as (_relay, (a, b)):
        yield a, b


def _tree(dev: Device, top: str) -> dict[str, bytes]:
    return {p: d for p, d in dev.tree().items() if p.startswith(top + "/")}


def _is_exec(dev: Device, rel: str) -> bool:
    return bool(os.stat(dev.folder / rel).st_mode & stat.S_IXUSR)


def test_exec_bit_travels_both_ways(pair: Pair) -> None:
    a, b = pair
    a.write("x/run.sh", "#!/bin/sh\necho hi\n")
    wait_until(lambda: b.read("x/run.sh") == "#!/bin/sh\necho hi\n", what="run.sh on b")
    assert not _is_exec(b, "x/run.sh")

    os.chmod(a.folder / "x/run.sh", 0o755)  # chmod only: size and mtime unchanged
    wait_until(lambda: _is_exec(b, "x/run.sh"), what="exec bit set on b")

    os.chmod(b.folder / "x/run.sh", 0o644)
    wait_until(lambda: not _is_exec(a, "x/run.sh"), what="exec bit cleared on a")

    # A new executable file arrives executable; content edits keep the bit.
    p = b.folder / "x/tool.sh"
    p.write_text("#!/bin/sh\n")
    os.chmod(p, 0o755)
    wait_until(lambda: a.read("x/tool.sh") == "#!/bin/sh\n", what="tool.sh on a")
    wait_until(lambda: _is_exec(a, "x/tool.sh"), what="tool.sh executable on a")
    a.write("x/tool.sh", "#!/bin/sh\nexit 0\n")
    wait_until(lambda: b.read("x/tool.sh") == "#!/bin/sh\nexit 0\n", what="edit on b")
    assert _is_exec(b, "x/tool.sh") and _is_exec(a, "x/tool.sh")
    # No echo: the bits stay as last set, on both sides.
    assert not _is_exec(a, "x/run.sh") and not _is_exec(b, "x/run.sh")


def _mtime(dev: Device, rel: str) -> int:
    return os.stat(dev.folder / rel).st_mtime_ns


def test_mtime_travels(pair: Pair) -> None:
    a, b = pair
    old = 978_307_200_123_456_789  # 2001-01-01, with sub-second digits
    tmp = a.folder / "mt/.doc.txt.swp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("written long ago\n")
    os.utime(tmp, ns=(old, old))
    os.replace(tmp, a.folder / "mt/doc.txt")  # a save that keeps the file's mtime
    wait_until(lambda: b.read("mt/doc.txt") == "written long ago\n", what="doc on b")
    wait_until(lambda: _mtime(b, "mt/doc.txt") == old, what="old mtime on b")

    b.write("mt/doc.txt", "written long ago\nand today\n")
    wait_until(lambda: a.read("mt/doc.txt") == "written long ago\nand today\n", what="edit")
    wait_until(lambda: _mtime(a, "mt/doc.txt") == _mtime(b, "mt/doc.txt"), what="b's mtime on a")
    assert _mtime(a, "mt/doc.txt") > old
    # Setting the mtime was not taken for a local change (no echo back and forth).
    a.write("mt/marker.txt", "m\n")
    wait_until(lambda: b.read("mt/marker.txt") == "m\n", what="marker on b")
    assert _mtime(a, "mt/doc.txt") == _mtime(b, "mt/doc.txt")


def test_case_only_rename_arrives_as_rename(pair: Pair) -> None:
    a, b = pair
    a.write("case/a.txt", "one\n")
    wait_until(lambda: b.read("case/a.txt") == "one\n", what="a.txt on b")
    os.rename(a.folder / "case/a.txt", a.folder / "case/A.txt")
    wait_until(lambda: _tree(b, "case") == {"case/A.txt": b"one\n"}, what="A.txt on b")
    # Same file id: an edit on b continues the same document on a.
    b.write("case/A.txt", "one\ntwo\n")
    wait_until(lambda: _tree(a, "case") == {"case/A.txt": b"one\ntwo\n"}, what="edit on a")


def test_nfc_and_nfd_names_from_two_devices_both_survive(pair: Pair) -> None:
    a, b = pair
    nfc = unicodedata.normalize("NFC", "nf/caf\u00e9.txt")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    a.write(nfc, "composed, from a\n")
    b.write(nfd, "decomposed, from b\n")
    want = {b"composed, from a\n", b"decomposed, from b\n"}

    def settled() -> bool:
        ta, tb = _tree(a, "nf"), _tree(b, "nf")
        return ta == tb and len(ta) == 2 and set(ta.values()) == want

    wait_until(settled, what="both spellings kept on both devices")
    names = set(_tree(a, "nf"))
    # One keeps its spelling, the other is a conflict copy: neither overwrote the other.
    assert len({unicodedata.normalize("NFC", n) for n in names}) == 2
    assert any(".sync-conflict-" in n for n in names)


def test_folder_rename_keeps_ids_and_tree_delete(pair: Pair) -> None:
    a, b = pair
    files = {f"tr/proj/sub{i % 3}/f{i}.txt": f"file {i}\n" for i in range(30)}
    files["tr/other/stay.txt"] = "stay\n"
    for rel, text in files.items():
        a.write(rel, text)
    want = {p: t.encode() for p, t in files.items()}
    wait_until(lambda: _tree(b, "tr") == want, what="the tree on b")

    os.rename(a.folder / "tr/proj", a.folder / "tr/renamed")
    moved = {p.replace("tr/proj/", "tr/renamed/", 1): t for p, t in want.items()}
    wait_until(lambda: _tree(b, "tr") == moved, what="the renamed folder on b")
    # The ids were kept: b's edit of a moved file lands in a's moved file.
    b.write("tr/renamed/sub1/f1.txt", "file 1\nedited on b\n")
    moved["tr/renamed/sub1/f1.txt"] = b"file 1\nedited on b\n"
    wait_until(lambda: _tree(a, "tr") == moved, what="edit after the folder rename")

    # A whole-tree delete deletes every file under it, and nothing else.
    shutil.rmtree(a.folder / "tr/renamed")
    wait_until(lambda: _tree(b, "tr") == {"tr/other/stay.txt": b"stay\n"}, what="tree deleted on b")
    wait_until(lambda: not (b.folder / "tr/renamed").exists(), what="folders gone on b")


def test_file_replaced_by_folder_and_back(pair: Pair) -> None:
    a, b = pair
    a.write("ff/thing", "a file\n")
    wait_until(lambda: b.read("ff/thing") == "a file\n", what="file on b")
    (a.folder / "ff/thing").unlink()
    a.write("ff/thing/inside.txt", "now a folder\n")
    wait_until(
        lambda: _tree(b, "ff") == {"ff/thing/inside.txt": b"now a folder\n"}, what="folder on b"
    )
    shutil.rmtree(b.folder / "ff/thing")
    b.write("ff/thing", "a file again\n")
    wait_until(lambda: _tree(a, "ff") == {"ff/thing": b"a file again\n"}, what="file on a")


def _warnings(dev: Device) -> list[str]:
    return list(dev.space_status().get("warnings") or [])


def test_symlinks_inside_recreated_outside_only_recorded(pair: Pair) -> None:
    a, b = pair
    a.write("ln/data/real.txt", "real\n")
    os.symlink("data/real.txt", a.folder / "ln/inside")
    os.symlink("../../etc/passwd", a.folder / "ln/outside")
    os.symlink("/etc", a.folder / "ln/absolute")
    wait_until(lambda: os.path.islink(b.folder / "ln/inside"), what="inside link on b")
    assert os.readlink(b.folder / "ln/inside") == "data/real.txt"
    assert b.read("ln/inside") == "real\n"  # it resolves, inside the space
    wait_until(
        lambda: sum("points outside the space" in w for w in _warnings(b)) == 2,
        what="warnings for both outside links on b",
    )
    assert not os.path.lexists(b.folder / "ln/outside")
    assert not os.path.lexists(b.folder / "ln/absolute")
    # The creator keeps its own links (recorded, not removed).
    assert os.readlink(a.folder / "ln/outside") == "../../etc/passwd"

    # Retarget and delete travel; a link replaced by a file travels too.
    os.unlink(a.folder / "ln/inside")
    os.symlink("data", a.folder / "ln/inside")
    wait_until(lambda: os.readlink(b.folder / "ln/inside") == "data", what="retarget on b")
    os.unlink(b.folder / "ln/inside")
    b.write("ln/inside", "now a file\n")
    wait_until(
        lambda: (
            not os.path.islink(a.folder / "ln/inside") and a.read("ln/inside") == "now a file\n"
        ),
        what="link replaced by a file on a",
    )
    os.unlink(a.folder / "ln/outside")
    os.unlink(a.folder / "ln/absolute")
    wait_until(
        lambda: not any("points outside the space" in w for w in _warnings(b)),
        what="outside links deleted: warnings gone on b",
    )


def test_qmoiignore_live_and_never_deletes_elsewhere(pair: Pair) -> None:
    a, b = pair
    a.write("ig/notes.log", "log v1\n")
    a.write("ig/keep.txt", "keep\n")
    a.write("ig/junk.swp", "swap\n")  # built-in ignore
    wait_until(lambda: b.read("ig/keep.txt") == "keep\n", what="keep.txt on b")
    wait_until(lambda: b.read("ig/notes.log") == "log v1\n", what="notes.log on b")
    assert b.read("ig/junk.swp") is None

    # The ignore file syncs like any file and applies at once.
    a.write(".qmoiignore", "# logs stay local\n*.log\n")
    wait_until(lambda: b.read(".qmoiignore") is not None, what=".qmoiignore on b")

    a.write("ig/notes.log", "log v2, local only\n")
    a.write("ig/new.log", "never sent while ignored\n")
    a.write("ig/marker1.txt", "m1\n")
    wait_until(lambda: b.read("ig/marker1.txt") == "m1\n", what="marker1 on b")
    assert b.read("ig/notes.log") == "log v1\n"
    assert b.read("ig/new.log") is None

    # Deleting an ignored file never deletes it on the other device.
    (a.folder / "ig/notes.log").unlink()
    a.write("ig/marker2.txt", "m2\n")
    wait_until(lambda: b.read("ig/marker2.txt") == "m2\n", what="marker2 on b")
    assert b.read("ig/notes.log") == "log v1\n"

    # Narrowing the patterns (no restart): new.log is no longer ignored and is sent.
    a.write(".qmoiignore", "notes.log\n")
    wait_until(lambda: b.read("ig/new.log") == "never sent while ignored\n", what="new.log")
    a.write("ig/marker3.txt", "m3\n")
    wait_until(lambda: b.read("ig/marker3.txt") == "m3\n", what="marker3 on b")
    assert b.read("ig/notes.log") == "log v1\n"
    # b's copy of the pattern file applies to b as well: its edit of notes.log stays local.
    b.write("ig/notes.log", "b's local log\n")
    b.write("ig/marker4.txt", "m4\n")
    wait_until(lambda: a.read("ig/marker4.txt") == "m4\n", what="marker4 on a")
    assert a.read("ig/notes.log") is None
    (a.folder / ".qmoiignore").unlink()
    wait_until(lambda: b.read(".qmoiignore") is None, what=".qmoiignore removed on b")
