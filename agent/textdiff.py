"""Turn "old text -> new text" into a few CRDT text operations, and apply them to a pycrdt Text.

Two facts shape this module:

* pycrdt ``Text`` indices are **UTF-8 byte offsets**, not Python character indices. Inserting at
  a byte offset that falls inside a multi-byte character corrupts the text silently, so every
  position computed here (in characters) is converted explicitly before it reaches pycrdt.
* Yrs gets slower as a text fragments into many small items (each op splits items). A naive
  character diff of a rewritten paragraph yields dozens of tiny ops; a line diff yields one or
  two. So we diff lines.

Merge granularity (the rule; docs/architecture.md "Text merge"): a changed line is expressed as
**delete the whole old line + insert the whole new line**, never as character edits inside it.
Two devices that change the same line concurrently then both delete the same items (idempotent)
and both insert at the same place; Yjs orders the two inserts by client id, so *both* versions of
the line survive intact, in the same order on every replica (like the two sides of a git merge
conflict). Character-level edits instead interleaved the two versions into a line neither
device wrote (chaos soak finding B: ``tok-a-23;`` + ``tok-b-21;`` -> ``tok-a-2321;``). A pure
insertion or deletion of whole lines is emitted as it is. The cost of a one-character edit is
one line resent (tens of bytes on a normal line). Only lines longer than
``LONG_LINE_CHARS`` (minified JSON, a base64 blob, a one-line 1 MB file) keep character-level
edits: resending such a line per keystroke would cost too much, and such files are rarely
hand-edited on two devices at once.

Position convention of :class:`TextOp` (this is the contract ``apply_ops`` relies on):
ops are sorted by position and applied **in list order**; ``op.pos`` is a Python character
index into the text *as it is after all earlier ops of the list have been applied* (so the
first op's ``pos`` is an index into ``old``). Ops never overlap: each op starts at or after the
end of the text inserted by the previous op.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "TextOp",
    "apply_ops",
    "apply_ops_to_str",
    "char_offset",
    "diff_ops",
    "utf8_offset",
]

# Lines longer than this keep character-level edits (see the module docstring). 1,000 chars:
# a normal line of code, prose or config is far shorter (so same-line conflicts keep both
# versions), while one whole-line resend stays ~1 KB; a longer line (minified JSON, a base64
# value, a single-line file of any size) is edited by characters so a keystroke stays tiny.
LONG_LINE_CHARS = 1000
# A replaced long line is refined at character level only when both sides together are at
# most this many characters: SequenceMatcher is quadratic-ish on characters, and a big rewritten
# block is better expressed as one delete + one insert anyway.
CHAR_REFINE_MAX_CHARS = 4000
# If a character-level refinement needs more ops than this, the block was really rewritten:
# emit a single replace instead (fewer items in the CRDT, faster later edits).
CHAR_REFINE_MAX_OPS = 8
# Two ops separated by an unchanged run shorter than this are merged into one op (re-deleting
# and re-inserting a couple of characters is cheaper than one more item split).
COALESCE_GAP = 3
# difflib.SequenceMatcher is quadratic (or worse) on inputs with many repeated elements (blank
# lines, a file of identical lines, long runs of one character). It is only used on segments
# whose size product is at most this; bigger segments are anchored by a patience diff first.
SEQUENCE_MATCHER_MAX_PRODUCT = 250_000


@dataclass(frozen=True, slots=True)
class TextOp:
    """Delete ``delete`` characters at ``pos``, then insert ``insert`` at ``pos``.

    ``pos`` and ``delete`` count Python characters (code points), in the coordinate space of
    the text after all earlier ops of the same list were applied (see the module docstring).
    """

    pos: int
    delete: int
    insert: str

    def __post_init__(self) -> None:
        if self.pos < 0 or self.delete < 0:
            raise ValueError(f"negative position or length in {self!r}")
        if self.delete == 0 and not self.insert:
            raise ValueError("empty TextOp")


# --------------------------------------------------------------------------------------------
# UTF-8 offsets


def utf8_offset(s: str, char_index: int) -> int:
    """Byte offset, in the UTF-8 encoding of ``s``, of the character at ``char_index``.

    ``char_index`` may equal ``len(s)`` (the end). Characters outside the BMP (emoji) take 4
    bytes, CJK 3, accented Latin 2; combining marks are separate code points and count on their
    own, exactly as pycrdt counts them.
    """
    if not 0 <= char_index <= len(s):
        raise IndexError(f"char index {char_index} out of range 0..{len(s)}")
    return len(s[:char_index].encode("utf-8"))


def char_offset(s: str, byte_offset: int) -> int:
    """Inverse of :func:`utf8_offset`: the character index whose UTF-8 offset is ``byte_offset``.

    Raises ValueError when ``byte_offset`` falls inside a multi-byte character (exactly the
    position at which pycrdt would corrupt the text).
    """
    data = s.encode("utf-8")
    if not 0 <= byte_offset <= len(data):
        raise IndexError(f"byte offset {byte_offset} out of range 0..{len(data)}")
    try:
        return len(data[:byte_offset].decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"byte offset {byte_offset} is inside a multi-byte character") from None


# --------------------------------------------------------------------------------------------
# Diff


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, with C-speed slice comparisons (galloping then bisection).

    A Python per-character loop over a 1 MB file costs tens of milliseconds; this costs
    O(n log n) byte comparisons done by memcmp, i.e. well under a millisecond per MB.
    """
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    # Gallop: find a length `hi` at which the prefixes differ.
    lo, step = 1, 64
    while True:
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            break
        if hi == n:
            return n
        lo, step = hi, step * 2
    # Invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]; bisect in between.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix_len(a: str, b: str, limit: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if n == 0 or a[-1] != b[-1]:
        return 0
    la, lb = len(a), len(b)
    lo, step = 1, 64
    while True:
        hi = min(n, lo + step)
        if a[la - hi : la - lo] != b[lb - hi : lb - lo]:
            break
        if hi == n:
            return n
        lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[la - mid : la - lo] == b[lb - mid : lb - lo]:
            lo = mid
        else:
            hi = mid
    return lo


# A raw edit in *old* coordinates: replace old[start:end] with `insert`.
_Edit = tuple[int, int, str]


def _char_edits(old: str, new: str, base: int) -> list[_Edit] | None:
    """Character-level edits turning ``old`` into ``new`` (offset by ``base``), or None when
    the refinement would be too fragmented (or too costly) to be worth it."""
    if len(old) * len(new) > SEQUENCE_MATCHER_MAX_PRODUCT:
        return None
    sm = difflib.SequenceMatcher(None, old, new, autojunk=False)
    edits: list[_Edit] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag != "equal":
            edits.append((base + i1, base + i2, new[j1:j2]))
    edits = _coalesce(edits, old, base)
    if len(edits) > CHAR_REFINE_MAX_OPS:
        return None
    return edits


def _coalesce(edits: list[_Edit], old: str, base: int) -> list[_Edit]:
    """Merge edits separated by fewer than COALESCE_GAP unchanged characters of ``old``.

    ``old`` is the text that ``edits`` index into, starting at absolute offset ``base``.
    """
    out: list[_Edit] = []
    for start, end, ins in edits:
        if out:
            pstart, pend, pins = out[-1]
            if start - pend < COALESCE_GAP:
                gap = old[pend - base : start - base]
                out[-1] = (pstart, end, pins + gap + ins)
                continue
        out.append((start, end, ins))
    return out


def _lis(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Longest increasing subsequence by second element (pairs sorted by first): patience
    sorting, O(k log k)."""
    tails: list[int] = []  # tails[k] = index in pairs of the smallest tail of a run of k+1
    tail_vals: list[int] = []
    prev: list[int] = [-1] * len(pairs)
    for idx, (_i, j) in enumerate(pairs):
        k = bisect.bisect_left(tail_vals, j)
        if k:
            prev[idx] = tails[k - 1]
        if k == len(tails):
            tails.append(idx)
            tail_vals.append(j)
        else:
            tails[k] = idx
            tail_vals[k] = j
    out: list[tuple[int, int]] = []
    idx = tails[-1] if tails else -1
    while idx >= 0:
        out.append(pairs[idx])
        idx = prev[idx]
    out.reverse()
    return out


def _matching_lines(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int, int]]:
    """Matching blocks ``(i, j, size)`` between line lists, sorted, adjacent ones merged.

    Patience diff: lines that occur exactly once on each side anchor the alignment (longest
    increasing subsequence), and the gaps between anchors are processed the same way. A gap
    without unique common lines is handed to SequenceMatcher only when small enough; a big one
    is left unmatched (replaced wholesale). So the cost stays near O(n log n) whatever the
    input, where SequenceMatcher alone can take minutes on a file of repeated lines.
    """
    matches: list[tuple[int, int, int]] = []
    stack = [(0, len(a), 0, len(b))]
    while stack:
        alo, ahi, blo, bhi = stack.pop()
        # Common prefix and suffix of the segment.
        while alo < ahi and blo < bhi and a[alo] == b[blo]:
            matches.append((alo, blo, 1))
            alo += 1
            blo += 1
        while alo < ahi and blo < bhi and a[ahi - 1] == b[bhi - 1]:
            ahi -= 1
            bhi -= 1
            matches.append((ahi, bhi, 1))
        if alo == ahi or blo == bhi:
            continue
        counts: dict[str, list[int]] = {}  # line -> [count in a, count in b, pos a, pos b]
        for i in range(alo, ahi):
            c = counts.setdefault(a[i], [0, 0, i, -1])
            c[0] += 1
        for j in range(blo, bhi):
            cb = counts.get(b[j])
            if cb is not None:
                cb[1] += 1
                cb[3] = j
        unique = sorted((c[2], c[3]) for c in counts.values() if c[0] == 1 and c[1] == 1)
        anchors = _lis(unique)
        if anchors:
            pa, pb = alo, blo
            for i, j in anchors:
                matches.append((i, j, 1))
                stack.append((pa, i, pb, j))
                pa, pb = i + 1, j + 1
            stack.append((pa, ahi, pb, bhi))
        elif (ahi - alo) * (bhi - blo) <= SEQUENCE_MATCHER_MAX_PRODUCT:
            sm = difflib.SequenceMatcher(None, a[alo:ahi], b[blo:bhi], autojunk=False)
            for i, j, size in sm.get_matching_blocks():
                if size:
                    matches.append((alo + i, blo + j, size))
    matches.sort()
    merged: list[tuple[int, int, int]] = []
    for i, j, size in matches:
        if merged:
            pi, pj, ps = merged[-1]
            if pi + ps == i and pj + ps == j:
                merged[-1] = (pi, pj, ps + size)
                continue
        merged.append((i, j, size))
    return merged


def _split_lines(s: str) -> list[str]:
    """``s`` cut after each "\\n" (the last piece may lack one); "".join() gives ``s`` back."""
    parts = s.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _line_edits(old: str, new: str, base: int) -> list[_Edit]:
    """Edits for the changed middle: a line diff; replaced lines are replaced whole, except
    a single long line (> LONG_LINE_CHARS), which is refined by characters."""
    # Lines end at "\n" only: str.splitlines also breaks at \r, \x1c-\x1e, \x85, \u2028...,
    # which would replace part of a line and let concurrent edits of it interleave again.
    old_lines = _split_lines(old)
    new_lines = _split_lines(new)

    # Character offsets of each old/new line start, to map line numbers back to characters.
    old_starts = [0]
    for line in old_lines:
        old_starts.append(old_starts[-1] + len(line))
    new_starts = [0]
    for line in new_lines:
        new_starts.append(new_starts[-1] + len(line))

    edits: list[_Edit] = []
    i = j = 0
    # Walk the gaps between matching blocks (plus a sentinel block at the end).
    for mi, mj, size in [
        *_matching_lines(old_lines, new_lines),
        (len(old_lines), len(new_lines), 0),
    ]:
        if i < mi or j < mj:
            o1, o2 = old_starts[i], old_starts[mi]
            n1, n2 = new_starts[j], new_starts[mj]
            old_block, new_block = old[o1:o2], new[n1:n2]
            refined = None
            if (
                mi - i == 1
                and mj - j == 1
                and max(len(old_block), len(new_block)) > LONG_LINE_CHARS
            ):
                # One long line changed: character edits (a whole-line resend costs too much).
                refined = _char_edits(old_block, new_block, base + o1)
            if refined is not None:
                edits.extend(refined)
            else:
                edits.append((base + o1, base + o2, new_block))
        i, j = mi + size, mj + size
    return edits


def _is_line_start(s: str, pos: int) -> bool:
    return pos == 0 or s[pos - 1] == "\n"


def _is_line_end(s: str, pos: int) -> bool:
    return pos == len(s) or s[pos] == "\n"


def _line_len_at(s: str, pos: int) -> int:
    """Length (with its newline) of the line of ``s`` containing index ``pos``."""
    start = s.rfind("\n", 0, pos) + 1
    end = s.find("\n", pos)
    return (len(s) if end < 0 else end + 1) - start


def _whole_lines(text: str, pos: int, chunk: str) -> bool:
    """True when inserting/deleting ``chunk`` at ``pos`` of ``text`` (the text without the
    chunk) adds/removes whole lines only: it sits at a line start and ends with a newline (or
    ends the file), or it starts with a newline and sits at a line end (appending a line to a
    file that has no final newline)."""
    if _is_line_start(text, pos) and (chunk.endswith("\n") or pos == len(text)):
        return True
    return chunk.startswith("\n") and _is_line_end(text, pos)


def _own_line_at_eof(edit: _Edit, old: str) -> _Edit:
    """A replaced last line without a final newline also takes the newline before it.

    Without this, two devices replacing the unterminated last line ``foo`` by ``bar`` and
    ``baz`` would merge into ``barbaz`` (no newline between the two inserts); replacing
    ``\\nfoo`` by ``\\nbar`` and ``\\nbaz`` merges into ``\\nbar\\nbaz``. The newline before
    ``start`` belongs to an unchanged line, never to an earlier edit (line-diff gaps are
    separated by at least one matching line).
    """
    start, end, ins = edit
    if (
        end == len(old)
        and start > 0
        and old[start - 1] == "\n"
        and start < end
        and ins
        and not (ins.endswith("\n") and old.endswith("\n"))
    ):
        return (start - 1, end, "\n" + ins)
    return edit


def diff_ops(old: str, new: str) -> list[TextOp]:
    """Ops that turn ``old`` into ``new`` (see the module docstring for the position
    convention and for the merge granularity: whole lines, except lines longer than
    ``LONG_LINE_CHARS``).

    The common prefix and suffix are trimmed first with memcmp-speed comparisons, so a
    one-character edit in a 1 MB file costs O(n) and yields one op replacing that one line.
    """
    if old == new:
        return []
    prefix = _common_prefix_len(old, new)
    suffix = _common_suffix_len(old, new, min(len(old), len(new)) - prefix)
    old_mid = old[prefix : len(old) - suffix]
    new_mid = new[prefix : len(new) - suffix]

    if not old_mid and _whole_lines(old, prefix, new_mid):
        return [TextOp(prefix, 0, new_mid)]
    if not new_mid and _whole_lines(new, prefix, old_mid):
        return [TextOp(prefix, len(old_mid), "")]

    # Widen the changed region to whole lines: the prefix back to a line start, the suffix
    # forward to start after a newline. A long line is left cut where the characters differ.
    long_cut = False
    if not _is_line_start(old, prefix):
        if max(_line_len_at(old, prefix), _line_len_at(new, prefix)) <= LONG_LINE_CHARS:
            prefix = old.rfind("\n", 0, prefix) + 1
        else:
            long_cut = True
    old_end, new_end = len(old) - suffix, len(new) - suffix
    if suffix and not (_is_line_start(old, old_end) and _is_line_start(new, new_end)):
        if max(_line_len_at(old, old_end - 1), _line_len_at(new, new_end - 1)) <= LONG_LINE_CHARS:
            nl = old.find("\n", old_end)
            suffix = 0 if nl < 0 else len(old) - (nl + 1)
        else:
            long_cut = True
    old_mid = old[prefix : len(old) - suffix]
    new_mid = new[prefix : len(new) - suffix]

    if not old_mid or not new_mid:
        edits: list[_Edit] = [(prefix, prefix + len(old_mid), new_mid)]
    elif (
        long_cut
        and "\n" not in old_mid
        and "\n" not in new_mid
        and len(old_mid) + len(new_mid) <= CHAR_REFINE_MAX_CHARS
    ):
        # A change inside one long line (the widening above stopped inside it): characters.
        edits = _char_edits(old_mid, new_mid, prefix) or [(prefix, prefix + len(old_mid), new_mid)]
    else:
        edits = _line_edits(old_mid, new_mid, prefix)
    if not long_cut and edits:
        edits[-1] = _own_line_at_eof(edits[-1], old)

    # Old coordinates -> sequential coordinates: shift by the net growth of earlier ops.
    ops: list[TextOp] = []
    shift = 0
    for start, end, ins in edits:
        if end == start and not ins:
            continue
        ops.append(TextOp(start + shift, end - start, ins))
        shift += len(ins) - (end - start)
    return ops


# --------------------------------------------------------------------------------------------
# Apply


class _TextLike(Protocol):
    """The subset of ``pycrdt.Text`` we use (typed here because pycrdt's own hints are loose)."""

    def insert(self, index: int, value: str, attrs: Any = None) -> None: ...

    def __delitem__(self, key: int | slice) -> None: ...


def _check_ops(ops: Sequence[TextOp], old: str) -> None:
    """Reject ops that break the sequential, non-overlapping convention."""
    old_pos = 0  # first old character not yet consumed
    shift = 0
    for op in ops:
        start = op.pos - shift
        if start < old_pos:
            raise ValueError(f"ops overlap or are out of order at {op!r}")
        if start + op.delete > len(old):
            raise ValueError(f"op {op!r} runs past the end of the text")
        old_pos = start + op.delete
        shift += len(op.insert) - op.delete


def apply_ops_to_str(old: str, ops: Iterable[TextOp]) -> str:
    """Pure-Python reference application of ``ops`` (used by tests and for checking)."""
    ops = list(ops)
    _check_ops(ops, old)
    parts: list[str] = []
    old_pos = 0
    shift = 0
    for op in ops:
        start = op.pos - shift
        parts.append(old[old_pos:start])
        parts.append(op.insert)
        old_pos = start + op.delete
        shift += len(op.insert) - op.delete
    parts.append(old[old_pos:])
    return "".join(parts)


def apply_ops(text: Any, ops: Iterable[TextOp], old: str) -> None:
    """Apply ``ops`` (character positions) to the pycrdt ``Text`` ``text``, whose current
    content must be ``old``, converting each position to a UTF-8 byte offset.

    Call inside a transaction to make the whole change one update. Conversion is incremental
    (ops are sorted), so the cost is O(len(old)) in total however many ops there are, not
    O(len(old)) per op.
    """
    ops = list(ops)
    _check_ops(ops, old)
    t: _TextLike = text
    old_pos = 0  # old character index matching `byte_pos` in the *old* text
    old_byte = 0  # UTF-8 offset of old[old_pos] in old
    byte_shift = 0  # net bytes inserted so far (intermediate text vs old)
    char_shift = 0
    for op in ops:
        start = op.pos - char_shift
        old_byte += len(old[old_pos:start].encode("utf-8"))
        deleted = old[start : start + op.delete]
        del_bytes = len(deleted.encode("utf-8"))
        at = old_byte + byte_shift
        if del_bytes:
            del t[at : at + del_bytes]
        if op.insert:
            t.insert(at, op.insert)
        ins_bytes = len(op.insert.encode("utf-8"))
        old_pos = start + op.delete
        old_byte += del_bytes
        byte_shift += ins_bytes - del_bytes
        char_shift += len(op.insert) - op.delete
