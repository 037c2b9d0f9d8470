"""File-system semantics between two real agents (real relay, real files, real watchers): the
exec bit, case-only renames, Unicode-normalization twins and ignore files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from harness import Device, cluster, wait_until

pytestmark = pytest.mark.slow


def _is_exec(dev: Device, rel: str) -> bool:
    return bool(os.stat(dev.folder / rel).st_mode & stat.S_IXUSR)


def _text(dev: Device, rel: str) -> str | None:
    return dev.read(rel)


def test_exec_bit_travels_both_ways(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        a.write("run.sh", "#!/bin/sh\necho hi\n")
        wait_until(lambda: _text(b, "run.sh") == "#!/bin/sh\necho hi\n", what="run.sh on b")
        assert not _is_exec(b, "run.sh")

        os.chmod(a.folder / "run.sh", 0o755)  # chmod only: size and mtime unchanged
        wait_until(lambda: _is_exec(b, "run.sh"), what="exec bit set on b")

        os.chmod(b.folder / "run.sh", 0o644)
        wait_until(lambda: not _is_exec(a, "run.sh"), what="exec bit cleared on a")

        # A new executable file arrives executable; content edits keep the bit.
        p = b.folder / "tool.sh"
        p.write_text("#!/bin/sh\n")
        os.chmod(p, 0o755)
        wait_until(lambda: _text(a, "tool.sh") == "#!/bin/sh\n", what="tool.sh on a")
        wait_until(lambda: _is_exec(a, "tool.sh"), what="tool.sh executable on a")
        a.write("tool.sh", "#!/bin/sh\nexit 0\n")
        wait_until(lambda: _text(b, "tool.sh") == "#!/bin/sh\nexit 0\n", what="edit on b")
        assert _is_exec(b, "tool.sh") and _is_exec(a, "tool.sh")
        # No echo: the bit stays as set, on both sides.
        assert not _is_exec(a, "run.sh") and not _is_exec(b, "run.sh")


def test_case_only_rename_arrives_as_rename(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        a.write("a.txt", "one\n")
        wait_until(lambda: _text(b, "a.txt") == "one\n", what="a.txt on b")
        os.rename(a.folder / "a.txt", a.folder / "A.txt")
        wait_until(
            lambda: b.tree() == {"A.txt": b"one\n"}, what="A.txt replaces a.txt on b (rename)"
        )
        # Same file id: an edit on b continues the same document on a.
        b.write("A.txt", "one\ntwo\n")
        wait_until(lambda: a.tree() == {"A.txt": b"one\ntwo\n"}, what="edit after case rename")


def test_qmoiignore_live_and_never_deletes_elsewhere(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        a.write("notes.log", "log v1\n")
        a.write("keep.txt", "keep\n")
        a.write("junk.swp", "swap\n")  # built-in ignore
        wait_until(lambda: _text(b, "keep.txt") == "keep\n", what="keep.txt on b")
        wait_until(lambda: _text(b, "notes.log") == "log v1\n", what="notes.log on b")
        assert _text(b, "junk.swp") is None

        # The ignore file syncs like any file and applies at once.
        a.write(".qmoiignore", "# logs stay local\n*.log\n")
        wait_until(lambda: _text(b, ".qmoiignore") is not None, what=".qmoiignore on b")

        a.write("notes.log", "log v2, local only\n")
        a.write("new.log", "never sent while ignored\n")
        a.write("marker1.txt", "m1\n")
        wait_until(lambda: _text(b, "marker1.txt") == "m1\n", what="marker1 on b")
        assert _text(b, "notes.log") == "log v1\n"
        assert _text(b, "new.log") is None

        # Deleting an ignored file never deletes it on the other device.
        (a.folder / "notes.log").unlink()
        a.write("marker2.txt", "m2\n")
        wait_until(lambda: _text(b, "marker2.txt") == "m2\n", what="marker2 on b")
        assert _text(b, "notes.log") == "log v1\n"

        # Narrowing the patterns (no restart): new.log is no longer ignored and is sent.
        a.write(".qmoiignore", "notes.log\n")
        wait_until(
            lambda: _text(b, "new.log") == "never sent while ignored\n", what="new.log on b"
        )
        a.write("marker3.txt", "m3\n")
        wait_until(lambda: _text(b, "marker3.txt") == "m3\n", what="marker3 on b")
        assert _text(b, "notes.log") == "log v1\n"
        # b's copy of the pattern file applies to b as well: its edit of notes.log stays local.
        b.write("notes.log", "b's local log\n")
        b.write("marker4.txt", "m4\n")
        wait_until(lambda: _text(a, "marker4.txt") == "m4\n", what="marker4 on a")
        assert _text(a, "notes.log") is None
