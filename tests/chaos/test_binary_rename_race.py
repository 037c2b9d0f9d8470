"""Regression tests: a binary file moved away while its local edit was still unpublished.

Found by the chaos soak (seed 1615408819, one binary version lost): devices a and c changed
``src/doc-b-74.bin`` concurrently, and c renamed it before its own version was published (a
binary upload waits for the relay). Three faults were behind it, each reproduced here:

* c's record of the file still had the stat of the old content, so the rename was not
  recognized: it was ingested as a delete of the old path plus a new file. The delete recorded
  as "seen" every edit counter in c's index — including a's edit, whose version had arrived in
  c's index but never reached c's disk (c's own change stood there) — so a's version was dead
  everywhere. Now a moved file with the same inode is a rename carrying the unpublished edit,
  and a binary delete claims only the versions that reached the disk.
* The runner (like many applications) rewrites a binary file in place: truncate, then write.
  Seen empty in between, the file was taken for text: its binary entry was replaced by a text
  entry and then by a new binary one, cut off from a's concurrent version. An emptied binary
  file now stays binary.
* A remote file whose path was held by a local file of a dead entry (kept: the user had
  changed it) was never written once that local file moved away, since reconciles are scoped
  to what a batch touched. Vacated paths are now in scope.

c's chunk uploads vanish in its fault proxy, so its version stays unpublished for as long as
each test needs, while its relay link carries a's changes in; markers written after a change
(delivered in the writer's order) tell when the other device has applied it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Device, Relay, create_space, invite, join, wait_until

from chaos.faultproxy import FaultProxy
from chaos.invariants import settle
from chaos.runner import set_relay_url

PUT_CHUNK = 0x08
TIMEOUT = 90
OLD, NEW = "src/doc.bin", "docs/renamed.bin"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _binary(tag: bytes, size: int) -> bytes:
    return b"\xff\xfeBIN " + tag + b"\n\x00" + os.urandom(size)


def _digests(dev: Device) -> dict[str, str]:
    return {p: _digest(data) for p, data in dev.tree().items()}


def _write(path: Path, data: bytes) -> None:
    """In place (truncate, then write), like the chaos runner and many applications."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _applied(writer: Device, reader: Device, name: str) -> None:
    """Wait until ``reader`` applied everything ``writer`` ingested before this call."""
    writer.write(name, f"{name} from {writer.name}\n")
    wait_until(
        lambda: reader.read(name) == f"{name} from {writer.name}\n",
        timeout=TIMEOUT,
        what=f"{reader.name} applied {writer.name}'s changes up to {name}",
    )


@contextlib.contextmanager
def _cluster(tmp: Path) -> Iterator[tuple[Device, Device, FaultProxy, bytes]]:
    """a on the relay directly, c through a fault proxy; both hold OLD (v0)."""
    relay = Relay(tmp / "relay-data").start()
    proxy = FaultProxy(relay.port).start()
    a = Device(tmp / "home-a", tmp / "folder-a", "a").init()
    c = Device(tmp / "home-c", tmp / "folder-c", "c").init()
    try:
        create_space(a, relay)
        a.start()
        join(c, invite(a))
        set_relay_url(c, proxy.url)
        c.start()
        v0 = _binary(b"v0", 40_000)
        _write(a.folder / OLD, v0)
        wait_until(lambda: _digests(c).get(OLD) == _digest(v0), timeout=TIMEOUT, what="c has v0")
        _applied(c, a, "ready.txt")  # c has recorded v0 (and a knows it)
        yield a, c, proxy, v0
    finally:
        a.stop()
        c.stop()
        relay.stop()
        proxy.stop()


def _edit_unpublished(c: Device, proxy: FaultProxy) -> bytes:
    """c changes OLD in place; its chunks vanish, so the version stays unpublished."""
    proxy.vanish_next("up", 10**9, PUT_CHUNK)
    v_c = _binary(b"c", 2_000)
    _write(c.folder / OLD, v_c)
    wait_until(
        lambda: proxy.counts[f"vanish_up_{PUT_CHUNK:#04x}"] >= 1,
        timeout=TIMEOUT,
        what="c tried to upload its version",
    )
    return v_c


def _publish(a: Device, data: bytes, uploads: int) -> None:
    _write(a.folder / OLD, data)
    wait_until(
        lambda: a.log().count(f"binary up {OLD}:") == uploads,
        timeout=TIMEOUT,
        what="a published its version",
    )


def _release_and_settle(a: Device, c: Device, proxy: FaultProxy) -> None:
    proxy.clear()  # c's uploads go through again
    proxy.cut()  # and the one waiting for its lost acknowledgement fails at once
    problems = settle([a, c], timeout=TIMEOUT)
    assert not problems, problems


@pytest.mark.parametrize("how", ["mv", "copy_and_delete"])
def test_binary_moved_before_its_concurrent_edit_was_published_keeps_both_versions(
    tmp_path: Path, how: str
) -> None:
    """``mv`` keeps the inode: a rename carrying the unpublished edit, so the two concurrent
    versions end as the file and one conflict copy at the new path. ``copy_and_delete`` (a new
    inode) is a delete plus a new file: the delete must not beat a's version, which never
    reached c's disk, so that one stays at the old path."""
    with _cluster(tmp_path) as (a, c, proxy, _v0):
        v_c = _edit_unpublished(c, proxy)
        # a's concurrent version reaches c's index, not c's disk (c's change is there)
        v_a = _binary(b"a", 40_000)
        _publish(a, v_a, uploads=2)
        _applied(a, c, "marker.txt")
        assert _digests(c)[OLD] == _digest(v_c), "c's own change must not be overwritten"

        if how == "mv":
            (c.folder / "docs").mkdir(exist_ok=True)
            os.rename(c.folder / OLD, c.folder / NEW)
        else:
            _write(c.folder / NEW, (c.folder / OLD).read_bytes())
            (c.folder / OLD).unlink()
        _applied(c, a, "marker2.txt")
        _release_and_settle(a, c, proxy)

        for dev in (a, c):
            have = _digests(dev)
            found = set(have.values())
            assert _digest(v_a) in found, f"a's version lost on {dev.name}: {sorted(have)}"
            assert _digest(v_c) in found, f"c's version lost on {dev.name}: {sorted(have)}"
            copies = [p for p in have if ".sync-conflict-" in p]
            assert len(copies) <= 1, f"more than one conflict copy on {dev.name}: {copies}"
            if how == "mv":
                assert OLD not in have, f"the rename did not carry on {dev.name}: {sorted(have)}"
                assert all(p.startswith("docs/renamed.") for p in copies), copies


def test_remote_file_waiting_for_a_path_is_written_once_the_local_file_moves_away(
    tmp_path: Path,
) -> None:
    """a deletes OLD while c's unpublished change keeps c's file (an edit beats a delete),
    then a creates a new file at OLD: c cannot write it there yet. Once c moves its file
    away, a's new file must come (it was left for a periodic full pass, ≥ 60 s and only when
    some batch came)."""
    with _cluster(tmp_path) as (a, c, proxy, _v0):
        v_c = _edit_unpublished(c, proxy)
        (a.folder / OLD).unlink()
        _applied(a, c, "marker.txt")
        assert _digests(c)[OLD] == _digest(v_c), "c's changed file must be kept"
        v_a = _binary(b"a-new", 40_000)
        _publish(a, v_a, uploads=2)  # a new file (a new entry) at the same path
        _applied(a, c, "marker2.txt")
        assert _digests(c)[OLD] == _digest(v_c), "c's changed file must not be overwritten"

        (c.folder / "docs").mkdir(exist_ok=True)
        os.rename(c.folder / OLD, c.folder / NEW)
        _applied(c, a, "marker3.txt")
        _release_and_settle(a, c, proxy)
        for dev in (a, c):
            have = _digests(dev)
            assert have.get(OLD) == _digest(v_a), f"{dev.name}: a's new file: {sorted(have)}"
            assert have.get(NEW) == _digest(v_c), f"{dev.name}: c's file: {sorted(have)}"


def test_binary_file_emptied_in_place_stays_one_binary_file(tmp_path: Path) -> None:
    """Emptied (the first half of a rewrite in place), then written: still the same binary
    file, so a concurrent version from a is split off as one conflict copy of it."""
    with _cluster(tmp_path) as (a, c, proxy, _v0):
        (c.folder / OLD).write_bytes(b"")
        wait_until(
            lambda: (a.folder / OLD).exists() and (a.folder / OLD).stat().st_size == 0,
            timeout=TIMEOUT,
            what="a has the emptied file",
        )
        assert f"binary up {OLD}: 0 bytes" in c.log(), "the emptied file went out as text"
        v_c = _edit_unpublished(c, proxy)
        v_a = _binary(b"a", 40_000)
        _publish(a, v_a, uploads=2)
        _applied(a, c, "marker.txt")
        _release_and_settle(a, c, proxy)
        for dev in (a, c):
            have = _digests(dev)
            found = set(have.values())
            assert {_digest(v_a), _digest(v_c)} <= found, f"{dev.name}: {sorted(have)}"
            copies = [p for p in have if ".sync-conflict-" in p]
            assert len(copies) == 1 and copies[0].startswith("src/doc."), copies
