"""INI / git config: line-preserving parse and patch (agent/settings_ini.py)."""

from __future__ import annotations

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
from qmoi_sync.agent.settings_ini import ParsedIni

GITCONFIG = """# my git config
[user]
\tname = Alice Example
\temail = alice@example.com
\t# signing key id
\tsigningkey = ABC123
[core]
\teditor = vim
\tbare
[remote "origin"]
\turl = https://example.com/repo.git
\tfetch = +refs/heads/*:refs/remotes/origin/*
\tfetch = +refs/tags/*:refs/tags/*

; aliases
[alias]
\tco = checkout   ; short
\tlg = log --graph \\
\t\t--oneline
"""


def patched(
    text: str,
    desired: dict[KeyPath, Any],
    hints: dict[KeyPath, float] | None = None,
    git: bool = True,
    keep: Any = lambda p: False,
) -> str:
    parsed = ParsedIni(text, git_style=git)
    tree = parsed.tree()
    h: dict[KeyPath, float] = {k: float(v) for k, v in ordinals(tree).items()}
    h.update(hints or {})
    out = parsed.apply(plan(tree, desired, keep, h.get))
    ParsedIni(out)
    return out


def same(a: dict[KeyPath, Any], b: dict[KeyPath, Any]) -> bool:
    """Equal with types (``False != 0``, ``1 != 1.0``) and key order ignored."""
    return {k: canon(v) for k, v in a.items()} == {k: canon(v) for k, v in b.items()}


def leaves(text: str) -> dict[KeyPath, Any]:
    return ParsedIni(text).tree().leaves


def test_model() -> None:
    t = leaves(GITCONFIG)
    assert t[("user", "name")] == "Alice Example"
    assert t[("core", "bare")] is None  # a bare key
    assert t[('remote "origin"', "fetch")] == [
        "+refs/heads/*:refs/remotes/origin/*",
        "+refs/tags/*:refs/tags/*",
    ]
    assert t[("alias", "co")] == "checkout   ; short"  # raw value, inline comment included
    assert t[("alias", "lg")] == "log --graph \\\n\t\t--oneline"  # continuation line


def test_noop_is_byte_identical() -> None:
    assert patched(GITCONFIG, leaves(GITCONFIG)) == GITCONFIG


def test_change_keeps_indentation_and_other_lines() -> None:
    d = leaves(GITCONFIG)
    d[("core", "editor")] = "nvim"
    out = patched(GITCONFIG, d)
    assert out == GITCONFIG.replace("\teditor = vim", "\teditor = nvim")


def test_multi_value_keys() -> None:
    d = leaves(GITCONFIG)
    d[('remote "origin"', "fetch")] = ["a", "b", "c"]
    out = patched(GITCONFIG, d)
    assert "\tfetch = a\n\tfetch = b\n\tfetch = c\n" in out
    d[('remote "origin"', "fetch")] = "only"
    out = patched(GITCONFIG, d)
    assert out.count("fetch") == 1 and leaves(out) == d


def test_insert_and_delete() -> None:
    d = leaves(GITCONFIG)
    del d[("user", "signingkey")]  # takes its comment line along
    d[("user", "username")] = "alice"
    d[("init", "defaultBranch")] = "main"
    out = patched(GITCONFIG, d, {("user", "username"): 0.5, ("init", "defaultBranch"): 99})
    assert "signing" not in out
    assert "[user]\n\tname = Alice Example\n\tusername = alice\n\temail" in out
    assert out.endswith("\t\t--oneline\n\n[init]\n\tdefaultBranch = main\n")
    assert leaves(out) == d


def test_delete_section_with_comments_above() -> None:
    d = {k: v for k, v in leaves(GITCONFIG).items() if k[0] != "alias"}
    out = patched(GITCONFIG, d)
    assert "aliases" not in out and "[alias]" not in out and leaves(out) == d


def test_new_file_from_scratch() -> None:
    hints = {("user", "name"): 0.0, ("core", "autocrlf"): 1.0}
    out = patched("", {("user", "name"): "Bob", ("core", "autocrlf"): "input"}, hints)
    assert out == "[user]\n\tname = Bob\n\n[core]\n\tautocrlf = input\n"
    plain = patched("", {("top",): "1", ("s", "k"): "v"}, {("s", "k"): 0.0}, git=False)
    assert plain == "top = 1\n\n[s]\nk = v\n"


def test_setup_cfg_style() -> None:
    text = "[metadata]\nname: demo\nversion: 1.0\n\n[options]\nzip_safe = False\n"
    d = leaves(text)
    assert d == {
        ("metadata", "name"): "demo",
        ("metadata", "version"): "1.0",
        ("options", "zip_safe"): "False",
    }
    d[("metadata", "license")] = "MIT"
    out = patched(text, d, {("metadata", "license"): 1.5}, git=False)
    assert (
        out == "[metadata]\nname: demo\nversion: 1.0\nlicense: MIT\n\n[options]\nzip_safe = False\n"
    )


def test_empty_section_is_a_leaf() -> None:
    assert leaves("[empty]\n[full]\na = 1\n") == {("empty",): {}, ("full", "a"): "1"}


def test_kept_keys_untouched() -> None:
    d = {k: v for k, v in leaves(GITCONFIG).items() if k != ("user", "signingkey")}
    assert patched(GITCONFIG, d, keep=lambda p: p == ("user", "signingkey")) == GITCONFIG


@pytest.mark.parametrize("bad", ["[unterminated\nkey = 1\n", "[]\n", "= value\n"])
def test_invalid(bad: str) -> None:
    with pytest.raises(SettingsParseError):
        ParsedIni(bad)


# -- property -----------------------------------------------------------------------------------
_name = st.text(alphabet="abcxyz_.-0", min_size=1, max_size=4)
_section = st.text(alphabet='abc "xy.', min_size=1, max_size=6).map(str.strip).filter(bool)
_value = st.one_of(
    st.none(),
    st.text(alphabet="ab =:;#/é\\*+", max_size=8)
    .map(str.strip)
    .filter(lambda v: not v.endswith("\\")),
)
_leaf = st.one_of(_value, st.lists(_value, min_size=2, max_size=3))
_ini = st.dictionaries(_section, st.dictionaries(_name, _leaf, min_size=1, max_size=4), max_size=4)


def _render(doc: dict[str, dict[str, Any]], indent: str, sep: str) -> str:
    out = []
    for section, keys in doc.items():
        out.append(f"# about {section}\n[{section}]\n")
        for key, value in keys.items():
            for v in value if isinstance(value, list) else [value]:
                out.append(f"{indent}{key}\n" if v is None else f"{indent}{key}{sep}{v}\n")
        out.append("\n")
    return "".join(out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=_ini,
    indent=st.sampled_from(["", "\t", "  "]),
    sep=st.sampled_from([" = ", "=", ": "]),
    data=st.data(),
)
def test_patch_reaches_desired(doc: dict, indent: str, sep: str, data: Any) -> None:
    text = _render(doc, indent, sep)
    before = leaves(text)
    desired = dict(before)
    for path in list(desired):
        action = data.draw(st.sampled_from(["keep", "keep", "change", "delete"]))
        if action == "change":
            desired[path] = data.draw(_leaf)
        elif action == "delete":
            del desired[path]
    for _ in range(data.draw(st.integers(0, 3))):
        desired[(data.draw(_section), data.draw(_name))] = data.draw(_leaf)
    out = patched(text, desired, git=False)
    assert same(leaves(out), normalize_desired(desired))
    if same(desired, before):
        assert out == text


def test_bulk_changes_are_spliced_in_one_pass() -> None:
    import time

    text = "".join(
        f"[s{i}]\n" + "".join(f"\t# about k{j}\n\tk{j} = v{j}\n" for j in range(10))
        for i in range(40)
    )
    tree = ParsedIni(text).tree()
    desired = {p: v + "x" for i, (p, v) in enumerate(tree.leaves.items()) if i % 5}
    started = time.perf_counter()
    out = patched(text, desired)
    assert time.perf_counter() - started < 3.0
    assert same(leaves(out), desired)
    assert out.count("# about") == len(desired)  # removed keys took their comment along
