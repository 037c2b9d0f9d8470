"""layout: a pure, deterministic function of converged index entries."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from qmoi_sync.agent.index import DeleteRecord, FileEntry
from qmoi_sync.agent.layout import Layout, compute_layout, fold_name, strip_conflict_marker
from qmoi_sync.protocol.paths import conflict_name, is_conflict_name

T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z


def entry(
    n: int,
    path: str,
    ts: float = T0,
    dev: str = "AAAAAAA",
    kind: str = "text",
    alive: bool = True,
) -> FileEntry:
    return FileEntry(
        fid=f"{n:032x}",
        path=path,
        kind=kind,
        mode=0o644,
        created_ts=ts,
        created_dev=dev,
        edits={dev: 1},
        deleted=None if alive else DeleteRecord(ts + 1, dev, {dev: 1}),
        alive=alive,
    )


def lay(*entries: FileEntry) -> Layout:
    return compute_layout({e.fid: e for e in entries})


def test_no_collision_everyone_keeps_their_path() -> None:
    a, b = entry(1, "a.txt"), entry(2, "dir/b.txt")
    out = lay(a, b)
    assert dict(out.paths) == {"a.txt": a.fid, "dir/b.txt": b.fid}
    assert out.path_of(a.fid) == "a.txt"
    assert out.conflicts == frozenset()


def test_dead_entries_are_not_laid_out() -> None:
    out = lay(entry(1, "a.txt", alive=False), entry(2, "a.txt"))
    assert dict(out.paths) == {"a.txt": f"{2:032x}"}
    assert out.conflicts == frozenset()


def test_collision_earliest_creation_wins_loser_gets_conflict_name() -> None:
    early = entry(2, "report.pdf", ts=T0, dev="BBBBBBB")
    late = entry(1, "report.pdf", ts=T0 + 60, dev="AAAAAAA")
    out = lay(late, early)
    assert out.paths["report.pdf"] == early.fid
    expected = conflict_name("report.pdf", T0 + 60, "AAAAAAA")
    assert expected == "report.sync-conflict-20251124-160100-AAAAAAA.pdf"
    assert out.paths[expected] == late.fid
    assert out.conflicts == {late.fid}
    assert is_conflict_name(expected)


def test_tie_on_time_is_broken_by_device_then_fid() -> None:
    x = entry(9, "n.md", dev="AAAAAAA")
    y = entry(1, "n.md", dev="BBBBBBB")
    assert lay(x, y).paths["n.md"] == x.fid
    p = entry(9, "m.md")
    q = entry(1, "m.md")
    assert lay(p, q).paths["m.md"] == q.fid


def test_three_way_collision_and_same_second_same_device_get_suffixes() -> None:
    w = entry(1, "a/x.txt", ts=T0 - 5)
    l1 = entry(2, "a/x.txt", ts=T0, dev="CCCCCCC")
    l2 = entry(3, "a/x.txt", ts=T0, dev="CCCCCCC")
    out = lay(w, l1, l2)
    base = conflict_name("a/x.txt", T0, "CCCCCCC")
    assert out.paths["a/x.txt"] == w.fid
    assert out.paths[base] == l1.fid
    assert out.paths[base.replace(".txt", "-2.txt")] == l2.fid
    assert out.conflicts == {l1.fid, l2.fid}


def test_conflict_name_never_collides_with_a_claimed_path() -> None:
    name = conflict_name("x.txt", T0 + 1, "BBBBBBB")
    w = entry(1, "x.txt", ts=T0)
    loser = entry(2, "x.txt", ts=T0 + 1, dev="BBBBBBB")
    squatter = entry(3, name, ts=T0 + 100)  # a real file already has that name
    out = lay(w, loser, squatter)
    assert out.paths[name] == squatter.fid
    assert out.path_of(loser.fid) == name.replace(".txt", "-2.txt")
    assert len(set(out.by_fid.values())) == 3


def test_no_conflict_copy_of_a_conflict_copy() -> None:
    name = conflict_name("x.txt", T0, "AAAAAAA")
    a = entry(1, name, ts=T0)
    b = entry(2, name, ts=T0 + 7, dev="BBBBBBB")  # both renamed onto the conflict name
    out = lay(a, b)
    got = out.path_of(b.fid)
    assert got == conflict_name("x.txt", T0 + 7, "BBBBBBB")
    assert got is not None and got.count(".sync-conflict-") == 1
    assert strip_conflict_marker(got) == "x.txt"
    assert strip_conflict_marker("dir/plain.txt") == "dir/plain.txt"
    assert strip_conflict_marker(got.replace(".txt", "-3.txt")) == "x.txt"


def test_file_blocking_a_directory_becomes_the_conflict_copy() -> None:
    f = entry(1, "a", ts=T0 - 100)  # even though it is older
    child = entry(2, "a/b.txt", ts=T0)
    out = lay(f, child)
    assert out.paths["a/b.txt"] == child.fid
    assert out.path_of(f.fid) == conflict_name("a", T0 - 100, "AAAAAAA")
    assert out.conflicts == {f.fid}


def test_directories_at_the_same_path_merge() -> None:
    d1 = entry(1, "photos", kind="dir", ts=T0)
    d2 = entry(2, "photos", kind="dir", ts=T0 + 1)
    out = lay(d1, d2)
    assert out.paths == {"photos": d1.fid}
    assert out.by_fid == {d1.fid: "photos", d2.fid: "photos"}
    assert out.conflicts == frozenset()


def test_file_and_empty_directory_at_the_same_path_earliest_wins() -> None:
    d = entry(1, "thing", kind="dir", ts=T0 + 5)
    f = entry(2, "thing", ts=T0)
    out = lay(d, f)
    assert out.paths["thing"] == f.fid
    assert out.conflicts == {d.fid}


def test_needed_lists_every_folder_a_placed_entry_lives_in() -> None:
    f = entry(1, "a/b/c.txt")
    g = entry(2, "x/y.txt")
    h = entry(3, "x/y.txt", ts=T0 + 1)  # its conflict copy lives in x too
    d = entry(4, "empty/inner", kind="dir")
    out = lay(f, g, h, d)
    assert out.needed == {"a", "a/b", "x", "empty"}


def test_folders_spelled_differently_are_two_folders_not_conflicts() -> None:
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    d1 = entry(1, nfc, kind="dir", ts=T0)
    d2 = entry(2, nfd, kind="dir", ts=T0 + 1)
    out = lay(d1, d2)
    assert out.paths == {nfc: d1.fid, nfd: d2.fid}
    assert out.conflicts == frozenset()
    # A file spelled like a folder still collides: the later one gets a conflict name.
    f = entry(3, nfd, ts=T0 + 2)
    out = lay(d1, f)
    assert out.paths[nfc] == d1.fid and out.conflicts == {f.fid}


def test_bad_remote_device_id_or_time_does_not_raise() -> None:
    w = entry(1, "x.txt")
    bad = entry(2, "x.txt", ts=T0 + 1, dev="not a/valid id!")
    huge = entry(3, "x.txt", ts=1e300, dev="CCCCCCC")
    out = lay(w, bad, huge)
    assert out.paths["x.txt"] == w.fid
    assert len(out.by_fid) == 3 and len(set(out.by_fid.values())) == 3


# ------------------------------------------------------------------------------------------
# properties

paths = st.sampled_from(
    ["a.txt", "b.txt", "a", "a/b.txt", "a/c", "d/e.md", "x.tar.gz", ".bashrc",
     conflict_name("a.txt", T0, "AAAAAAA")]
)  # fmt: skip
entry_st = st.builds(
    entry,
    n=st.integers(0, 40),
    path=paths,
    ts=st.sampled_from([T0, T0 + 1, T0 + 3600]),
    dev=st.sampled_from(["AAAAAAA", "BBBBBBB"]),
    kind=st.sampled_from(["text", "text", "binary", "dir"]),
    alive=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(entry_st, max_size=12, unique_by=lambda e: e.fid), st.randoms())
def test_property_layout_is_deterministic_and_collision_free(
    entries: list[FileEntry], rnd: random.Random
) -> None:
    by_fid = {e.fid: e for e in entries}
    out = compute_layout(by_fid)
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert compute_layout({e.fid: e for e in shuffled}) == out  # order-independent

    alive = {e.fid for e in entries if e.alive}
    assert set(out.by_fid) == alive
    # One fid per path; only merged directories share a path.
    assert len(out.paths) == len(set(out.paths))
    for fid, p in out.by_fid.items():
        if out.paths[p] != fid:
            assert by_fid[fid].kind == "dir" and by_fid[out.paths[p]].kind == "dir"
    # A path that some entry needs as a directory is never a file.
    for p in out.paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            if anc in out.paths:
                assert by_fid[out.paths[anc]].kind == "dir"
    # Non-conflicts keep their own path; conflict copies never nest markers.
    for fid, p in out.by_fid.items():
        if fid in out.conflicts:
            assert p.count(".sync-conflict-") == 1
        else:
            assert p == by_fid[fid].path


def test_a_conflict_name_is_free_beside_a_path_spelled_like_its_fold() -> None:
    """With fold_case a fold is not always its own fold: "ß\u0301" folds to "ss\u0301", which
    folds to "s\u015b". A claimed path spelled like the conflict name's fold is another name,
    so the conflict name needs no suffix."""
    w = entry(1, "\u00df\u0301.txt", ts=T0)
    loser = entry(2, "\u00df\u0301.txt", ts=T0 + 60)
    name = conflict_name(loser.path or "", T0 + 60, "AAAAAAA")
    other = entry(3, fold_name(name, fold_case=True), ts=T0 + 100)
    assert fold_name(other.path or "", fold_case=True) != other.path
    out = compute_layout({e.fid: e for e in (w, loser, other)}, fold_case=True)
    assert out.path_of(loser.fid) == name
    assert out.path_of(other.fid) == other.path and out.conflicts == {loser.fid}
