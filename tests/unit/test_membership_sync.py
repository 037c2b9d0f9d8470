"""SpaceSync and membership: which envelopes a device accepts as the log changes, and what a
device that may not send does with local edits. Real SQLite store, real protocol objects, no
relay (envelopes are handed to `handle_remote` as a relay link would)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_space import make_sync

from qmoi_sync.agent import space as space_mod
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import Store
from qmoi_sync.agent.textdoc import ingest_disk_text, new_text_doc
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import DeviceInfo, DocUpdate, Updates, encode_payload


@dataclass
class World:
    admin: DeviceIdentity
    member: DeviceIdentity  # the receiving device
    gone: DeviceIdentity  # removed in `after`
    reader: DeviceIdentity
    before: MembershipLog  # epoch 0, everyone a member
    after: MembershipLog  # `gone` removed: epoch 1
    secrets: dict[int, bytes]
    seqs: dict[bytes, int]

    def seal(self, sender: DeviceIdentity, epoch: int, payload: bytes) -> bytes:
        pk = sender.public.sign_pk
        self.seqs[pk] = self.seqs.get(pk, 0) + 1
        space = self.before.space_id
        key = derive_epoch_keys(space, epoch, self.secrets[epoch]).msg
        return seal(sender, space, epoch, key, self.seqs[pk], payload)

    def info(self, sender: DeviceIdentity, epoch: int, name: str) -> bytes:
        return self.seal(sender, epoch, encode_payload(DeviceInfo(name, "test", "0")))

    def edit(self, sender: DeviceIdentity, epoch: int) -> bytes:
        update = ingest_disk_text(new_text_doc(), "some text\n")
        assert update is not None
        items = [DocUpdate(doc_id=b"\x07" * 16, update=update)]
        return self.seal(sender, epoch, encode_payload(Updates(items=items)))


def make_world() -> World:
    admin, member, gone, reader = (DeviceIdentity.generate() for _ in range(4))
    log, s0 = MembershipLog.create(admin, time.time())
    log.add_member(admin, member.public, Role.member, {0: s0}, time.time())
    log.add_member(admin, gone.public, Role.member, {0: s0}, time.time())
    log.add_member(admin, reader.public, Role.reader, {0: s0}, time.time())
    before = log.copy()
    _op, s1 = log.remove_member(admin, gone.public.sign_pk, time.time())
    return World(admin, member, gone, reader, before, log, {0: s0, 1: s1}, {})


async def names(store: Store, sync: SpaceSync) -> set[str]:
    return {i["name"] for i in (await store.device_infos(sync.space_id)).values()}


async def test_future_epoch_waits_for_the_log_that_explains_it(
    store: Store, tmp_path: Path
) -> None:
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.before)
    waiting = asyncio.Event()
    original = sync._await_new_keyring

    async def spy(before: Keyring) -> bool:
        waiting.set()
        return await original(before)

    sync._await_new_keyring = spy  # type: ignore[method-assign]
    env = w.info(w.admin, 1, "admin-in-epoch-1")
    task = asyncio.create_task(sync.handle_remote([(1, env)]))
    await asyncio.wait_for(waiting.wait(), 5)
    assert sync.cursor == 0 and sync.stats.quarantined == 0
    sync.set_keyring(Keyring.build(w.after, w.member))  # the Membership frame arrives
    await asyncio.wait_for(task, 5)
    assert sync.stats.quarantined == 0 and sync.cursor == 1
    assert await names(store, sync) == {"admin-in-epoch-1"}
    assert sync.epoch_fence == 1


async def test_unexplained_future_epoch_is_quarantined_and_waited_for_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.before)
    monkeypatch.setattr(space_mod, "MEMBERSHIP_WAIT_S", 0.2)
    await asyncio.wait_for(sync.handle_remote([(1, w.info(w.admin, 1, "x"))]), 5)
    assert sync.stats.quarantined == 1 and sync.cursor == 1
    # Same log version: no second wait, even if waiting would now take forever.
    monkeypatch.setattr(space_mod, "MEMBERSHIP_WAIT_S", 3600)
    await asyncio.wait_for(sync.handle_remote([(2, w.info(w.admin, 1, "y"))]), 5)
    assert sync.stats.quarantined == 2 and sync.cursor == 2


async def test_unknown_sender_is_quarantined_after_the_wait(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.before)
    monkeypatch.setattr(space_mod, "MEMBERSHIP_WAIT_S", 0.2)
    stranger = DeviceIdentity.generate()
    await asyncio.wait_for(sync.handle_remote([(1, w.info(stranger, 0, "stranger"))]), 5)
    assert sync.stats.quarantined == 1
    assert await names(store, sync) == set()


async def test_removed_device_is_accepted_until_the_fence(store: Store, tmp_path: Path) -> None:
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.after)
    # Sealed before its removal (epoch 0) and delivered before any epoch-1 envelope: accepted
    # (a device catching up, or joining later, must still get what it wrote as a member).
    await sync.handle_remote([(1, w.info(w.gone, 0, "gone-before"))])
    assert sync.stats.quarantined == 0 and sync.epoch_fence == 0
    # The first envelope of the new epoch is the fence.
    await sync.handle_remote([(2, w.info(w.admin, 1, "admin"))])
    assert sync.epoch_fence == 1
    # Anything the removed device still seals with its old key after that is refused.
    await sync.handle_remote([(3, w.info(w.gone, 0, "gone-after")), (4, w.edit(w.gone, 0))])
    assert sync.stats.quarantined == 2
    assert await names(store, sync) == {"gone-before", "admin"}
    # It can never seal a new-epoch envelope (no key); and the fence survives a restart.
    again = await make_sync(store, tmp_path / "folder", w.member, w.after)
    assert again.epoch_fence == 1


async def test_content_from_a_reader_is_quarantined(store: Store, tmp_path: Path) -> None:
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.before)
    await sync.handle_remote([(1, w.info(w.reader, 0, "reader")), (2, w.edit(w.reader, 0))])
    assert sync.stats.quarantined == 1
    assert await names(store, sync) == {"reader"}  # its announcement is harmless
    await sync.handle_remote([(3, w.edit(w.admin, 0))])
    assert sync.stats.quarantined == 1  # the same content from a writer is applied


@pytest.mark.parametrize("who", ["reader", "gone"])
async def test_a_device_that_may_not_send_never_seals(
    store: Store, tmp_path: Path, who: str
) -> None:
    w = make_world()
    me = w.reader if who == "reader" else w.gone
    sync = await make_sync(store, tmp_path / "folder", me, w.after)
    (sync.root / "local.txt").write_text("my own edit\n")
    await sync.rescan()
    await sync.handle_local({"local.txt"})
    await sync.send_device_info("me", "test", "0")
    assert await store.outbox_count(sync.space_id) == 0
    assert sync.seq == 0 and not sync.index.entries()
    block = "read-only member" if who == "reader" else "this device was removed from the space"
    assert sync.warnings["held:local.txt"] == f"{block}: local change to local.txt not synced"
    # Reverting the change (deleting the never-synced file) clears the warning.
    (sync.root / "local.txt").unlink()
    await sync.handle_local({"local.txt"})
    assert "held:local.txt" not in sync.warnings
