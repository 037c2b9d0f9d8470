"""index: flat JSON-leaf entries, edit-beats-delete, undelete, deterministic file ids."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pycrdt import Doc, Map

from qmoi_sync.agent.index import FILES, IndexDoc, derive_file_id, fid_hex

KEY = b"k" * 32
A, B, C = "AAAAAAA", "BBBBBBB", "CCCCCCC"
F1 = "11" * 16
F2 = "22" * 16


def sync(*idxs: IndexDoc) -> None:
    states = [i.state() for i in idxs]
    for i in idxs:
        for s in states:
            i.apply_update(s)


def replicas(n: int = 2) -> list[IndexDoc]:
    return [IndexDoc(client_id=100 + i) for i in range(n)]


# ------------------------------------------------------------------------------------------
# basic fields


def test_create_and_read_back_with_types_preserved() -> None:
    (a,) = replicas(1)
    a.create(F1, "docs/readme.md", "text", 0o755, A, 1_700_000_000.5)
    e = a.entries()[F1]
    assert e.fid == F1 and e.path == "docs/readme.md" and e.kind == "text"
    assert e.mode == 0o755 and type(e.mode) is int  # pycrdt would have given 493.0
    assert e.created_ts == 1_700_000_000.5 and e.created_dev == A
    assert e.edits == {A: 1} and type(e.edits[A]) is int
    assert e.deleted is None and e.alive


def test_storage_is_flat_keys_with_json_string_leaves() -> None:
    (a,) = replicas(1)
    a.create(F1, "x", "binary", 0o644, A, 5.0)
    raw = a.doc.get(FILES, type=Map).to_py()
    # Schema 4: kind, path and mtime ride in the creator's "c:<dev>", which is also its first
    # edit count; the kind's default mode is not stored.
    assert set(raw) == {f"{F1}/c:{A}"}
    assert all(isinstance(v, str) for v in raw.values())
    assert json.loads(raw[f"{F1}/c:{A}"]) == ["binary", 5.0, "x", None]
    assert a.entries()[F1].edits == {A: 1}
    a.set_mode(F1, 0o755, A)
    raw = a.doc.get(FILES, type=Map).to_py()
    assert json.loads(raw[f"{F1}/mode"]) == 0o755
    a.set_mode(F1, 0o644, A)  # back to the default: stored explicitly over the old value
    raw = a.doc.get(FILES, type=Map).to_py()
    assert json.loads(raw[f"{F1}/mode"]) == 0o644 and a.entries()[F1].mode == 0o644


def test_mutations_return_incremental_updates_that_replicate() -> None:
    a, b = replicas()
    for upd in (
        a.create(F1, "a.txt", "text", 0o644, A, 1.0),
        a.record_edit(F1, A),
        a.rename(F1, "b.txt", A),
        a.set_mode(F1, 0o755, A),
    ):
        assert isinstance(upd, bytes) and len(upd) < 400  # 5 keys x 32-char fid prefix
        b.apply_update(upd)
    assert b.entries() == a.entries()
    e = b.entries()[F1]
    assert e.path == "b.txt" and e.mode == 0o755 and e.edits == {A: 4}
    b.apply_update(a.delete(F1, A, 2.0))
    assert not b.entries()[F1].alive


def test_from_state_and_wrapping_an_existing_doc() -> None:
    (a,) = replicas(1)
    a.create(F1, "a", "text", 0o644, A, 1.0)
    a.create(F2, "b", "dir", 0o755, A, 1.0)
    b = IndexDoc.from_state(a.state())
    assert b.entries() == a.entries()
    doc: Doc[Any] = Doc()
    doc.apply_update(a.state())
    c = IndexDoc(doc)
    assert c.entries() == a.entries()
    assert c.state_vector() == a.state_vector()
    assert c.update_since(a.state_vector()) is not None


def test_take_changed_reports_local_and_remote_changes() -> None:
    a, b = replicas()
    b.take_changed()
    upd = a.create(F1, "a", "text", 0o644, A, 1.0)
    assert a.take_changed() == {F1}
    assert a.take_changed() == set()
    b.apply_update(upd)
    assert b.take_changed() == {F1}


def test_input_validation() -> None:
    (a,) = replicas(1)
    with pytest.raises(ValueError):
        a.create("xyz", "p", "text", 0o644, A, 1.0)
    with pytest.raises(ValueError):
        a.create(F1, "p", "socket", 0o644, A, 1.0)
    with pytest.raises(ValueError):
        a.create(F1, "", "text", 0o644, A, 1.0)
    with pytest.raises(ValueError):
        a.create(F1, "p", "text", 0o644, "bad/dev", 1.0)
    with pytest.raises(ValueError):
        a.create(F1, "p", "text", 0o644, A, float("nan"))
    with pytest.raises(KeyError):
        a.record_edit(F1, A)
    with pytest.raises(KeyError):
        a.rename(F1, "q", A)
    with pytest.raises(KeyError):
        a.delete(F1, A, 1.0)
    assert a.entries() == {}


# ------------------------------------------------------------------------------------------
# delete semantics


def test_delete_then_undelete_by_create() -> None:
    (a,) = replicas(1)
    a.create(F1, "a.txt", "text", 0o644, A, 1.0)
    a.delete(F1, A, 2.0)
    e = a.entries()[F1]
    assert not e.alive and e.deleted is not None
    assert e.deleted.seen == {A: 1} and e.deleted.dev == A and e.deleted.ts == 2.0
    a.create(F1, "a.txt", "text", 0o644, B, 3.0)
    e = a.entries()[F1]
    assert e.alive and e.deleted is None
    assert (e.created_ts, e.created_dev) == (3.0, B)  # a recreation is a new creation


def test_create_on_alive_fid_keeps_created_stamp() -> None:
    (a,) = replicas(1)
    a.create(F1, "a.txt", "text", 0o644, A, 1.0)
    a.create(F1, "a.txt", "text", 0o644, B, 9.0)  # same file arrived by another route
    e = a.entries()[F1]
    assert (e.created_ts, e.created_dev) == (1.0, A)
    assert e.edits == {A: 1, B: 1}


@pytest.mark.parametrize("edit", ["record_edit", "rename", "set_mode"])
def test_an_edit_beats_a_concurrent_delete(edit: str) -> None:
    a, b = replicas()
    a.create(F1, "f.txt", "text", 0o644, A, 1.0)
    sync(a, b)
    a.delete(F1, A, 2.0)
    if edit == "record_edit":
        b.record_edit(F1, B)
    elif edit == "rename":
        b.rename(F1, "g.txt", B)
    else:
        b.set_mode(F1, 0o755, B)
    sync(a, b)
    assert a.entries() == b.entries()
    assert a.entries()[F1].alive


def test_a_delete_that_saw_the_edit_wins() -> None:
    a, b = replicas()
    a.create(F1, "f.txt", "text", 0o644, A, 1.0)
    sync(a, b)
    b.record_edit(F1, B)
    sync(a, b)
    a.delete(F1, A, 2.0)
    sync(a, b)
    assert not a.entries()[F1].alive and not b.entries()[F1].alive


def test_concurrent_deletes_converge_dead() -> None:
    a, b = replicas()
    a.create(F1, "f.txt", "text", 0o644, A, 1.0)
    sync(a, b)
    a.delete(F1, A, 2.0)
    b.delete(F1, B, 3.0)
    sync(a, b)
    assert a.entries() == b.entries()
    assert not a.entries()[F1].alive


def test_concurrent_undelete_and_delete_keeps_the_file() -> None:
    a, b = replicas()
    a.create(F1, "f.txt", "text", 0o644, A, 1.0)
    a.delete(F1, A, 2.0)
    sync(a, b)
    a.create(F1, "f.txt", "text", 0o644, A, 3.0)  # undelete
    b.delete(F1, B, 3.5)  # b deletes again, not having seen the undelete
    sync(a, b)
    assert a.entries() == b.entries()
    assert a.entries()[F1].alive


def test_concurrent_creation_of_the_same_fid_merges_field_by_field() -> None:
    a, b = replicas()
    a.create(F1, "same.txt", "text", 0o644, A, 10.0)
    b.create(F1, "same.txt", "text", 0o644, B, 20.0)
    sync(a, b)
    ea, eb = a.entries()[F1], b.entries()[F1]
    assert ea == eb and ea.alive
    assert ea.edits == {A: 1, B: 1}  # nothing of either creation was replaced wholesale
    assert (ea.created_ts, ea.created_dev) in {(10.0, A), (20.0, B)}


def test_concurrent_renames_pick_the_same_winner_everywhere() -> None:
    a, b, c = replicas(3)
    a.create(F1, "f.txt", "text", 0o644, A, 1.0)
    sync(a, b, c)
    a.rename(F1, "from-a.txt", A)
    b.rename(F1, "from-b.txt", B)
    sync(a, b, c)
    assert a.entries() == b.entries() == c.entries()
    assert a.entries()[F1].path in {"from-a.txt", "from-b.txt"}


# ------------------------------------------------------------------------------------------
# hostile / malformed remote data


def test_malformed_remote_fields_never_raise() -> None:
    src: Doc[Any] = Doc()
    m = src.get(FILES, type=Map)
    m[f"{F1}/path"] = "not json {"
    m[f"{F1}/c"] = json.dumps(["text", 1.0, A])
    m[f"{F2}/path"] = json.dumps("ok.txt")
    m[f"{F2}/c"] = json.dumps(["weird-kind", "x", 5])
    m[f"{F2}/mode"] = json.dumps("rwx")
    m[f"{F2}/del"] = json.dumps({"ts": "x"})
    m[f"{F2}/e:{A}"] = json.dumps(True)
    m["no-slash-key"] = json.dumps(1)
    m[f"{'33' * 16}/path"] = 5  # not a string leaf at all
    idx = IndexDoc.from_state(src.get_update())
    entries = idx.entries()
    assert not entries[F1].alive  # no usable path
    assert entries[F2].path is None and not entries[F2].alive  # unknown kind: never shown
    assert entries[F2].mode == 0o644 and entries[F2].edits == {}


# ------------------------------------------------------------------------------------------
# file ids


def test_derive_file_id_is_deterministic_keyed_and_separates_fields() -> None:
    fid = derive_file_id(KEY, "a/b.txt", b"content")
    assert len(fid) == 16
    assert fid == derive_file_id(KEY, "a/b.txt", b"content")
    assert fid != derive_file_id(b"other key" * 4, "a/b.txt", b"content")
    assert fid != derive_file_id(KEY, "a/b.txt", b"content!")
    assert fid != derive_file_id(KEY, "a/b.txtc", b"ontent")  # no ambiguity by concatenation
    assert derive_file_id(KEY, "d", b"", kind="dir") != derive_file_id(KEY, "d", b"", kind="text")
    assert len(derive_file_id(b"x" * 100, "p", b"")) == 16  # long keys are compressed
    with pytest.raises(ValueError):
        derive_file_id(b"", "p", b"")
    assert fid_hex(fid) == fid.hex()
    with pytest.raises(ValueError):
        fid_hex(b"short")


def test_same_path_and_content_on_two_devices_is_one_entry() -> None:
    a, b = replicas()
    fa = derive_file_id(KEY, "notes.md", b"hello\n").hex()
    fb = derive_file_id(KEY, "notes.md", b"hello\n").hex()
    a.create(fa, "notes.md", "text", 0o644, A, 1.0)
    b.create(fb, "notes.md", "text", 0o644, B, 2.0)
    sync(a, b)
    alive = [e for e in a.entries().values() if e.alive]
    assert len(alive) == 1


# ------------------------------------------------------------------------------------------
# unloading while idle (agent/memtrim.py calls it through SpaceSync.drop_loaded_docs)


def test_unload_keeps_entries_and_the_next_change_continues_the_same_client() -> None:
    a, b = replicas()
    a.create(F1, "a.txt", "text", 0o644, A, 1.0)
    a.doc.get("other-root", type=Map)["k"] = "v"  # other roots (settings registry) survive
    b.apply_update(a.state())
    before = a.entries()
    client = a.doc.client_id
    assert a.unload() and not a.loaded
    assert not a.unload()  # already unloaded
    assert a.entries() == before and not a.loaded  # reads from the caches do not reload
    upd = a.rename(F1, "b.txt", A)  # reloads
    assert a.loaded and a.doc.client_id == client
    assert a.doc.get("other-root", type=Map)["k"] == "v"
    b.apply_update(upd)
    assert b.entries()[F1].path == "b.txt" and b.entries()[F1].edits == {A: 2}
    # remote changes after a reload still reach the caches through the observer
    assert a.unload()
    a.apply_update(b.delete(F1, B, 2.0))
    assert not a.entries()[F1].alive and a.take_changed() >= {F1}
    sync(a, b)
    assert a.entries() == b.entries()


def test_unload_is_refused_inside_a_batch() -> None:
    (a,) = replicas(1)
    with a.batch():
        a.create(F1, "a.txt", "text", 0o644, A, 1.0)
        assert not a.unload()
    assert a.loaded and a.entries()[F1].alive
