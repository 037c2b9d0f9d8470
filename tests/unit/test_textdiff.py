"""textdiff: few ops at line granularity (characters only within long lines), UTF-8 byte
offsets, application to a real pycrdt Text. Merge behaviour: test_line_merge.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Text

from qmoi_sync.agent.textdiff import (
    TextOp,
    apply_ops,
    apply_ops_to_str,
    char_offset,
    diff_ops,
    utf8_offset,
)

# Characters that stress byte/char conversion: ASCII, 2-byte Latin, 3-byte CJK, 4-byte emoji
# (astral, a surrogate pair in UTF-16), combining marks, ZWJ sequences, CR/LF.
TOKENS = [
    "a", "b", "z", " ", "\n", "\r\n", "\r", "\t", "é", "ß", "中", "文", "😀", "👍🏽",
    "👩\u200d💻", "e\u0301", "\u0301", "\u0308", "\U0001d518", "\ufeff", "\ufb01",
]  # fmt: skip

unicode_text = st.lists(
    st.one_of(
        st.sampled_from(TOKENS),
        st.characters(blacklist_categories=("Cs",)),  # any code point but lone surrogates
    ),
    max_size=60,
).map("".join)

line_text = st.lists(
    st.lists(st.sampled_from(TOKENS[:12]), max_size=8).map(lambda cs: "".join(cs) + "\n"),
    max_size=12,
).map("".join)


def text_doc(initial: str) -> tuple[Doc[Any], Text]:
    doc: Doc[Any] = Doc()
    doc["content"] = text = Text()
    text += initial  # += appends at len(text), which pycrdt counts in bytes: correct
    return doc, text


def apply_to_crdt(old: str, new: str) -> tuple[str, list[TextOp]]:
    doc, text = text_doc(old)
    ops = diff_ops(old, new)
    with doc.transaction():
        apply_ops(text, ops, old)
    return str(text), ops


# ------------------------------------------------------------------------------------------
# utf8 offsets


def test_utf8_offset_counts_bytes_per_character() -> None:
    s = "aé中😀e\u0301"
    assert [utf8_offset(s, i) for i in range(len(s) + 1)] == [0, 1, 3, 6, 10, 11, 13]


def test_char_offset_is_the_inverse_and_refuses_mid_character() -> None:
    s = "aé中😀e\u0301\r\n"
    for i in range(len(s) + 1):
        assert char_offset(s, utf8_offset(s, i)) == i
    with pytest.raises(ValueError, match="inside a multi-byte"):
        char_offset(s, 2)  # inside é
    with pytest.raises(ValueError):
        char_offset(s, 7)  # inside 😀


def test_offsets_out_of_range() -> None:
    with pytest.raises(IndexError):
        utf8_offset("abc", 4)
    with pytest.raises(IndexError):
        utf8_offset("abc", -1)
    with pytest.raises(IndexError):
        char_offset("é", 3)


@given(unicode_text, st.data())
def test_utf8_offset_matches_encoding(s: str, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(s)))
    assert utf8_offset(s, i) == len(s[:i].encode("utf-8"))
    assert char_offset(s, utf8_offset(s, i)) == i


# ------------------------------------------------------------------------------------------
# diff shape


def test_equal_texts_give_no_ops() -> None:
    assert diff_ops("same\n", "same\n") == []
    assert diff_ops("", "") == []


def test_pure_insert_and_pure_delete_of_whole_lines() -> None:
    assert diff_ops("", "abc") == [TextOp(0, 0, "abc")]
    assert diff_ops("abc", "") == [TextOp(0, 3, "")]
    assert diff_ops("a\nb\n", "a\nnew\nb\n") == [TextOp(2, 0, "new\n")]
    assert diff_ops("a\nnew\nb\n", "a\nb\n") == [TextOp(2, 4, "")]
    # Appending a line to a file without a final newline inserts "\n..." after the last line.
    assert diff_ops("a\nb", "a\nb\nc") == [TextOp(3, 0, "\nc")]


def test_insert_or_delete_inside_a_line_replaces_the_line() -> None:
    # Merge granularity is the line (see textdiff's docstring and test_line_merge.py).
    assert diff_ops("hello world", "hello brave world") == [TextOp(0, 11, "hello brave world")]
    assert diff_ops("x\nhello brave world\ny\n", "x\nhello world\ny\n") == [
        TextOp(2, 18, "hello world\n")
    ]


def test_one_char_edit_in_a_megabyte_is_one_op_on_one_line() -> None:
    old = "".join(f"line {i} with some text é😀\n" for i in range(40_000))
    assert len(old) > 1_000_000
    mid = len(old) // 2
    new = old[:mid] + "Q" + old[mid + 1 :]
    ops = diff_ops(old, new)
    assert len(ops) == 1
    line_start = old.rfind("\n", 0, mid) + 1
    line_end = old.index("\n", mid) + 1
    assert (ops[0].pos, ops[0].delete) == (line_start, line_end - line_start)
    assert ops[0].insert == new[line_start:line_end]
    assert apply_ops_to_str(old, ops) == new


def test_word_change_replaces_only_that_line() -> None:
    old = "first line\nthe quick brown fox jumps over the lazy dog\nlast line\n"
    new = "first line\nthe quick red fox jumps over the lazy dog\nlast line\n"
    ops = diff_ops(old, new)
    assert ops == [TextOp(11, 44, "the quick red fox jumps over the lazy dog\n")]


def test_word_change_on_a_long_line_does_not_replace_the_line() -> None:
    filler = " ".join(f"w{i}" for i in range(400))  # > LONG_LINE_CHARS
    old = f"first line\nthe quick brown fox {filler}\nlast line\n"
    new = f"first line\nthe quick red fox {filler}\nlast line\n"
    ops = diff_ops(old, new)
    assert len(ops) == 1
    assert ops[0].delete <= len("brown") and len(ops[0].insert) <= len("red")


def test_scattered_line_edits_give_one_op_per_edit() -> None:
    lines = [f"line number {i}\n" for i in range(200)]
    new_lines = list(lines)
    for i in (10, 80, 150):
        new_lines[i] = f"line number {i} (edited)\n"
    new_lines.insert(120, "an inserted line\n")
    old, new = "".join(lines), "".join(new_lines)
    ops = diff_ops(old, new)
    assert len(ops) == 4
    assert apply_ops_to_str(old, ops) == new


def test_rewritten_block_is_one_replace_not_many_fragments() -> None:
    old = "keep\n" + "".join(f"alpha {i} beta gamma\n" for i in range(20)) + "tail\n"
    body = "".join(f"{i * 7} totally different words here\n" for i in range(20))
    new = "keep\n" + body + "tail\n"
    ops = diff_ops(old, new)
    assert len(ops) <= 8
    assert apply_ops_to_str(old, ops) == new


def test_crlf_file_edits() -> None:
    old = "a\r\nb\r\nc\r\n"
    new = "a\r\nB!\r\nc\r\nd\r\n"
    out, ops = apply_to_crdt(old, new)
    assert out == new
    assert len(ops) <= 2


def test_ops_follow_the_sequential_convention() -> None:
    # Two edits: the second op's position accounts for the first op's growth.
    old = "aaaa\nbbbb\ncccc\n"
    new = "aaaaXXXXXX\nbbbb\nccccY\n"
    ops = diff_ops(old, new)
    assert ops == [TextOp(0, 5, "aaaaXXXXXX\n"), TextOp(16, 5, "ccccY\n")]


# ------------------------------------------------------------------------------------------
# TextOp / apply validation


def test_textop_validation() -> None:
    with pytest.raises(ValueError):
        TextOp(-1, 0, "x")
    with pytest.raises(ValueError):
        TextOp(0, -1, "x")
    with pytest.raises(ValueError):
        TextOp(0, 0, "")


def test_apply_rejects_out_of_order_or_overlapping_ops() -> None:
    with pytest.raises(ValueError, match="overlap"):
        apply_ops_to_str("abcdef", [TextOp(3, 1, ""), TextOp(1, 1, "")])
    with pytest.raises(ValueError, match="past the end"):
        apply_ops_to_str("abc", [TextOp(2, 5, "")])
    _doc, text = text_doc("abc")
    with pytest.raises(ValueError):
        apply_ops(text, [TextOp(2, 5, "")], "abc")
    assert str(text) == "abc"  # refused before touching the CRDT


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("héllo wörld 😀\r\nline2\n", "héllo wörld 😁\r\nline2 changed\nnew 中文\n"),
        ("a\u0301b", "a\u0302b"),
        ("👩\u200d💻 codes", "👩\u200d🔬 codes"),
        ("中文文本\n第二行\n", "中文本\n第二行!\n第三行\n"),
        ("😀😀😀", "😀😃😀"),
        ("x" * 10 + "😀", "😀" + "x" * 10),
    ],
)
def test_apply_on_pycrdt_text_with_multibyte_characters(old: str, new: str) -> None:
    out, _ops = apply_to_crdt(old, new)
    assert out == new


# ------------------------------------------------------------------------------------------
# properties (a): diff_ops + apply_ops turns any old into any new


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(unicode_text, unicode_text)
def test_property_any_old_to_any_new_unicode(old: str, new: str) -> None:
    ops = diff_ops(old, new)
    assert apply_ops_to_str(old, ops) == new
    out, _ = apply_to_crdt(old, new)
    assert out == new


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(line_text, line_text)
def test_property_line_structured_texts(old: str, new: str) -> None:
    out, ops = apply_to_crdt(old, new)
    assert out == new
    # Never more ops than changed characters, and ops never abut (they would be merged).
    assert len(ops) <= max(1, len(old) + len(new))


@st.composite
def edited_pair(draw: st.DrawFn) -> tuple[str, str]:
    """A text and a version with a few local edits (the realistic case for op counts)."""
    lines = draw(st.lists(line_text.filter(bool), min_size=1, max_size=6))
    old = "".join(lines)
    new_lines = old.splitlines(keepends=True)
    n_edits = draw(st.integers(1, 3))
    for _ in range(n_edits):
        i = draw(st.integers(0, len(new_lines)))
        kind = draw(st.sampled_from(["insert", "delete", "change"]))
        if kind == "insert" or not new_lines:
            new_lines.insert(i, draw(unicode_text) + "\n")
        elif kind == "delete":
            del new_lines[min(i, len(new_lines) - 1)]
        else:
            j = min(i, len(new_lines) - 1)
            new_lines[j] = draw(unicode_text) + "\n"
    return old, "".join(new_lines)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(edited_pair())
def test_property_local_edits_roundtrip_on_crdt(pair: tuple[str, str]) -> None:
    old, new = pair
    out, _ops = apply_to_crdt(old, new)
    assert out == new


# ------------------------------------------------------------------------------------------
# pathological inputs: bounded cost (a quadratic diff would hit the test timeout), few ops


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("\n" * 200_000, "\n" * 1000 + "a\n" + "\n" * 99_000 + "b\n" + "\n" * 99_998),
        ("ab\ncd\n" * 50_000, "ab\ncd\n" * 20_000 + "X\n" + "ab\ncd\n" * 30_000),
        ("".join("abc"[i * 7 % 3] + "\n" for i in range(100_000)),
         "".join("abc"[i * 5 % 3] + "\n" for i in range(100_000))),
        ("a" * 500_000 + "b" * 500_000, "a" * 250_000 + "X" + "a" * 249_999 + "b" * 499_999 + "Y"),
        ("a" * 2000, "a" * 1000 + "b" + "a" * 999),
    ],
)  # fmt: skip
def test_pathological_inputs_stay_cheap_and_correct(old: str, new: str) -> None:
    ops = diff_ops(old, new)
    assert apply_ops_to_str(old, ops) == new
    assert len(ops) <= 2


def test_shuffled_lines_are_handled() -> None:
    lines = [f"line {i}\n" for i in range(5000)]
    shuffled = lines[::7] + [x for k, x in enumerate(lines) if k % 7]
    ops = diff_ops("".join(lines), "".join(shuffled))
    assert apply_ops_to_str("".join(lines), ops) == "".join(shuffled)
