"""Index schemas 2 and 3: fewer map entries per file (kind, and the path and mtime a file was
created with, folded into ``c``; default modes not stored), and index state written with schema 1
or 2 refused with a clear message instead of misread."""

from __future__ import annotations

import json
import time
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


def test_new_text_file_entry_has_two_map_entries_and_reads_back() -> None:
    idx = IndexDoc(client_id=1)
    idx.create(F1, "a.txt", "text", 0o644, A, 2.5, mtime_ns=123)
    raw = idx.doc.get(FILES, type=Map).to_py()
    assert sorted(raw) == sorted(f"{F1}/{k}" for k in ("c", f"e:{A}"))
    e = idx.entries()[F1]
    assert (e.path, e.kind, e.mode, e.created_ts, e.created_dev, e.mtime_ns) == (
        "a.txt",
        "text",
        0o644,
        2.5,
        A,
        123,
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
    b.put_fields(F1, {**creation_fields("binary", 0o755, 3.0, A, "p.bin"), f"e:{A}": 1})
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
    assert problem is not None and "index schema 1 or 2" in problem
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


async def test_agent_refuses_a_space_whose_stored_index_is_schema2(
    store: Store, tmp_path: Path
) -> None:
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    async with store.transaction():
        await store.compact_doc(log.space_id.hex(), INDEX_DOC_ID, _schema2_state())
    with pytest.raises(UserError, match=r"older qmoi-sync \(index schema 1 or 2"):
        await make_sync(store, tmp_path / "folder", me, log)


async def test_first_index_stores_two_map_entries_per_new_text_file(
    store: Store, tmp_path: Path
) -> None:
    """Through the store: what a first index commits, loaded back, is 2 entries per new text
    file (``c`` with path and mtime, and the edit counter), and reads back as the files."""
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
        assert sorted(k for k in raw if k.startswith(fid)) == sorted(
            [f"{fid}/c", f"{fid}/e:{sync.device}"]
        )
        assert e.alive and e.mtime_ns == (folder / str(e.path)).stat().st_mtime_ns
