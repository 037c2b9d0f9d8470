"""Portable relative paths and conflict-copy names (pure functions).

A synced path is ``/``-separated, relative, and must be representable on Linux, macOS and Windows.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .errors import PathError

__all__ = [
    "CONFLICT_MARKER",
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "conflict_name",
    "is_conflict_name",
    "split_ext_for_conflict",
    "validate_relpath",
]

#: Longest path (UTF-8 bytes).
MAX_PATH_BYTES = 4096
#: Longest path component (UTF-8 bytes).
MAX_COMPONENT_BYTES = 255
CONFLICT_MARKER = ".sync-conflict-"

_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"{p}{n}" for p in ("COM", "LPT") for n in [*"123456789", "\u00b9", "\u00b2", "\u00b3"]]
)
_DRIVE = re.compile(r"^[A-Za-z]:")
_SHORT_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")
_CONFLICT_RE = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[A-Za-z0-9]{1,16}(?:\.[^.]*)?$")


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def validate_relpath(p: str) -> str:
    """Return ``p`` unchanged if it is a safe portable relative path; else raise PathError."""
    if not isinstance(p, str):
        raise PathError("path must be a string")
    if p == "":
        raise PathError("path is empty")
    try:
        size = len(p.encode("utf-8"))
    except UnicodeEncodeError:
        raise PathError("path is not valid UTF-8 (it contains undecodable bytes)") from None
    if size > MAX_PATH_BYTES:
        raise PathError(f"path is {size} bytes long, limit {MAX_PATH_BYTES}")
    if "\x00" in p:
        raise PathError("path contains a NUL character")
    if any(_is_control(ch) for ch in p):
        raise PathError("path contains a control character")
    if "\\" in p:
        raise PathError("path contains a backslash (use '/' as separator)")
    if p.startswith("/"):
        raise PathError("path is absolute (it must be relative to the space folder)")
    if _DRIVE.match(p):
        raise PathError("path starts with a drive letter")
    for comp in p.split("/"):
        _check_component(comp, p)
    return p


def _check_component(comp: str, p: str) -> None:
    if comp == "":
        raise PathError(f"path {p!r} has an empty component (double or trailing '/')")
    if comp in (".", ".."):
        raise PathError(f"path {p!r} contains a {comp!r} component")
    if len(comp.encode("utf-8")) > MAX_COMPONENT_BYTES:
        raise PathError(f"a component of {p!r} is longer than {MAX_COMPONENT_BYTES} bytes")
    if comp[-1] in ". ":
        raise PathError(f"component {comp!r} ends with a dot or a space (not portable to Windows)")
    stem = comp.split(".", 1)[0].rstrip(" ").upper()
    if stem in _RESERVED:
        raise PathError(f"component {comp!r} is a reserved name on Windows")


def split_ext_for_conflict(path: str) -> tuple[str, str]:
    """``a/b/report.pdf`` → ``("a/b/report", ".pdf")``; ``name`` / ``.bashrc`` → ``(path, "")``.

    Only the last extension of the last component counts (``x.tar.gz`` → ``("x.tar", ".gz")``).
    """
    head, sep, name = path.rpartition("/")
    dot = name.rfind(".")
    if dot <= 0:  # no dot, or a dotfile with no further extension
        return path, ""
    return head + sep + name[:dot], name[dot:]


def _timestamp(when: datetime | float | int) -> str:
    if isinstance(when, datetime):
        dt = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    elif isinstance(when, int | float) and not isinstance(when, bool):
        try:
            dt = datetime.fromtimestamp(when, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise PathError(f"timestamp {when!r} is out of range") from None
    else:
        raise PathError("when must be a datetime or a unix timestamp")
    return dt.strftime("%Y%m%d-%H%M%S")


def conflict_name(path: str, when: datetime | float | int, short_id: str) -> str:
    """``stem.sync-conflict-YYYYMMDD-HHMMSS-SHORTID.ext`` (UTC; naive datetimes count as UTC).

    A pure function of its inputs, so every device computes the same name. If the new last
    component would be over 255 bytes, the stem is shortened (never the marker or extension).
    """
    validate_relpath(path)
    if not isinstance(short_id, str) or not _SHORT_ID.match(short_id):
        raise PathError("short_id must be 1-16 ASCII letters or digits")
    base, ext = split_ext_for_conflict(path)
    marker = f"{CONFLICT_MARKER}{_timestamp(when)}-{short_id}"
    head, sep, stem = base.rpartition("/")
    budget = MAX_COMPONENT_BYTES - len(marker.encode()) - len(ext.encode("utf-8"))
    raw = stem.encode("utf-8")
    if len(raw) > budget:
        stem = raw[: max(budget, 1)].decode("utf-8", errors="ignore").rstrip(". ") or "_"
    out = head + sep + stem + marker + ext
    try:
        return validate_relpath(out)
    except PathError as e:
        raise PathError(f"no valid conflict name for {path!r}: {e}") from None


def is_conflict_name(path: str) -> bool:
    """True if the last component of ``path`` looks like a conflict copy."""
    return bool(_CONFLICT_RE.search(path.rpartition("/")[2]))
