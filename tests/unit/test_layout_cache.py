"""LayoutCache: the layout kept up to date per changed entry is always exactly compute_layout.

Random batches of changes (seeded hypothesis) over a small set of names chosen to collide:
case and NFC/NFD spellings, a file and a folder of the same name, files under folders that
come and go, symlinks, and names equal to the conflict names (and suffixed conflict names)
the losers get.
"""

from __future__ import annotations

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from qmoi_sync.agent.index import DeleteRecord, FileEntry
from qmoi_sync.agent.layout import Layout, LayoutCache, compute_layout
from qmoi_sync.protocol.paths import conflict_name

T0 = 1_764_000_000.0
DEVS = ("AAAAAAA", "BBBBBBB")
CONFLICT = conflict_name("a.txt", T0, "AAAAAAA")
NAMES = (
    "a.txt",
    "A.txt",
    "a",
    "A",
    "a/b.txt",
    "a/c/d.txt",
    "a/c",
    "Café.txt",
    "Cafe\u0301.txt",
    "x/y.txt",
    "x",
    CONFLICT,
    CONFLICT.replace(".txt", "-2.txt"),
    "b.txt",
)
KINDS = ("text", "text", "binary", "dir", "symlink")
FIDS = 10


def make(fid: int, path: str, kind: str, ts_step: int, dev: str, alive: bool) -> FileEntry:
    ts = T0 + ts_step  # the same second often: equal conflict names, suffixes
    return FileEntry(
        fid=f"{fid:032x}",
        path=path,
        kind=kind,
        mode=0o644,
        created_ts=ts,
        created_dev=dev,
        edits={dev: 1},
        deleted=None if alive else DeleteRecord(ts + 1, dev, {dev: 1}),
        alive=alive,
        target="t" if kind == "symlink" else None,
    )


change = st.tuples(
    st.integers(0, FIDS - 1),
    st.sampled_from(NAMES),
    st.sampled_from(KINDS),
    st.integers(0, 2),
    st.sampled_from(DEVS),
    st.sampled_from((True, True, True, False)),
)


def step(
    cache: LayoutCache, entries: dict[str, FileEntry], changed: list[str] | set[str]
) -> tuple[Layout, dict[str, str | None] | None]:
    """What SpaceSync does: the update, or the full layout when the update asks for one."""
    got = cache.update(entries, changed)
    if got is None:
        return cache.full(entries), None
    return got


def same(got: Layout, want: Layout) -> None:
    assert dict(got.paths) == dict(want.paths)
    assert dict(got.by_fid) == dict(want.by_fid)
    assert got.conflicts == want.conflicts
    assert set(got.needed) == set(want.needed)
    assert len(got.needed) == len(want.needed)


def compact(cache: LayoutCache) -> None:
    """One claimant or spelling is held as itself, never as a 1-tuple, a path whose one
    claimant is placed there has no claims item, and a name whose only spelling is itself has
    no spelling item (what saves the memory, see LayoutCache)."""
    for path, claimants in cache._claims.items():
        if isinstance(claimants, tuple):
            assert len(claimants) > 1
        else:
            assert cache.by_fid[claimants.fid] != path
    for fold, spelled in cache._spell.items():
        assert len(spelled) > 1 if isinstance(spelled, tuple) else spelled != fold


def run(batches: list[list[tuple[int, str, str, int, str, bool]]], fold_case: bool) -> LayoutCache:
    entries: dict[str, FileEntry] = {}
    cache = LayoutCache(fold_case=fold_case)
    same(cache.full(entries), compute_layout(entries, fold_case=fold_case))
    for ops in batches:
        old = dict(cache.by_fid)
        changed: set[str] = set()
        for fid, path, kind, ts, dev, alive in ops:
            e = make(fid, path, kind, ts, dev, alive)
            entries[e.fid] = e
            changed.add(e.fid)
        got, before = step(cache, entries, changed)
        want = compute_layout(entries, fold_case=fold_case)
        same(got, want)
        compact(cache)
        if before is not None:
            # Every fid whose place changed is reported, with the place it had.
            moved = {f for f in set(old) | set(want.by_fid) if old.get(f) != want.by_fid.get(f)}
            assert moved <= set(before)
            assert all(before[f] == old.get(f) for f in moved)
        assert dict(cache.dirs) == {p: f for p, f in want.paths.items() if entries[f].kind == "dir"}
        assert dict(cache.links) == {
            p: f for p, f in want.paths.items() if entries[f].kind == "symlink"
        }
    return cache


@seed(20261126)
@settings(max_examples=300)
@given(st.lists(st.lists(change, min_size=1, max_size=4), min_size=1, max_size=12), st.booleans())
def test_incremental_layout_equals_full_layout(
    batches: list[list[tuple[int, str, str, int, str, bool]]], fold_case: bool
) -> None:
    run(batches, fold_case)


def test_changes_away_from_conflicts_are_not_laid_out_again() -> None:
    """The point of the cache: a batch of new files in a big space re-places only those, even
    when the space holds a conflict copy elsewhere."""
    entries = {
        e.fid: e
        for e in (
            make(1, "same.txt", "text", 0, "AAAAAAA", True),
            make(2, "same.txt", "text", 1, "BBBBBBB", True),
        )
    }
    cache = LayoutCache()
    cache.full(entries)
    assert cache.full_runs == 1
    for i in range(3, 200):
        e = make(i, f"d{i % 7}/f{i}.txt", "text", 0, "AAAAAAA", True)
        entries[e.fid] = e
        got, before = step(cache, entries, [e.fid])
        assert before is not None and got.path_of(e.fid) == f"d{i % 7}/f{i}.txt"
    assert cache.full_runs == 1
    same(cache.layout or Layout(), compute_layout(entries))
    # A change next to the conflict copy is laid out in full (and still right).
    e = make(1, "other.txt", "text", 0, "AAAAAAA", True)
    entries[e.fid] = e
    got, before = step(cache, entries, [e.fid])
    assert before is None and cache.full_runs == 2
    same(got, compute_layout(entries))


A, B = DEVS


def test_a_path_from_one_claimant_to_several_and_back() -> None:
    """The cache holds one claimant as itself and several as a tuple: every way in and out."""
    cache = run(
        [
            [(1, "photos", "dir", 0, A, True)],
            [(2, "photos", "dir", 1, B, True)],  # a second folder entry: merged, two claimants
            [(3, "photos", "dir", 2, A, True)],  # three
            [(1, "photos", "dir", 0, A, False)],  # two (the winner went)
            [(2, "photos/x.txt", "text", 1, B, True)],  # one (moved away), and needed now
            [(2, "photos", "dir", 1, B, True), (3, "elsewhere", "dir", 2, A, True)],
            [(2, "photos", "dir", 1, B, False), (4, "photos", "dir", 0, B, True)],
        ],
        fold_case=False,
    )
    assert cache.full_runs == 1  # all incremental: no conflict anywhere
    run(  # files: the second claimant is a conflict copy (laid out in full), then goes again
        [
            [(1, "a.txt", "text", 0, A, True)],
            [(2, "a.txt", "text", 1, B, True)],
            [(1, "a.txt", "text", 0, A, False)],
            [(2, "b.txt", "text", 1, B, True)],
            [(1, "a.txt", "text", 0, A, True)],
        ],
        fold_case=False,
    )


def test_a_name_from_one_spelling_to_several_and_back() -> None:
    """No item for a name whose only claimed spelling is the name itself, one spelling as
    itself, several as a tuple: every way between them, NFC/NFD and case."""
    nfc, nfd = "Caf\u00e9", "Cafe\u0301"
    cache = run(
        [
            [(1, nfd, "dir", 0, A, True)],  # one spelling, not the fold (NFC)
            [(2, nfc, "dir", 1, B, True)],  # two: folders, so both stay
            [(1, nfd, "dir", 0, A, False)],  # only the fold itself
            [(1, nfd, "dir", 0, A, True), (2, nfc, "dir", 1, B, False)],
            [(3, nfd + "/x.txt", "text", 0, A, True), (1, "y", "dir", 0, A, True)],
        ],
        fold_case=False,
    )
    assert cache.full_runs == 1
    cache = run(
        [
            [(1, "Docs", "dir", 0, A, True)],
            [(2, "docs", "dir", 1, B, True), (3, "DOCS", "dir", 2, A, True)],
            [(1, "Docs", "dir", 0, A, False)],
            [(2, "docs", "dir", 1, B, False)],
            [(2, "docs", "dir", 1, B, True), (3, "DOCS", "dir", 2, A, False)],
        ],
        fold_case=True,
    )
    assert cache.full_runs == 1
    run(  # files spelled differently: the later one is a conflict copy until one goes
        [
            [(1, nfc + ".txt", "text", 0, A, True)],
            [(2, nfd + ".txt", "text", 1, B, True)],
            [(1, nfc + ".txt", "text", 0, A, False)],
            [(1, nfc + ".txt", "text", 0, A, True), (2, nfd + ".txt", "text", 1, B, False)],
        ],
        fold_case=False,
    )


def test_a_path_that_is_not_its_own_fold() -> None:
    """With fold_case, "ß\u0301" folds to "ss\u0301", whose own fold is "s\u015b": a path
    spelled like a fold may belong to another name, so "no item" must not count it."""
    sharp, folded = "\u00df\u0301/x.txt", "ss\u0301/x.txt"  # (in folders: `needed` shows it)
    steps = [
        [(1, folded, "text", 0, A, True)],
        [(2, sharp, "text", 1, B, True)],  # another name: no conflict
        [(1, folded, "text", 0, A, False)],
        [(1, folded, "text", 0, A, True), (2, sharp, "text", 1, B, False)],
    ]
    assert run(steps, fold_case=True).full_runs == 1
    run(
        [
            *steps,
            [(2, "s\u015b/x.txt", "text", 1, B, True)],  # folded's other spelling: a conflict
            [(1, folded, "text", 0, A, False)],
        ],
        fold_case=True,
    )


def test_plain_names_cost_one_slot_each() -> None:
    """The memory the cache saves at 100,000 files: no spelling item for a plain name, no
    claims item for a path its one claimant is placed at, no claimed path beside by_fid."""
    entries = {
        e.fid: e for e in (make(i, f"d{i % 3}/f{i}.txt", "text", 0, A, True) for i in range(60))
    }
    for fold_case in (False, True):
        cache = LayoutCache(fold_case=fold_case)
        cache.full(entries)
        assert cache._spell == {} and cache._lost == {} and cache._claims == {}


def test_a_folder_holding_a_conflict_copy_stays_needed_when_its_files_go() -> None:
    """Regression: the folders of conflict copies were kept only when no claimed path lived
    in them at the last full layout; when those paths went later, the folder was no longer
    needed although a conflict copy still lived in it (found by a randomized run)."""
    nfc, nfd = "Caf\u00e9", "Cafe\u0301"
    run(
        [
            [(1, nfd + "/x.txt", "text", 1, A, True), (3, nfd + "/y.txt", "text", 0, A, True)],
            [(2, nfc + "/x.txt", "text", 0, B, True)],  # keeps the name: 1 is a conflict copy
            [(3, nfd + "/y.txt", "text", 0, A, False)],  # the copy's folder is still needed
        ],
        fold_case=False,
    )


def test_entries_gone_from_the_index_while_others_take_their_paths() -> None:
    """A path's one placed claimant is read from ``entries``: an entry that left the index
    altogether (no fields left) in the batch where another entry takes its path must not be
    looked up there. Ten such pairs, so the set order of ``changed`` cannot hide it."""
    entries = {
        e.fid: e
        for i in range(10)
        for e in (
            make(2 * i, f"a{i}.txt", "text", 0, A, True),
            make(2 * i + 1, f"b{i}", "dir", 0, B, True),
        )
    }
    cache = LayoutCache()
    cache.full(entries)
    for i in range(10):
        del entries[f"{2 * i:032x}"]
        e = make(2 * i + 1, f"a{i}.txt", "dir", 0, B, True)
        entries[e.fid] = e
    got, before = step(cache, entries, [f"{n:032x}" for n in range(20)])
    assert before is not None  # laid out incrementally
    same(got, compute_layout(entries))
    compact(cache)
