"""The state-vector resync through the relay (agent/relay_repair.py), in process: two real
SpaceSyncs (each its own SQLite store and folder) of one space, a third member ``w`` sealing
edits. What one device puts in its outbox is handed to the other's `handle_remote` as a relay
would deliver it — so the relay's part (withholding one envelope of w from b) is played by the
test. Hostile requests and replies are sealed by real members (or a non-member)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from local_space import make_sync
from pycrdt import Doc

from qmoi_sync.agent import relay_repair
from qmoi_sync.agent.relay_order import GAP_REPORT_S, RelayOrder
from qmoi_sync.agent.relay_repair import split_parts
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import Store
from qmoi_sync.agent.textdoc import ingest_disk_text, new_text_doc, text_of
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import (
    DocUpdate,
    Payload,
    RepairGap,
    RepairReply,
    RepairRequest,
    Updates,
    encode_payload,
)

DOC = b"\x07" * 16


class Space:
    """Admin ``w`` (the writer whose envelope the relay withholds), members ``a`` and ``b``."""

    def __init__(self) -> None:
        self.w = DeviceIdentity.generate()
        self.a = DeviceIdentity.generate()
        self.b = DeviceIdentity.generate()
        self.reader = DeviceIdentity.generate()
        now = time.time()
        self.log, secret = MembershipLog.create(self.w, now)
        for dev in (self.a, self.b):
            self.log.add_member(self.w, dev.public, Role.member, {0: secret}, now)
        self.log.add_member(self.w, self.reader.public, Role.reader, {0: secret}, now)
        self.key = derive_epoch_keys(self.log.space_id, 0, secret).msg
        self.doc: Doc[Any] = new_text_doc()
        self.seqs: dict[bytes, int] = {}

    def seal(self, dev: DeviceIdentity, payload: Payload) -> bytes:
        seq = self.seqs[dev.public.sign_pk] = self.seqs.get(dev.public.sign_pk, 0) + 1
        return seal(dev, self.log.space_id, 0, self.key, seq, encode_payload(payload))

    def edit(self, text: str) -> bytes:
        update = ingest_disk_text(self.doc, text)
        assert update is not None
        return self.seal(self.w, Updates([DocUpdate(DOC, update)]))


class Relay:
    """Hands envelopes to a device in relay order (its own relay seqs per receiver)."""

    def __init__(self) -> None:
        self.n = 0

    async def deliver(self, to: SpaceSync, *envelopes: bytes) -> None:
        batch = []
        for e in envelopes:
            self.n += 1
            batch.append((self.n, e))
        await to.handle_remote(batch)


async def sent(sync: SpaceSync, after: int = 0) -> list[bytes]:
    """What ``sync`` sealed into its outbox after its seq ``after``."""
    return [e for _s, e in await sync.store.outbox(sync.space_id, after_seq=after, limit=1000)]


async def text(sync: SpaceSync) -> str:
    return text_of(await sync.doc(DOC))


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    sp = Space()
    sa, sb = await Store.open(tmp_path / "a.db"), await Store.open(tmp_path / "b.db")
    a = await make_sync(sa, tmp_path / "fa", sp.a, sp.log)
    b = await make_sync(sb, tmp_path / "fb", sp.b, sp.log)
    now = [1000.0]
    b.order = RelayOrder(clock=lambda: now[0])
    for s in (a, b):
        s.subscribe_from()
    try:
        yield sp, a, b, now
    finally:
        await sa.close()
        await sb.close()


async def _withheld_gap(
    sp: Space, a: SpaceSync, b: SpaceSync, now: list[float]
) -> tuple[bytes, bytes]:
    """w edits three times; the relay delivers all to a, and withholds the second from b (its
    re-subscription gets the same). b reports the gap and, the re-subscription not filling it,
    asks through the relay: returns b's request envelope and the withheld one."""
    e1, e2, e3 = sp.edit("a\n"), sp.edit("a\nb\n"), sp.edit("a\nb\nc\n")
    ra, rb = Relay(), Relay()
    await ra.deliver(a, e1, e2, e3)
    await rb.deliver(b, e1, e3)
    assert await text(b) == "a\n" and b.order.held
    now[0] += GAP_REPORT_S
    await b.repair_gaps()  # attempt 1: subscribe again (the relay withholds e2 again)
    assert b.order.resubscribe_from is not None and not await sent(b)
    b.subscribe_from()
    await rb.deliver(b, e1, e3)
    now[0] += GAP_REPORT_S
    await b.repair_gaps()  # attempt 2: ask the other members
    [request] = await sent(b)
    return request, e2


async def test_a_withheld_envelope_is_repaired_by_a_member_through_the_relay(pair: Any) -> None:
    sp, a, b, now = pair
    request, _e2 = await _withheld_gap(sp, a, b, now)
    assert b.repair.requests_sent == 1
    await Relay().deliver(a, request)
    replies = await sent(a)
    assert len(replies) == 1 and a.repair.replies_sent == 1
    await Relay().deliver(b, *replies)
    assert await text(b) == "a\nb\nc\n"
    assert b.order.gaps(b.windows) == [] and not b.order.held
    [rep] = b.order.repaired
    assert (rep.how, rep.by, rep.first_missing, rep.missing) == (
        "state resync through the relay",
        sp.a.public.sign_pk,
        2,
        1,
    )
    # a covered w's stream for b, but only w may move w's replay window: should the relay
    # deliver e2 after all, it is applied (idempotently), not dropped.
    assert b.windows[sp.w.public.sign_pk].watermark == 1
    assert b.order.covered[sp.w.public.sign_pk] == 3
    # The same request, replayed by the relay under another relay seq, is dropped by a's
    # replay window; the same request id sealed again by b is not answered twice.
    await Relay().deliver(a, request)
    await b._send_stream([RepairRequest(next(iter(b.repair.outstanding)), [sp.a.public.sign_pk])])
    [again] = await sent(b, after=1)
    await Relay().deliver(a, again)
    assert len(await sent(a)) == 1 and a.repair.replies_sent == 1


async def test_the_sender_itself_covers_its_stream_for_good(pair: Any) -> None:
    """When the gap's sender answers, its reply covers its own stream: the replay window
    advances (persisted), the gap is closed for good."""
    sp, a, b, now = pair
    w_sync = a  # a plays w's part here: its own envelopes are withheld from b
    e1, e2, e3 = [], [], []
    for i, bucket in enumerate((e1, e2, e3)):
        await w_sync.run_local(
            lambda add, i=i: _edit_local(w_sync, add, "x\n" * (i + 1)),
        )
        bucket.extend(await sent(w_sync, after=i))
    rb = Relay()
    await rb.deliver(b, *e1, *e3)
    now[0] += GAP_REPORT_S
    await b.repair_gaps()
    b.subscribe_from()
    now[0] += GAP_REPORT_S
    await b.repair_gaps()
    [request] = await sent(b)
    await Relay().deliver(a, request)
    replies = await sent(a, after=3)
    await rb.deliver(b, *replies)
    assert await text(b) == "x\nx\nx\n"
    window = b.windows[sp.a.public.sign_pk]
    assert window.watermark == 4 and b.order.gaps(b.windows) == []  # its seqs 1..3 + reply
    [rep] = b.order.repaired
    assert rep.by == sp.a.public.sign_pk


async def _edit_local(sync: SpaceSync, add: Any, content: str) -> None:
    doc = await sync.doc(DOC)
    add(DOC, ingest_disk_text(doc, content))


async def test_hostile_replies_are_never_applied(pair: Any) -> None:
    """Replies b did not ask for (unknown request id, another requester), from a reader, or
    with a bogus cover, change nothing they should not; a malformed one is quarantined and
    charged to its (verified) sender; a request from a non-member never opens."""
    sp, a, b, now = pair
    _request, e2 = await _withheld_gap(sp, a, b, now)
    rid = next(iter(b.repair.outstanding))
    evil = new_text_doc()
    upd = ingest_disk_text(evil, "EVIL\n")
    assert upd is not None
    items = [DocUpdate(DOC, upd)]
    me = sp.b.public.sign_pk
    unknown = sp.seal(sp.a, RepairReply(os.urandom(16), me, items=items))
    elsewhere = sp.seal(sp.a, RepairReply(rid, sp.w.public.sign_pk, items=items))
    from_reader = sp.seal(sp.reader, RepairReply(rid, me, items=items))
    truncated = sp.seal(sp.a, RepairReply(rid, me, items=items))[:-1]  # bad signature
    malformed = seal(sp.a, sp.log.space_id, 0, sp.key, 99, b"\x08" + rid + me + b"\x00\x05")
    outsider = DeviceIdentity.generate()
    forged_request = sp.seal(outsider, RepairRequest(os.urandom(16), gaps=[]))
    q = b.stats.quarantined
    await Relay().deliver(b, unknown, elsewhere, from_reader, truncated, malformed)
    assert "EVIL" not in await text(b)
    assert b.repair.replies_ignored == 1  # the unknown request id (another requester's: silent)
    assert b.stats.quarantined == q + 3  # reader content, bad signature, malformed payload
    assert b.offenders.count(sp.reader.public.sign_pk) == 1
    assert b.offenders.count(sp.a.public.sign_pk) == 1  # the malformed one a signed
    # A lying cover (far beyond anything w sent) is bounded by what b received of w.
    liar = sp.seal(sp.a, RepairReply(rid, me, covers=[(sp.w.public.sign_pk, 10**9)]))
    await Relay().deliver(b, liar)
    assert b.order.covered[sp.w.public.sign_pk] == 3
    # The lie cannot make b lose w's envelopes: its window did not move, so w's next edit
    # and the withheld one, should the relay deliver it after all, are applied.
    assert b.windows[sp.w.public.sign_pk].watermark == 1 and not b.order.held
    e4 = sp.edit("a\nb\nc\nd\n")
    await Relay().deliver(b, e4, e2)
    assert await text(b) == "a\nb\nc\nd\n"
    # A request from a non-member does not open: quarantined, charged to the relay path.
    qa = a.stats.quarantined
    await Relay().deliver(a, forged_request)
    assert a.stats.quarantined == qa + 1 and not await sent(a)
    # A request that names other responders is not answered by a.
    other = sp.seal(
        sp.b, RepairRequest(os.urandom(16), [sp.w.public.sign_pk], [RepairGap(me, 1, 1)])
    )
    await Relay().deliver(a, other)
    assert not await sent(a) and a.repair.requests_ignored >= 1


async def test_answers_are_rate_limited(pair: Any) -> None:
    """Requests of one requester are answered at most every ANSWER_MIN_INTERVAL_S; several in
    one batch get one answer (the latest)."""
    sp, a, _b, _now = pair
    asks = [sp.seal(sp.b, RepairRequest(os.urandom(16))) for _ in range(5)]
    await Relay().deliver(a, *asks)
    assert len(await sent(a)) == 1
    await Relay().deliver(a, sp.seal(sp.b, RepairRequest(os.urandom(16))))
    assert len(await sent(a)) == 1, "within ANSWER_MIN_INTERVAL_S: not answered"
    assert a.repair.requests_ignored >= 1


def test_large_diffs_are_split_and_capped() -> None:
    items = [(bytes([i]) * 16, b"x" * 400) for i in range(10)]
    parts, complete = split_parts(items, part_bytes=1000, max_bytes=10_000)
    assert complete and [len(p) for p in parts] == [2, 2, 2, 2, 2]
    parts, complete = split_parts(items, part_bytes=1000, max_bytes=2_000)
    assert not complete and sum(len(p) for p in parts) == 5
    assert split_parts([], part_bytes=1000) == ([[]], True)
    assert relay_repair.PART_BYTES < relay_repair.REPLY_MAX_BYTES


async def test_hostile_requests_get_a_bounded_answer_or_none(pair: Any) -> None:
    """A member's request with a state vector that does not decode is answered without that
    document (nothing breaks); the answer, delivered to b which never sent that request, is not
    applied; a malformed request is quarantined and charged to the member that signed it,
    never answered."""
    sp, a, b, _now = pair
    await Relay().deliver(a, sp.edit("shared\n"))
    bogus = sp.seal(sp.b, RepairRequest(os.urandom(16), items=[(DOC, b"\xff\xff\xff")]))
    await Relay().deliver(a, bogus)
    [reply_env] = await sent(a)
    await Relay().deliver(b, reply_env)  # b never asked that: nothing applied
    assert await text(b) == ""
    q = a.stats.quarantined
    truncated = seal(sp.b, sp.log.space_id, 0, sp.key, 50, b"\x07" + b"r" * 16 + b"\x02")
    await Relay().deliver(a, truncated)
    assert a.stats.quarantined == q + 1 and a.offenders.count(sp.b.public.sign_pk) == 1
    assert len(await sent(a)) == 1, "a malformed request is not answered"
