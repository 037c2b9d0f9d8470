"""A large start-up scan commits in slices (bounded memory), without losing rename detection.

In-process SpaceSync on a real Store and a real folder; the slice size is lowered so a handful
of files exercises the sliced path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from local_space import make_sync

from qmoi_sync.agent import space as space_mod
from qmoi_sync.agent.store import Store
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog


def write(folder: Path, n: int, prefix: str) -> dict[str, bytes]:
    files = {f"{prefix}{i:02d}.txt": f"{prefix} file {i}\n".encode() for i in range(n)}
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    return files


async def test_large_scan_commits_in_slices(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space_mod, "RESCAN_SLICE", 3)
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    folder = tmp_path / "folder"
    folder.mkdir()
    files = write(folder, 10, "n")
    sync = await make_sync(store, folder, me, log)
    await sync.rescan()
    assert set(sync.files) == set(files)
    alive = {e.path for e in sync.index.entries().values() if e.alive}
    assert alive == set(files)
    # One commit per slice: 10 files in slices of 3 -> at least 4 envelopes in the outbox.
    assert await store.outbox_count(sync.space_id) >= 4


async def test_missing_tracked_file_keeps_one_batch_so_a_rename_keeps_its_id(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder, 4, "a")
    sync = await make_sync(store, folder, me, log)
    await sync.rescan()
    fid = sync.files["a00.txt"].fid
    # While the agent is "down": a00 renamed to the end of the sort order, many new files.
    os.rename(folder / "a00.txt", folder / "z-renamed.txt")
    write(folder, 10, "m")
    monkeypatch.setattr(space_mod, "RESCAN_SLICE", 3)
    await sync.rescan()
    assert "a00.txt" not in sync.files
    assert sync.files["z-renamed.txt"].fid == fid
    entry = sync.index.entry(fid.hex())
    assert entry is not None and entry.alive and entry.path == "z-renamed.txt"
    assert len(sync.files) == 14
