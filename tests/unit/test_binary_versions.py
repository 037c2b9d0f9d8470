"""agent/binary_sync.py pure parts: manifest heads (version vectors), winner, conflict fids."""

from __future__ import annotations

from typing import Any

from qmoi_sync.agent.binary_sync import choose, conflict_fid, manifest_heads
from qmoi_sync.protocol.chunks import ChunkKeys, ChunkRef, Manifest
from qmoi_sync.protocol.keys import derive_epoch_keys

KEYS = ChunkKeys.for_epoch(0, derive_epoch_keys(bytes(16), 0, b"k" * 32))


def m(content: bytes, vv: dict[str, int], ts: float) -> dict[str, Any]:
    man = Manifest.build(KEYS, [ChunkRef(KEYS.chunk_id(content), len(content))])
    return {**man.to_json(), "vv": vv, "ts": ts}


def test_sequential_edits_single_head() -> None:
    fields = {"m:A": m(b"v1", {"A": 1}, 1.0), "m:B": m(b"v2", {"A": 1, "B": 1}, 2.0)}
    heads = manifest_heads(fields)
    assert [h.dev for h in heads] == ["B"]
    winner, losers = choose(heads)
    assert winner.dev == "B" and losers == {}


def test_concurrent_edits_two_heads_latest_wins() -> None:
    fields = {"m:A": m(b"va", {"A": 2}, 5.0), "m:B": m(b"vb", {"A": 1, "B": 1}, 4.0)}
    heads = manifest_heads(fields)
    assert sorted(h.dev for h in heads) == ["A", "B"]
    winner, losers = choose(heads)
    assert winner.dev == "A"
    assert [h.dev for group in losers.values() for h in group] == ["B"]
    # a split mark hides the loser: one head left
    assert [h.dev for h in manifest_heads({**fields, "x:B": 1})] == ["A"]
    # a later edit by B (counter 2) is a new version again
    later = {**fields, "x:B": 1, "m:B": m(b"vb2", {"A": 1, "B": 2}, 6.0)}
    assert sorted(h.dev for h in manifest_heads(later)) == ["A", "B"]


def test_identical_concurrent_content_is_no_conflict() -> None:
    fields = {"m:A": m(b"same", {"A": 1}, 1.0), "m:B": m(b"same", {"B": 1}, 2.0)}
    _winner, losers = choose(manifest_heads(fields))
    assert losers == {}


def test_garbage_manifests_ignored_and_conflict_fid_deterministic() -> None:
    fields: dict[str, Any] = {
        "m:A": m(b"ok", {"A": 1}, 1.0),
        "m:B": {"v": 1, "chunks": "nope"},
        "m:C": {**m(b"x", {"C": 1}, 1.0), "vv": "bad"},
        "m:D": m(b"y", {"E": 3}, 1.0),  # no own counter
    }
    assert [h.dev for h in manifest_heads(fields)] == ["A"]
    a = conflict_fid(b"k" * 32, b"f" * 16, b"h" * 32)
    assert a == conflict_fid(b"k" * 32, b"f" * 16, b"h" * 32) and len(a) == 16
    assert a != conflict_fid(b"k" * 32, b"f" * 16, b"i" * 32)
