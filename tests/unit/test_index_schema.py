"""Index schemas 2 to 4: fewer map entries per file (kind, and the path and mtime a file was
created with, folded into the creation record; default modes not stored; schema 4: the creation
record is keyed by its device, ``c:<dev>``, and counts as that device's first edit, so a new file
is one map entry), and index state written with schemas 1 to 3 refused with a clear message
instead of misread."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from local_space import make_sync
from pycrdt import Doc, Map

from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.index import DEFAULT_MODES, FILES, IndexDoc, creation_fields
from qmoi_sync.agent.space import INDEX_DOC_ID
from qmoi_sync.agent.store import Store
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog

A, B = "AAAAAAA", "BBBBBBB"
F1 = "11" * 16


def _schema1_state() -> bytes:
    """An index entry exactly as schema 1 wrote it."""
    doc: Doc[Any] = Doc()
    m = doc.get(FILES, type=Map)
    with doc.transaction():
        m[f"{F1}/path"] = json.dumps("a.txt")
        m[f"{F1}/kind"] = json.dumps("text")
        m[f"{F1}/mode"] = json.dumps(0o644)
        m[f"{F1}/created"] = json.dumps({"ts": 1.0, "dev": A})
        m[f"{F1}/e:{A}"] = json.dumps(1)
    return doc.get_update()


def _schema2_state() -> bytes:
    """An index entry exactly as schema 2 wrote it (``c`` = [kind, ts, dev])."""
    doc: Doc[Any] = Doc()
    m = doc.get(FILES, type=Map)
    with doc.transaction():
        m[f"{F1}/path"] = json.dumps("a.txt")
        m[f"{F1}/c"] = json.dumps(["text", 1.0, A])
        m[f"{F1}/e:{A}"] = json.dumps(1)
        m[f"{F1}/mtime"] = json.dumps(5)
    return doc.get_update()


def _schema3_state() -> bytes:
    """An index entry exactly as schema 3 wrote it (``c`` = [kind, ts, dev, path, mtime])."""
    doc: Doc[Any] = Doc()
    m = doc.get(FILES, type=Map)
    with doc.transaction():
        m[f"{F1}/c"] = json.dumps(["text", 1.0, A, "a.txt", 5])
        m[f"{F1}/e:{A}"] = json.dumps(1)
    return doc.get_update()


def _sync(*docs: IndexDoc) -> None:
    for x in docs:
        for y in docs:
            if x is not y:
                x.apply_update(y.state())


def test_new_text_file_entry_has_one_map_entry_and_reads_back() -> None:
    idx = IndexDoc(client_id=1)
    idx.create(F1, "a.txt", "text", 0o644, A, 2.5, mtime_ns=123)
    raw = idx.doc.get(FILES, type=Map).to_py()
    assert sorted(raw) == [f"{F1}/c:{A}"]
    assert json.loads(raw[f"{F1}/c:{A}"]) == ["text", 2.5, "a.txt", 123]
    e = idx.entries()[F1]
    assert (e.path, e.kind, e.mode, e.created_ts, e.created_dev, e.mtime_ns, e.edits) == (
        "a.txt",
        "text",
        0o644,
        2.5,
        A,
        123,
        {A: 1},
    )
    # Later changes write their own keys, which override the creation record.
    idx.rename(F1, "b.txt", A)
    idx.set_mtime(F1, 456)
    e = idx.entries()[F1]
    assert (e.path, e.mtime_ns, e.edits) == ("b.txt", 456, {A: 2})


def test_recreation_after_a_rename_and_delete_takes_the_new_path() -> None:
    """A written ``path`` key overrides ``c``: re-creating a deleted entry must write it too."""
    idx = IndexDoc(client_id=1)
    idx.create(F1, "a.txt", "text", 0o644, A, 1.0, mtime_ns=1)
    idx.rename(F1, "b.txt", A)
    idx.set_mtime(F1, 2)
    idx.delete(F1, A, 2.0)
    assert not idx.entries()[F1].alive
    idx.create(F1, "c.txt", "text", 0o644, A, 3.0, mtime_ns=3)
    e = idx.entries()[F1]
    assert (e.alive, e.path, e.mtime_ns, e.created_ts) == (True, "c.txt", 3, 3.0)


def test_a_concurrent_identical_creation_beats_a_delete_it_did_not_see() -> None:
    """Two devices create the same fid (same path and content) before they sync; one deletes
    it. The other's creation was not seen by that delete: it must win (an edit beats a
    concurrent delete), whichever creation record speaks for the entry."""
    for a_ts, b_ts in ((1.0, 2.0), (2.0, 1.0)):
        a, b = IndexDoc(client_id=10), IndexDoc(client_id=20)
        a.create(F1, "a.txt", "text", 0o644, A, a_ts)
        b.create(F1, "a.txt", "text", 0o644, B, b_ts)
        a.delete(F1, A, 3.0)
        assert not a.entries()[F1].alive
        _sync(a, b)
        ea, eb = a.entries()[F1], b.entries()[F1]
        assert ea == eb and ea.alive and ea.edits == {A: 1, B: 1}
        assert ea.created_dev == (B if b_ts > a_ts else A)


def test_a_delete_that_saw_every_creation_wins() -> None:
    a, b = IndexDoc(client_id=10), IndexDoc(client_id=20)
    a.create(F1, "a.txt", "text", 0o644, A, 1.0)
    b.create(F1, "a.txt", "text", 0o644, B, 1.5)
    _sync(a, b)
    b.delete(F1, B, 3.0)
    _sync(a, b)
    assert not a.entries()[F1].alive and not b.entries()[F1].alive
    assert a.entries()[F1].deleted == b.entries()[F1].deleted


def test_recreation_counts_beyond_the_delete_and_beats_an_earlier_clock() -> None:
    """b deletes a's file; a re-creates it at another path with a clock far behind the first
    creation: the entry is alive, at the new path, on both devices; a's count is written
    explicitly (its record alone would count 1, which the delete saw)."""
    a, b = IndexDoc(client_id=10), IndexDoc(client_id=20)
    a.create(F1, "a.txt", "text", 0o644, A, 1000.0)
    _sync(a, b)
    b.delete(F1, B, 1001.0)
    _sync(a, b)
    assert not a.entries()[F1].alive
    a.create(F1, "later.txt", "text", 0o644, A, 5.0)  # a's clock is behind
    _sync(a, b)
    for x in (a, b):
        e = x.entries()[F1]
        assert e.alive and e.path == "later.txt" and e.edits == {A: 2}
        assert e.created_ts > 1000.0 and e.created_dev == A
    raw = a.doc.get(FILES, type=Map).to_py()
    assert json.loads(raw[f"{F1}/e:{A}"]) == 2


def test_recreation_by_another_device_takes_its_record() -> None:
    a, b = IndexDoc(client_id=10), IndexDoc(client_id=20)
    a.create(F1, "a.txt", "text", 0o644, A, 1.0)
    _sync(a, b)
    a.delete(F1, A, 2.0)
    _sync(a, b)
    b.create(F1, "b.txt", "binary", 0o644, B, 3.0)
    _sync(a, b)
    e = a.entries()[F1]
    assert e == b.entries()[F1]
    assert (e.alive, e.path, e.created_dev, e.edits) == (True, "b.txt", B, {A: 1, B: 1})


@pytest.mark.parametrize(
    "junk",
    [
        "not json",
        json.dumps(["text", 1.0, "a.txt"]),  # schema-3-like length
        json.dumps(["text", 1.0, A, "a.txt", 5]),
        json.dumps({"kind": "text"}),
        json.dumps([7, 1.0, "a.txt", None]),
        json.dumps("[" * 5000),
    ],
)
def test_junk_creation_records_count_for_nothing(junk: str) -> None:
    """A hostile peer's ``c:<dev>`` value is ignored: it neither creates a path nor counts as
    an edit; a valid record next to it still speaks for the entry."""
    doc: Doc[Any] = Doc()
    m = doc.get(FILES, type=Map)
    with doc.transaction():
        m[f"{F1}/c:{B}"] = junk
    idx = IndexDoc(client_id=1)
    idx.apply_update(doc.get_update())
    e = idx.entries().get(F1)  # undecodable: no entry at all
    assert e is None or (e.path is None and not e.alive and e.edits == {})
    idx.create(F1, "a.txt", "text", 0o644, A, 1.0)
    e = idx.entries()[F1]
    assert e.alive and e.path == "a.txt" and e.edits == {A: 1}


def test_rename_racing_a_creation_merges_to_the_rename_everywhere() -> None:
    a, b = IndexDoc(client_id=10), IndexDoc(client_id=20)
    a.create(F1, "a.txt", "text", 0o644, A, 1.0, mtime_ns=1)
    b.apply_update(a.state())
    b.rename(F1, "moved.txt", B)
    a.create(F1, "a.txt", "text", 0o644, A, 2.0, mtime_ns=1)  # the same file seen again: a merge
    for x, y in ((a, b), (b, a)):
        x.apply_update(y.state())
    assert a.entries()[F1] == b.entries()[F1]
    assert a.entries()[F1].path == "moved.txt"


@pytest.mark.parametrize("kind", sorted(DEFAULT_MODES))
def test_default_mode_per_kind_is_implied(kind: str) -> None:
    idx = IndexDoc(client_id=1)
    idx.create(F1, "x", kind, DEFAULT_MODES[kind], A, 1.0)
    assert f"{F1}/mode" not in idx.doc.get(FILES, type=Map).to_py()
    assert idx.entries()[F1].mode == DEFAULT_MODES[kind]


def test_concurrent_mode_change_and_creation_with_the_default_merge_to_the_change() -> None:
    a, b = IndexDoc(client_id=10), IndexDoc(client_id=20)
    a.create(F1, "run.sh", "text", 0o644, A, 1.0)
    b.apply_update(a.state())
    b.set_mode(F1, 0o755, B)
    a.create(F1, "run.sh", "text", 0o644, A, 2.0)  # a re-creates concurrently (no-op merge)
    for x, y in ((a, b), (b, a)):
        x.apply_update(y.state())
    assert a.entries()[F1].mode == b.entries()[F1].mode == 0o755


def test_creation_fields_match_what_create_writes() -> None:
    a, b = IndexDoc(client_id=1), IndexDoc(client_id=2)
    a.create(F1, "p.bin", "binary", 0o755, A, 3.0)
    b.put_fields(F1, creation_fields("binary", 0o755, 3.0, A, "p.bin"))
    assert a.entries() == b.entries()
    with pytest.raises(ValueError, match="kind"):
        creation_fields("folder", 0o755, 1.0, A, "p")


def test_schema1_entries_are_reported_and_never_materialized() -> None:
    idx = IndexDoc(client_id=1)
    assert idx.schema_problem() is None
    idx.apply_update(_schema1_state())
    problem = idx.schema_problem()
    assert problem is not None and "index schema 1" in problem
    e = idx.entries()[F1]
    assert e.path is None and not e.alive


def test_schema2_entries_are_reported_and_never_materialized() -> None:
    idx = IndexDoc(client_id=1)
    idx.apply_update(_schema2_state())
    problem = idx.schema_problem()
    assert problem is not None and "index schema 1, 2 or 3" in problem
    e = idx.entries()[F1]
    assert e.path is None and not e.alive


def test_schema3_entries_are_reported_and_never_materialized() -> None:
    idx = IndexDoc(client_id=1)
    idx.apply_update(_schema3_state())
    problem = idx.schema_problem()
    assert problem is not None and "index schema 1, 2 or 3" in problem
    e = idx.entries()[F1]
    assert e.path is None and not e.alive


async def test_agent_refuses_a_space_whose_stored_index_is_schema1(
    store: Store, tmp_path: Path
) -> None:
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    space_id = log.space_id.hex()
    async with store.transaction():
        await store.compact_doc(space_id, INDEX_DOC_ID, _schema1_state())
    with pytest.raises(UserError, match=r"older qmoi-sync \(index schema 1"):
        await make_sync(store, tmp_path / "folder", me, log)


@pytest.mark.parametrize("state", [_schema2_state, _schema3_state])
async def test_agent_refuses_a_space_whose_stored_index_is_schema2_or_3(
    store: Store, tmp_path: Path, state: Callable[[], bytes]
) -> None:
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    async with store.transaction():
        await store.compact_doc(log.space_id.hex(), INDEX_DOC_ID, state())
    with pytest.raises(UserError, match=r"older qmoi-sync \(index schema 1, 2 or 3"):
        await make_sync(store, tmp_path / "folder", me, log)


async def test_first_index_stores_one_map_entry_per_new_text_file(
    store: Store, tmp_path: Path
) -> None:
    """Through the store: what a first index commits, loaded back, is 1 entry per new text
    file (``c:<dev>`` with path and mtime, counting as the first edit), and reads back as the
    files."""
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    folder = tmp_path / "folder"
    (folder / "d").mkdir(parents=True)
    names = [f"d/f{i}.txt" for i in range(20)]
    for name in names:
        (folder / name).write_text(f"{name}\n")
    sync = await make_sync(store, folder, me, log)
    await sync.rescan()
    state, updates = await store.load_doc(sync.space_id, INDEX_DOC_ID)
    idx = IndexDoc()
    for part in [state, *updates] if state else updates:
        idx.apply_update(part)
    raw = idx.doc.get(FILES, type=Map).to_py()
    files = {e.fid: e for e in idx.entries().values() if e.kind == "text"}
    assert {e.path for e in files.values()} == set(names)
    for fid, e in files.items():
        assert [k for k in raw if k.startswith(fid)] == [f"{fid}/c:{sync.device}"]
        assert e.edits == {sync.device: 1}
        assert e.alive and e.mtime_ns == (folder / str(e.path)).stat().st_mtime_ns


def test_mtimes_before_1970_travel_and_junk_mtimes_read_as_none() -> None:
    """Any mtime os.stat can report is kept, before 1970 included; a peer's value outside that
    range (os.utime would fail on it) reads as no mtime, and a local one is refused."""
    a, b = IndexDoc(client_id=1), IndexDoc(client_id=2)
    old = -2_208_988_800_000_000_000  # 1900
    a.create(F1, "old.txt", "text", 0o644, A, 1.0, mtime_ns=old)
    b.apply_update(a.state())
    assert b.entries()[F1].mtime_ns == old
    a.set_mtime(F1, old - 1)
    b.apply_update(a.state())
    assert b.entries()[F1].mtime_ns == old - 1
    for bad in (10**40, -(10**40), True, 1.5):
        with pytest.raises(ValueError, match="bad mtime"):
            a.set_mtime(F1, bad)  # type: ignore[arg-type]
        doc: Doc[Any] = Doc(client_id=10**6)  # above a's: its concurrent write wins the key
        with doc.transaction():
            doc.get(FILES, type=Map)[f"{F1}/mtime"] = json.dumps(bad)
        c = IndexDoc.from_state(a.state(), client_id=3)
        c.apply_update(doc.get_update())
        e = c.entries()[F1]
        assert c.fields(F1)["mtime"] == bad  # the junk is what the map holds
        assert e.alive and e.path == "old.txt" and e.mtime_ns is None
