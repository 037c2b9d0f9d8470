"""A save the watcher has not delivered yet, when a remote edit of the same file is written:
the write must not replace the saved file (the save would be lost for good: the watcher then
sees the remote text, which holds no trace of it). Found by tests/faults' clock-skew scenario
(three devices appending to one file at the same instant lost one device's line).

Two in-process devices on real SQLite stores and real folders; A's envelopes are handed to B's
`handle_remote` as the relay would. B's save lands at the worst moment: after B looked for unsaved
local changes (`_absorb_unsaved`, before applying) and before its write of the merged text — the
test puts it there by running it just before the real `write_files_atomic`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from local_space import make_sync

from qmoi_sync.agent import space as space_mod
from qmoi_sync.agent.materialize import WriteJob, write_files_atomic
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import Store
from qmoi_sync.agent.textdoc import text_of
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog, Role


@contextlib.asynccontextmanager
async def two_devices(
    store: Store, tmp_path: Path
) -> AsyncIterator[tuple[SpaceSync, SpaceSync, Store, Callable[[], Awaitable[None]]]]:
    """A (admin, folder A, ``store``) and B (member, folder B, its own store), and a function
    handing A's new envelopes to B as the relay would."""
    admin, member = DeviceIdentity.generate(), DeviceIdentity.generate()
    log, secret = MembershipLog.create(admin, time.time())
    log.add_member(admin, member.public, Role.member, {0: secret}, time.time())
    store_b = await Store.open(tmp_path / "b.db")
    try:
        a = await make_sync(store, tmp_path / "A", admin, log)
        b = await make_sync(store_b, tmp_path / "B", member, log)
        sent = 0

        async def a_to_b() -> None:
            nonlocal sent
            for _seq, env in await store.outbox(a.space_id, after_seq=sent):
                sent += 1
                await b.handle_remote([(sent, env)])

        yield a, b, store_b, a_to_b
    finally:
        await store_b.close()


async def test_save_landing_before_a_remote_write_is_merged_not_overwritten(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_devices(store, tmp_path) as (a, b, store_b, a_to_b):
        (tmp_path / "A" / "notes.txt").write_text("one\ntwo\nthree\n")
        await a.handle_local(["notes.txt"])
        await a_to_b()
        on_b = tmp_path / "B" / "notes.txt"
        assert on_b.read_text() == "one\ntwo\nthree\n"

        # A edits the first line; B saves a new last line, not yet seen by B's agent.
        (tmp_path / "A" / "notes.txt").write_text("ONE\ntwo\nthree\n")
        await a.handle_local(["notes.txt"])
        saves = ["one\ntwo\nthree\nfour (b)\n"]

        def save_then_write(root: Path, jobs: list[WriteJob]) -> list[object]:
            if saves and root == tmp_path / "B":
                on_b.write_text(saves.pop())
            return write_files_atomic(root, jobs)  # type: ignore[return-value]

        monkeypatch.setattr(space_mod, "write_files_atomic", save_then_write)
        await a_to_b()
        assert not saves

        assert on_b.read_text() == "ONE\ntwo\nthree\nfour (b)\n"
        # The save became B's own edit, on its way to A.
        assert await store_b.outbox_count(b.space_id) > 0
        assert "notes.txt" not in {k.partition(":")[2] for k in b.warnings}


async def test_save_landing_before_a_remote_rename_is_ingested_after_the_move(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same race with a rename from A: B's save lands just before B moves the file. The moved
    file used to be recorded as holding the synced content, so the save was never ingested and
    B's file differed from every other device's for good (tests/e2e random convergence seed
    746109826)."""
    async with two_devices(store, tmp_path) as (a, b, _store_b, a_to_b):
        (tmp_path / "A" / "old.txt").write_text("one\ntwo\n")
        await a.handle_local(["old.txt"])
        await a_to_b()
        (tmp_path / "A" / "old.txt").rename(tmp_path / "A" / "new.txt")
        await a.handle_local(["old.txt", "new.txt"])

        saves = ["one\ntwo\nthree (b)\n"]
        real_rename = space_mod.rename_file

        def save_then_rename(root: Path, src: str, dst: str) -> object:
            if saves and root == tmp_path / "B" and src == "old.txt":
                (root / "old.txt").write_text(saves.pop())
            return real_rename(root, src, dst)

        monkeypatch.setattr(space_mod, "rename_file", save_then_rename)
        await a_to_b()
        assert not saves
        assert not (tmp_path / "B" / "old.txt").exists()
        assert (tmp_path / "B" / "new.txt").read_text() == "one\ntwo\nthree (b)\n"
        # The save is B's edit of the file's document, on its way to A.
        assert text_of(await b.doc(b.files["new.txt"].fid)) == "one\ntwo\nthree (b)\n"
