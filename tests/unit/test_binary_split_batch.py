"""Regression (found by the chaos soak, tests/chaos, seeds 3700236510 and 853166103): a new
binary file that arrives in the same batch as concurrent versions of another binary file was
never downloaded.

``BinarySync.reconcile`` returned as soon as it split the conflict, before scheduling any
download of that batch, expecting SpaceSync to reconcile everything again; but the reconcile
that follows the split is scoped to what the split touched (the split fid and its conflict
copy), so the new file stayed missing on that device until something else touched it.

In-process: a real SQLite store, folder and protocol objects; the other members' envelopes are
handed to ``handle_remote`` as a relay link would deliver one backlog. BinarySync is built
without a blob link or chunk sources and its workers are not started: what is checked is which
downloads one batch schedules (``BinarySync.down``), not the transfer itself (the binary suite
covers that with real processes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from local_space import make_sync

from qmoi_sync.agent.binary_sync import BinarySync
from qmoi_sync.agent.chunk_store import ChunkStore
from qmoi_sync.agent.index import IndexDoc
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import Store
from qmoi_sync.protocol.chunks import ChunkKeys, ChunkRef, Manifest
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import INDEX_DOC_ID, DocUpdate, Updates, encode_payload

SHARED = "11" * 16
NEW = "22" * 16


class Member:
    """Another device of the space: its own copy of the index, its own envelope stream."""

    def __init__(self, ident: DeviceIdentity, space_id: bytes, msg_key: bytes) -> None:
        self.ident, self.space_id, self.msg_key = ident, space_id, msg_key
        self.dev = ident.public.short_id
        self.index = IndexDoc()
        self.seq = 0

    def seal(self, *updates: bytes) -> bytes:
        self.seq += 1
        payload = encode_payload(Updates(items=[DocUpdate(INDEX_DOC_ID, u) for u in updates]))
        return seal(self.ident, self.space_id, 0, self.msg_key, self.seq, payload)


class Space:
    """The device under test (an in-process SpaceSync with its BinarySync) and two other
    members, a and c, whose envelopes it receives."""

    def __init__(self) -> None:
        admin, other, self.me = (DeviceIdentity.generate() for _ in range(3))
        self.log, secret = MembershipLog.create(admin, time.time())
        for member in (other, self.me):
            self.log.add_member(admin, member.public, Role.member, {0: secret}, time.time())
        epoch_keys = derive_epoch_keys(self.log.space_id, 0, secret)
        self.chunk_keys = ChunkKeys.for_epoch(0, epoch_keys)
        self.a = Member(admin, self.log.space_id, epoch_keys.msg)
        self.c = Member(other, self.log.space_id, epoch_keys.msg)

    def manifest(self, content: bytes, ts: float) -> dict[str, Any]:
        ref = ChunkRef(self.chunk_keys.chunk_id(content), len(content))
        return {**Manifest.build(self.chunk_keys, [ref]).to_json(), "ts": ts}

    async def receiver(self, store: Store, folder: Path) -> tuple[SpaceSync, BinarySync]:
        sync = await make_sync(store, folder, self.me, self.log)
        binary = BinarySync(sync, ChunkStore(store, sync.space_id), None, remote=[])
        await binary.start()
        sync.binary = binary
        sync.subscribe_from()
        return sync, binary


def scheduled(binary: BinarySync) -> dict[str, str]:
    """fid hex -> path of the downloads BinarySync has scheduled."""
    return {fid.hex(): job.path for fid, job in binary.down.items()}


async def test_new_binary_file_in_a_batch_with_a_conflict_split_is_downloaded(
    store: Store, tmp_path: Path
) -> None:
    s = Space()
    a, c = s.a, s.c
    sync, binary = await s.receiver(store, tmp_path / "f")

    # One backlog: a creates shared.bin, c (having seen the creation) writes its own version
    # concurrently with a's, and a adds new.bin.
    now = time.time()
    create = a.index.create(SHARED, "shared.bin", "binary", 0o644, a.dev, now)
    version_a = a.index.put_manifest(SHARED, a.dev, s.manifest(b"\xff v-a " * 100, now + 2), {})
    c.index.apply_update(create)
    version_c = c.index.put_manifest(SHARED, c.dev, s.manifest(b"\xff v-c " * 100, now + 1), {})
    new_file = a.index.create(NEW, "new.bin", "binary", 0o644, a.dev, now + 3)
    new_version = a.index.put_manifest(NEW, a.dev, s.manifest(b"\xff new " * 100, now + 3), {})
    await sync.handle_remote(
        [(1, a.seal(create, version_a)), (2, c.seal(version_c)), (3, a.seal(new_file, new_version))]
    )

    entries = sync.index.entries()
    copies = [fid for fid, e in entries.items() if e.alive and fid not in (SHARED, NEW)]
    assert len(copies) == 1, f"one conflict copy of shared.bin expected: {entries}"
    [copy] = copies
    assert "conflict" in (entries[copy].path or ""), entries[copy]
    due = scheduled(binary)
    assert due.get(NEW) == "new.bin", f"new.bin not scheduled for download: {due}"
    # The split fid and its conflict copy are reconciled again after the split (the next pass
    # of the batch has them in scope): the winner (a's, the latest) and c's version are due.
    assert due.get(SHARED) == "shared.bin", due
    assert due.get(copy) == entries[copy].path, due
    assert binary.down[bytes.fromhex(SHARED)].head.dev == a.dev
    assert binary.down[bytes.fromhex(copy)].head.dev == c.dev


async def test_a_version_that_cannot_be_split_off_does_not_hold_back_the_winner(
    store: Store, tmp_path: Path
) -> None:
    """A concurrent version under a device id no conflict name can carry (garbage from a buggy
    or hostile member): nothing is split, so there is nothing to wait for: the winner is
    downloaded, and the garbage version stays out of the folder."""
    s = Space()
    a, c = s.a, s.c
    sync, binary = await s.receiver(store, tmp_path / "f")
    now = time.time()
    create = a.index.create(SHARED, "shared.bin", "binary", 0o644, a.dev, now)
    version_a = a.index.put_manifest(SHARED, a.dev, s.manifest(b"\xff v-a " * 100, now + 2), {})
    c.index.apply_update(create)
    bad = "not a device!"
    garbage = c.index.put_fields(
        SHARED, {f"m:{bad}": {**s.manifest(b"\xff junk " * 100, now + 1), "vv": {bad: 1}}}
    )
    await sync.handle_remote([(1, a.seal(create, version_a)), (2, c.seal(garbage))])

    assert [fid for fid, e in sync.index.entries().items() if e.alive] == [SHARED]
    assert scheduled(binary) == {SHARED: "shared.bin"}
    assert binary.down[bytes.fromhex(SHARED)].head.dev == a.dev
