"""One regression test per pycrdt 0.14 trap listed in design-brief §4.

Each test first shows the hazard with raw pycrdt (so a pycrdt upgrade that changes the
behaviour is noticed), then shows that our code avoids it. Measured with pycrdt 0.14.13
(yrs 0.28).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from pycrdt import Doc, Map, Text, TransactionEvent

from qmoi_sync.agent.causal import CausalBuffer, missing_dependencies
from qmoi_sync.agent.index import IndexDoc
from qmoi_sync.agent.textdiff import apply_ops, diff_ops
from qmoi_sync.agent.textdoc import ingest_disk_text, load_text_doc, new_text_doc, text_of


def capture(doc: Doc[Any], fn: Callable[[], object]) -> bytes:
    """Run ``fn`` in one transaction of ``doc`` and return that transaction's update."""
    out: list[bytes] = []

    def on_commit(event: TransactionEvent) -> None:
        out.append(event.update)

    sub = doc.observe(on_commit)
    try:
        with doc.transaction():
            fn()
    finally:
        doc.unobserve(sub)
    assert len(out) == 1
    return out[0]


# ------------------------------------------------------------------------------------------
# Trap 1: updates applied out of causal order are silently lost.
#
# Reproduced with 0.14.13: when updates are held "pending" by yrs (one has a clock gap, another
# references an item not yet present) and the missing one then arrives, a pending update can be
# DROPPED: its content never appears and the state vector does not cover it. The doc does not
# raise. A state-vector resync (sync step 1/2) repairs it, because the state vector shows the
# gap; applying each sender's updates in that sender's order avoids it altogether.


def _map_scenario() -> tuple[bytes, bytes, bytes]:
    b: Doc[Any] = Doc(client_id=3)
    mb = b.get("m", type=Map)
    u0 = capture(b, lambda: mb.__setitem__("a", "from-b"))  # b#1
    u1 = capture(b, lambda: mb.__setitem__("b", "from-b"))  # b#2
    a: Doc[Any] = Doc(client_id=1)
    ma = a.get("m", type=Map)
    a.apply_update(u0)
    u2 = capture(a, lambda: ma.__setitem__("a", "from-a"))  # a#1, overwrites b#1's key
    return u0, u1, u2


def test_out_of_order_loss_reproduced_with_raw_pycrdt() -> None:
    u0, u1, u2 = _map_scenario()
    d: Doc[Any] = Doc()
    m = d.get("m", type=Map)
    for u in (u1, u2, u0):  # b#2 (gap), a#1 (needs b#1), then b#1
        d.apply_update(u)
    assert m.to_py() == {"b": "from-b"}  # "a" is gone, no error raised
    ref: Doc[Any] = Doc()
    for u in (u0, u1, u2):
        ref.apply_update(u)
    assert ref.get("m", type=Map).to_py() == {"a": "from-a", "b": "from-b"}
    # The loss is visible in the state vector, so sync step 1/2 (the safety net) repairs it.
    assert d.get_state() != ref.get_state()
    d.apply_update(ref.get_update(d.get_state()))
    assert m.to_py() == {"a": "from-a", "b": "from-b"}


def test_out_of_order_avoided_by_per_sender_order() -> None:
    u0, u1, u2 = _map_scenario()
    tagged = {u0: ("B", 1), u1: ("B", 2), u2: ("A", 1)}
    for arrival in itertools.permutations((u0, u1, u2)):
        buf = CausalBuffer()
        d: Doc[Any] = Doc()
        m = d.get("m", type=Map)
        for u in arrival:
            sender, seq = tagged[u]
            for rel in buf.offer(sender, seq, u):
                d.apply_update(rel.update)
        assert m.to_py() == {"a": "from-a", "b": "from-b"}, arrival


def test_missing_dependencies_flags_both_hazardous_updates() -> None:
    u0, u1, u2 = _map_scenario()
    empty = Doc().get_state()
    assert missing_dependencies(empty, u0) is False
    assert missing_dependencies(empty, u1) is True  # clock gap: b#1 missing
    assert missing_dependencies(empty, u2) is True  # overwrites an item we lack
    d: Doc[Any] = Doc()
    d.apply_update(u0)
    assert missing_dependencies(d.get_state(), u1) is False
    assert missing_dependencies(d.get_state(), u2) is False


def _random_history(rng: random.Random) -> list[tuple[int, int, bytes]]:
    """Three replicas making random text and map edits with random partial syncs.

    Returns (sender, seq, update) in creation order.
    """
    reps: list[Doc[Any]] = [Doc(client_id=i + 1) for i in range(3)]
    log: list[tuple[int, int, bytes]] = []
    seen: list[set[int]] = [set() for _ in reps]
    seqs = [0, 0, 0]
    for _ in range(rng.randint(3, 14)):
        i = rng.randrange(3)
        t = reps[i].get("content", type=Text)
        m = reps[i].get("m", type=Map)

        def op(t: Text = t, m: Map[Any] = m) -> None:
            s = str(t)
            if rng.random() < 0.3:
                m[rng.choice("ab")] = str(rng.random())
            elif s and rng.random() < 0.4:
                a = rng.randrange(len(s))
                b = min(len(s), a + rng.randint(1, 3))
                del t[len(s[:a].encode()) : len(s[:b].encode())]
            else:
                a = rng.randint(0, len(s))
                t.insert(len(s[:a].encode()), rng.choice(["x", "yz", "é"]))

        seqs[i] += 1
        log.append((i, seqs[i], capture(reps[i], op)))
        seen[i].add(len(log) - 1)
        if rng.random() < 0.5:
            j = rng.randrange(3)
            for k in range(len(log)):
                if k not in seen[j]:
                    reps[j].apply_update(log[k][2])
                    seen[j].add(k)
    return log


def _content(d: Doc[Any]) -> tuple[str, Any]:
    return str(d.get("content", type=Text)), d.get("m", type=Map).to_py()


def test_random_histories_lose_data_in_random_order_but_never_through_the_buffer() -> None:
    rng = random.Random(20251124)
    lost_raw = 0
    for _ in range(400):
        log = _random_history(rng)
        ref: Doc[Any] = Doc()
        for _s, _q, u in log:
            ref.apply_update(u)
        expected = _content(ref)
        arrival = list(log) + rng.sample(log, k=len(log) // 3)  # reordered, with duplicates
        rng.shuffle(arrival)

        raw: Doc[Any] = Doc()
        for _s, _q, u in arrival:
            raw.apply_update(u)
        if _content(raw) != expected:
            lost_raw += 1

        buf = CausalBuffer()
        ours: Doc[Any] = Doc()
        for sender, seq, u in arrival:
            for rel in buf.offer(sender, seq, u):
                ours.apply_update(rel.update)
        assert buf.held_count == 0
        assert _content(ours) == expected
    # The hazard is real with 0.14.13 (about a fifth of these histories lose something).
    # If this drops to 0 after a pycrdt upgrade, upstream fixed it: keep the discipline anyway.
    assert lost_raw > 0


# ------------------------------------------------------------------------------------------
# Trap 2: Text indices are UTF-8 byte offsets; a position inside a multi-byte character
# misplaces an insert silently (0.14.13 appends it at the end) and makes a delete panic.


def test_text_indices_are_utf8_bytes_raw_hazard() -> None:
    d: Doc[Any] = Doc()
    d["content"] = t = Text()
    t += "héllo"
    assert len(t) == 6  # bytes, not characters
    t.insert(2, "X")  # Python index 2 = after "hé"; byte 2 is inside "é"
    assert str(t) != "héXllo"  # silently wrong (0.14.13 gives "hélloX")
    d2: Doc[Any] = Doc()
    d2["content"] = t2 = Text()
    t2 += "😀b"
    with pytest.raises(BaseException) as exc:  # pyo3 PanicException is a BaseException
        del t2[1:2]
    assert not isinstance(exc.value, Exception)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("héllo", "héXllo"),
        ("😀b", "😀Xb"),
        ("😀b😀", "😀😀"),
        ("中文e\u0301\r\n", "中e\u0302\r\n文"),
    ],
)
def test_text_indices_converted_by_apply_ops(old: str, new: str) -> None:
    d: Doc[Any] = Doc()
    d["content"] = t = Text()
    t += old
    with d.transaction():
        apply_ops(t, diff_ops(old, new), old)
    assert str(t) == new


# ------------------------------------------------------------------------------------------
# Trap 3: the same disk content ingested independently on two devices is duplicated.


def _naive_ingest(doc: Doc[Any], new: str) -> bytes:
    """What a straightforward implementation does: edit the doc with its own client id."""
    t = doc.get("content", type=Text)
    old = str(t)
    return capture(doc, lambda: apply_ops(t, diff_ops(old, new), old))


def test_duplicate_ingest_doubles_text_with_raw_pycrdt() -> None:
    a: Doc[Any] = Doc()
    b: Doc[Any] = Doc()
    ua = _naive_ingest(a, "README\n")
    ub = _naive_ingest(b, "README\n")
    a.apply_update(ub)
    b.apply_update(ua)
    assert str(a.get("content", type=Text)) == "README\nREADME\n"


def test_duplicate_ingest_prevented_by_deterministic_client_id() -> None:
    # Initial seed on both devices (folder already present when a device joins).
    a, b = new_text_doc(), new_text_doc()
    ua = ingest_disk_text(a, "README\n")
    ub = ingest_disk_text(b, "README\n")
    assert ua is not None and ua == ub
    a.apply_update(ub)
    b.apply_update(ua)
    assert text_of(a) == text_of(b) == "README\n"
    # A later identical change on both (git pull on both machines).
    ua = ingest_disk_text(a, "README\nmore\n")
    ub = ingest_disk_text(b, "README\nmore\n")
    assert ua is not None and ub is not None
    a.apply_update(ub)
    b.apply_update(ua)
    assert text_of(a) == text_of(b) == "README\nmore\n"
    # And it still merges with a third replica that took a different route.
    c = load_text_doc(a.get_update())
    assert text_of(c) == "README\nmore\n"


# ------------------------------------------------------------------------------------------
# Trap 4: concurrent writes to one Map key are won by the highest client id (not the latest
# write), and integers come back as floats.


def test_map_lww_by_client_id_and_ints_as_floats_raw() -> None:
    low: Doc[Any] = Doc(client_id=1)
    high: Doc[Any] = Doc(client_id=2)
    u_high = capture(high, lambda: high.get("m", type=Map).__setitem__("k", 1))  # earlier
    u_low = capture(low, lambda: low.get("m", type=Map).__setitem__("k", 2))  # later
    for d, other in ((low, u_high), (high, u_low)):
        d.apply_update(other)
        value = d.get("m", type=Map)["k"]
        assert value == 1.0 and isinstance(value, float)  # highest client id won, as a float


def test_index_keeps_types_and_picks_the_same_winner_everywhere() -> None:
    fid = "ab" * 16
    base = IndexDoc(client_id=50)
    seed = base.create(fid, "f.txt", "text", 0o644, "AAAAAAA", 1.0)
    reps = [IndexDoc(client_id=cid) for cid in (10, 20, 30)]
    for r in reps:
        r.apply_update(seed)
    updates = [
        reps[0].set_mode(fid, 0o755, "AAAAAAA"),
        reps[1].set_mode(fid, 0o700, "BBBBBBB"),
        reps[2].rename(fid, "g.txt", "CCCCCCC"),
    ]
    for order in itertools.permutations(range(3)):
        r = IndexDoc(client_id=99)
        r.apply_update(seed)
        for i in order:
            r.apply_update(updates[i])
        e = r.entries()[fid]
        assert e.mode == 0o700 and type(e.mode) is int  # client 20 > 10 wins, an int
        assert e.path == "g.txt"
        assert e.edits == {"AAAAAAA": 2, "BBBBBBB": 1, "CCCCCCC": 1}
        assert all(type(v) is int for v in e.edits.values())


# ------------------------------------------------------------------------------------------
# Trap 5: fragmentation. Edits at random character positions split the text into many items
# and make later edits slower; line-level diffs keep the op count low. (Op counts asserted,
# never timings.)


def test_line_level_edits_keep_op_counts_low() -> None:
    rng = random.Random(7)
    lines = [f"{i:04d} " + " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(8))
             for i in range(400)]  # fmt: skip
    old = "\n".join(lines) + "\n"
    doc = new_text_doc()
    ingest_disk_text(doc, old)
    total_ops = 0
    for step in range(50):
        new_lines = text_of(doc).splitlines()
        i = rng.randrange(len(new_lines))
        choice = step % 3
        if choice == 0:
            new_lines[i] = new_lines[i].replace("beta", "BETA", 1) + " edited"
        elif choice == 1:
            new_lines.insert(i, f"inserted line {step}")
        else:
            del new_lines[i]
        new = "\n".join(new_lines) + "\n"
        ops = diff_ops(text_of(doc), new)
        assert len(ops) <= 2, ops  # one local edit -> at most two ops
        total_ops += len(ops)
        ingest_disk_text(doc, new)
        assert text_of(doc) == new
    assert total_ops <= 100


def test_whole_paragraph_rewrite_is_not_fragmented() -> None:
    old = "".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(50))
    new = "".join(f"a completely different sentence number {i * 3}\n" for i in range(50))
    # A character-level diff of these would produce hundreds of interleaved tiny ops.
    assert len(diff_ops(old, new)) <= 50
    assert len(diff_ops("x\n" + old, "x\n" + new + "tail\n")) <= 51
