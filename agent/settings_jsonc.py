"""JSON and JSON-with-comments settings files (VS Code's ``settings.json``), edited in place.

The parser accepts strict JSON plus what VS Code writes and reads: ``//`` and ``/* */`` comments
and trailing commas. It records where every key and value is in the text, so writing back only
touches the keys that changed:

* a changed value is replaced in place (same key text, comments before and after it untouched);
* a new key is inserted after its preceding sibling, on its own line with the indentation of
  its siblings (or, in a single-line object, inline), with commas fixed up around it;
* a removed key takes its line with it, together with the comment lines directly above it (no
  blank line in between) and a comment at the end of its line; the comma of the new last
  member is removed unless the object used trailing commas.

What is *not* preserved: a value that changes is written by ``json.dumps`` (a changed list or
object loses comments *inside* it; a single-line value stays single-line). Duplicate keys follow
``JSON.parse``: the last one counts; editing it edits the last one, removing it removes all.
Empty files and files holding only comments are empty settings. The top level must be an
object. A UTF-8 BOM and CRLF line endings are kept.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from qmoi_sync.agent.settings_formats import (
    Delete,
    FormatName,
    Group,
    KeyPath,
    Leaf,
    Op,
    Replace,
    SettingsParseError,
    SettingsTree,
    line_col,
)

__all__ = ["JsoncFormat", "ParsedJsonc", "parse_jsonc"]

MAX_DEPTH = 256

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n\ufeff]+)
  | (?P<lc>//[^\n]*)
  | (?P<bc>/\*.*?\*/)
  | (?P<str>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
  | (?P<num>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![0-9A-Za-z_.]))
  | (?P<lit>(?:true|false|null)(?![0-9A-Za-z_]))
  | (?P<punct>[{}\[\]:,])
    """,
    re.VERBOSE | re.DOTALL,
)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass
class _Tok:
    kind: str
    start: int
    end: int


@dataclass
class _Value:
    kind: Literal["object", "array", "scalar"]
    start: int
    end: int
    members: list[_Member] = field(default_factory=list)
    py: Any = None  # arrays and scalars: the Python value


@dataclass
class _Member:
    key: str
    key_start: int
    value: _Value
    comma: int | None = None  # offset of the comma after the value, if any


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, n = 0, len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            line, col = line_col(text, pos)
            if text.startswith("/*", pos):
                raise SettingsParseError("unterminated comment", line, col)
            if text[pos] == '"':
                raise SettingsParseError("unterminated or invalid string", line, col)
            raise SettingsParseError(f"unexpected character {text[pos]!r}", line, col)
        kind = m.lastgroup or ""
        if kind not in ("ws", "lc", "bc"):
            toks.append(_Tok(kind, m.start(), m.end()))
        pos = m.end()
    return toks


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def _err(self, message: str, pos: int | None = None) -> SettingsParseError:
        if pos is None:
            pos = self.toks[self.i].start if self.i < len(self.toks) else len(self.text)
        line, col = line_col(self.text, pos)
        return SettingsParseError(message, line, col)

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _next(self, what: str) -> _Tok:
        tok = self._peek()
        if tok is None:
            raise self._err(f"unexpected end of file, expected {what}")
        self.i += 1
        return tok

    def _punct(self, tok: _Tok | None, ch: str) -> bool:
        return tok is not None and tok.kind == "punct" and self.text[tok.start] == ch

    def parse(self) -> _Value | None:
        if not self.toks:
            return None
        root = self.value(0)
        if self._peek() is not None:
            raise self._err("unexpected content after the end of the settings object")
        if root.kind != "object":
            raise self._err("the top level of a settings file must be an object", root.start)
        return root

    def value(self, depth: int) -> _Value:
        if depth > MAX_DEPTH:
            raise self._err("nested too deeply")
        tok = self._next("a value")
        t = self.text[tok.start : tok.end]
        if tok.kind == "punct":
            if t == "{":
                return self.obj(tok, depth)
            if t == "[":
                return self.arr(tok, depth)
            raise self._err(f"unexpected {t!r}, expected a value", tok.start)
        if tok.kind == "str":
            return _Value("scalar", tok.start, tok.end, py=self._string(tok))
        if tok.kind == "num":
            return _Value("scalar", tok.start, tok.end, py=json.loads(t))
        return _Value("scalar", tok.start, tok.end, py={"true": True, "false": False}.get(t))

    def _string(self, tok: _Tok) -> str:
        s: str = json.loads(self.text[tok.start : tok.end])
        if _SURROGATE.search(s):
            raise self._err("invalid unicode escape (lone surrogate)", tok.start)
        return s

    def obj(self, open_tok: _Tok, depth: int) -> _Value:
        node = _Value("object", open_tok.start, open_tok.start)
        while True:
            tok = self._next("a key or '}'")
            if self._punct(tok, "}"):
                node.end = tok.end
                return node
            if tok.kind != "str":
                raise self._err("expected a string key or '}'", tok.start)
            key = self._string(tok)
            colon = self._next("':'")
            if not self._punct(colon, ":"):
                raise self._err("expected ':' after the key", colon.start)
            member = _Member(key, tok.start, self.value(depth + 1))
            node.members.append(member)
            sep = self._next("',' or '}'")
            if self._punct(sep, ","):
                member.comma = sep.start
                continue
            if self._punct(sep, "}"):
                node.end = sep.end
                return node
            raise self._err("expected ',' or '}'", sep.start)

    def arr(self, open_tok: _Tok, depth: int) -> _Value:
        items: list[Any] = []
        while True:
            tok = self._peek()
            if self._punct(tok, "]"):
                assert tok is not None
                self.i += 1
                return _Value("array", open_tok.start, tok.end, py=items)
            items.append(_to_py(self.text, self.value(depth + 1)))
            sep = self._next("',' or ']'")
            if self._punct(sep, ","):
                continue  # a trailing comma is fine: the loop then meets the ']'
            if self._punct(sep, "]"):
                return _Value("array", open_tok.start, sep.end, py=items)
            raise self._err("expected ',' or ']'", sep.start)


def _to_py(text: str, node: _Value) -> Any:
    if node.kind != "object":
        return node.py
    out: dict[str, Any] = {}
    for m in node.members:
        out[m.key] = _to_py(text, m.value)
    return out


def _flatten(node: _Value, path: KeyPath, tree: SettingsTree, text: str) -> None:
    last: dict[str, _Member] = {}
    for m in node.members:
        last[m.key] = m  # duplicate keys: the last counts (JSON.parse), first position
    for key, m in last.items():
        child = (*path, key)
        v = m.value
        if v.kind == "object" and v.members:
            tree.add_container(child)
            _flatten(v, child, tree, text)
        else:
            tree.add_leaf(child, _to_py(text, v))


def parse_jsonc(text: str) -> tuple[_Value | None, SettingsTree]:
    root = _Parser(text).parse()
    tree = SettingsTree()
    if root is not None:
        _flatten(root, (), tree, text)
    return root, tree


# -- editing --------------------------------------------------------------------------------
def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _line_indent(text: str, pos: int) -> str:
    ls = _line_start(text, pos)
    i = ls
    while i < len(text) and text[i] in " \t":
        i += 1
    return text[ls:i]


def _starts_line(text: str, pos: int) -> bool:
    return text[_line_start(text, pos) : pos].strip(" \t\ufeff") == ""


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class ParsedJsonc:
    def __init__(self, text: str) -> None:
        self.text = text
        self.root, self._tree = parse_jsonc(text)

    def tree(self) -> SettingsTree:
        return self._tree

    # -- style --------------------------------------------------------------------------------
    @property
    def nl(self) -> str:
        return "\r\n" if "\r\n" in self.text else "\n"

    def _unit(self) -> str:
        root = self.root
        if root is not None:
            for m in root.members:
                if _starts_line(self.text, m.key_start):
                    ind = _line_indent(self.text, m.key_start)
                    base = _line_indent(self.text, root.start)
                    unit = ind[len(base) :] if ind.startswith(base) else ind
                    if unit:
                        return unit
        return "    "

    def _block(self, value: Any, indent: str) -> str:
        if not isinstance(value, dict | list) or not value:
            return json.dumps(value, ensure_ascii=False)
        out = json.dumps(value, ensure_ascii=False, indent=self._unit())
        return out.replace("\n", self.nl + indent)

    def _render(self, node: Leaf | Group, indent: str, block: bool) -> str:
        value = node.to_plain() if isinstance(node, Group) else node.value
        if block or isinstance(node, Group):
            return self._block(value, indent)
        return _compact(value)

    # -- lookup -------------------------------------------------------------------------------
    def _find(self, path: KeyPath) -> tuple[_Value, list[int]]:
        """The object holding ``path``'s last segment and the indexes of its members with that
        key (every occurrence; the last one is the effective one)."""
        node = self.root
        if node is None:
            raise KeyError(path)
        for seg in path[:-1]:
            found = [m for m in node.members if m.key == seg]
            if not found or found[-1].value.kind != "object":
                raise KeyError(path)
            node = found[-1].value
        idx = [i for i, m in enumerate(node.members) if m.key == path[-1]]
        if not idx:
            raise KeyError(path)
        return node, idx

    def _object(self, path: KeyPath) -> _Value:
        if not path:
            if self.root is None:
                raise KeyError(path)
            return self.root
        parent, idx = self._find(path)
        node = parent.members[idx[-1]].value
        if node.kind != "object":
            raise KeyError(path)
        return node

    def _tail(self, m: _Member) -> tuple[int, int | None]:
        """End of the member's line content (after its comma and a same-line comment), and the
        end of that line including its newline — None when something else follows on it."""
        t = self.text
        pos = max(m.value.end, (m.comma + 1) if m.comma is not None else 0)
        n = len(t)
        while pos < n and t[pos] in " \t":
            pos += 1
        if t.startswith("//", pos):
            nlp = t.find("\n", pos)
            pos = n if nlp < 0 else nlp
            if pos > 0 and t[pos - 1] == "\r":
                pos -= 1
        elif t.startswith("/*", pos):
            end = t.find("*/", pos)
            if end >= 0 and "\n" not in t[pos:end]:
                pos = end + 2
                while pos < n and t[pos] in " \t":
                    pos += 1
        if pos >= n:
            return pos, pos
        if t.startswith("\r\n", pos):
            return pos, pos + 2
        if t[pos] == "\n":
            return pos, pos + 1
        return pos, None

    def _lead(self, m: _Member) -> int:
        """Start of the member's first line, extended over the comment lines directly above."""
        t = self.text
        cur = _line_start(t, m.key_start)
        while cur > 0:
            prev_end = cur - 1  # the '\n' ending the previous line
            prev_start = _line_start(t, prev_end)
            line = t[prev_start:prev_end].strip(" \t\r\ufeff")
            if not line:
                break  # a blank line: comments above it are not attached
            if line.startswith("//") or (line.startswith("/*") and line.endswith("*/")):
                cur = prev_start
                continue
            if line.endswith("*/") and not line.startswith("/*"):
                # the last line of a multi-line block comment: find where it starts
                open_at = t.rfind("/*", 0, prev_end)
                if open_at >= 0 and _starts_line(t, open_at):
                    cur = _line_start(t, open_at)
                    continue
            break
        return cur

    # -- operations ---------------------------------------------------------------------------
    def _edit(self, edits: list[tuple[int, int, str]]) -> None:
        text = self.text
        for start, end, repl in sorted(edits, key=lambda e: e[0], reverse=True):
            text = text[:start] + repl + text[end:]
        self.text = text
        self.root, self._tree = parse_jsonc(text)

    def _delete(self, path: KeyPath) -> None:
        while True:
            try:
                obj, idx = self._find(path)
            except KeyError:
                return
            i = idx[-1]
            self._delete_member(obj, i)

    def _delete_member(self, obj: _Value, i: int) -> None:
        t = self.text
        members = obj.members
        m = members[i]
        last = i == len(members) - 1
        _content_end, line_end = self._tail(m)
        edits: list[tuple[int, int, str]] = []
        if line_end is not None and _starts_line(t, m.key_start):
            edits.append((self._lead(m), line_end, ""))
            if last and m.comma is None and i > 0:
                prev = members[i - 1]
                if prev.comma is not None:
                    edits.append((prev.comma, prev.comma + 1, ""))
        elif not last:
            edits.append((m.key_start, members[i + 1].key_start, ""))
        elif i > 0:
            edits.append((members[i - 1].value.end, m.value.end, ""))
        else:
            end = m.comma + 1 if m.comma is not None else m.value.end
            edits.append((m.key_start, end, ""))
        self._edit(edits)

    def _replace(self, path: KeyPath, new: Leaf | Group) -> None:
        obj, idx = self._find(path)
        m = obj.members[idx[-1]]
        v = m.value
        was_multiline = "\n" in self.text[v.start : v.end]
        indent = _line_indent(self.text, m.key_start)
        block = was_multiline or (v.kind == "object" and isinstance(new, Group))
        self._edit([(v.start, v.end, self._render(new, indent, block))])

    def _insert(
        self, parent: KeyPath, after: str | None, members: tuple[tuple[str, Leaf | Group], ...]
    ) -> None:
        if self.root is None:
            prefix = self.text.rstrip()
            self._edit([(0, len(self.text), (prefix + self.nl if prefix else "") + "{}" + self.nl)])
        obj = self._object(parent)
        t = self.text
        nl = self.nl
        mems = obj.members
        inner = t[obj.start + 1 : obj.end - 1]
        multiline = not mems or "\n" in t[obj.start : obj.end]
        if not multiline:
            rendered = [
                json.dumps(k, ensure_ascii=False) + ": " + self._render(n, "", False)
                for k, n in members
            ]
            if after is None:
                self._edit([(mems[0].key_start, mems[0].key_start, ", ".join(rendered) + ", ")])
            else:
                anchor = [m for m in mems if m.key == after][-1]
                pos = anchor.value.end
                self._edit([(pos, pos, "".join(", " + r for r in rendered))])
            return
        base = _line_indent(t, obj.start)
        if mems and _starts_line(t, mems[0].key_start):
            indent = _line_indent(t, mems[0].key_start)
        else:
            indent = base + self._unit()
        rendered = [
            indent + json.dumps(k, ensure_ascii=False) + ": " + self._render(n, indent, True)
            for k, n in members
        ]
        if not mems:
            body = ",".join(nl + r for r in rendered)
            pos = obj.start + 1
            if "\n" not in inner:
                # `{}` or `{ }`: the closing brace goes on its own line
                self._edit([(pos, obj.end - 1, body + nl + base)])
            else:
                # only comments inside: new keys go after them, before the closing brace
                close = obj.end - 1
                ls = _line_start(t, close)
                at = ls - 1 if t[ls:close].strip() == "" and ls > pos else close
                if at > 0 and t[at - 1] == "\r":
                    at -= 1
                self._edit([(at, at, body)])
            return
        if after is None:
            pos = obj.start + 1
            self._edit([(pos, pos, "".join(nl + r + "," for r in rendered))])
            return
        anchor = [m for m in mems if m.key == after][-1]
        self._edit(self._insert_after_edits(obj, anchor, members))

    def _insert_after_edits(
        self, obj: _Value, anchor: _Member, members: tuple[tuple[str, Leaf | Group], ...]
    ) -> list[tuple[int, int, str]]:
        """Edits inserting keys after ``anchor`` in a multi-line, non-empty object."""
        t = self.text
        mems = obj.members
        if _starts_line(t, mems[0].key_start):
            indent = _line_indent(t, mems[0].key_start)
        else:
            indent = _line_indent(t, obj.start) + self._unit()
        rendered = [
            indent + json.dumps(k, ensure_ascii=False) + ": " + self._render(n, indent, True)
            for k, n in members
        ]
        is_last = anchor is mems[-1]
        trailing_style = is_last and anchor.comma is not None
        tail, line_end = self._tail(anchor)
        if line_end is None:
            tail = (anchor.comma + 1) if anchor.comma is not None else anchor.value.end
        pieces = []
        for k, r in enumerate(rendered):
            last_new = k == len(rendered) - 1
            comma = "," if (not last_new or not is_last or trailing_style) else ""
            pieces.append(self.nl + r + comma)
        edits = [(tail, tail, "".join(pieces))]
        if anchor.comma is None:
            edits.append((anchor.value.end, anchor.value.end, ","))
        return edits

    def _independent_edits(self, op: Op) -> list[tuple[int, int, str]] | None:
        """The edits of an operation that touches only its own region of the text (a value
        replaced, a key on its own line that is not the last of its object, keys inserted after
        an existing key of a multi-line object), computed on the current parse so several can
        be spliced in one pass; None when it must run alone (then it re-parses)."""
        t = self.text
        try:
            if isinstance(op, Replace):
                obj, idx = self._find(op.path)
                m = obj.members[idx[-1]]
                v = m.value
                block = "\n" in t[v.start : v.end] or (
                    v.kind == "object" and isinstance(op.new, Group)
                )
                indent = _line_indent(t, m.key_start)
                return [(v.start, v.end, self._render(op.new, indent, block))]
            if isinstance(op, Delete):
                obj, idx = self._find(op.path)
                if len(idx) != 1 or idx[0] == len(obj.members) - 1:
                    return None
                m = obj.members[idx[0]]
                _end, line_end = self._tail(m)
                if line_end is None or not _starts_line(t, m.key_start):
                    return None
                return [(self._lead(m), line_end, "")]
            if op.after is None or self.root is None:
                return None
            obj = self._object(op.parent)
            mems = [m for m in obj.members if m.key == op.after]
            if not mems or "\n" not in t[obj.start : obj.end]:
                return None
            return self._insert_after_edits(obj, mems[-1], op.members)
        except KeyError:
            return None

    def apply(self, ops: list[Op]) -> str:
        """Apply the operations in order. Runs of operations of one kind whose edits are
        independent are spliced in a single pass (one re-parse instead of one per key: a
        400-key change takes milliseconds, not seconds); the others run one by one."""
        i = 0
        while i < len(ops):
            j = i
            while j < len(ops) and type(ops[j]) is type(ops[i]):
                j += 1
            group, i = ops[i:j], j
            edits: list[tuple[int, int, str]] = []
            alone: list[Op] = []
            for op in group:
                e = self._independent_edits(op)
                if e is None:
                    alone.append(op)
                else:
                    edits.extend(e)
            if edits and _disjoint(edits):
                self._edit(edits)
            else:
                alone = list(group)
            for op in alone:
                self._apply_one(op)
        return self.text

    def _apply_one(self, op: Op) -> None:
        if isinstance(op, Delete):
            self._delete(op.path)
        elif isinstance(op, Replace):
            self._replace(op.path, op.new)
        else:
            self._insert(op.parent, op.after, op.members)


def _disjoint(edits: list[tuple[int, int, str]]) -> bool:
    spans = sorted((s, e) for s, e, _r in edits)
    return all(a[1] <= b[0] and a[0] != b[0] for a, b in itertools.pairwise(spans))


@dataclass
class JsoncFormat:
    name: FormatName = "json"

    def parse(self, text: str) -> ParsedJsonc:
        return ParsedJsonc(text)
