"""Merge granularity of text files: a changed line is replaced whole, so two devices changing
the same line concurrently both keep their version intact (chaos soak finding B), while a
one-character edit still sends a small update. Real pycrdt documents, no mocks."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from qmoi_sync.agent.textdiff import LONG_LINE_CHARS, apply_ops_to_str, diff_ops
from qmoi_sync.agent.textdoc import ingest_disk_text, load_text_doc, new_text_doc, text_of


def replicas(base: str) -> tuple[Doc[Any], Doc[Any]]:
    """Two devices holding the same document (the second one loaded from the first's state)."""
    a = new_text_doc()
    ingest_disk_text(a, base)
    b = load_text_doc(a.get_update())
    assert text_of(b) == base
    return a, b


def merge_concurrent(base: str, text_a: str, text_b: str) -> str:
    """Each device saves its own version offline; then they exchange the incremental updates
    (in both orders, as a relay would deliver them). Returns the merged text, checked to be
    identical on both replicas."""
    a, b = replicas(base)
    ua = ingest_disk_text(a, text_a)
    ub = ingest_disk_text(b, text_b)
    assert ua is not None and ub is not None
    a.apply_update(ub)
    b.apply_update(ua)
    assert text_of(a) == text_of(b)
    return text_of(a)


def body(n: int) -> list[str]:
    return [f"# lineage L{n}\n"] + [f"tok-c-{i};\n" for i in range(30)]


@pytest.mark.parametrize(
    ("line_a", "line_b"),
    [
        ("tok-a-23;\n", "tok-b-21;\n"),  # the soak's seed 756148544 shape
        ("kappa\n", "theta\n"),  # `thkappkappa` in the soak
        ("tok-c-19; edited on a\n", "tok-c-19; b\n"),  # both edited the same old line
        ("x\n", "a much longer replacement line written on device b\n"),
        ("héllo 😀 wörld\n", "中文 line\n"),  # multi-byte characters (UTF-8 offsets)
    ],
)
def test_concurrent_replacement_of_one_line_keeps_both_lines_intact(
    line_a: str, line_b: str
) -> None:
    lines = body(1)
    base = "".join(lines)
    text_a = "".join([*lines[:20], line_a, *lines[21:]])
    text_b = "".join([*lines[:20], line_b, *lines[21:]])
    merged = merge_concurrent(base, text_a, text_b)
    out = merged.splitlines(keepends=True)
    # Both versions survive as whole lines, next to each other, where the old line was; the
    # old line is gone and every other line is untouched.
    assert lines[20] not in out
    assert out[:20] == lines[:20] and out[22:] == lines[21:]
    assert sorted(out[20:22]) == sorted([line_a, line_b])


def test_concurrent_replacement_order_is_the_same_whoever_merges_first() -> None:
    lines = body(2)
    base = "".join(lines)
    text_a = "".join([*lines[:5], "from a\n", *lines[6:]])
    text_b = "".join([*lines[:5], "from b\n", *lines[6:]])
    a, b = replicas(base)
    ua, ub = ingest_disk_text(a, text_a), ingest_disk_text(b, text_b)
    assert ua is not None and ub is not None
    # A third replica receiving the two updates in the other order ends identical.
    c = load_text_doc(replicas(base)[0].get_update())
    c.apply_update(ub)
    c.apply_update(ua)
    a.apply_update(ub)
    b.apply_update(ua)
    assert text_of(a) == text_of(b) == text_of(c)
    assert "from a\n" in text_of(a).splitlines(keepends=True)
    assert "from b\n" in text_of(a).splitlines(keepends=True)


def test_concurrent_replacement_of_an_unterminated_last_line_keeps_them_apart() -> None:
    base = "first\nlast"
    merged = merge_concurrent(base, "first\nlast-a", "first\nlast-b")
    assert merged.split("\n")[0] == "first"
    assert sorted(merged.split("\n")[1:]) == ["last-a", "last-b"]


def test_concurrent_multi_line_replacements_of_one_block_keep_both_blocks() -> None:
    lines = body(3)
    base = "".join(lines)
    block_a = ["a1\n", "a2\n", "a3\n"]
    block_b = ["b1\n", "b2\n"]
    merged = merge_concurrent(
        base, "".join(lines[:10] + block_a + lines[13:]), "".join(lines[:10] + block_b + lines[13:])
    )
    text_a, text_b = "".join(block_a), "".join(block_b)
    head, tail = "".join(lines[:10]), "".join(lines[13:])
    assert merged in (head + text_a + text_b + tail, head + text_b + text_a + tail)


def test_edits_of_different_lines_merge_as_before() -> None:
    lines = body(4)
    base = "".join(lines)
    la = list(lines)
    la[3] = "tok-c-2; changed on a\n"
    la.insert(10, "inserted on a\n")
    lb = list(lines)
    lb[25] = "tok-c-24 changed on b\n"
    del lb[28]
    merged = merge_concurrent(base, "".join(la), "".join(lb))
    expected = list(lines)
    expected[3] = la[3]
    expected[25] = lb[25]
    del expected[28]
    expected.insert(10, "inserted on a\n")
    assert merged == "".join(expected)


def test_adjacent_line_edits_merge_without_loss() -> None:
    lines = body(5)
    base = "".join(lines)
    la = list(lines)
    la[7] = "seven from a\n"
    lb = list(lines)
    lb[8] = "eight from b\n"
    merged = merge_concurrent(base, "".join(la), "".join(lb))
    expected = list(lines)
    expected[7], expected[8] = la[7], lb[8]
    assert merged == "".join(expected)


def _megabyte() -> str:
    lines = []
    total = 0
    n = 0
    while total < 1_000_000:
        line = f"{n:06d} the quick brown fox jumps over the lazy dog; pack my box with jugs\n"
        lines.append(line)
        total += len(line)
        n += 1
    return "".join(lines)


def test_one_char_edit_in_a_megabyte_of_normal_lines_is_a_small_update() -> None:
    old = _megabyte()
    mid = len(old) // 2
    new = old[:mid] + "Q" + old[mid:]
    ops = diff_ops(old, new)
    assert len(ops) == 1
    line_start = old.rfind("\n", 0, mid) + 1
    line = old[line_start : old.index("\n", mid) + 1]
    assert (ops[0].pos, ops[0].delete) == (line_start, len(line))  # that one line, whole
    assert apply_ops_to_str(old, ops) == new
    a, _b = replicas(old)
    update = ingest_disk_text(a, new)
    assert update is not None
    assert len(update) < 1024, len(update)
    assert text_of(a) == new


def test_long_lines_keep_character_edits() -> None:
    # A 1 MB minified-JSON-like single line: a whole-line resend would be 1 MB per keystroke.
    old = '{"k":[' + ",".join(f'"v{i}"' for i in range(150_000)) + "]}\n"
    assert len(old) > 1_000_000
    mid = len(old) // 2
    new = old[:mid] + "Q" + old[mid + 1 :]
    ops = diff_ops(old, new)
    assert len(ops) == 1 and ops[0].delete == 1 and ops[0].insert == "Q"
    a, _b = replicas(old)
    update = ingest_disk_text(a, new)
    assert update is not None and len(update) < 1024, update and len(update)
    # The threshold: a line just over it is edited by characters, one at it is replaced whole.
    long_line = "x" * LONG_LINE_CHARS + "\n"
    ops = diff_ops("a\n" + long_line + "b\n", "a\n" + "y" + long_line[1:] + "b\n")
    assert [(o.delete, o.insert) for o in ops] == [(1, "y")]
    short_line = "x" * (LONG_LINE_CHARS - 1) + "\n"
    ops = diff_ops("a\n" + short_line + "b\n", "a\n" + "y" + short_line[1:] + "b\n")
    assert [(o.pos, o.delete) for o in ops] == [(2, len(short_line))]


line_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r")
new_line = st.text(line_chars, min_size=0, max_size=12).map(lambda s: s + "\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 8),
    data=st.data(),
)
def test_property_concurrent_line_replacements_never_interleave(
    n: int, data: st.DataObject
) -> None:
    """Each device replaces one line (maybe the same one) by a line of its own: after the
    merge, every line either device wrote is present whole, and both replicas agree."""
    lines = [f"base line {k}\n" for k in range(n)]
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1))
    line_a = "A:" + data.draw(new_line)
    line_b = "B:" + data.draw(new_line)
    la, lb = list(lines), list(lines)
    la[i], lb[j] = line_a, line_b
    text = merge_concurrent("".join(lines), "".join(la), "".join(lb))
    merged = re.findall(r"[^\n]*\n|[^\n]+$", text)  # lines end at "\n" only, as in textdiff
    assert line_a in merged and line_b in merged
    assert lines[i] not in merged and lines[j] not in merged
    assert [x for x in merged if x not in (line_a, line_b)] == [
        x for k, x in enumerate(lines) if k not in (i, j)
    ]
