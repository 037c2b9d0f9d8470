"""The CRDT model of settings documents (agent/settings_doc.py): types, merge, winners, registry."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from qmoi_sync.agent.settings_doc import (
    ENTRIES,
    Change,
    SettingsDoc,
    read_registry,
    registry_update,
    settings_doc_id,
)


def replica(client_id: int | None = None) -> SettingsDoc:
    return SettingsDoc(Doc(client_id=client_id))


def sync_all(*docs: SettingsDoc) -> None:
    updates = [d.doc.get_update() for d in docs]
    for d in docs:
        for u in updates:
            d.doc.apply_update(u)


def write(doc: SettingsDoc, dev: str, values: dict[tuple[str, ...], Any], now: float) -> bytes:
    resolved = doc.resolve()
    changes = {p: Change(False, v, 0.0) for p, v in values.items()}
    return doc.write(dev, changes, {p: resolved.version(p) for p in values}, now)


def test_types_survive_the_crdt() -> None:
    a, b = replica(), replica()
    values = {
        ("int",): 7,
        ("big",): 2**70,
        ("float",): 1.0,
        ("bool",): True,
        ("null",): None,
        ("list",): [1, "two", {"three": 3.5}, None],
        ("empty",): {},
        ("unicode", "κλειδί"): "Zoë ✓ 日本",
    }
    b.doc.apply_update(write(a, "AAA", values, 1.0))
    got = b.resolve().values()
    assert got == values
    for path, value in values.items():
        assert type(got[path]) is type(value)


def test_different_keys_on_two_devices_both_survive() -> None:
    a, b = replica(), replica()
    write(a, "AAA", {("x",): 1}, 1.0)
    write(b, "BBB", {("y",): 2}, 1.0)
    sync_all(a, b)
    assert a.resolve().values() == b.resolve().values() == {("x",): 1, ("y",): 2}


def test_same_key_deterministic_winner_and_recorded_loser() -> None:
    a, b, c = replica(5), replica(1), replica(9)
    sync_all(a, b, c)
    ua = write(a, "AAA", {("k",): "from a"}, 100.0)
    ub = write(b, "BBB", {("k",): "from b"}, 200.0)  # later clock wins
    results = []
    for order in itertools.permutations([ua, ub]):
        d = replica()
        for u in order:
            d.doc.apply_update(u)
        r = d.resolve()
        state = r.keys[("k",)]
        results.append((state.value, [e.device for e in state.losers()]))
    assert results[0] == results[1] == ("from b", ["AAA"])
    # the loser is the value a had; a later write that saw both settles the conflict
    sync_all(a, b, c)
    assert [(p, s.losers()[0].value) for p, s in a.resolve().conflicts()] == [(("k",), "from a")]
    c.doc.apply_update(write(c, "CCC", {("k",): "settled"}, 50.0))
    sync_all(a, b, c)
    assert a.resolve().values()[("k",)] == "settled"  # even with an older clock: it saw both
    assert a.resolve().conflicts() == []


def test_clock_tie_broken_by_device_id_and_edit_beats_delete() -> None:
    a, b = replica(), replica()
    write(a, "AAA", {("k",): 1}, 10.0)
    write(b, "ZZZ", {("k",): 2}, 10.0)
    sync_all(a, b)
    assert a.resolve().values()[("k",)] == 2
    # a deletion concurrent with an edit loses, whatever the clocks
    a2, b2 = replica(), replica()
    write(a2, "AAA", {("k",): 1}, 1.0)
    sync_all(a2, b2)
    version = a2.resolve().version(("k",))
    a2.write("AAA", {("k",): Change(True)}, {("k",): version}, 1000.0)
    b2.write("BBB", {("k",): Change(False, 5)}, {("k",): version}, 2.0)
    sync_all(a2, b2)
    state = a2.resolve().keys[("k",)]
    assert state.value == 5 and not state.deleted and state.losers()[0].deleted


def test_sequential_writes_are_not_conflicts() -> None:
    a, b = replica(), replica()
    write(a, "AAA", {("k",): 1}, 10.0)
    sync_all(a, b)
    write(b, "BBB", {("k",): 2}, 5.0)  # saw a's value: supersedes it whatever the clocks
    sync_all(a, b)
    r = a.resolve()
    assert r.values()[("k",)] == 2 and r.conflicts() == []
    assert r.version(("k",)) == {"AAA": 1, "BBB": 1}


def test_same_value_on_both_sides_is_no_conflict() -> None:
    a, b = replica(), replica()
    write(a, "AAA", {("k",): [1, 2]}, 1.0)
    write(b, "BBB", {("k",): [1, 2]}, 2.0)
    sync_all(a, b)
    assert a.resolve().conflicts() == []


def test_first_import_at_clock_zero_loses_to_the_shared_value() -> None:
    a, b = replica(), replica()
    write(a, "AAA", {("k",): "shared"}, 100.0)
    sync_all(a, b)
    b.write("BBB", {("k",): Change(False, "mine", 0.0, ts=0.0)}, {("k",): {}}, 500.0)
    sync_all(a, b)
    state = a.resolve().keys[("k",)]
    assert state.value == "shared" and state.losers()[0].value == "mine"


def test_each_device_writes_only_its_own_map_keys() -> None:
    """The Y.Map trap (highest client id wins a concurrent write to one key) never applies."""
    a, b = replica(client_id=1), replica(client_id=2**40)
    write(a, "AAA", {("k",): "a"}, 9.0)
    write(b, "BBB", {("k",): "b"}, 1.0)
    sync_all(a, b)
    keys = sorted(a.doc.get(ENTRIES, type=Map).keys())
    assert keys == ["AAA|/k", "BBB|/k"]
    assert a.resolve().values()[("k",)] == "a"  # by the recorded clock, not the client id


def test_garbage_entries_are_ignored() -> None:
    d = replica()
    m = d.doc.get(ENTRIES, type=Map)
    with d.doc.transaction():
        m["nodevice"] = json.dumps({"n": 1, "ts": 1, "v": 1})
        m["X|not-a-pointer"] = json.dumps({"n": 1, "ts": 1, "v": 1})
        m["X|/a"] = "not json"
        m["Y|/a"] = json.dumps({"n": "1", "ts": 1, "v": 1})
        m["Z|/a"] = json.dumps({"n": 1, "ts": 1})  # neither a value nor a deletion
        m["W|/a"] = 5.0
        m["V|/b"] = json.dumps({"n": 1, "ts": 1, "v": "ok", "seen": {"X": "bad"}})
        m["U|/c"] = json.dumps({"n": 1, "ts": 1, "v": "fine"})
    assert d.resolve().values() == {("c",): "fine"}


def test_doc_ids_are_keyed_and_stable() -> None:
    assert settings_doc_id(b"k" * 32, "vscode") == settings_doc_id(b"k" * 32, "vscode")
    assert settings_doc_id(b"k" * 32, "vscode") != settings_doc_id(b"j" * 32, "vscode")
    assert settings_doc_id(b"k" * 32, "vscode") != settings_doc_id(b"k" * 32, "ruff")
    assert len(settings_doc_id(b"k" * 32, "x")) == 16


def test_registry_merges_patterns_from_two_devices() -> None:
    a, b = Doc(), Doc()
    a.apply_update(registry_update(b, "vscode", fmt="json", device="BBB", now=1.0))
    registry_update(a, "vscode", local=[("window.zoomLevel", True)])
    registry_update(b, "vscode", local=[("terminal.*", True)], allow=[("*.tokenColors", True)])
    ua, ub = a.get_update(), b.get_update()
    a.apply_update(ub)
    b.apply_update(ua)
    for doc in (a, b):
        info = read_registry(doc)["vscode"]
        assert info.local == ("terminal.*", "window.zoomLevel")
        assert info.allow == ("*.tokenColors",)
        assert info.format == "json" and not info.deleted and info.created_by == "BBB"
    registry_update(a, "vscode", local=[("terminal.*", False)], deleted=True, device="AAA")
    info = read_registry(a)["vscode"]
    assert info.local == ("window.zoomLevel",) and info.deleted
    assert registry_update(a, "vscode", local=[("terminal.*", False)]) == b"\x00\x00"


def test_registry_ignores_unknown_formats() -> None:
    d = Doc()
    m = d.get("settings", type=Map)
    with d.transaction():
        m["future/format"] = json.dumps("yaml")
        m["junk"] = "x"
    assert read_registry(d) == {}


# -- property: replicas converge whatever the interleaving -------------------------------------
_op = st.one_of(
    st.tuples(
        st.just("write"),
        st.integers(0, 2),  # replica
        st.sampled_from([("a",), ("b",), ("n", "c")]),
        st.one_of(st.none(), st.integers(-3, 3), st.booleans(), st.text(max_size=2)),
        st.booleans(),  # a deletion
        st.floats(0, 100),  # clock
    ),
    st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=25))
def test_replicas_converge(ops: list[tuple[Any, ...]]) -> None:
    reps = [replica(client_id=i + 1) for i in range(3)]
    devs = ["AAA", "BBB", "CCC"]
    for op in ops:
        if op[0] == "write":
            _k, i, path, value, deleted, now = op
            r = reps[i]
            version = r.resolve().version(path)
            change = Change(True) if deleted else Change(False, value, 0.0)
            r.write(devs[i], {path: change}, {path: version}, now)
        else:
            _k, i, j = op
            reps[j].doc.apply_update(reps[i].doc.get_update(reps[j].doc.get_state()))
    sync_all(*reps)
    results = []
    for r in reps:
        res = r.resolve()
        results.append(
            (
                json.dumps(sorted((list(p), v) for p, v in res.values().items())),
                [(p, s.winner.device, [e.device for e in s.losers()]) for p, s in res.conflicts()],
            )
        )
    assert results[0] == results[1] == results[2]
