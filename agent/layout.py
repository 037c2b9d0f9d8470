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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from qmoi_sync.protocol.errors import PathError
from qmoi_sync.protocol.paths import CONFLICT_MARKER, conflict_name

from .index import FileEntry

__all__ = ["CONFLICT_MARKER", "Layout", "compute_layout", "strip_conflict_marker"]

ConflictNamer = Callable[[str, float, str], str]


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
    needed: frozenset[str] = frozenset()
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
    name_of = namer or _safe_conflict_name
    alive = sorted(
        (e for e in entries.values() if e.alive and e.path is not None),
        key=lambda e: (e.path or "", _rank(e)),
    )

    claims: dict[str, list[FileEntry]] = {}
    for e in alive:
        assert e.path is not None
        claims.setdefault(e.path, []).append(e)
    # Spellings of one name (NFC/NFD, or case with fold_case): the spelling of the earliest
    # entry keeps the name; entries claiming any other spelling become conflict copies.
    spellings: dict[str, list[str]] = {}
    for p in claims:
        spellings.setdefault(fold_name(p, fold_case), []).append(p)
    respelled: list[FileEntry] = []
    for spelled in spellings.values():
        if len(spelled) > 1 and not all(e.kind == "dir" for p in spelled for e in claims[p]):
            # (Folders spelled differently stay two folders, like the folders of files: only
            # files and links are ever renamed to a conflict name for their spelling.)
            keep = min(spelled, key=lambda p: (_rank(claims[p][0]), p))
            for p in spelled:
                if p != keep:
                    respelled.extend(claims.pop(p))
    # Every directory some alive entry needs to exist.
    needed_dirs: set[str] = set()
    for p in claims:
        needed_dirs.update(_ancestors(p))
    # Paths a conflict name must avoid: every claimed path and every needed directory.
    taken: set[str] = {fold_name(p, fold_case) for p in set(claims) | needed_dirs}

    paths: dict[str, str] = {}
    by_fid: dict[str, str] = {}
    losers: list[FileEntry] = list(respelled)
    for path, group in claims.items():  # sorted by path then rank, so group[0] is earliest
        if any(e.kind != "symlink" for e in group):
            # A symlink never takes a path from a file or folder (it may be a link a device
            # keeps only for itself, e.g. pointing outside the space): links lose.
            losers.extend(e for e in group if e.kind == "symlink")
            group = [e for e in group if e.kind != "symlink"]
        dirs = [e for e in group if e.kind == "dir"]
        files = [e for e in group if e.kind != "dir"]
        if path in needed_dirs:
            # Something lives under this path: it must be a directory. Files lose.
            winners, losers_here = dirs, files
        elif dirs and files:
            # A directory and a file claim the path and nothing needs it as a directory:
            # earliest creation wins, as for any other collision.
            if _rank(dirs[0]) <= _rank(files[0]):
                winners, losers_here = dirs, files
            else:
                winners, losers_here = [files[0]], files[1:] + dirs
        elif dirs:
            winners, losers_here = dirs, []
        else:
            winners, losers_here = [files[0]], files[1:]
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
        while fold_name(final, fold_case) in taken:
            n += 1
            final = _with_suffix(candidate, n)
        taken.add(fold_name(final, fold_case))
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
