"""Settings files as flat key paths, and the plan that patches a file towards a desired state.

A settings file (JSON with or without comments, TOML, INI) is seen as a tree of *containers*
(objects / tables / sections) whose *leaves* are values. A leaf is addressed by its key path, a
tuple of key names from the root (``("editor", "fontSize")``; VS Code's flat ``"window.zoomLevel"``
is the one-segment path ``("window.zoomLevel",)``). Leaf values are JSON-compatible Python values;
lists (and TOML arrays of tables) are single leaves, never merged element by element; an empty
container is a leaf whose value is ``{}`` so that it survives.

Writing back never re-serializes a file. Each format module parses a file into an editable form
that remembers where every key is (`ParsedSettings`) and applies *operations* to it:

* `Replace(path, Leaf | Group)` — the value at an existing path becomes this leaf (or, for a
  leaf that must become a container, this new container);
* `Delete(path)` — a leaf or a whole container disappears (with the comments attached to it);
* `Insert(parent, after, members)` — new keys (leaves or new containers, `Group`) are inserted
  into an existing container right after the sibling named ``after`` (``None``: first).

`plan()` computes these operations from the tree of the file on disk and the desired flat
state, touching nothing else: untouched keys keep their text, comments, order and indentation.
New keys are placed by an *order hint* (the ordinal of the key in the file of the device that
wrote it): before the first existing sibling whose hint is greater.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "BUILTIN_SECRET_ALLOW",
    "FORMATS",
    "SECRET_PATTERNS",
    "Delete",
    "FormatName",
    "Group",
    "Insert",
    "KeyPath",
    "Leaf",
    "Op",
    "ParsedSettings",
    "Replace",
    "SettingsParseError",
    "SettingsTree",
    "canon",
    "detect_format",
    "display_path",
    "format_handler",
    "from_pointer",
    "line_col",
    "looks_secret",
    "matches_any",
    "normalize_desired",
    "parse_key_arg",
    "plan",
    "to_pointer",
]

KeyPath = tuple[str, ...]
FormatName = Literal["json", "toml", "ini"]
FORMATS: tuple[FormatName, ...] = ("json", "toml", "ini")


class SettingsParseError(ValueError):
    """A settings file that does not parse (half-saved, a syntax error)."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None) -> None:
        self.message = message
        self.line = line
        self.col = col
        where = f" at line {line}" + (f", column {col}" if col is not None else "") if line else ""
        super().__init__(f"{message}{where}")


def line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


# -- key paths ------------------------------------------------------------------------------
def to_pointer(path: KeyPath) -> str:
    """RFC 6901 JSON pointer of a key path (``("a/b", "c")`` -> ``/a~1b/c``)."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def from_pointer(pointer: str) -> KeyPath:
    if not pointer.startswith("/"):
        raise ValueError(f"not a JSON pointer: {pointer!r}")
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/"))


def display_path(path: KeyPath) -> str:
    """How people write a key: segments joined by dots (``editor.fontSize``)."""
    return ".".join(path)


def parse_key_arg(text: str, known: Iterable[KeyPath] = ()) -> KeyPath:
    """A key given on the command line: a JSON pointer (``/a/b``), the display form of a key
    that exists (``window.zoomLevel`` when that is one key), or dotted segments (``lan.enabled``
    -> ``("lan", "enabled")``)."""
    if text.startswith("/"):
        return from_pointer(text)
    for path in known:
        if display_path(path) == text:
            return path
    if not text or any(not part for part in text.split(".")):
        raise ValueError(f"not a key: {text!r}")
    return tuple(text.split("."))


def matches_any(path: KeyPath, patterns: Iterable[str]) -> str | None:
    """The first glob pattern that matches the key or one of its ancestors, else None.

    A pattern is matched (case-sensitively, `fnmatch` syntax) against the display form of the
    key and of each of its ancestors, so ``terminal.integrated.*`` matches VS Code's flat key
    ``terminal.integrated.fontSize`` and ``terminal`` matches everything under a ``terminal``
    table. A pattern starting with ``/`` is matched against JSON pointers instead.
    """
    pats = list(patterns)
    if not pats:
        return None
    for i in range(len(path), 0, -1):
        prefix = path[:i]
        dotted, pointer = display_path(prefix), to_pointer(prefix)
        for pat in pats:
            if fnmatch.fnmatchcase(pointer if pat.startswith("/") else dotted, pat):
                return pat
    return None


# Leaf names that look like credentials stay on the device unless allow-listed (lower-cased
# leaf name, fnmatch). The built-in allow list removes common false positives of ``*key*`` and
# ``*token*`` (keyboard layouts, keybindings, syntax-colour tokens).
SECRET_PATTERNS: tuple[str, ...] = ("*token*", "*password*", "*passwd*", "*secret*", "*key*")
BUILTIN_SECRET_ALLOW: tuple[str, ...] = (
    "*keyboard*",
    "*keybinding*",
    "*keymap*",
    "*keyword*",
    "*hotkey*",
    "*monkey*",
    "*tokencolor*",
    "*semantictoken*",
)


def _name_is_secret(name: str) -> bool:
    low = name.lower()
    if any(fnmatch.fnmatchcase(low, p) for p in BUILTIN_SECRET_ALLOW):
        return False
    return any(fnmatch.fnmatchcase(low, p) for p in SECRET_PATTERNS)


def _value_has_secret(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(value, dict):
        return any(
            _name_is_secret(str(k)) or _value_has_secret(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(_value_has_secret(v, depth + 1) for v in value)
    return False


def looks_secret(path: KeyPath, value: Any = None) -> bool:
    """Whether a leaf looks like a credential: its own name (the last key segment) matches one
    of `SECRET_PATTERNS`, or it is a list/table holding such a key (a TOML array of tables with
    a ``password`` field)."""
    return bool(path) and (_name_is_secret(path[-1]) or _value_has_secret(value))


# -- values ---------------------------------------------------------------------------------
def canon(value: Any) -> str:
    """Canonical JSON text of a leaf value: equal iff same type and value (``1`` != ``1.0`` !=
    ``true``). Object keys are sorted: key order inside a leaf value is not a change."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_json_value(value: Any, depth: int = 0) -> None:
    """Raise ValueError unless ``value`` is plain JSON data (no NaN, no custom types)."""
    if depth > 64:
        raise ValueError("value nested too deeply")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite number")
        return
    if isinstance(value, list):
        for v in value:
            check_json_value(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError("object keys must be strings")
            check_json_value(v, depth + 1)
        return
    raise ValueError(f"not a JSON value: {type(value).__name__}")


# -- the tree and the operations ----------------------------------------------------------------
@dataclass
class SettingsTree:
    """A parsed file, format-neutral: leaves in document order, and every container's children
    in document order (the root container is ``()``)."""

    leaves: dict[KeyPath, Any] = field(default_factory=dict)
    children: dict[KeyPath, list[str]] = field(default_factory=lambda: {(): []})

    def add_container(self, path: KeyPath) -> None:
        if path not in self.children:
            self.children[path] = []
            self.children[path[:-1]].append(path[-1])

    def add_leaf(self, path: KeyPath, value: Any) -> None:
        if path in self.leaves:
            self.leaves[path] = value  # a duplicate key: the last one counts
            return
        self.leaves[path] = value
        self.children[path[:-1]].append(path[-1])

    def is_container(self, path: KeyPath) -> bool:
        return path in self.children


@dataclass(frozen=True)
class Leaf:
    value: Any


@dataclass(frozen=True)
class Group:
    """A new container and its content, in order."""

    items: tuple[tuple[str, Leaf | Group], ...]

    def to_plain(self) -> dict[str, Any]:
        return {k: (v.to_plain() if isinstance(v, Group) else v.value) for k, v in self.items}


@dataclass(frozen=True)
class Replace:
    path: KeyPath
    new: Leaf | Group


@dataclass(frozen=True)
class Delete:
    path: KeyPath


@dataclass(frozen=True)
class Insert:
    parent: KeyPath
    after: str | None  # insert after this existing child; None: as the first child
    members: tuple[tuple[str, Leaf | Group], ...]


Op = Replace | Delete | Insert


class ParsedSettings(Protocol):
    def tree(self) -> SettingsTree: ...

    def apply(self, ops: list[Op]) -> str: ...


class FormatHandler(Protocol):
    name: FormatName

    def parse(self, text: str) -> ParsedSettings: ...


def format_handler(name: str, *, style_hint: str = "") -> FormatHandler:
    """The handler of a format. ``style_hint`` is the file name, for defaults of files created
    from scratch (``.gitconfig``: tab-indented keys)."""
    if name == "json":
        from qmoi_sync.agent.settings_jsonc import JsoncFormat

        return JsoncFormat()
    if name == "toml":
        from qmoi_sync.agent.settings_toml import TomlFormat

        return TomlFormat()
    if name == "ini":
        from qmoi_sync.agent.settings_ini import IniFormat

        return IniFormat(git_style=Path(style_hint).name in (".gitconfig", "config", "gitconfig"))
    raise ValueError(f"unknown settings format {name!r} (known: json, toml, ini)")


_EXTENSIONS: dict[str, FormatName] = {
    ".json": "json",
    ".jsonc": "json",
    ".json5": "json",
    ".code-workspace": "json",
    ".toml": "toml",
    ".ini": "ini",
    ".cfg": "ini",
    ".conf": "ini",
    ".gitconfig": "ini",
    ".editorconfig": "ini",
    ".npmrc": "ini",
}


def detect_format(path: Path | str, override: str | None = None) -> FormatName:
    """The format of a settings file: ``override`` if given (``jsonc`` is an alias of json),
    else from the extension (``.gitconfig``-style dotfiles by name)."""
    if override:
        o = override.lower()
        if o in ("json", "jsonc"):
            return "json"
        if o in ("toml", "ini"):
            return "toml" if o == "toml" else "ini"
        raise ValueError(f"unknown format {override!r} (json, jsonc, toml, ini)")
    p = Path(path)
    name = p.name.lower()
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    if name in ("gitconfig", "config"):
        return "ini"
    raise ValueError(f"cannot tell the format of {p.name!r} from its name: pass --format")


# -- planning ---------------------------------------------------------------------------------
def normalize_desired(desired: Mapping[KeyPath, Any]) -> dict[KeyPath, Any]:
    """Drop every leaf that is an ancestor of another leaf (a key that is both a value and a
    container after concurrent edits): the deeper keys win, deterministically."""
    out = dict(desired)
    prefixes: set[KeyPath] = set()
    for path in desired:
        for i in range(1, len(path)):
            prefixes.add(path[:i])
    for path in list(out):
        if path in prefixes:
            del out[path]
    return out


def _build_group(
    base: KeyPath, paths: list[KeyPath], desired: Mapping[KeyPath, Any], hint: Callable[..., float]
) -> Group:
    """The new container at ``base`` holding these desired leaves (all strictly under it)."""
    by_child: dict[str, list[KeyPath]] = {}
    for p in paths:
        by_child.setdefault(p[len(base)], []).append(p)
    items: list[tuple[float, str, Leaf | Group]] = []
    for child, ps in by_child.items():
        cpath = (*base, child)
        node: Leaf | Group
        if ps == [cpath]:
            node = Leaf(desired[cpath])
        else:
            node = _build_group(cpath, [p for p in ps if p != cpath], desired, hint)
        items.append((min(hint(p) for p in ps), child, node))
    items.sort(key=lambda t: (t[0], t[1]))
    return Group(tuple((name, node) for _o, name, node in items))


def plan(
    tree: SettingsTree,
    desired: Mapping[KeyPath, Any],
    keep: Callable[[KeyPath], bool],
    hint: Callable[[KeyPath], float | None],
) -> list[Op]:
    """Operations that turn the file's tree into ``desired`` (leaf path -> value).

    ``keep(path)`` marks leaves this device keeps as they are (device-local keys, credentials):
    they are never changed nor deleted, and a container holding one is never removed.
    ``desired`` must not contain kept keys. ``hint(path)`` is the order hint of a desired leaf
    (None: unknown, placed last).
    """
    desired = normalize_desired(desired)

    def h(p: KeyPath) -> float:
        v = hint(p)
        return math.inf if v is None else v

    kept = {p for p in tree.leaves if keep(p)}
    ops: list[Op] = []

    # Which existing nodes survive: kept leaves, leaves still desired, and their ancestors; and
    # every ancestor of a desired path (it becomes or stays a container).
    survive: set[KeyPath] = set()
    for p in kept | {p for p in tree.leaves if p in desired}:
        for i in range(1, len(p) + 1):
            survive.add(p[:i])
    for p in desired:
        for i in range(1, len(p)):
            survive.add(p[:i])

    def kept_under(path: KeyPath) -> bool:
        n = len(path)
        return any(k[:n] == path for k in kept)

    # 1. Deletions: maximal subtrees that do not survive (a container and its comments go whole).
    deleted: set[KeyPath] = set()

    def walk(container: KeyPath) -> None:
        for name in tree.children.get(container, []):
            path = (*container, name)
            if path in desired and tree.is_container(path) and not kept_under(path):
                continue  # becomes a leaf: a Replace below
            if path not in survive and path not in desired:
                ops.append(Delete(path))
                deleted.add(path)
            elif tree.is_container(path):
                walk(path)

    walk(())

    # 2. Changed values, and structure changes in place (leaf <-> container).
    handled: set[KeyPath] = set()
    for path, value in desired.items():
        if path in tree.leaves:
            if canon(tree.leaves[path]) != canon(value):
                ops.append(Replace(path, Leaf(value)))
            handled.add(path)
        elif tree.is_container(path):
            if not kept_under(path):
                ops.append(Replace(path, Leaf(value)))
            handled.add(path)

    # 3. Additions: group new leaves by (deepest existing container, first missing segment); a
    # leaf standing where a container is needed is replaced by the new container.
    groups: dict[tuple[KeyPath, str], list[KeyPath]] = {}
    replaced_leaf: dict[KeyPath, list[KeyPath]] = {}
    for path in desired:
        if path in handled:
            continue
        base: KeyPath = ()
        blocker: KeyPath | None = None
        for i in range(1, len(path)):
            prefix = path[:i]
            if tree.is_container(prefix):
                base = prefix
                continue
            if prefix in tree.leaves:
                blocker = prefix
            break
        if blocker is not None:
            if blocker in kept:
                continue  # a device-local value stands where the container would go
            replaced_leaf.setdefault(blocker, []).append(path)
            continue
        groups.setdefault((base, path[len(base)]), []).append(path)

    for blocker, paths in replaced_leaf.items():
        ops.append(Replace(blocker, _build_group(blocker, paths, desired, h)))

    prefix_hint: dict[KeyPath, float] = {}
    for p in desired:
        for i in range(1, len(p) + 1):
            prefix_hint[p[:i]] = min(prefix_hint.get(p[:i], math.inf), h(p))
    inserts: dict[tuple[KeyPath, str | None], list[tuple[float, str, Leaf | Group]]] = {}
    for (base, child), paths in groups.items():
        cpath = (*base, child)
        node: Leaf | Group
        node = Leaf(desired[cpath]) if paths == [cpath] else _build_group(cpath, paths, desired, h)
        order = min(h(p) for p in paths)
        existing = [n for n in tree.children.get(base, []) if (*base, n) not in deleted]
        anchor: str | None = existing[-1] if existing else None
        for i, name in enumerate(existing):
            sib_hint = prefix_hint.get((*base, name), math.inf)
            if sib_hint != math.inf and sib_hint > order:
                anchor = existing[i - 1] if i > 0 else None
                break
        inserts.setdefault((base, anchor), []).append((order, child, node))
    for (base, anchor), members in inserts.items():
        members.sort(key=lambda t: (t[0], t[1]))
        ops.append(Insert(base, anchor, tuple((name, node) for _o, name, node in members)))
    return ops


def ordinals(tree: SettingsTree) -> dict[KeyPath, int]:
    """Each leaf's position in document order (the order hint written with a key)."""
    return {p: i for i, p in enumerate(tree.leaves)}


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_doc_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"bad settings name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name
