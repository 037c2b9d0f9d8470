"""TOML through tomlkit: parse, patch, write back with comments and order kept."""

from __future__ import annotations

from typing import Any

import pytest
import tomlkit
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
from qmoi_sync.agent.settings_toml import ParsedToml, from_json, to_json

RUFF = """# ruff settings
line-length = 100  # wide screens
target-version = "py311"

[lint]
# rules we want
select = ["E", "F", "I"]
ignore = []  # none yet

[lint.isort]
known-first-party = ["qmoi_sync"]

[format]
quote-style = "double"
released = 1979-05-27T07:32:00Z
"""


def patched(
    text: str, desired: dict[KeyPath, Any], hints: dict[KeyPath, float] | None = None
) -> str:
    parsed = ParsedToml(text)
    tree = parsed.tree()
    h: dict[KeyPath, float] = {k: float(v) for k, v in ordinals(tree).items()}
    h.update(hints or {})
    out = parsed.apply(plan(tree, desired, lambda p: False, h.get))
    ParsedToml(out)
    return out


def same(a: dict[KeyPath, Any], b: dict[KeyPath, Any]) -> bool:
    """Equal with types (``False != 0``, ``1 != 1.0``) and key order ignored."""
    return {k: canon(v) for k, v in a.items()} == {k: canon(v) for k, v in b.items()}


def leaves(text: str) -> dict[KeyPath, Any]:
    return ParsedToml(text).tree().leaves


def test_model_and_types() -> None:
    t = leaves(RUFF)
    assert t[("line-length",)] == 100 and type(t[("line-length",)]) is int
    assert t[("lint", "select")] == ["E", "F", "I"]
    assert t[("lint", "isort", "known-first-party")] == ["qmoi_sync"]
    assert t[("format", "released")] == {"$toml": "datetime", "v": "1979-05-27T07:32:00+00:00"}
    assert list(t)[:2] == [("line-length",), ("target-version",)]


def test_noop_is_byte_identical() -> None:
    assert patched(RUFF, leaves(RUFF)) == RUFF


def test_change_keeps_the_line_comment_and_everything_else() -> None:
    d = leaves(RUFF)
    d[("line-length",)] = 120
    out = patched(RUFF, d)
    assert out == RUFF.replace("line-length = 100  #", "line-length = 120  #")


def test_insert_plain_key_after_predecessor_and_table_at_end() -> None:
    d = leaves(RUFF)
    d[("lint", "preview")] = True
    d[("lint", "per-file-ignores", "tests/*")] = ["S101"]
    out = patched(RUFF, d, {("lint", "preview"): 3.5, ("lint", "per-file-ignores", "tests/*"): 9})
    assert "ignore = []  # none yet\npreview = true\n" in out
    assert '[lint.per-file-ignores]\n"tests/*" = ["S101"]' in out
    assert out.startswith(RUFF[: RUFF.index("ignore")])
    assert leaves(out) == d


def test_delete_keys_and_tables() -> None:
    d = leaves(RUFF)
    del d[("lint", "isort", "known-first-party")]
    del d[("format", "quote-style")]
    out = patched(RUFF, d)
    assert "[lint.isort]" not in out and "quote-style" not in out
    assert "# rules we want" in out and leaves(out) == d


def test_dotted_keys_and_inline_tables() -> None:
    text = "a.b.c = 1\npoint = {x = 1, y = 2}  # p\n"
    t = leaves(text)
    assert t == {("a", "b", "c"): 1, ("point", "x"): 1, ("point", "y"): 2}
    t[("point", "z")] = 3
    t[("a", "b", "d")] = "e"
    out = patched(text, t)
    assert leaves(out) == t
    assert "point = {x = 1, y = 2, z = 3}" in out


def test_special_values_round_trip() -> None:
    text = (
        "inf_ = inf\nd = 2020-01-02\nt = 07:32:00\nlst = [1979-05-27T07:32:00Z]\n[[aot]]\nk = 1\n"
    )
    t = leaves(text)
    assert t[("inf_",)] == {"$toml": "float", "v": "inf"}
    assert t[("aot",)] == [{"k": 1}]
    for value in t.values():
        assert to_json(from_json(value)) == value
    assert patched(text, t) == text
    t[("d",)] = {"$toml": "date", "v": "2021-03-04"}
    assert "d = 2021-03-04" in patched(text, t)


def test_new_file_from_scratch() -> None:
    out = patched("", {("a",): 1, ("t", "b"): "x"}, {("a",): 0, ("t", "b"): 1})
    assert tomlkit.parse(out).unwrap() == {"a": 1, "t": {"b": "x"}}


@pytest.mark.parametrize("bad", ["a = ", "a = 1\na = 2\n", "[t\n", 'a = "x', "a = 1 2"])
def test_invalid(bad: str) -> None:
    with pytest.raises(SettingsParseError):
        ParsedToml(bad)


# -- property ---------------------------------------------------------------------------------
_key = st.text(alphabet="abk_-1.", min_size=1, max_size=3)
_scalar = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet='ab "\\é\n', max_size=5),
)
_leaf = st.one_of(_scalar, st.lists(_scalar, max_size=3))
_doc = st.recursive(
    st.dictionaries(_key, _leaf, max_size=4),
    lambda inner: st.dictionaries(_key, st.one_of(_leaf, inner), min_size=1, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=_doc, data=st.data())
def test_patch_reaches_desired(original: dict, data: Any) -> None:
    text = tomlkit.dumps(original)
    before = leaves(text)
    desired = dict(before)
    for path in list(desired):
        action = data.draw(st.sampled_from(["keep", "keep", "change", "delete"]))
        if action == "change":
            desired[path] = data.draw(_leaf)
        elif action == "delete":
            del desired[path]
    for _ in range(data.draw(st.integers(0, 2))):
        desired[tuple(data.draw(st.lists(_key, min_size=1, max_size=3)))] = data.draw(_leaf)
    out = patched(text, desired)
    assert same(leaves(out), normalize_desired(desired))
    if same(desired, before):
        assert out == text
