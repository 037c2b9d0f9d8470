"""causal: per-sender in-order release, bounds, and the Yjs v1 decoders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Snapshot, Text, TransactionEvent, XmlElement, XmlFragment
from pycrdt import merge_updates as pycrdt_merge

from qmoi_sync.agent.causal import (
    BufferFull,
    CausalBuffer,
    Released,
    UpdateDecodeError,
    decode_delete_set,
    decode_snapshot,
    decode_state_vector,
    decode_update,
    encode_state_vector,
    missing_dependencies,
)


def capture(doc: Doc[Any], fn: Callable[[], object]) -> bytes:
    out: list[bytes] = []

    def on_commit(event: TransactionEvent) -> None:
        out.append(event.update)

    sub = doc.observe(on_commit)
    with doc.transaction():
        fn()
    doc.unobserve(sub)
    return out[0]


# ------------------------------------------------------------------------------------------
# CausalBuffer


def test_in_order_updates_are_released_immediately() -> None:
    buf = CausalBuffer()
    assert buf.offer("a", 1, b"1") == [Released("a", 1, b"1")]
    assert buf.offer("a", 2, b"2") == [Released("a", 2, b"2")]
    assert buf.next_seq("a") == 3 and buf.next_seq("b") == 1


def test_gap_holds_until_filled_then_releases_in_order() -> None:
    buf = CausalBuffer()
    assert buf.offer("a", 3, b"3") == []
    assert buf.offer("a", 2, b"2") == []
    assert buf.held_count == 2 and buf.held_bytes == 2
    assert buf.gaps() == {"a": (1, 2)}
    assert list(buf) == [("a", 2), ("a", 3)]
    got = buf.offer("a", 1, b"1")
    assert [r.seq for r in got] == [1, 2, 3]
    assert buf.held_count == 0 and buf.held_bytes == 0 and buf.gaps() == {}


def test_senders_are_independent() -> None:
    buf = CausalBuffer()
    assert buf.offer("a", 2, b"a2") == []
    assert buf.offer("b", 1, b"b1") == [Released("b", 1, b"b1")]
    assert [r.update for r in buf.offer("a", 1, b"a1")] == [b"a1", b"a2"]


def test_duplicates_are_dropped() -> None:
    buf = CausalBuffer()
    buf.offer("a", 1, b"1")
    assert buf.offer("a", 1, b"1") == []
    buf.offer("a", 3, b"3")
    assert buf.offer("a", 3, b"3") == []
    assert buf.held_count == 1


def test_bounds_raise_without_storing() -> None:
    buf = CausalBuffer(max_count=2, max_bytes=10)
    buf.offer("a", 5, b"x")
    buf.offer("a", 6, b"x")
    with pytest.raises(BufferFull) as exc:
        buf.offer("a", 7, b"x")
    assert exc.value.sender == "a"
    assert buf.held_count == 2
    buf2 = CausalBuffer(max_bytes=10)
    with pytest.raises(BufferFull):
        buf2.offer("b", 9, b"x" * 11)
    assert buf2.held_bytes == 0
    # The in-order update is never refused, whatever is held.
    assert buf.offer("a", 1, b"y" * 100) == [Released("a", 1, b"y" * 100)]
    with pytest.raises(ValueError):
        CausalBuffer(max_count=0)


def test_set_next_and_drop_sender() -> None:
    buf = CausalBuffer()
    buf.offer("a", 3, b"3")
    buf.offer("a", 5, b"5")
    assert [r.seq for r in buf.set_next("a", 3)] == [3]
    assert buf.next_seq("a") == 4
    assert buf.set_next("a", 2) == []  # never goes back
    assert buf.drop_sender("a") == 1
    assert buf.held_count == 0 and buf.drop_sender("zzz") == 0
    buf.offer("b", 4, b"4")
    assert buf.set_next("b", 10) == []  # stale held update forgotten
    assert buf.held_count == 0 and buf.next_seq("b") == 10


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 12)), max_size=60))
def test_property_release_order_is_per_sender_consecutive(offers: list[tuple[str, int]]) -> None:
    buf = CausalBuffer()
    released: dict[str, list[int]] = {}
    for sender, seq in offers:
        for r in buf.offer(sender, seq, f"{sender}{seq}".encode()):
            assert r.update == f"{r.sender}{r.seq}".encode()
            released.setdefault(str(r.sender), []).append(r.seq)
    for seqs in released.values():
        assert seqs == list(range(1, len(seqs) + 1))
    for sender in "abc":
        assert buf.next_seq(sender) == len(released.get(sender, [])) + 1


# ------------------------------------------------------------------------------------------
# decoders


def rich_doc() -> Doc[Any]:
    """A document using every kind of content the decoder must skip correctly."""
    x: Doc[Any] = Doc(client_id=12345)
    arr = x.get("arr", type=Array)
    arr.append(1)
    arr.append({"a": [1, 2.5, None, True, "s", b"bytes"], "n": -(2**40)})
    arr.append(Map({"k": Text("nested")}))
    tt = x.get("tx", type=Text)
    tt += "hé😀"
    tt.insert_embed(1, {"img": "x"})
    tt.format(0, 1, {"bold": True})
    del tt[0:1]
    fr = x.get("xml", type=XmlFragment)
    fr.children.append(XmlElement("p", {"a": "b"}))
    return x


def test_decode_update_matches_state_vector_on_every_content_kind() -> None:
    x = rich_doc()
    full = x.get_update()
    dec = decode_update(full)
    sv = decode_state_vector(x.get_state())
    assert {c: max(e for _s, e in spans) for c, spans in dec.ranges.items()} == sv
    assert dec.deletes  # the deleted "h" and the format markers
    assert missing_dependencies(Doc().get_state(), full) is False


def test_encode_state_vector_roundtrip_and_accepted_by_pycrdt() -> None:
    x = rich_doc()
    sv = decode_state_vector(x.get_state())
    enc = encode_state_vector(sv)
    assert decode_state_vector(enc) == sv
    assert x.get_update(enc) is not None


def test_decode_snapshot_and_delete_set() -> None:
    d: Doc[Any] = Doc(client_id=7)
    t = d.get("content", type=Text)
    t += "abcdef"
    del t[1:3]
    del t[2:3]
    sv, ds = decode_snapshot(Snapshot.from_doc(d).encode())
    assert sv == {7: 6}
    assert ds == {7: [(1, 2), (4, 1)]}
    assert decode_delete_set(b"\x01\x07\x02\x01\x02\x03\x01") == {7: [(1, 3)]}  # merged


def test_merged_update_with_skip_struct() -> None:
    d: Doc[Any] = Doc(client_id=5)
    t = d.get("content", type=Text)
    u = [
        capture(d, lambda: t.insert(0, "abc")),
        capture(d, lambda: t.insert(3, "def")),
        capture(d, lambda: t.insert(6, "ghi")),
    ]
    merged = pycrdt_merge(u[0], u[2])  # has a Skip over u[1]
    assert decode_update(merged).ranges == {5: [(0, 3), (6, 9)]}
    assert missing_dependencies(Doc().get_state(), merged) is True
    e: Doc[Any] = Doc()
    e.apply_update(u[0])
    e.apply_update(u[1])
    assert missing_dependencies(e.get_state(), merged) is False


def test_delete_of_an_unseen_item_is_a_missing_dependency() -> None:
    a: Doc[Any] = Doc(client_id=1)
    t = a.get("content", type=Text)
    ins = capture(a, lambda: t.insert(0, "foo"))
    rm = capture(a, lambda: t.__delitem__(slice(0, 1)))  # pure delete-set update
    assert decode_update(rm).ranges == {}
    assert missing_dependencies(Doc().get_state(), rm) is True
    d: Doc[Any] = Doc()
    d.apply_update(ins)
    assert missing_dependencies(d.get_state(), rm) is False


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x01\x01\x05",
        b"\xff" * 12,
        b"\x05\x00",
        b"\x00\x00\x00",
        b"\x01\x01\x01\x00\x1f",
    ],
)
def test_malformed_updates_raise_update_decode_error(data: bytes) -> None:
    with pytest.raises(UpdateDecodeError):
        decode_update(data)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_property_decoders_never_raise_anything_else(data: bytes) -> None:
    for fn in (decode_update, decode_state_vector, decode_delete_set, decode_snapshot):
        try:
            fn(data)
        except UpdateDecodeError:
            pass


@settings(max_examples=300)
@given(st.data())
def test_property_mutated_real_updates_never_crash_the_decoder(data: st.DataObject) -> None:
    full = bytearray(rich_doc().get_update())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(full) - 1))
        full[i] = data.draw(st.integers(0, 255))
    try:
        missing_dependencies(b"\x00", bytes(full))
    except UpdateDecodeError:
        pass
