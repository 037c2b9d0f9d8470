"""Where each alive index entry lives on disk: a PURE function of converged index state.

Every device computes the same layout from the same entries, so conflict copies need no extra
writes to the index (and no device "decides" a conflict that another device decides
differently). Nothing here reads the clock, the disk or the local device id.

Rules:

* Each alive entry claims its own ``path``. When several alive entries claim the same path
  (concurrent creation with different content, or a rename onto an existing path), the
  **winner** is the one created earliest, ties broken by creating device then fid; it keeps
  the path. Every loser is placed at ``conflict_name(path, created_ts, created_dev)``.
* A file (non-directory) whose path is a proper ancestor of another alive entry's path (one
  device created file ``a``, another ``a/b``) cannot coexist with it on disk: the file is
  placed under a conflict name and the directory keeps the path.
* A symlink claiming the same path as a file or folder always loses (conflict name).
* Directory entries claiming the same path do not conflict: they are the same directory. The
  winner is the one listed in ``Layout.paths``; ``by_fid`` maps all of them to the path.
* A conflict name never collides with a path claimed by another alive entry, an ancestor
  directory of one, or another conflict name: a numeric suffix (``-2``, ``-3``, ...) is added
  deterministically before the extension.
* No conflict copies of conflict copies: when the losing entry's own path is already a
  conflict name, the new name is derived from the original path it was derived from.

* Paths that differ only by Unicode normalization (``Café`` NFC vs NFD) are the same name on
  normalizing file systems (macOS): they always collide here, and with ``fold_case`` (set by a
  device whose folder is case-insensitive) so do paths that differ only by case. The exact
  spelling of the earliest-created entry keeps its path; every entry spelled differently is
  placed under a conflict name (never overwritten). Only the full path is compared: two
  *folders* spelled differently still map to two folders (left for later), and "dir" entries
  claiming only differently spelled paths keep them (an empty conflict-named folder would
  help no one).
"""

from __future__ import annotations

import math
import posixpath
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeVar

from qmoi_sync.protocol.errors import PathError
from qmoi_sync.protocol.paths import CONFLICT_MARKER, conflict_name

from .index import FileEntry

__all__ = [
    "CONFLICT_MARKER",
    "Layout",
    "LayoutCache",
    "compute_layout",
    "strip_conflict_marker",
]

ConflictNamer = Callable[[str, float, str], str]
_T = TypeVar("_T")


def _fallback_conflict_name(path: str, when: float, short_id: str) -> str:
    """Used only when ``conflict_name`` refuses its input (a path or device id from a buggy
    peer): still deterministic, same shape. The runtime validates every path it materializes,
    so a name built from an invalid path is refused there, not here (a pure function of
    remote data must not raise)."""
    head, base = posixpath.split(path)
    stem, ext = _split_ext(base)
    when = min(max(0.0, when), 253402300799.0) if math.isfinite(when) else 0.0
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    dev = re.sub(r"[^A-Za-z0-9]", "", short_id)[:16] or "X"
    return posixpath.join(head, f"{stem}{CONFLICT_MARKER}{stamp}-{dev}{ext}")


def _safe_conflict_name(path: str, when: float, short_id: str) -> str:
    try:
        return conflict_name(path, when, short_id)
    except PathError:
        return _fallback_conflict_name(path, when, short_id)


def _split_ext(base: str) -> tuple[str, str]:
    """("report", ".pdf"); a leading dot is not an extension (".bashrc" -> (".bashrc", ""))."""
    dot = base.rfind(".")
    if dot <= 0:
        return base, ""
    return base[:dot], base[dot:]


# stem.sync-conflict-YYYYMMDD-HHMMSS-ID[-N].ext  (ID: base32-ish device short id)
_CONFLICT_RE = re.compile(r"^(?P<stem>.+?)\.sync-conflict-\d{8}-\d{6}-[A-Za-z0-9]+(?:-\d+)?$")


def strip_conflict_marker(path: str) -> str:
    """The original path a conflict name was derived from (the path itself if it is not one)."""
    head, base = posixpath.split(path)
    stem, ext = _split_ext(base)
    m = _CONFLICT_RE.match(stem)
    if m is None:
        return path
    return posixpath.join(head, m.group("stem") + ext)


def _with_suffix(path: str, n: int) -> str:
    head, base = posixpath.split(path)
    stem, ext = _split_ext(base)
    return posixpath.join(head, f"{stem}-{n}{ext}")


def _ancestors(path: str) -> Iterable[str]:
    # Stops when dirname() stops shrinking: for a remote absolute path ("/etc/x") it reaches a
    # fixed point ("/", "//") and looping on it would hang the agent.
    parent = posixpath.dirname(path)
    while parent and parent != path:
        yield parent
        path, parent = parent, posixpath.dirname(parent)


@dataclass(frozen=True, slots=True)
class Layout:
    """The on-disk layout of one space."""

    paths: Mapping[str, str] = field(default_factory=dict)
    """relative path -> fid hex (one entry per path; for merged directories, the winner)."""
    by_fid: Mapping[str, str] = field(default_factory=dict)
    """fid hex -> relative path, for every alive entry."""
    conflicts: frozenset[str] = frozenset()
    """fids placed under a conflict name (the ``conflicts`` count shown by ``status``)."""
    needed: AbstractSet[str] = frozenset()
    """Every folder some placed entry lives in (ancestors of ``paths``): kept on disk even
    when no alive "dir" entry claims it."""

    def path_of(self, fid: str) -> str | None:
        return self.by_fid.get(fid)


def _rank(e: FileEntry) -> tuple[float, str, str]:
    return (e.created_ts, e.created_dev, e.fid)


def fold_name(path: str, fold_case: bool = False) -> str:
    """The key under which two paths name the same file: NFC, and case-folded if asked."""
    nfc = unicodedata.normalize("NFC", path)
    return nfc.casefold() if fold_case else nfc


def _place_group(
    group: Sequence[FileEntry], needed: bool
) -> tuple[list[FileEntry], list[FileEntry]]:
    """(winners, losers) among the entries claiming one path (``group`` sorted by rank);
    ``needed``: some other placed entry lives under the path, so it must be a folder."""
    losers: list[FileEntry] = []
    if any(e.kind != "symlink" for e in group):
        # A symlink never takes a path from a file or folder (it may be a link a device
        # keeps only for itself, e.g. pointing outside the space): links lose.
        losers.extend(e for e in group if e.kind == "symlink")
        group = [e for e in group if e.kind != "symlink"]
    dirs = [e for e in group if e.kind == "dir"]
    files = [e for e in group if e.kind != "dir"]
    if needed:
        # Something lives under this path: it must be a directory. Files lose.
        return dirs, losers + files
    if dirs and files:
        # A directory and a file claim the path and nothing needs it as a directory:
        # earliest creation wins, as for any other collision.
        if _rank(dirs[0]) <= _rank(files[0]):
            return dirs, losers + files
        return [files[0]], losers + files[1:] + dirs
    if dirs:
        return dirs, losers
    return [files[0]], losers + files[1:]


def _many(slot: _T | tuple[_T, ...] | None) -> tuple[_T, ...]:
    """The values of a slot (a path's claimants, a name's spellings) that holds one value as
    itself and several as a tuple: nearly every path has one claimant and every name one
    spelling, and a 1-tuple per file cost ~5.6 MB at 100,000 files (each)."""
    if slot is None:
        return ()
    return slot if isinstance(slot, tuple) else (slot,)


def _one_or_many(values: tuple[_T, ...]) -> _T | tuple[_T, ...]:
    """The slot holding ``values`` (at least one): see ``_many``."""
    return values[0] if len(values) == 1 else values


def _claims_of(entries: Mapping[str, FileEntry]) -> dict[str, FileEntry | tuple[FileEntry, ...]]:
    """path -> the alive entries claiming it, by rank: one as itself, several as a tuple."""
    claims: dict[str, FileEntry | tuple[FileEntry, ...]] = {}
    several: dict[str, list[FileEntry]] = {}
    for e in entries.values():
        if e.alive and e.path is not None:
            first = claims.setdefault(e.path, e)
            if first is not e:
                several.setdefault(e.path, list(_many(first))).append(e)
    for p, group in several.items():  # (only these are sorted: no 100,000-key sort)
        claims[p] = tuple(sorted(group, key=_rank))
    return claims


def compute_layout(
    entries: Mapping[str, FileEntry],
    *,
    namer: ConflictNamer | None = None,
    fold_case: bool = False,
) -> Layout:
    """The layout of the alive ``entries`` (keyed by fid hex; dead entries are ignored).

    ``namer`` overrides the conflict naming function (tests); by default it is
    ``qmoi_sync.protocol.paths.conflict_name``. ``fold_case``: names differing only by case
    collide (a case-insensitive folder).
    """
    return _lay_out(_claims_of(entries), namer=namer, fold_case=fold_case)


def _lay_out(
    claims: Mapping[str, FileEntry | tuple[FileEntry, ...]],
    *,
    namer: ConflictNamer | None,
    fold_case: bool,
) -> Layout:
    """``compute_layout`` of the entries ``claims`` lists (``_claims_of``; left as it is).

    Its working set is kept to about one slot per path beside the result (at 100,000 files it
    was ~32 MB above its 7.7 MB result, 45 MB with fold_case: a list per path and per name, a
    set of every name, sort keys): the full layout runs on top of everything else an agent
    holds after a large catch-up."""
    name_of = namer or _safe_conflict_name

    def fold(path: str) -> str:
        return fold_name(path, fold_case)

    # Spellings of one name (NFC/NFD, or case with fold_case): the spelling of the earliest
    # entry keeps the name; entries claiming any other spelling become conflict copies. Two
    # different paths of one name cannot both be the name itself (its fold), so a name with
    # several spellings has one that is not the name: only such names are listed.
    odd: dict[str, str] = {}  # name -> its first claimed spelling that is not the name itself
    spellings: dict[str, list[str]] = {}  # names spelled several ways -> every claimed spelling
    for p in claims:
        name = fold(p)
        if name != p:
            first = odd.setdefault(name, p)
            if first is not p:
                spellings.setdefault(name, [first]).append(p)
    for name, p in odd.items():
        if name in claims and fold(name) == name:  # (with fold_case a fold is not always its
            spellings.setdefault(name, [p]).append(name)  # own fold: "ss\u0301", "s\u015b")

    def claimed_name(name: str) -> bool:
        """Some claimed path is spelled ``name`` (a fold) or another way of it."""
        return name in odd or (name in claims and fold(name) == name)

    respelled: set[str] = set()  # claimed paths whose name another spelling keeps
    for spelled in spellings.values():
        if not all(e.kind == "dir" for p in spelled for e in _many(claims[p])):
            # (Folders spelled differently stay two folders, like the folders of files: only
            # files and links are ever renamed to a conflict name for their spelling.)
            keep = min(spelled, key=lambda p: (_rank(_many(claims[p])[0]), p))
            respelled.update(p for p in spelled if p != keep)
    # Every directory some alive entry needs to exist.
    needed_dirs: set[str] = set()
    for p in claims:
        if p not in respelled:
            needed_dirs.update(_ancestors(p))
    # Names a conflict name must avoid: every claimed path's (claimed_name), every needed
    # directory's, every conflict name's given before it.
    taken: set[str] = {fold(d) for d in needed_dirs}

    paths: dict[str, str] = {}
    by_fid: dict[str, str] = {}
    losers: list[FileEntry] = [e for p in respelled for e in _many(claims[p])]
    for path in sorted(claims):  # group[0] is the earliest; the dicts are in path order
        if path in respelled:
            continue
        winners, losers_here = _place_group(_many(claims[path]), path in needed_dirs)
        if winners:
            paths[path] = winners[0].fid
            for w in winners:  # several only for merged directories
                by_fid[w.fid] = path
        losers.extend(losers_here)

    conflicts: set[str] = set()
    for e in sorted(losers, key=lambda e: (e.path or "", _rank(e))):
        assert e.path is not None
        candidate = name_of(strip_conflict_marker(e.path), e.created_ts, e.created_dev)
        n = 1
        final = candidate
        while (name := fold(final)) in taken or claimed_name(name):
            n += 1
            final = _with_suffix(candidate, n)
        taken.add(name)
        paths[final] = e.fid
        by_fid[e.fid] = final
        conflicts.add(e.fid)

    needed = set(needed_dirs)
    for p in paths:
        if p not in claims:  # conflict names live in folders too
            needed.update(_ancestors(p))
    return Layout(
        paths=paths,
        by_fid=by_fid,
        conflicts=frozenset(conflicts),
        needed=frozenset(needed),
    )


class _Needed(AbstractSet[str]):
    """``Layout.needed`` of a ``LayoutCache``: folders some claimed path lives in (counted,
    so a removal is O(depth)) plus the folders of conflict names (fixed between full
    computations). A live view: valid until the cache's next ``update``."""

    __slots__ = ("_counts", "_extra")

    def __init__(self, counts: dict[str, int], extra: frozenset[str]) -> None:
        self._counts = counts
        self._extra = extra

    def __contains__(self, item: object) -> bool:
        return item in self._counts or item in self._extra

    def __iter__(self) -> Iterator[str]:
        yield from self._counts
        yield from (p for p in self._extra if p not in self._counts)

    def __len__(self) -> int:
        return len(self._counts) + sum(1 for p in self._extra if p not in self._counts)


class LayoutCache:
    """``compute_layout`` kept up to date entry by entry, for the sync loop: a batch of remote
    updates touches a few entries of a space that may hold 100,000, and laying out all of them
    per batch made a big first sync quadratic.

    ``update(entries, changed)`` re-places only the paths the changed entries claimed or now
    claim, the other spellings of those names, and the claimed folders above them (a file at
    a path that just became a folder's parent loses it). Whenever such a region holds, or
    would hold, a conflict copy, or a changed name comes near one (a conflict name's numeric
    suffix depends on every taken name), it falls back to ``compute_layout`` over everything:
    the result is always exactly ``compute_layout(entries)``.

    The returned ``Layout`` shares this cache's dicts: it is valid until the next ``update``.
    """

    def __init__(self, *, fold_case: bool = False, namer: ConflictNamer | None = None) -> None:
        self.fold_case = fold_case
        self._namer = namer
        self._layout: Layout | None = None
        # The path each alive entry claims is by_fid's, except for the conflict copies: theirs
        # are kept here (a second fid -> path dict for every entry cost ~3.8 MB at 100,000).
        # Exact between updates: an update placing an entry elsewhere than its claim (a
        # conflict) falls back to ``full``, and any change to a conflict copy is hot.
        self._lost: dict[str, str] = {}
        # path -> claiming entries by rank (_claimants): several as a tuple, one as itself,
        # none as () (only during an update), and no item for a path whose one claimant is
        # placed there (nearly every path: it is ``paths``'s; a full path -> entry dict cost
        # ~3.8 MB at 100,000 files). The entries mapping of the current call gives its entry.
        self._claims: dict[str, FileEntry | tuple[FileEntry, ...]] = {}
        # fold_name -> claimed paths of that name (_spellings): a path as itself, several as a
        # tuple, and no item when the only claimed spelling is the fold itself (nearly every
        # name: NFC, and lowercase or not folding case) or none is claimed.
        self._spell: dict[str, str | tuple[str, ...]] = {}
        self._below: dict[str, int] = {}  # folder -> claimed paths under it (needed_dirs)
        self._extra: frozenset[str] = frozenset()  # folders of conflict names
        self._hot: set[str] = set()  # folded names near a conflict copy: changes go full
        self.paths: dict[str, str] = {}
        self.by_fid: dict[str, str] = {}
        self.dirs: dict[str, str] = {}  # placed "dir" entries: path -> fid
        self.links: dict[str, str] = {}  # placed symlinks: path -> fid
        self.full_runs = 0

    @property
    def layout(self) -> Layout | None:
        return self._layout

    def _fold(self, path: str) -> str:
        return fold_name(path, self.fold_case)

    def full(self, entries: Mapping[str, FileEntry]) -> Layout:
        """Lay out every entry (start-up, or a change near a conflict)."""
        self.full_runs += 1
        # The old state goes before the new one is built (an update meanwhile lays out
        # everything again; a Layout returned before keeps the dicts it has): a full layout
        # again at 100,000 files peaked 7.7 MB higher with both.
        self._layout = None
        self._claims, self._spell, self._lost = {}, {}, {}
        self.paths, self.by_fid, self.dirs, self.links = {}, {}, {}, {}
        claims = _claims_of(entries)
        out = _lay_out(claims, namer=self._namer, fold_case=self.fold_case)
        self._claims = claims  # every claimed path until the end of full
        for p in claims:
            self._add_spelling(p)
        respelled: set[str] = set()
        for slot in self._spell.values():
            spelled = _many(slot)
            if len(spelled) > 1 and not all(
                e.kind == "dir" for p in spelled for e in _many(claims[p])
            ):
                keep = min(spelled, key=lambda p: (_rank(_many(claims[p])[0]), p))
                respelled.update(p for p in spelled if p != keep)
        self._below = {}
        for p in claims:
            if p not in respelled:
                for d in _ancestors(p):
                    self._below[d] = self._below.get(d, 0) + 1
        extra: set[str] = set()
        hot: set[str] = set()
        name_of = self._namer or _safe_conflict_name
        for fid in out.conflicts:
            final = out.by_fid[fid]
            extra.update(_ancestors(final))
            e = entries[fid]
            assert e.path is not None
            self._lost[fid] = e.path
            # The loser's own name (a change there or below it may let it win again) and every
            # name its suffix search passed (freeing one renames it).
            hot.add(self._fold(e.path))
            hot.add(self._fold(final))
            candidate = name_of(strip_conflict_marker(e.path), e.created_ts, e.created_dev)
            name, n = candidate, 1
            while n < 100_000 and self._fold(name) != self._fold(final):
                hot.add(self._fold(name))
                n += 1
                name = _with_suffix(candidate, n)
        # Every one, also those a claimed path needs now: that path may go, the copy stays.
        self._extra = frozenset(extra)
        self._hot = hot
        # compute_layout's own dicts, not copies (a second pair coexisting with them raised
        # the peak of ``full`` by ~7.6 MB at 100,000 files): ``out`` is dropped here.
        self.paths = out.paths if isinstance(out.paths, dict) else dict(out.paths)
        self.by_fid = out.by_fid if isinstance(out.by_fid, dict) else dict(out.by_fid)
        self.dirs = {p: f for p, f in self.paths.items() if entries[f].kind == "dir"}
        self.links = {p: f for p, f in self.paths.items() if entries[f].kind == "symlink"}
        self._claims = {
            p: c
            for p, c in claims.items()
            if isinstance(c, tuple) or self.by_fid.get(c.fid) != p  # (not placed there)
        }
        self._layout = Layout(
            paths=self.paths,
            by_fid=self.by_fid,
            conflicts=out.conflicts,
            needed=_Needed(self._below, self._extra),
        )
        return self._layout

    def _invalid(self) -> None:
        self._layout = None
        return None

    def update(
        self, entries: Mapping[str, FileEntry], changed: Iterable[str]
    ) -> tuple[Layout, dict[str, str | None]] | None:
        """The layout after the entries ``changed`` (fid hex) changed, and every fid whose
        place may have changed with the path it had before (None: it had none). None when
        the change needs everything laid out again: call ``full`` (the cache is unusable
        until then; ``full`` may run in another thread, it reads only ``entries``).

        ``entries`` holds every entry, as for ``compute_layout``; an entry not in ``changed``
        is as it was at the previous call (the cache reads a placed entry from there)."""
        if self._layout is None:
            return self._invalid()
        changed = set(changed)
        news: dict[str, str | None] = {}
        for fid in changed:
            e = entries.get(fid)
            news[fid] = e.path if e is not None and e.alive and e.path is not None else None
            for p in (self._claimed(fid), news[fid]):
                if p is None:
                    continue
                if self._fold(p) in self._hot or any(
                    self._fold(d) in self._hot for d in _ancestors(p)
                ):
                    return self._invalid()
        before: dict[str, str | None] = {}
        touched: set[str] = set()

        def note(fid: str) -> None:
            if fid not in before:
                before[fid] = self.by_fid.get(fid)

        # Every changed entry leaves the path it claimed before any claims its new one: a
        # path with no item then has an unchanged claimant, whose entry ``entries`` holds.
        for fid in changed:
            note(fid)
            # (by_fid still holds what it held before this update for a changed fid: it is
            # written below, and in the placement loop after this one.)
            old = self._claimed(fid)
            if old is not None:
                touched.add(old)
                slot = self._claims.get(old)  # (no item: fid was the one claimant)
                rest = tuple(e for e in _many(slot) if e.fid != fid)
                if rest:
                    self._claims[old] = _one_or_many(rest)
                else:
                    self._unclaim(old, touched)
        for fid in changed:
            new = news[fid]
            if new is None:
                self.by_fid.pop(fid, None)
                continue
            e = entries[fid]
            touched.add(new)
            claimants = self._claimants(new, entries)
            if not claimants:
                self._claims[new] = e
                self._add_spelling(new)
                for d in _ancestors(new):
                    n = self._below.get(d, 0)
                    self._below[d] = n + 1
                    if n == 0:
                        touched.add(d)  # a file claiming d now loses it to the folder
            else:
                self._claims[new] = tuple(sorted((*claimants, e), key=_rank))
        for p in list(touched):
            touched.update(self._spellings(self._fold(p)))
        for p in touched:
            at = self._claimants(p, entries)
            if not at:
                fid_at = self.paths.pop(p, None)
                self.dirs.pop(p, None)
                self.links.pop(p, None)
                if fid_at is not None:
                    note(fid_at)
                continue
            spelled = self._spellings(self._fold(p))
            if len(spelled) > 1 and not all(
                e.kind == "dir" for q in spelled for e in self._claimants(q, entries)
            ):
                return self._invalid()
            winners, losers = _place_group(at, p in self._below)
            if losers:
                return self._invalid()
            for e in at:
                note(e.fid)
            if p in self.paths:
                note(self.paths[p])
            self.paths[p] = winners[0].fid
            for w in winners:
                self.by_fid[w.fid] = p
            kind = winners[0].kind
            if kind == "dir":
                self.dirs[p] = winners[0].fid
            else:
                self.dirs.pop(p, None)
            if kind == "symlink":
                self.links[p] = winners[0].fid
            else:
                self.links.pop(p, None)
        for p in touched:  # each has no claimant now, or is placed for all of its claimants
            slot = self._claims.get(p)
            if slot is not None and len(_many(slot)) < 2:
                del self._claims[p]
        assert self._layout is not None
        return self._layout, before

    def _claimed(self, fid: str) -> str | None:
        """The path the alive entry ``fid`` claims (None: no alive entry)."""
        lost = self._lost.get(fid)
        return lost if lost is not None else self.by_fid.get(fid)

    def _claimants(self, path: str, entries: Mapping[str, FileEntry]) -> tuple[FileEntry, ...]:
        """The alive entries claiming ``path``, by rank (``entries``: this update's)."""
        slot = self._claims.get(path)
        if slot is not None:
            return _many(slot)
        fid = self.paths.get(path)
        return () if fid is None or fid in self._lost else (entries[fid],)

    def _is_claimed(self, path: str) -> bool:
        slot = self._claims.get(path)
        if slot is not None:
            return bool(_many(slot))
        fid = self.paths.get(path)
        return fid is not None and fid not in self._lost

    def _spellings(self, fold: str) -> tuple[str, ...]:
        """The claimed paths whose fold_name is ``fold`` (in no particular order)."""
        slot = self._spell.get(fold)
        if slot is None:
            # No item: the fold itself if it is claimed and is its own fold (it may be a path
            # of another name: with fold_case a path is not always its fold's fold).
            return (fold,) if self._is_claimed(fold) and self._fold(fold) == fold else ()
        return _many(slot)

    def _set_spellings(self, fold: str, spelled: tuple[str, ...]) -> None:
        if not spelled or spelled == (fold,):
            self._spell.pop(fold, None)  # what _spellings reads from no item
        else:
            self._spell[fold] = _one_or_many(spelled)

    def _add_spelling(self, path: str) -> None:
        """``path`` is claimed now (already in ``_claims``)."""
        fold = self._fold(path)
        spelled = self._spellings(fold)
        if path not in spelled:
            self._set_spellings(fold, (*spelled, path))

    def _unclaim(self, path: str, touched: set[str]) -> None:
        self._claims[path] = ()  # (paths still places its old claimant until placed again)
        fold = self._fold(path)
        self._set_spellings(fold, tuple(p for p in self._spellings(fold) if p != path))
        for d in _ancestors(path):
            n = self._below.get(d, 0) - 1
            if n <= 0:
                self._below.pop(d, None)
                touched.add(d)  # a file may claim the folder's path now
            else:
                self._below[d] = n
