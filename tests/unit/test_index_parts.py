"""The index is compacted into merged parts of bounded size, not one state of the whole index
(applying or encoding a 100,000-file index in one piece doubled the agent's peak memory).

In-process SpaceSync on a real Store and a real folder; the part size is lowered so a few
dozen small batches make several parts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from local_space import make_sync

from qmoi_sync.agent import space as space_mod
from qmoi_sync.agent.store import COMPACT_AFTER, Store
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog


async def test_index_compacts_into_parts_and_loads_the_same(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space_mod, "INDEX_PART_BYTES", 4000)
    me = DeviceIdentity.generate()
    log, _secret = MembershipLog.create(me, time.time())
    folder = tmp_path / "folder"
    folder.mkdir()
    sync = await make_sync(store, folder, me, log)
    await sync.rescan()
    n = COMPACT_AFTER + 10
    for i in range(n):  # one batch, one index update each: compaction falls due once
        (folder / f"f{i:03d}.txt").write_text(f"file {i}\n")
        await sync.handle_local([f"f{i:03d}.txt"])
    state, parts = await store.load_doc(sync.space_id, space_mod.INDEX_DOC_ID)
    assert state is None  # no state of the whole index was written
    assert 1 < len(parts) < COMPACT_AFTER  # merged into parts, several of them
    assert max(len(p) for p in parts) < 4 * 4000
    # A restart loads the same index from the parts.
    again = await make_sync(store, folder, me, log)
    alive = {e.path for e in again.index.entries().values() if e.alive}
    assert alive == {f"f{i:03d}.txt" for i in range(n)}
    assert again.index.state_vector() == sync.index.state_vector()
