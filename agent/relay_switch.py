"""Moving a space to another relay (the shared ``relays`` option changed).

Relays do not share their logs, so a move is a handover:

1. Wait (bounded) until this device's outbox is acknowledged by the old relay: the change that
   started the move, and anything else sealed before it, reaches the devices still there.
2. Stop the relay link (SpaceRuntime.replace_relay, under the owner's lock, as for pause).
3. Keep the old relay's cursor (``relay_cursor@<url>``) and start from the new relay's own
   cursor (0 the first time): relay sequence numbers are per relay.
4. Seal this device's *full* state (the index and every document) into the stream, ahead of
   anything else sent to the new relay: the new relay has none of the history, and a device that
   reaches it later (or joins through it) gets everything from the stream. Updates every device
   already has are deduplicated by the CRDT; they are sealed as full-state Updates, which tell
   receivers that this device's seqs below them (never on the new relay) are covered, not a
   gap (agent/relay_order.py); a device that was offline while the others moved
   brings its own changes along the same way when it moves.
5. Persist the new URL in the spaces table and start a link to it.

Envelopes a late device publishes to the old relay before it learns of the move are covered by
step 4 once it moves. A device that can no longer reach the old relay at all never learns of
the move through it (set its relay again on that device).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from qmoi_sync.agent.space import INDEX_DOC_ID

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime

log = logging.getLogger("qmoi_sync.settings")

DRAIN_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.05


async def switch_relay(rt: SpaceRuntime, url: str) -> None:
    store = rt.agent.store
    space_id = rt.record.space_id
    old_url = rt.record.relay_url
    if url == old_url:
        return
    if rt.link is not None and not rt.record.paused:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while await store.outbox_count(space_id) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)  # the outbox has no "drained" event to wait on

    async def prepare() -> None:
        sync = rt.sync
        async with sync.lock:
            async with store.transaction():
                if old_url:
                    await store.set_counter(space_id, f"relay_cursor@{old_url}", sync.cursor)
                cursor = await store.get_counter(space_id, f"relay_cursor@{url}", 0)
                await store.set_counter(space_id, "relay_cursor", cursor)
                await store.db.execute(
                    "UPDATE spaces SET relay_url=? WHERE space_id=?", (url, space_id)
                )
            sync.reset_cursor(cursor)
        if sync.send_block is not None:
            return

        async def produce(add: Callable[[bytes, bytes | None], None]) -> None:
            add(INDEX_DOC_ID, sync.index.state())
            for doc_id in await store.doc_ids(space_id):
                if doc_id != INDEX_DOC_ID:
                    add(doc_id, (await sync.doc(doc_id)).get_update())
            return None

        await sync.run_local(produce, full_state=True)

    await rt.replace_relay(url, prepare)
    log.info("space %s moved from relay %s to %s", rt.record.name, old_url, url)
