"""A relay that reorders, replays, drops or withholds: SpaceSync applies each sender's envelopes
once and in that sender's order, holds what depends on a missing one, keeps the relay cursor
below what it holds, reports the gap and asks for a repair (agent/relay_order.py). Real SQLite
store and protocol objects; envelopes are handed to `handle_remote` as a relay link would."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from local_space import make_sync
from pycrdt import Doc, Map

from qmoi_sync.agent.index import FILES, IndexDoc
from qmoi_sync.agent.offenders import RELAY
from qmoi_sync.agent.relay_order import GAP_REPORT_S, RelayOrder
from qmoi_sync.agent.space import INDEX_DOC_ID
from qmoi_sync.agent.store import Store
from qmoi_sync.agent.textdoc import ingest_disk_text, new_text_doc, text_of
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import DocUpdate, Updates, decode_payload, encode_payload

DOC = b"\x07" * 16
OTHER = b"\x08" * 16
DOC2 = b"\x09" * 16


class Writer:
    """Another member editing documents, sealing each edit as its next stream envelope."""

    def __init__(self) -> None:
        self.admin = DeviceIdentity.generate()
        self.me = DeviceIdentity.generate()
        self.log, secret = MembershipLog.create(self.admin, time.time())
        self.log.add_member(self.admin, self.me.public, Role.member, {0: secret}, time.time())
        self.key = derive_epoch_keys(self.log.space_id, 0, secret).msg
        self.docs: dict[bytes, Doc[Any]] = {}
        self.index = IndexDoc()
        self.seq = 0

    def edit(self, doc_id: bytes, text: str) -> bytes:
        doc = self.docs.setdefault(doc_id, new_text_doc())
        update = ingest_disk_text(doc, text)
        assert update is not None
        self.seq += 1
        payload = encode_payload(Updates(items=[DocUpdate(doc_id=doc_id, update=update)]))
        return seal(self.admin, self.log.space_id, 0, self.key, self.seq, payload)

    def create(self, doc_id: bytes, path: str, text: str | None = None) -> bytes:
        """The index entry that makes text document ``doc_id`` the file ``path`` (with
        ``text``: the document's first update in the same envelope, before the entry)."""
        items = []
        if text is not None:
            update = ingest_disk_text(self.docs.setdefault(doc_id, new_text_doc()), text)
            assert update is not None
            items.append(DocUpdate(doc_id=doc_id, update=update))
        update = self.index.create(doc_id.hex(), path, "text", 0o644, "writer", time.time())
        items.append(DocUpdate(doc_id=INDEX_DOC_ID, update=update))
        self.seq += 1
        payload = encode_payload(Updates(items=items))
        return seal(self.admin, self.log.space_id, 0, self.key, self.seq, payload)


async def text(sync: Any, doc_id: bytes) -> str:
    return text_of(await sync.doc(doc_id))


async def test_reordered_and_replayed_deliveries(store: Store, tmp_path: Path) -> None:
    w = Writer()
    sync = await make_sync(store, tmp_path / "f", w.me, w.log)
    e1, e2 = w.edit(DOC, "one\n"), w.edit(DOC, "one\ntwo\n")
    sync.subscribe_from()

    # e2 first: it depends on e1, so it is held; the cursor stays below it.
    await sync.handle_remote([(2, e2)])
    assert sync.order.held and await text(sync, DOC) == ""
    assert sync.cursor == 2 and sync.applied_cursor == 1
    assert await store.get_counter(sync.space_id, "relay_cursor") == 1

    # Then e1, with a relay seq that goes backwards: applied, and e2 released after it.
    await sync.handle_remote([(1, e1)])
    assert await text(sync, DOC) == "one\ntwo\n"
    assert not sync.order.held and sync.applied_cursor == 2
    assert sync.offenders.count(RELAY, "delivered out of order") == 1

    # e1 replayed: dropped, never applied twice, charged to the relay.
    dups = sync.stats.duplicates
    await sync.handle_remote([(1, e1)])
    assert await text(sync, DOC) == "one\ntwo\n"
    assert sync.stats.duplicates == dups + 1
    assert sync.offenders.count(RELAY, "replayed an envelope (dropped)") == 1
    assert sync.order.gaps(sync.windows) == []


async def test_index_entry_past_a_gap_waits_for_the_text_it_makes_visible(
    store: Store, tmp_path: Path
) -> None:
    """Regression: a new text file was written empty when its index entry came before the
    envelope with its text (an honest relay delivers a late envelope after higher ones when its
    first publish was refused). The entry waits for the gap; the file appears whole."""
    w = Writer()
    folder = tmp_path / "f"
    folder.mkdir()
    sync = await make_sync(store, folder, w.me, w.log)
    e1, e2 = w.edit(DOC, "the text\n"), w.create(DOC, "new.txt")
    sync.subscribe_from()

    await sync.handle_remote([(2, e2)])
    assert not (folder / "new.txt").exists(), "written before its text"
    assert sync.order.held and sync.applied_cursor == 1

    await sync.handle_remote([(1, e1)])
    assert (folder / "new.txt").read_text() == "the text\n"
    assert not sync.order.held and sync.applied_cursor == 2

    # An entry that carries its text in the same envelope needs nothing from the gap: applied
    # at once, like any update that lacks no dependency.
    _e3, e4 = w.edit(OTHER, "x\n"), w.create(DOC2, "whole.txt", "carried along\n")
    await sync.handle_remote([(4, e4)])
    assert (folder / "whole.txt").read_text() == "carried along\n"
    assert not sync.order.held


async def test_gap_is_reported_and_repaired_through_the_relay(store: Store, tmp_path: Path) -> None:
    w = Writer()
    sync = await make_sync(store, tmp_path / "f", w.me, w.log)
    now = [1000.0]
    sync.order = RelayOrder(clock=lambda: now[0])
    e1, e2, e3 = w.edit(DOC, "a\n"), w.edit(DOC, "a\nb\n"), w.edit(DOC, "a\nb\nc\n")
    e4 = w.edit(OTHER, "independent\n")
    sync.subscribe_from()

    # The relay drops e2: e3 is held (it needs e2), e4 (another document) applies at once.
    await sync.handle_remote([(1, e1), (3, e3), (4, e4)])
    assert await text(sync, DOC) == "a\n" and await text(sync, OTHER) == "independent\n"
    [gap] = sync.order.gaps(sync.windows)
    assert (gap.first_missing, gap.missing, gap.held, gap.reported) == (2, 1, 1, False)
    assert sync.applied_cursor == 2  # below e3's relay seq

    await sync.repair_gaps()
    assert sync.order.resubscribe_from is None, "nothing is due before GAP_REPORT_S"
    now[0] += GAP_REPORT_S
    [gap] = sync.order.gaps(sync.windows)
    assert gap.reported
    await sync.repair_gaps()  # no LAN peer: subscribe again from where w's stream was whole
    assert sync.order.resubscribe_from == 1
    assert sync.subscribe_from() == 1 and sync.order.resubscribe_from is None

    # The relay delivers everything again from there: e2 fills the gap, e3 follows.
    await sync.handle_remote([(2, e2), (3, e3), (4, e4)])
    assert await text(sync, DOC) == "a\nb\nc\n"
    assert sync.order.gaps(sync.windows) == [] and not sync.order.held
    assert sync.applied_cursor == 4
    assert sync.offenders.count(RELAY) == 0, "an honest re-delivery is not an offence"


async def test_a_gap_that_stays_open_is_charged_to_the_relay(store: Store, tmp_path: Path) -> None:
    w = Writer()
    sync = await make_sync(store, tmp_path / "f", w.me, w.log)
    now = [1000.0]
    sync.order = RelayOrder(clock=lambda: now[0])
    e1, _e2, e3 = w.edit(DOC, "a\n"), w.edit(DOC, "a\nb\n"), w.edit(DOC, "a\nb\nc\n")
    sync.subscribe_from()
    await sync.handle_remote([(1, e1), (3, e3)])
    attempts = 0
    for _ in range(8):
        now[0] += 200
        await sync.repair_gaps()
        if sync.order.resubscribe_from is not None:
            attempts += 1
            sync.subscribe_from()
    # A few re-subscriptions (each gets the log again from the gap), then only reports.
    assert 1 <= attempts <= 4
    assert sync.offenders.count(RELAY) >= 1
    # Given up: what waited is applied (yrs keeps the update pending without its predecessor),
    # so the relay cursor moves on; the gap stays listed.
    [gap] = sync.order.gaps(sync.windows)
    assert gap.repairs == 8 and gap.held == 0 and gap.missing == 1
    assert not sync.order.held and sync.applied_cursor == sync.cursor == 3


async def test_a_lan_peer_repairs_the_gap_instead_of_the_relay(
    store: Store, tmp_path: Path
) -> None:
    """With a LAN peer that can answer (peer_sync's hook says so), a gap is not asked of the
    relay again; what the peer brings fills it and releases the held envelope."""
    w = Writer()
    sync = await make_sync(store, tmp_path / "f", w.me, w.log)
    now = [1000.0]
    sync.order = RelayOrder(clock=lambda: now[0])
    asked: list[bytes] = []

    async def lan_can_answer(sender: bytes) -> bool:
        asked.append(sender)
        return True

    sync.on_stream_gap = lan_can_answer
    e1, e2, e3 = w.edit(DOC, "a\n"), w.edit(DOC, "a\nb\n"), w.edit(DOC, "a\nb\nc\n")
    sync.subscribe_from()
    await sync.handle_remote([(1, e1), (3, e3)])
    now[0] += GAP_REPORT_S
    await sync.repair_gaps()
    assert asked == [w.admin.public.sign_pk] and sync.order.resubscribe_from is None
    assert await sync.handle_peer([e2]) == 1  # the peer's copy of the missing envelope
    assert await text(sync, DOC) == "a\nb\nc\n"
    assert sync.order.gaps(sync.windows) == [] and sync.applied_cursor == 3


async def test_a_full_state_after_a_relay_move_is_not_a_gap(store: Store, tmp_path: Path) -> None:
    """A device that moved relays seals its whole state (kind 6, first envelope marked) on the
    new relay, whose log never had its earlier seqs: receivers see no gap below it. A hole
    after it is still a gap."""
    w = Writer()
    sync = await make_sync(store, tmp_path / "f", w.me, w.log)
    doc = new_text_doc()
    update = ingest_disk_text(doc, "whole state\n")
    assert update is not None
    w.seq = 41  # seqs 1..41 went to the old relay
    payload = Updates(items=[DocUpdate(DOC, update)], full_state=True)
    assert decode_payload(encode_payload(payload)) == payload
    assert encode_payload(payload)[0] == 6
    first = seal(w.admin, w.log.space_id, 0, w.key, 42, encode_payload(payload))
    sync.subscribe_from()
    await sync.handle_remote([(1, first)])
    assert await text(sync, DOC) == "whole state\n"
    assert sync.order.gaps(sync.windows) == []
    w.docs[DOC] = doc
    w.seq = 42
    _lost, after = w.edit(DOC, "whole state\nmore\n"), w.edit(DOC, "whole state\nmore\nand more\n")
    await sync.handle_remote([(2, after)])
    [gap] = sync.order.gaps(sync.windows)
    assert (gap.first_missing, gap.missing) == (43, 1)


async def test_an_older_agents_index_entry_is_reported_and_never_materialized(
    store: Store, tmp_path: Path
) -> None:
    """A member still running index schema 3 (one shared ``c`` record): its entry is not read
    as a file of this space (it could not count its creation as an edit), and status says why."""
    w = Writer()
    sync = await make_sync(store, tmp_path / "f", w.me, w.log)
    sync.subscribe_from()
    doc: Doc[Any] = Doc()
    files = doc.get(FILES, type=Map)
    with doc.transaction():
        files[f"{DOC.hex()}/c"] = json.dumps(["text", 1.0, "writer", "old.txt", None])
        files[f"{DOC.hex()}/e:writer"] = json.dumps(1)
    w.seq += 1
    payload = encode_payload(
        Updates(items=[DocUpdate(doc_id=INDEX_DOC_ID, update=doc.get_update())])
    )
    await sync.handle_remote([(1, seal(w.admin, w.log.space_id, 0, w.key, w.seq, payload))])
    assert "schema 1, 2 or 3" in sync.warnings["index-schema"]
    assert not (tmp_path / "f" / "old.txt").exists()
    assert all(not e.alive for e in sync.index.entries().values())
