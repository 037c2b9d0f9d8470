"""Which local paths are never sent: built-in editor/OS droppings plus the space's ``.qmoiignore``.

``.qmoiignore`` lives in the space root, uses gitignore syntax (``pathspec``'s GitIgnoreSpec:
``*.log``, ``build/``, ``/only-at-root``, ``!negation``) and is synced like any other file, so
every device usually applies the same patterns. It is re-read whenever its size, mtime or inode
changes, so edits take effect without a restart.

Semantics (gitignore-like: ignoring only stops *sending*):

* A local path that matches is not ingested: its creation, edits, renames onto it and its
  deletion are never sent. In particular, a file that becomes ignored is *not* deleted on
  the other devices; it simply stops being updated from this device.
* Entries that other devices send are still materialized here even if they match a local
  pattern (the sender decided to sync them; a differing pattern set is a transient state
  while ``.qmoiignore`` itself syncs).
* ``.qmoiignore`` itself is never ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pathspec

from qmoi_sync.agent.materialize import is_temp_name

__all__ = ["BUILTIN_PATTERNS", "IGNORE_FILE", "IgnoreRules"]

log = logging.getLogger("qmoi_sync.ignore")

IGNORE_FILE = ".qmoiignore"
# Never synced, whatever .qmoiignore says: editor swap/backup files, OS metadata, Office lock
# files, partial downloads. (Agent temp files are excluded separately: is_temp_name.)
BUILTIN_PATTERNS: tuple[str, ...] = (
    "*.swp",
    "*.swx",
    "*.swo",
    "*~",
    ".#*",
    "*.tmp",
    "4913",  # vim's write probe
    ".DS_Store",
    "._*",  # AppleDouble
    ".Spotlight-V100/",
    ".Trashes/",
    "Thumbs.db",
    "ehthumbs.db",
    "desktop.ini",
    "~$*",  # Office lock files
    ".~lock.*#",  # LibreOffice lock files
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.download",
)
MAX_IGNORE_FILE = 256 * 1024

_BUILTIN = pathspec.GitIgnoreSpec.from_lines(BUILTIN_PATTERNS)


class IgnoreRules:
    """The ignore rules of one space folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stamp: tuple[int, int, int] | None = None
        self._spec: pathspec.GitIgnoreSpec | None = None
        self._lines: list[str] = []
        self.error: str | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read ``.qmoiignore`` if it changed on disk; True if the rules changed."""
        path = self.root / IGNORE_FILE
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            st = None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino) if st is not None else None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        old = self._lines
        self._lines = []
        self._spec = None
        self.error = None
        if st is not None:
            try:
                if st.st_size > MAX_IGNORE_FILE:
                    raise ValueError(f"larger than {MAX_IGNORE_FILE} bytes")
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
                self._spec = pathspec.GitIgnoreSpec.from_lines(lines)
                self._lines = lines
            except (OSError, ValueError) as exc:  # pathspec raises ValueError subclasses
                self.error = f"{IGNORE_FILE}: {exc}"
                log.warning("ignoring an unusable %s: %s", IGNORE_FILE, exc)
        return old != self._lines

    def is_ignored(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether a '/'-separated relative path is never sent (``is_dir``: a folder)."""
        if relpath == IGNORE_FILE:
            return False
        name = relpath.rsplit("/", 1)[-1]
        if is_temp_name(name):
            return True
        probe = relpath + "/" if is_dir else relpath
        if _BUILTIN.match_file(probe):
            return True
        return self._spec is not None and self._spec.match_file(probe)
