"""A device joins with a folder that already holds the space's files (a copy, a git clone on
both machines): nothing is duplicated. Where the same path holds different content, both
versions are kept (one under a `.sync-conflict-` name) and nothing is lost."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from harness import Device, Relay, create_space, invite, join, wait_until

ORIGINAL = {
    "README.md": "# project\n\nSome words about it.\n",
    "notes/todo.txt": "buy milk\ncall bob\nfix the roof\n",
    "notes/deep/idea.txt": "an idea\nwith two lines\n",
    "src/app.py": "def main():\n    print('hello')\n",
    "empty.txt": "",
}


@contextlib.contextmanager
def _a_with_files(tmp: Path) -> Iterator[tuple[Relay, Device]]:
    relay = Relay(tmp / "relay-data").start()
    a = Device(tmp / "home-a", tmp / "folder-a", "a").init()
    try:
        create_space(a, relay)
        for p, t in ORIGINAL.items():
            a.write(p, t)
        a.start()
        wait_until(
            lambda: _status_is(a, files=len(ORIGINAL), pending_out=0),
            what="a ingested and sent its files",
        )
        yield relay, a
    finally:
        a.stop()
        relay.stop()


def _status_is(dev: Device, **want: object) -> bool:
    st = dev.space_status()
    return all(st[k] == v for k, v in want.items())


def _conflict_copies(dev: Device) -> list[str]:
    return sorted(p for p in dev.tree() if "sync-conflict" in p)


def _barrier(a: Device, b: Device, tag: str) -> None:
    """Each side writes a marker and waits for the other's: the relay delivers in order, so
    once a marker has arrived everything its sender published before it has been applied."""
    b.write(f"barrier-{tag}-b.txt", "b\n")
    wait_until(lambda: a.read(f"barrier-{tag}-b.txt") == "b\n", what=f"{tag}: b's marker at a")
    a.write(f"barrier-{tag}-a.txt", "a\n")
    wait_until(lambda: b.read(f"barrier-{tag}-a.txt") == "a\n", what=f"{tag}: a's marker at b")


def _check(cond: bool, msg: str, a: Device, b: Device) -> None:
    if not cond:
        raise AssertionError(
            f"{msg}\na: {a.tree()}\nb: {b.tree()}\n--- a\n{a.log()[-4000:]}\n--- b\n"
            f"{b.log()[-4000:]}"
        )


def test_join_with_identical_files_does_not_duplicate(tmp_path: Path) -> None:
    with _a_with_files(tmp_path) as (_relay, a):
        b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b").init()
        shutil.copytree(a.folder, b.folder)
        try:
            join(b, invite(a))
            b.start()
            wait_until(
                lambda: _status_is(b, files=len(ORIGINAL), state="idle"),
                what="b scanned its folder and caught up",
            )
            _barrier(a, b, "1")
            want = {p: t.encode() for p, t in ORIGINAL.items()}
            want |= {"barrier-1-a.txt": b"a\n", "barrier-1-b.txt": b"b\n"}
            _check(a.tree() == want and b.tree() == want, "content doubled or lost", a, b)

            # The pre-existing files are ONE shared document each: edits flow, undoubled.
            a.write("notes/todo.txt", ORIGINAL["notes/todo.txt"] + "added on a\n")
            b.write("src/app.py", ORIGINAL["src/app.py"] + "main()\n")
            want["notes/todo.txt"] = (ORIGINAL["notes/todo.txt"] + "added on a\n").encode()
            want["src/app.py"] = (ORIGINAL["src/app.py"] + "main()\n").encode()
            wait_until(
                lambda: a.tree() == want and b.tree() == want,
                what="edits to pre-existing files flow both ways",
            )
            _barrier(a, b, "2")
            want |= {"barrier-2-a.txt": b"a\n", "barrier-2-b.txt": b"b\n"}
            _check(a.tree() == want and b.tree() == want, "edits doubled", a, b)
            for d in (a, b):
                assert d.space_status()["conflicts"] == 0
        finally:
            b.stop()


def test_join_with_one_different_file_keeps_both(tmp_path: Path) -> None:
    with _a_with_files(tmp_path) as (_relay, a):
        b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b").init()
        shutil.copytree(a.folder, b.folder)
        b_version = "buy bread\nB's own list, never seen by a\n"
        b.write("notes/todo.txt", b_version)
        b.write("notes/only-on-b.txt", "b had this before joining\n")
        try:
            join(b, invite(a))
            b.start()
            wait_until(
                lambda: len(_conflict_copies(a)) == 1 and a.tree() == b.tree(),
                timeout=30,
                what="both versions on both devices",
            )
            _barrier(a, b, "1")
            tree = a.tree()
            _check(tree == b.tree(), "trees differ", a, b)
            (copy,) = _conflict_copies(a)
            assert copy.startswith("notes/todo.sync-conflict-") and copy.endswith(".txt"), copy
            # Both versions are there, each exactly once: one at the path, one beside it.
            versions = {tree["notes/todo.txt"], tree[copy]}
            assert versions == {ORIGINAL["notes/todo.txt"].encode(), b_version.encode()}, versions
            # Everything else is untouched and undoubled.
            rest = {p: t.encode() for p, t in ORIGINAL.items() if p != "notes/todo.txt"}
            rest |= {"barrier-1-a.txt": b"a\n", "barrier-1-b.txt": b"b\n"}
            rest["notes/only-on-b.txt"] = b"b had this before joining\n"
            others = {p: v for p, v in tree.items() if p not in ("notes/todo.txt", copy)}
            assert others == rest
            for d in (a, b):
                wait_until(lambda d=d: d.space_status()["conflicts"] == 1, what="conflict count")
        finally:
            b.stop()
