"""TOML settings files (``ruff.toml``, ``pyproject``-style), edited through tomlkit.

tomlkit keeps a parsed document's comments, whitespace and key order, and renders untouched
parts byte for byte; this module maps it onto key paths and applies the edit operations to it:

* tables (``[a.b]``, dotted keys ``a.b = 1``, inline tables ``{x = 1}``) are containers; an empty
  table is the leaf ``{}``;
* arrays and arrays of tables (``[[x]]``) are single leaves (a list);
* dates, times and date-times, and ``inf``/``nan``, which JSON cannot hold, travel as tagged
  objects ``{"$toml": "datetime" | "date" | "time" | "float", "v": "<text>"}``;
* a changed value keeps the comment at the end of its line; a new plain key goes after its
  preceding sibling (or after the table's last plain key), a new table at the end of its parent.

A changed array is re-rendered by tomlkit (comments inside it are lost). TOML has no null: a
null value (only possible through ``settings set``) is refused before it reaches a TOML file.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import tomlkit
from tomlkit.container import Container, OutOfOrderTableProxy
from tomlkit.exceptions import ParseError as TomlParseError
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, InlineTable, Item, Table

from qmoi_sync.agent.settings_formats import (
    Delete,
    FormatName,
    Group,
    Insert,
    KeyPath,
    Leaf,
    Op,
    Replace,
    SettingsParseError,
    SettingsTree,
)

__all__ = ["ParsedToml", "TomlFormat", "from_json", "to_json"]

TAG = "$toml"


def to_json(value: Any) -> Any:
    """A tomlkit/Python TOML value as JSON data (tagged where JSON has no type for it)."""
    if isinstance(value, Item):
        value = value.unwrap()
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {TAG: "float", "v": str(value)}
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dt.datetime):
        return {TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {TAG: "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {TAG: "time", "v": value.isoformat()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    raise ValueError(f"unsupported TOML value {type(value).__name__}")


def from_json(value: Any) -> Any:
    """The inverse of `to_json` (plain Python values tomlkit can render)."""
    if value is None:
        raise ValueError("TOML has no null value")
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        tag = value.get(TAG)
        if isinstance(tag, str) and set(value) == {TAG, "v"} and isinstance(value["v"], str):
            text = value["v"]
            if tag == "datetime":
                return dt.datetime.fromisoformat(text)
            if tag == "date":
                return dt.date.fromisoformat(text)
            if tag == "time":
                return dt.time.fromisoformat(text)
            if tag == "float":
                return float(text)
        return {k: from_json(v) for k, v in value.items()}
    return value


def _ordered_keys(obj: Any) -> list[str]:
    body = None
    if isinstance(obj, Container):
        body = obj.body
    elif isinstance(obj, Table | InlineTable):
        body = obj.value.body
    if body is None:
        return [str(k) for k in obj]
    out: list[str] = []
    for key, _item in body:
        if key is not None and key.key not in out:
            out.append(key.key)
    return out


def _is_table(obj: Any) -> bool:
    return isinstance(obj, Table | InlineTable | OutOfOrderTableProxy | Container)


def _flatten(obj: Any, path: KeyPath, tree: SettingsTree) -> None:
    for key in _ordered_keys(obj):
        item = obj[key]
        child = (*path, key)
        if _is_table(item) and len(item) > 0:
            tree.add_container(child)
            _flatten(item, child, tree)
        elif _is_table(item):
            tree.add_leaf(child, {})
        elif isinstance(item, AoT):
            tree.add_leaf(child, [to_json(t.unwrap()) for t in item.body])
        else:
            tree.add_leaf(child, to_json(item))


class ParsedToml:
    def __init__(self, text: str) -> None:
        try:
            self.doc = tomlkit.parse(text)
        except TomlParseError as exc:
            raise SettingsParseError(
                str(exc).split(" at line ")[0],
                getattr(exc, "line", None),
                getattr(exc, "col", None),
            ) from None
        except (TOMLKitError, ValueError) as exc:
            raise SettingsParseError(str(exc)) from None

    def tree(self) -> SettingsTree:
        tree = SettingsTree()
        _flatten(self.doc, (), tree)
        return tree

    def _get(self, path: KeyPath) -> Any:
        obj: Any = self.doc
        for seg in path:
            obj = obj[seg]
        return obj

    def _make(self, node: Leaf | Group, inline: bool) -> Any:
        if isinstance(node, Group):
            tbl: Any = tomlkit.inline_table() if inline else tomlkit.table()
            for key, child in node.items:
                tbl[key] = self._make(child, inline or not isinstance(child, Group))
            return tbl
        value = from_json(node.value)
        if isinstance(value, dict) and (inline or value):
            it = tomlkit.inline_table()
            it.update(value)
            return it
        if isinstance(value, dict):
            return tomlkit.table()
        return tomlkit.item(value)

    def _replace(self, path: KeyPath, new: Leaf | Group) -> None:
        parent = self._get(path[:-1])
        old = parent[path[-1]]
        inline = isinstance(parent, InlineTable) or isinstance(old, InlineTable)
        if isinstance(new, Leaf) and not isinstance(from_json(new.value), dict) and _is_table(old):
            # a table becomes a plain value: it must move before the parent's tables
            del parent[path[-1]]
            self._add(parent, path[-1], new, None)
            return
        parent[path[-1]] = self._make(new, inline)

    def _add(self, parent: Any, key: str, node: Leaf | Group, after: str | None) -> None:
        inline = isinstance(parent, InlineTable)
        item = self._make(node, inline)
        container: Container | None = None
        if isinstance(parent, Container):
            container = parent
        elif isinstance(parent, Table):
            container = parent.value
        if container is None or inline or isinstance(item, Table | AoT):
            parent[key] = item
            return
        plain = [
            k.key
            for k, v in container.body
            if k is not None and not isinstance(v, Table | AoT) and not _is_table(v)
        ]
        anchor = after if after in plain else (plain[-1] if plain else None)
        if after is None and plain:
            first = next(
                i for i, (k, _v) in enumerate(container.body) if k is not None and k.key == plain[0]
            )
            container._insert_at(first, key, item)
        elif anchor is not None:
            container._insert_after(anchor, key, item)
        else:
            parent[key] = item

    def apply(self, ops: list[Op]) -> str:
        for op in ops:
            if isinstance(op, Delete):
                parent = self._get(op.path[:-1])
                del parent[op.path[-1]]
            elif isinstance(op, Replace):
                self._replace(op.path, op.new)
            elif isinstance(op, Insert):
                parent = self._get(op.parent)
                after = op.after
                for key, node in op.members:
                    self._add(parent, key, node, after)
                    after = key
        return tomlkit.dumps(self.doc)


@dataclass
class TomlFormat:
    name: FormatName = "toml"

    def parse(self, text: str) -> ParsedToml:
        return ParsedToml(text)
