"""textdoc: deterministic ingest (no doubled text), incremental updates, merging, cost."""

from __future__ import annotations

import time
from typing import Any

from pycrdt import Doc

from qmoi_sync.agent.causal import decode_state_vector
from qmoi_sync.agent.textdoc import (
    deterministic_client_id,
    ingest_disk_text,
    load_text_doc,
    new_text_doc,
    text_of,
)


def exchange(*docs: Doc[Any]) -> None:
    """Full pairwise state exchange (what sync step 1/2 would achieve)."""
    states = [d.get_update() for d in docs]
    for d in docs:
        for s in states:
            d.apply_update(s)


def test_new_load_and_text_of() -> None:
    doc = new_text_doc()
    assert text_of(doc) == ""
    assert ingest_disk_text(doc, "héllo 😀\n") is not None
    again = load_text_doc(doc.get_update())
    assert text_of(again) == "héllo 😀\n"


def test_ingest_equal_text_is_none() -> None:
    doc = new_text_doc()
    ingest_disk_text(doc, "x\n")
    assert ingest_disk_text(doc, "x\n") is None
    assert ingest_disk_text(new_text_doc(), "") is None


def test_ingest_update_is_incremental_and_applies_elsewhere() -> None:
    a = new_text_doc()
    seed = ingest_disk_text(a, "line one\nline two\n")
    assert seed is not None
    b = load_text_doc(seed)
    upd = ingest_disk_text(a, "line one\nline 2\n")
    assert upd is not None
    assert len(upd) < 60  # only this change, not the document
    b.apply_update(upd)
    assert text_of(b) == "line one\nline 2\n"


def test_seed_same_content_on_two_replicas_does_not_double() -> None:
    a, b = new_text_doc(), new_text_doc()
    ua = ingest_disk_text(a, "shared\ncontent\n")
    ub = ingest_disk_text(b, "shared\ncontent\n")
    assert ua == ub  # same client id, same clock, same bytes
    exchange(a, b)
    assert text_of(a) == text_of(b) == "shared\ncontent\n"


def test_identical_later_modification_on_two_replicas_does_not_double() -> None:
    a = new_text_doc()
    ingest_disk_text(a, "v1\nbody\n")
    b = load_text_doc(a.get_update())
    ua = ingest_disk_text(a, "v1\nbody\nappended by git pull\n")
    ub = ingest_disk_text(b, "v1\nbody\nappended by git pull\n")
    assert ua == ub
    exchange(a, b)
    assert text_of(a) == text_of(b) == "v1\nbody\nappended by git pull\n"
    # ...and again after the identical change, replicas stay in lock step.
    ua = ingest_disk_text(a, "v2\nbody\nappended by git pull\n")
    ub = ingest_disk_text(b, "v2\nbody\nappended by git pull\n")
    exchange(a, b)
    assert text_of(a) == text_of(b) == "v2\nbody\nappended by git pull\n"


def test_identical_change_on_three_replicas_with_client_id_of_each_doc_differing() -> None:
    # The docs' own client ids are irrelevant: only the temp doc's deterministic id counts.
    docs = [new_text_doc(client_id=cid) for cid in (11, 22, 33)]
    for d in docs:
        ingest_disk_text(d, "a\nb\nc\n")
    exchange(*docs)
    for d in docs:
        ingest_disk_text(d, "a\nB\nc\n")
    exchange(*docs)
    assert {text_of(d) for d in docs} == {"a\nB\nc\n"}


def test_different_concurrent_edits_both_survive() -> None:
    a = new_text_doc()
    ingest_disk_text(a, "one\ntwo\nthree\n")
    b = load_text_doc(a.get_update())
    ingest_disk_text(a, "ONE\ntwo\nthree\n")
    ingest_disk_text(b, "one\ntwo\nthree\nfour\n")
    exchange(a, b)
    assert text_of(a) == text_of(b) == "ONE\ntwo\nthree\nfour\n"


def test_different_seeds_are_both_kept() -> None:
    # Different content seeded concurrently is a real concurrent insertion: both survive.
    # (In the agent this never happens within one fid: fids derive from path + content.)
    a, b = new_text_doc(), new_text_doc()
    ingest_disk_text(a, "alpha\n")
    ingest_disk_text(b, "beta\n")
    exchange(a, b)
    assert text_of(a) == text_of(b)
    assert sorted(text_of(a).splitlines()) == ["alpha", "beta"]


def test_same_text_reached_by_different_histories_merges_safely() -> None:
    # Same visible text, different logical state: client ids must differ (no id reuse with
    # different content, which would corrupt), and the merge is an ordinary concurrent edit.
    a, b = new_text_doc(), new_text_doc()
    ingest_disk_text(a, "xy\n")
    ingest_disk_text(b, "x\n")
    ingest_disk_text(b, "xy\n")
    assert text_of(a) == text_of(b)
    ua = ingest_disk_text(a, "xyz\n")
    ub = ingest_disk_text(b, "xyz\n")
    assert ua != ub
    exchange(a, b)
    assert text_of(a) == text_of(b)


def test_deterministic_client_id_properties() -> None:
    cid = deterministic_client_id(b"state", "old", "new")
    assert cid == deterministic_client_id(b"state", "old", "new")
    assert 0 < cid < 2**53
    assert cid != deterministic_client_id(b"state", "old", "new!")
    assert cid != deterministic_client_id(b"state2", "old", "new")
    # Length prefixes: moving a boundary between fields changes the id.
    assert deterministic_client_id(b"", "ab", "c") != deterministic_client_id(b"", "a", "bc")


def test_base_state_preserves_remote_edits_made_since_materialization() -> None:
    local = new_text_doc()
    ingest_disk_text(local, "title\nbody\nfooter\n")
    materialized = local.get_update()  # what was written to disk
    remote = load_text_doc(materialized)
    remote_upd = ingest_disk_text(remote, "title\nbody\nfooter\nremote line\n")
    assert remote_upd is not None
    local.apply_update(remote_upd)  # arrived before we re-wrote the file
    # The user edits the file on disk, starting from what was materialized:
    upd = ingest_disk_text(local, "TITLE\nbody\nfooter\n", base_state=materialized)
    assert upd is not None
    # Without base_state this ingest would have deleted "remote line".
    assert text_of(local) == "TITLE\nbody\nfooter\nremote line\n"
    remote.apply_update(upd)
    assert text_of(remote) == text_of(local)


def test_unicode_ingest_roundtrip() -> None:
    doc = new_text_doc()
    for version in ["", "é\n", "é😀\r\n中文\n", "e\u0301😀\r\n文\n", "👩\u200d💻\n"]:
        ingest_disk_text(doc, version)
        assert text_of(doc) == version


def test_measure_one_char_edit_on_a_megabyte(capsys: Any) -> None:
    """Prints the measured cost (not asserted: timings vary); asserts the update is tiny."""
    big = "".join(
        f"line {i:06d} lorem ipsum dolor sit amet é😀 {i * 31 % 997}\n" for i in range(22_000)
    )
    assert len(big.encode()) > 1024 * 1024
    doc = new_text_doc()
    t0 = time.perf_counter()
    ingest_disk_text(doc, big)
    seed_s = time.perf_counter() - t0
    mid = len(big) // 2
    edited = big[:mid] + ("X" if big[mid] != "X" else "Y") + big[mid + 1 :]
    t0 = time.perf_counter()
    upd = ingest_disk_text(doc, edited)
    edit_s = time.perf_counter() - t0
    assert upd is not None
    assert len(upd) < 1024
    assert text_of(doc) == edited
    # State vector growth: every ingest adds one (deterministic) client id.
    sv_before = len(doc.get_state())
    for i in range(20):
        ingest_disk_text(doc, text_of(doc) + f"append {i}\n")
    sv_after = len(doc.get_state())
    assert len(decode_state_vector(doc.get_state())) == 22
    with capsys.disabled():
        print(
            f"\n[textdoc] 1 MiB doc ({len(big.encode())} B): seed ingest {seed_s * 1e3:.1f} ms, "
            f"1-char edit ingest {edit_s * 1e3:.1f} ms, update {len(upd)} B, "
            f"state vector {sv_before} B -> {sv_after} B after 20 more ingests"
        )
