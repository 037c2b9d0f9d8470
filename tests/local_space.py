"""An in-process `SpaceSync` on a real SQLite store and a real folder, for unit tests that drive
the single owner of a space directly (no relay, no agent process)."""

from __future__ import annotations

import time
from pathlib import Path

from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import SpaceRecord, Store
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog


async def make_sync(
    store: Store, folder: Path, me: DeviceIdentity, log: MembershipLog
) -> SpaceSync:
    """The space of ``log`` as device ``me`` sees it, its folder ``folder`` (registered in
    ``store`` on first use, as `space create` / `join` would), loaded."""
    record = SpaceRecord(
        space_id=log.space_id.hex(),
        name="notes",
        folder=folder,
        relay_url=None,
        insecure=False,
        created_at=time.time(),
        seeded=True,
        paused=False,
    )
    if not [r for r in await store.spaces() if r.space_id == record.space_id]:
        async with store.transaction():
            await store.add_space(record)
            await store.save_membership(record.space_id, log.to_bytes())
    sync = SpaceSync(store, me, record, Keyring.build(log, me))
    await sync.load()
    return sync
