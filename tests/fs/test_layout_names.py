"""layout: names differing only by Unicode normalization (always) or by case (case-insensitive
folders) never claim one file; the later entry gets a conflict name."""

from __future__ import annotations

import unicodedata

from qmoi_sync.agent.index import FileEntry
from qmoi_sync.agent.layout import compute_layout
from qmoi_sync.protocol.paths import is_conflict_name

T0 = 1_764_000_000.0
NFC = unicodedata.normalize("NFC", "caf\u00e9.txt")
NFD = unicodedata.normalize("NFD", NFC)


def _entry(n: int, path: str, ts: float) -> FileEntry:
    return FileEntry(
        fid=f"{n:032x}",
        path=path,
        kind="text",
        mode=0o644,
        created_ts=ts,
        created_dev=f"DEV{n}",
        edits={f"DEV{n}": 1},
        alive=True,
    )


def test_nfc_and_nfd_spellings_do_not_share_a_file() -> None:
    assert NFC != NFD
    first, later = _entry(1, NFD, T0), _entry(2, NFC, T0 + 5)
    out = compute_layout({e.fid: e for e in (later, first)})
    assert out.path_of(first.fid) == NFD
    other = out.path_of(later.fid)
    assert other is not None and other != NFC and is_conflict_name(other)
    assert later.fid in out.conflicts and first.fid not in out.conflicts


def test_case_twins_collide_only_when_folding_case() -> None:
    low, up = _entry(1, "dir/a.txt", T0), _entry(2, "dir/A.txt", T0 + 1)
    entries = {e.fid: e for e in (low, up)}
    plain = compute_layout(entries)
    assert plain.path_of(low.fid) == "dir/a.txt" and plain.path_of(up.fid) == "dir/A.txt"
    folded = compute_layout(entries, fold_case=True)
    assert folded.path_of(low.fid) == "dir/a.txt"
    moved = folded.path_of(up.fid)
    assert moved is not None and is_conflict_name(moved) and moved.startswith("dir/A")


def test_conflict_names_avoid_folded_twins() -> None:
    # A conflict name must not itself collide (by case) with a path another entry holds.
    a, b = _entry(1, "x.txt", T0), _entry(2, "X.txt", T0 + 1)
    out = compute_layout({e.fid: e for e in (a, b)}, fold_case=True)
    names = {p.casefold() for p in out.paths}
    assert len(names) == len(out.paths) == 2
