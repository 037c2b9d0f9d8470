"""IndexDoc.batch(): many index changes in one transaction and one update."""

from __future__ import annotations

import pytest

from qmoi_sync.agent.index import IndexDoc

FIDS = [f"{i:032x}" for i in range(1, 4)]


def test_batch_yields_one_update_equal_to_the_single_changes() -> None:
    batched = IndexDoc()
    with batched.batch() as updates:
        for n, fid in enumerate(FIDS):
            assert batched.create(fid, f"dir/f{n}.txt", "text", 0o644, "devA", 100.0 + n) == b""
            # set_mtime requires the entry: the create just before is visible in the batch
            assert batched.set_mtime(fid, 1_000 + n) == b""
        # reads inside the batch see its writes
        assert batched.entry(FIDS[0]) is not None
    assert len(updates) == 1

    single = IndexDoc()
    for n, fid in enumerate(FIDS):
        single.create(fid, f"dir/f{n}.txt", "text", 0o644, "devA", 100.0 + n)
        single.set_mtime(fid, 1_000 + n)

    replica = IndexDoc()
    replica.apply_update(updates[0])
    assert replica.entries() == batched.entries() == single.entries()
    assert set(replica.take_changed()) == set(FIDS)
    assert {fid: e.mtime_ns for fid, e in replica.entries().items()} == {
        fid: 1_000 + n for n, fid in enumerate(FIDS)
    }
    # outside a batch mutators return their own update again
    assert batched.record_edit(FIDS[0], "devA") not in (b"", b"\x00\x00")


def test_empty_batch_and_nesting() -> None:
    ix = IndexDoc()
    with ix.batch() as updates:
        pass
    assert updates in ([], [b"\x00\x00"])
    with ix.batch(), pytest.raises(RuntimeError), ix.batch():
        pass
    # the failed nesting left the index usable
    ix.create(FIDS[0], "a.txt", "text", 0o644, "devA", 1.0)
    assert ix.entry(FIDS[0]) is not None
