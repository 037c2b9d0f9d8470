"""INI-style settings files (``.gitconfig``, ``setup.cfg``, ``*.ini``), edited line by line.

``configparser`` would lose comments and layout on write, so this module keeps the file as a
list of lines and rewrites only the lines of keys that changed.

The model:

* ``[section]`` headers are containers (the text between the brackets, stripped, is the name:
  ``remote "origin"``); keys before the first header are top-level keys. A section that appears
  twice is one section (keys are edited where they are, new keys go to its last block).
* ``key = value`` / ``key: value`` (the first ``=`` or ``:`` separates), with any indentation;
  a line holding only a name is a bare key (git's ``[core] bare``), value ``null``. Values are
  the raw text after the separator, stripped: no unquoting, so what one device has on disk is
  exactly what another writes (an inline comment after a value is part of the value). A value
  ending in a backslash continues on the next line (git).
* A key repeated in one section (git's multi-valued ``fetch``) is one leaf whose value is the
  list of its values, written back as repeated lines.
* ``#`` and ``;`` start comment lines. Removing a key removes the comment lines directly above
  it; removing a section removes its header, its lines and the comments directly above it.
* New keys take the indentation and the ``key = value`` spacing of their section's keys (else of
  the file's; files created from scratch: tab-indented keys for git config files).

Every value is a string (or null, or a list of them): INI has no types.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

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

__all__ = ["IniFormat", "ParsedIni"]

_HEADER = re.compile(r"^\s*\[(?P<name>[^\]]*)\]\s*(?:[#;].*)?$")
_KEY = re.compile(
    r"^(?P<indent>[ \t]*)(?P<key>[^=:\s][^=:]*?)(?P<sep>[ \t]*[=:][ \t]*)(?P<value>.*)$"
)
_BARE = re.compile(r"^(?P<indent>[ \t]*)(?P<key>[^=:\s\[#;][^=:]*?)[ \t]*$")


@dataclass
class _KeyLoc:
    key: str
    first: int  # first line index
    end: int  # one past its last line (continuations)
    value: str | None
    indent: str
    sep: str


@dataclass
class _Block:
    name: str | None  # None: the keys before the first header
    header: int | None
    end: int  # one past the block's last line
    keys: list[_KeyLoc] = field(default_factory=list)


def _is_comment(line: str) -> bool:
    s = line.strip()
    return s.startswith("#") or s.startswith(";")


def _continues(value: str) -> bool:
    stripped = value.rstrip("\r\n")
    n = len(stripped) - len(stripped.rstrip("\\"))
    return n % 2 == 1


def _parse(lines: list[str]) -> list[_Block]:
    blocks = [_Block(None, None, 0)]
    i, n = 0, len(lines)
    while i < n:
        raw = lines[i].rstrip("\r\n")
        s = raw.strip()
        if not s or _is_comment(raw):
            i += 1
            continue
        if s.startswith("["):
            m = _HEADER.match(raw)
            if m is None or not m.group("name").strip():
                raise SettingsParseError("malformed section header", i + 1)
            blocks[-1].end = i
            blocks.append(_Block(m.group("name").strip(), i, i + 1))
            i += 1
            continue
        m = _KEY.match(raw)
        if m is not None:
            value_lines = [m.group("value")]
            j = i + 1
            while _continues(value_lines[-1]) and j < n:
                value_lines.append(lines[j].rstrip("\r\n"))
                j += 1
            value: str | None = "\n".join(value_lines).strip()
            key, indent, sep = m.group("key").strip(), m.group("indent"), m.group("sep")
        else:
            b = _BARE.match(raw)
            if b is None:
                raise SettingsParseError(f"cannot read this line: {s[:40]!r}", i + 1)
            key, indent, sep, value, j = (
                b.group("key").strip(),
                b.group("indent"),
                " = ",
                None,
                i + 1,
            )
        blocks[-1].keys.append(_KeyLoc(key, i, j, value, indent, sep))
        i = j
    blocks[-1].end = n
    return blocks


def _as_values(value: Any) -> list[str | None]:
    items = value if isinstance(value, list) else [value]
    out: list[str | None] = []
    for v in items:
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, int | float):
            out.append(json.dumps(v))
        else:
            out.append(json.dumps(v, ensure_ascii=False))
    return out


class ParsedIni:
    def __init__(self, text: str, git_style: bool = False) -> None:
        self.lines = text.splitlines(keepends=True)
        self.git_style = git_style
        self.nl = "\r\n" if "\r\n" in text else "\n"
        self.blocks = _parse(self.lines)

    def tree(self) -> SettingsTree:
        tree = SettingsTree()
        sections: dict[str, dict[str, list[str | None]]] = {}
        order: list[str] = []
        for b in self.blocks:
            if b.name is None:
                grouped: dict[str, list[str | None]] = {}
                for k in b.keys:
                    grouped.setdefault(k.key, []).append(k.value)
                for key, vals in grouped.items():
                    tree.add_leaf((key,), vals[0] if len(vals) == 1 else vals)
                continue
            if b.name not in sections:
                sections[b.name] = {}
                order.append(b.name)
            for k in b.keys:
                sections[b.name].setdefault(k.key, []).append(k.value)
        for name in order:
            keys = sections[name]
            if (name,) in tree.leaves:
                continue  # a top-level key of the same name was first: it wins
            if not keys:
                tree.add_leaf((name,), {})
                continue
            tree.add_container((name,))
            for key, vals in keys.items():
                tree.add_leaf((name, key), vals[0] if len(vals) == 1 else vals)
        return tree

    # -- helpers ------------------------------------------------------------------------------
    def _reparse(self) -> None:
        self.blocks = _parse(self.lines)

    def _eol(self, i: int) -> None:
        """Make sure line i ends with a newline (it is about to get a successor)."""
        if i >= 0 and i < len(self.lines) and not self.lines[i].endswith("\n"):
            self.lines[i] += self.nl

    def _sections(self, name: str) -> list[_Block]:
        return [b for b in self.blocks if b.name == name]

    def _locs(self, path: KeyPath) -> list[_KeyLoc]:
        if len(path) == 1:
            return [k for k in self.blocks[0].keys if k.key == path[0]]
        return [k for b in self._sections(path[0]) for k in b.keys if k.key == path[1]]

    def _style(self, block: _Block | None) -> tuple[str, str]:
        """(indentation, separator) for a new key: as in its section, else as in any section,
        else as the top-level keys, else the defaults."""
        if block is not None and block.keys:
            return block.keys[0].indent, block.keys[0].sep
        for b in self.blocks[1:]:
            if b.keys:
                return b.keys[0].indent, b.keys[0].sep
        return ("\t" if self.git_style else ""), " = "

    def _key_lines(self, key: str, value: Any, indent: str, sep: str) -> list[str]:
        out = []
        for v in _as_values(value):
            if v is None:
                out.append(f"{indent}{key}{self.nl}")
            else:
                out.append(f"{indent}{key}{sep}{v.replace(chr(10), self.nl)}{self.nl}")
        return out

    def _lead(self, i: int) -> int:
        """Line index where the comment lines directly above line i start."""
        while i > 0 and _is_comment(self.lines[i - 1]) and self.lines[i - 1].strip():
            i -= 1
        return i

    def _section_span(self, b: _Block) -> tuple[int, int]:
        assert b.header is not None
        start = self._lead(b.header)
        end = b.end
        # comments directly above the next header belong to it
        if end < len(self.lines):
            end = max(self._lead(end), b.header + 1)
        return start, end

    def _render_section(self, name: str, group: Group | Leaf) -> list[str]:
        out = [f"[{name}]{self.nl}"]
        indent, sep = self._style(None)
        if isinstance(group, Group):
            for key, node in group.items:
                value = node.to_plain() if isinstance(node, Group) else node.value
                out += self._key_lines(key, value, indent, sep)
        return out

    # -- operations ---------------------------------------------------------------------------
    def _delete(self, path: KeyPath) -> None:
        if len(path) == 2 or (len(path) == 1 and self._locs(path)):
            locs = self._locs(path)
            spans = [(self._lead(k.first), k.end) for k in locs]
        else:
            spans = [self._section_span(b) for b in self._sections(path[0])]
        for start, end in sorted(spans, reverse=True):
            del self.lines[start:end]
        self._reparse()

    def _replace(self, path: KeyPath, new: Leaf | Group) -> None:
        if len(path) == 2 or self._locs(path):
            if isinstance(new, Group) and len(path) == 1:
                # a top-level key becomes a section
                self._delete(path)
                self._add_sections([(path[0], new)], None)
                return
            locs = self._locs(path)
            first = locs[0]
            value = new.to_plain() if isinstance(new, Group) else new.value
            repl = self._key_lines(first.key, value, first.indent, first.sep)
            for k in reversed(locs[1:]):
                del self.lines[k.first : k.end]
            if first.end == len(self.lines) and not self.lines[first.end - 1].endswith("\n"):
                repl[-1] = repl[-1].rstrip("\r\n")
            self.lines[first.first : first.end] = repl
            self._reparse()
            return
        # a section (or an empty one, a `{}` leaf)
        blocks = self._sections(path[0])
        if isinstance(new, Group):
            for b in blocks:
                for k in reversed(b.keys):
                    del self.lines[k.first : k.end]
                self._reparse()
                break
            self._insert_keys(path[0], None, new.items)
            return
        if isinstance(new.value, dict) and not new.value:
            for b in reversed(self._sections(path[0])):
                for k in reversed(b.keys):
                    del self.lines[self._lead(k.first) : k.end]
            self._reparse()
            return
        self._delete(path)
        self._insert_top_keys([(path[0], new)])

    def _insert_keys(
        self, section: str, after: str | None, members: tuple[tuple[str, Leaf | Group], ...]
    ) -> None:
        blocks = self._sections(section)
        if not blocks:
            self._add_sections([(section, Group(members))], None)
            return
        target = blocks[-1]
        assert target.header is not None
        at = target.header + 1
        if after is None:
            target = blocks[0]
            assert target.header is not None
            at = target.header + 1
        else:
            locs = [k for b in blocks for k in b.keys if k.key == after]
            if locs:
                at = locs[-1].end
                target = next(b for b in blocks if locs[-1] in b.keys)
            elif target.keys:
                at = target.keys[-1].end
        indent, sep = self._style(target)
        out: list[str] = []
        for key, node in members:
            value = node.to_plain() if isinstance(node, Group) else node.value
            out += self._key_lines(key, value, indent, sep)
        self._eol(at - 1)
        self.lines[at:at] = out
        self._reparse()

    def _insert_top_keys(self, members: list[tuple[str, Leaf | Group]]) -> None:
        pre = self.blocks[0]
        if pre.keys:
            at = pre.keys[-1].end
        elif len(self.blocks) > 1:
            header = self.blocks[1].header
            assert header is not None
            at = self._lead(header)
        else:
            at = len(self.lines)
        indent, sep = (pre.keys[0].indent, pre.keys[0].sep) if pre.keys else ("", " = ")
        out: list[str] = []
        for key, node in members:
            value = node.to_plain() if isinstance(node, Group) else node.value
            out += self._key_lines(key, value, indent, sep)
        if not pre.keys and at < len(self.lines) and out:
            out.append(self.nl)
        self._eol(at - 1)
        self.lines[at:at] = out
        self._reparse()

    def _add_sections(self, members: list[tuple[str, Leaf | Group]], after: str | None) -> None:
        at = len(self.lines)
        if after is not None and self._sections(after):
            at = self._section_span(self._sections(after)[-1])[1]
        out: list[str] = []
        for name, node in members:
            if at > 0 or out:
                prev = out[-1] if out else self.lines[at - 1]
                if prev.strip():
                    out.append(self.nl)
            out += self._render_section(name, node)
        self._eol(at - 1)
        if at < len(self.lines) and self.lines[at].strip():
            out.append(self.nl)
        self.lines[at:at] = out
        self._reparse()

    def _insert(self, op: Insert) -> None:
        if op.parent:
            self._insert_keys(op.parent[0], op.after, op.members)
            return
        keys = [(k, n) for k, n in op.members if isinstance(n, Leaf) and not _is_empty_dict(n)]
        sections = [
            (k, n) for k, n in op.members if not (isinstance(n, Leaf) and not _is_empty_dict(n))
        ]
        if keys:
            self._insert_top_keys(keys)
        if sections:
            after = op.after if op.after is not None and self._sections(op.after) else None
            if after is None and op.after is None and len(self.blocks) > 1:
                # "first": before the first section
                first = self.blocks[1]
                assert first.header is not None
                start = self._lead(first.header)
                out: list[str] = []
                for name, node in sections:
                    out += [*self._render_section(name, node), self.nl]
                self.lines[start:start] = out
                self._reparse()
                return
            self._add_sections(sections, after)

    def _line_edits(self, op: Op) -> list[tuple[int, int, list[str]]] | None:
        """Line-range edits of a key's value change or a key's removal (its own lines only),
        so a run of them is applied in one pass; None for anything structural."""
        if isinstance(op, Insert):
            return None
        if not (len(op.path) == 2 or (len(op.path) == 1 and self._locs(op.path))):
            return None  # a section
        if isinstance(op, Replace) and isinstance(op.new, Leaf):
            locs = self._locs(op.path)
            if not locs:
                return None
            first = locs[0]
            repl = self._key_lines(first.key, op.new.value, first.indent, first.sep)
            if first.end == len(self.lines) and not self.lines[first.end - 1].endswith("\n"):
                repl[-1] = repl[-1].rstrip("\r\n")
            return [(first.first, first.end, repl)] + [(k.first, k.end, []) for k in locs[1:]]
        if isinstance(op, Delete):
            return [(self._lead(k.first), k.end, []) for k in self._locs(op.path)] or None
        return None

    def apply(self, ops: list[Op]) -> str:
        """Apply the operations in order; runs of key changes and removals are spliced in one
        pass (one re-parse for the run), anything else runs alone."""
        i = 0
        while i < len(ops):
            edits = self._line_edits(ops[i])
            if edits is not None:
                batch = list(edits)
                j = i + 1
                while j < len(ops) and (more := self._line_edits(ops[j])) is not None:
                    batch.extend(more)
                    j += 1
                spans = sorted((a, b) for a, b, _r in batch)
                if all(x[1] <= y[0] for x, y in itertools.pairwise(spans)):
                    for a, b, repl in sorted(batch, key=lambda e: e[0], reverse=True):
                        self.lines[a:b] = repl
                    self._reparse()
                    i = j
                    continue
            op = ops[i]
            if isinstance(op, Delete):
                self._delete(op.path)
            elif isinstance(op, Replace):
                self._replace(op.path, op.new)
            elif isinstance(op, Insert):
                self._insert(op)
            i += 1
        return "".join(self.lines)


def _is_empty_dict(node: Leaf | Group) -> bool:
    return isinstance(node, Leaf) and isinstance(node.value, dict) and not node.value


@dataclass
class IniFormat:
    git_style: bool = False
    name: FormatName = "ini"

    def parse(self, text: str) -> ParsedIni:
        return ParsedIni(text, git_style=self.git_style)
