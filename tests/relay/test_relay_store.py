"""Unit tests for the relay's SQLite store (no protocol, no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from qmoi_sync.relay.store import (
    AppendStatus,
    RelayStore,
    SpaceLimitError,
    StoredEnvelope,
    StoreError,
)

SPACE = b"S" * 16
OTHER = b"O" * 16
ALICE = b"a" * 32
BOB = b"b" * 32
BIG = 1 << 40


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RelayStore]:
    s = await RelayStore.open(tmp_path)
    assert await s.create_space(SPACE, b"log-v1", max_spaces=10)
    yield s
    await s.close()


async def test_append_assigns_monotonic_seqs_from_one(store: RelayStore) -> None:
    r1 = await store.append(SPACE, ALICE, 1, b"x" * 10, quota_bytes=BIG)
    r2 = await store.append(SPACE, BOB, 7, b"y" * 5, quota_bytes=BIG)
    r3 = await store.append(SPACE, ALICE, 2, b"z", quota_bytes=BIG)
    assert [r.relay_seq for r in (r1, r2, r3)] == [1, 2, 3]
    assert all(r.status is AppendStatus.STORED for r in (r1, r2, r3))
    assert await store.head_seq(SPACE) == 3
    assert await store.bytes_used(SPACE) == 16
    assert await store.sender_max_seq(SPACE, ALICE) == 2
    page = await store.read_page(SPACE, 0)
    assert page == [(1, b"x" * 10), (2, b"y" * 5), (3, b"z")]
    assert await store.read_page(SPACE, 2) == [(3, b"z")]
    assert await store.read_page(SPACE, 3) == []


async def test_duplicate_not_stored(store: RelayStore) -> None:
    assert (await store.append(SPACE, ALICE, 5, b"one", quota_bytes=BIG)).relay_seq == 1
    dup = await store.append(SPACE, ALICE, 5, b"one", quota_bytes=BIG)
    assert dup.status is AppendStatus.DUPLICATE and dup.relay_seq == 1
    assert await store.head_seq(SPACE) == 1
    assert len(await store.read_page(SPACE, 0)) == 1


async def test_late_seq_below_sender_max_is_stored_not_acked_as_duplicate(
    store: RelayStore,
) -> None:
    """The chaos runner's seed 11 (a Publish lost on the way, the next one stored): the
    resend of the lost one was acked as a duplicate without being stored, so the sender forgot
    it and no device ever got that change. The same happens without any network fault when
    the relay's rate limiter or quota drops one publish and a later one gets through."""
    assert (await store.append(SPACE, ALICE, 1, b"first", quota_bytes=BIG)).relay_seq == 1
    # seq 2 was dropped (rate limit, quota, lost frame); seq 3 got through
    assert (await store.append(SPACE, ALICE, 3, b"third", quota_bytes=BIG)).relay_seq == 2
    late = await store.append(SPACE, ALICE, 2, b"second", quota_bytes=BIG)
    assert late.status is AppendStatus.STORED and late.relay_seq == 3
    assert [d for _, d in await store.read_page(SPACE, 0)] == [b"first", b"third", b"second"]
    assert await store.sender_max_seq(SPACE, ALICE) == 3  # the max never goes down
    again = await store.append(SPACE, ALICE, 2, b"second", quota_bytes=BIG)
    assert again.status is AppendStatus.DUPLICATE and again.relay_seq == 3


async def test_duplicates_inside_one_batch(store: RelayStore) -> None:
    futs = [
        store.submit_append(SPACE, ALICE, seq, b"e", quota_bytes=BIG) for seq in (1, 2, 2, 1, 3)
    ]
    results = await asyncio.gather(*futs)
    assert [r.status for r in results] == [
        AppendStatus.STORED,
        AppendStatus.STORED,
        AppendStatus.DUPLICATE,
        AppendStatus.DUPLICATE,
        AppendStatus.STORED,
    ]
    assert [r.relay_seq for r in results] == [1, 2, 2, 1, 3]


async def test_quota(store: RelayStore) -> None:
    assert (await store.append(SPACE, ALICE, 1, b"a" * 60, quota_bytes=100)).relay_seq == 1
    r = await store.append(SPACE, ALICE, 2, b"b" * 60, quota_bytes=100)
    assert r.status is AppendStatus.QUOTA_EXCEEDED
    # Refused envelopes do not advance the sender's seq: the same seq can be retried.
    assert await store.sender_max_seq(SPACE, ALICE) == 1
    assert (await store.append(SPACE, ALICE, 2, b"b" * 40, quota_bytes=100)).relay_seq == 2
    # Make room by dropping the prefix, then the big one fits.
    assert await store.drop_before(SPACE, 2) == 60
    assert await store.bytes_used(SPACE) == 40
    r = await store.append(SPACE, ALICE, 3, b"c" * 60, quota_bytes=100)
    assert r.status is AppendStatus.STORED and r.relay_seq == 3
    assert [s for s, _ in await store.read_page(SPACE, 0)] == [2, 3]


async def test_read_page_bounds(store: RelayStore) -> None:
    for i in range(1, 11):
        await store.append(SPACE, ALICE, i, bytes([i]) * 100, quota_bytes=BIG)
    assert [s for s, _ in await store.read_page(SPACE, 0, max_count=3)] == [1, 2, 3]
    assert [s for s, _ in await store.read_page(SPACE, 0, max_bytes=250)] == [1, 2]
    # One envelope is always returned even if bigger than max_bytes.
    assert [s for s, _ in await store.read_page(SPACE, 4, max_bytes=10)] == [5]


async def test_group_commit_batches_and_listener_order(store: RelayStore) -> None:
    seen: list[int] = []

    def listener(space_id: bytes, envs: Sequence[StoredEnvelope]) -> None:
        assert space_id == SPACE
        seen.extend(e.relay_seq for e in envs)

    store.add_commit_listener(listener)
    futs = [
        store.submit_append(SPACE, ALICE, i, b"x" * 32, quota_bytes=BIG) for i in range(1, 1001)
    ]
    results = await asyncio.gather(*futs)
    assert [r.relay_seq for r in results] == list(range(1, 1001))
    assert seen == list(range(1, 1001))
    assert store.stats.batches < 100  # grouped, not one commit per envelope
    assert store.stats.largest_batch > 10


async def test_persistence_across_reopen(tmp_path: Path) -> None:
    s = await RelayStore.open(tmp_path)
    await s.create_space(SPACE, b"log", max_spaces=10)
    await s.append(SPACE, ALICE, 1, b"hello", quota_bytes=BIG)
    await s.update_log(SPACE, b"log-2")
    await s.close()
    s = await RelayStore.open(tmp_path)
    try:
        rec = await s.get_space(SPACE)
        assert rec is not None and rec.log == b"log-2" and rec.head_seq == 1
        assert await s.sender_max_seq(SPACE, ALICE) == 1
        dup = await s.append(SPACE, ALICE, 1, b"hello", quota_bytes=BIG)
        assert dup.status is AppendStatus.DUPLICATE
        assert (await s.append(SPACE, ALICE, 2, b"again", quota_bytes=BIG)).relay_seq == 2
        assert s.space_count == 1
    finally:
        await s.close()


async def test_space_limit_and_unknown_space(store: RelayStore) -> None:
    assert not await store.create_space(SPACE, b"other", max_spaces=10)  # exists
    with pytest.raises(SpaceLimitError):
        await store.create_space(OTHER, b"log", max_spaces=1)
    with pytest.raises(StoreError):
        await store.append(OTHER, ALICE, 1, b"x", quota_bytes=BIG)
    assert await store.get_space(OTHER) is None


async def test_closed_store_refuses(tmp_path: Path) -> None:
    s = await RelayStore.open(tmp_path)
    await s.close()
    with pytest.raises(StoreError):
        s.submit_append(SPACE, ALICE, 1, b"x", quota_bytes=BIG)
