"""JSON / JSON-with-comments: parse, patch in place, write back (agent/settings_jsonc.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoi_sync.agent.settings_formats import (
    KeyPath,
    SettingsParseError,
    canon,
    normalize_desired,
    ordinals,
    plan,
)
from qmoi_sync.agent.settings_jsonc import ParsedJsonc

VSCODE = """{
    // Editor
    "editor.fontSize": 14, // big enough
    "editor.tabSize": 4,
    /* zoom
       level */
    "window.zoomLevel": 1,
    "files.exclude": {
        "**/.git": true,
        "**/node_modules": true,
    },
    "editor.rulers": [80, 120],
    "terminal.integrated.fontFamily": "Fira Code",
}
"""


def patched(
    text: str,
    desired: dict[KeyPath, Any],
    hints: dict[KeyPath, float] | None = None,
    keep: Any = lambda p: False,
) -> str:
    parsed = ParsedJsonc(text)
    tree = parsed.tree()
    h: dict[KeyPath, float] = {k: float(v) for k, v in ordinals(tree).items()}
    h.update(hints or {})
    out = parsed.apply(plan(tree, desired, keep, h.get))
    ParsedJsonc(out)  # the result parses
    return out


def same(a: dict[KeyPath, Any], b: dict[KeyPath, Any]) -> bool:
    """Equal with types (``False != 0``, ``1 != 1.0``) and key order ignored."""
    return {k: canon(v) for k, v in a.items()} == {k: canon(v) for k, v in b.items()}


def leaves(text: str) -> dict[KeyPath, Any]:
    return ParsedJsonc(text).tree().leaves


def test_flatten_keeps_types_and_order() -> None:
    tree = ParsedJsonc(VSCODE).tree()
    assert list(tree.leaves) == [
        ("editor.fontSize",),
        ("editor.tabSize",),
        ("window.zoomLevel",),
        ("files.exclude", "**/.git"),
        ("files.exclude", "**/node_modules"),
        ("editor.rulers",),
        ("terminal.integrated.fontFamily",),
    ]
    assert tree.leaves[("editor.rulers",)] == [80, 120]
    assert type(tree.leaves[("editor.tabSize",)]) is int
    assert tree.children[("files.exclude",)] == ["**/.git", "**/node_modules"]


def test_noop_is_byte_identical() -> None:
    assert patched(VSCODE, leaves(VSCODE)) == VSCODE


def test_change_one_value_touches_only_that_value() -> None:
    d = leaves(VSCODE)
    d[("editor.fontSize",)] = 16
    out = patched(VSCODE, d)
    assert out == VSCODE.replace('"editor.fontSize": 14,', '"editor.fontSize": 16,')
    assert "// big enough" in out


def test_insert_after_its_predecessor_with_sibling_indentation() -> None:
    d = leaves(VSCODE)
    d[("editor.wordWrap",)] = "on"
    d[("files.exclude", "**/dist")] = False
    out = patched(VSCODE, d, {("editor.wordWrap",): 1.5, ("files.exclude", "**/dist"): 3.5})
    assert '    "editor.tabSize": 4,\n    "editor.wordWrap": "on",\n    /* zoom' in out
    assert '        "**/.git": true,\n        "**/dist": false,\n        "**/node_modules"' in out
    assert leaves(out)[("editor.wordWrap",)] == "on"


def test_insert_at_end_keeps_trailing_comma_style() -> None:
    d = leaves(VSCODE)
    d[("zzz",)] = None
    out = patched(VSCODE, d, {("zzz",): 99})
    assert out.endswith('"Fira Code",\n    "zzz": null,\n}\n')


def test_insert_at_end_without_trailing_commas() -> None:
    text = '{\n  "a": 1,\n  "b": 2\n}\n'
    out = patched(text, {("a",): 1, ("b",): 2, ("c",): {"d": True}}, {("c", "d"): 5})
    assert out == '{\n  "a": 1,\n  "b": 2,\n  "c": {\n    "d": true\n  }\n}\n'


def test_delete_takes_attached_comments_and_fixes_commas() -> None:
    d = leaves(VSCODE)
    del d[("window.zoomLevel",)]
    out = patched(VSCODE, d)
    assert "zoom" not in out and "level */" not in out
    assert out == VSCODE.replace('    /* zoom\n       level */\n    "window.zoomLevel": 1,\n', "")
    text = '{\n  "a": 1, // about a\n  "b": 2\n}\n'
    assert patched(text, {("a",): 1}) == '{\n  "a": 1 // about a\n}\n'


def test_delete_a_whole_object() -> None:
    d = {k: v for k, v in leaves(VSCODE).items() if k[0] != "files.exclude"}
    out = patched(VSCODE, d)
    assert "files.exclude" not in out and "node_modules" not in out
    assert leaves(out) == d


def test_single_line_objects_stay_single_line() -> None:
    text = '{"a": 1, "b": {"c": 2, "d": 3}}'
    out = patched(text, {("a",): 1, ("b", "c"): 2, ("b", "e"): 4}, {("b", "e"): 3.5})
    assert out == '{"a": 1, "b": {"c": 2, "e": 4}}'


def test_crlf_and_bom_free_text_and_unicode() -> None:
    text = '{\r\n  "name": "Zoë",\r\n  "n": 1\r\n}\r\n'
    out = patched(text, {("name",): "Zoë ✓", ("n",): 1, ("new",): "日本"}, {("new",): 9})
    assert out == '{\r\n  "name": "Zoë ✓",\r\n  "n": 1,\r\n  "new": "日本"\r\n}\r\n'


def test_structure_changes() -> None:
    text = '{\n    "a": 1,\n    "b": {\n        "c": 2\n    }\n}\n'
    # a scalar becomes an object, an object becomes a scalar
    out = patched(text, {("a", "x"): True, ("b",): "flat"})
    assert leaves(out) == {("a", "x"): True, ("b",): "flat"}
    # an emptied object survives as {}
    out = patched(text, {("a",): 1, ("b",): {}})
    assert leaves(out) == {("a",): 1, ("b",): {}}


def test_empty_and_comment_only_files() -> None:
    assert leaves("") == {}
    assert leaves("  // nothing yet\n") == {}
    out = patched("// my settings\n", {("a",): 1, ("b", "c"): [1, "x"]})
    assert out.startswith("// my settings\n{\n")
    assert leaves(out) == {("a",): 1, ("b", "c"): [1, "x"]}
    assert patched("{}", {("k",): 0.5}) == '{\n    "k": 0.5\n}'


def test_kept_keys_are_never_touched() -> None:
    d = {k: v for k, v in leaves(VSCODE).items() if k != ("window.zoomLevel",)}
    out = patched(VSCODE, d, keep=lambda p: p == ("window.zoomLevel",))
    assert out == VSCODE


def test_numbers_and_literals_round_trip_exactly() -> None:
    text = '{"i": 10000000000000000000001, "f": 1.0, "e": 1e5, "neg": -0.25, "t": true, "n": null}'
    tree = leaves(text)
    assert tree[("i",)] == 10000000000000000000001 and type(tree[("i",)]) is int
    assert type(tree[("f",)]) is float and tree[("t",)] is True and tree[("n",)] is None
    assert patched(text, tree) == text


def test_duplicate_keys_last_wins() -> None:
    text = '{"a": 1, "a": 2}'
    assert leaves(text) == {("a",): 2}
    assert leaves(patched(text, {("a",): 3})) == {("a",): 3}
    assert leaves(patched(text, {})) == {}


@pytest.mark.parametrize(
    "bad",
    [
        '{"a": 1',  # half-saved
        '{"a": 1,, "b": 2}',
        '{"a": }',
        '{"a": 1} x',
        '{"a": tru}',
        "[1, 2]",
        '{"a": "unterminated}',
        '{"a": 1 /* open comment',
        '{"a": 01}',
        "{a: 1}",
    ],
)
def test_invalid_files_are_refused_with_a_position(bad: str) -> None:
    with pytest.raises(SettingsParseError) as exc:
        ParsedJsonc(bad)
    assert exc.value.line == 1


# -- properties: any patch lands exactly on the desired state ----------------------------------
_keys = st.text(alphabet='ab.é/~"\\ ', min_size=1, max_size=3)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=2)
)
_leaf_values = st.one_of(_scalars, st.lists(_values, max_size=3), st.just({}))
_trees = st.recursive(
    st.dictionaries(_keys, _leaf_values, max_size=4),
    lambda inner: st.dictionaries(_keys, st.one_of(_leaf_values, inner), max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    original=_trees,
    indent=st.sampled_from([None, 2, 4, "\t"]),
    data=st.data(),
)
def test_patch_reaches_desired_and_keeps_order(original: dict, indent: Any, data: Any) -> None:
    text = json.dumps(original, indent=indent, ensure_ascii=False)
    before = leaves(text)
    desired = dict(before)
    for path in list(desired):
        action = data.draw(st.sampled_from(["keep", "keep", "change", "delete"]))
        if action == "change":
            desired[path] = data.draw(_leaf_values)
        elif action == "delete":
            del desired[path]
    hints: dict[KeyPath, float] = {}
    for _ in range(data.draw(st.integers(0, 3))):
        path = tuple(data.draw(st.lists(_keys, min_size=1, max_size=3)))
        desired[path] = data.draw(_leaf_values)
        hints[path] = data.draw(st.floats(-1, 20))
    out = patched(text, desired, hints)
    assert same(leaves(out), normalize_desired(desired))
    kept = [p for p in before if p in leaves(out)]
    assert [p for p in leaves(out) if p in kept] == kept  # untouched keys keep their order


def _jsonc_flavour(text: str, data: Any) -> str:
    """Decorate json.dumps output as people and VS Code do: comment lines above keys, comments
    at line ends, trailing commas."""
    lines = text.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if stripped.startswith('"') and data.draw(st.booleans()):
            out.append(line[: len(line) - len(line.lstrip())] + "// about the next key")
        if (
            nxt[:1] in ("}", "]")
            and stripped
            and stripped[-1] not in "{[,"
            and data.draw(st.booleans())
        ):
            line += ","
        if line.endswith(",") and data.draw(st.booleans()):
            line += " // tail"
        out.append(line)
    return "\n".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=_trees, indent=st.sampled_from([2, 4, "\t"]), data=st.data())
def test_patch_with_comments_and_trailing_commas(original: dict, indent: Any, data: Any) -> None:
    text = _jsonc_flavour(json.dumps(original, indent=indent, ensure_ascii=False), data)
    before = leaves(text)
    assert before == leaves(json.dumps(original))
    desired = dict(before)
    for path in list(desired):
        action = data.draw(st.sampled_from(["keep", "keep", "change", "delete"]))
        if action == "change":
            desired[path] = data.draw(_leaf_values)
        elif action == "delete":
            del desired[path]
    for _ in range(data.draw(st.integers(0, 2))):
        path = tuple(data.draw(st.lists(_keys, min_size=1, max_size=2)))
        desired[path] = data.draw(_leaf_values)
    out = patched(text, desired)
    assert same(leaves(out), normalize_desired(desired))
    if same(desired, before):
        assert out == text


def test_bulk_changes_are_spliced_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 changed values (a device back after a long time offline): one re-parse per run of
    independent edits, not one per key (which took seconds). Counted, not timed."""
    from qmoi_sync.agent import settings_jsonc

    parses = 0
    real_tokenize = settings_jsonc._tokenize

    def counting_tokenize(src: str) -> Any:
        nonlocal parses
        parses += 1
        return real_tokenize(src)

    monkeypatch.setattr(settings_jsonc, "_tokenize", counting_tokenize)
    text = json.dumps(
        {f"k{i}": {"v": i, "list": [i]} if i % 3 == 0 else i for i in range(400)}, indent=4
    )
    tree = ParsedJsonc(text).tree()
    desired = {p: (v + 1 if isinstance(v, int) else v) for p, v in tree.leaves.items()}
    desired = {p: v for i, (p, v) in enumerate(desired.items()) if i % 7}  # and some removals
    hints = {(f"new{i}",): i + 0.5 for i in range(0, 400, 5)}
    desired.update({p: "added" for p in hints})
    out = patched(text, desired, hints)
    changes = len(desired) + len(tree.leaves) - len(set(desired) & set(tree.leaves))
    # One parse per key would be ~600; runs of independent edits share one (26 here).
    assert changes > 400 and parses * 10 <= changes, f"{parses} parses for {changes} changes"
    assert same(leaves(out), desired)
