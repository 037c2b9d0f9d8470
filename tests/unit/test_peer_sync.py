"""LAN sync logic in process: real SpaceSync objects (SQLite, folders, crypto), the real
SpaceLan ordering/resync code, and a stand-in for the websocket session.

Covers what the namespace tests cannot force: envelopes reordered or lost on the LAN path, a
peer's update that depends on a third device's update we lack (the pycrdt trap of design brief
§4), and the same envelope arriving over the LAN and through the relay.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qmoi_sync.agent import peer_sync
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.peer_sync import SpaceLan
from qmoi_sync.agent.relay_order import GAP_REPORT_S, RelayOrder
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import SpaceRecord, Store
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.envelope import open_envelope, parse_header
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import StateRequest, decode_payload


@dataclass
class Device:
    identity: DeviceIdentity
    store: Store
    sync: SpaceSync
    sealed: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def pk(self) -> bytes:
        return self.identity.public.sign_pk

    async def write(self, rel: str, text: str) -> list[bytes]:
        """Edit a file on disk and take it in; returns the envelopes sealed for it."""
        (self.sync.root / rel).write_text(text)
        before = len(self.sealed)
        await self.sync.handle_local({rel})
        return [e for _s, e in self.sealed[before:]]

    def read(self, rel: str) -> str | None:
        p = self.sync.root / rel
        return p.read_text() if p.exists() else None


@dataclass
class StubAgent:
    lan: Any = None


@dataclass
class StubRuntime:
    """What SpaceLan reads of a SpaceRuntime."""

    sync: SpaceSync
    keyring: Keyring
    record: SpaceRecord
    revoked: bool = False
    agent: StubAgent = field(default_factory=StubAgent)

    async def on_membership(self, data: bytes) -> None:
        return None


class StubSession:
    """Stands in for a PeerSession: the peer is `peer`, and a resync is answered by running the
    real state request/reply between the two SpaceSyncs."""

    def __init__(self, space: SpaceLan, peer: Device) -> None:
        self.space = space
        self.peer = peer
        self.peer_pk = peer.pk
        self.side: list[tuple[int, bytes]] = []
        self.pending: int | None = None
        self.requests: list[str] = []
        self.peer_can_write = True

    async def request_resync(self, why: str, gap: bool = False) -> None:
        if self.pending is None:
            self.pending = 1
            self.requests.append(why)

    async def deliver(self, envelope: bytes) -> None:
        """What PeerSession._reader does with a StreamEnvelope."""
        seq = parse_header(envelope).seq
        if self.pending is not None:
            self.side.append((seq, envelope))
            return
        await self.space.offer(self, seq, envelope)  # type: ignore[arg-type]

    async def answer_resync(self, me: Device) -> None:
        """Run the pending resync: our state request, the peer's reply, coverage release."""
        assert self.pending is not None
        request_env = await me.sync.state_request()
        assert request_env is not None
        ring = self.peer.sync.keyring
        opened = open_envelope(request_env, me.sync.space_bytes, ring.msg_keys(), ring.is_member)
        request = decode_payload(opened.plaintext)
        assert isinstance(request, StateRequest)
        replies = await self.peer.sync.state_reply(request)
        for env in replies:
            assert await me.sync.handle_peer([env]) == 1
        self.pending = None
        covered = L.covered_seq(parse_header(replies[-1]).seq)
        await self.space.release_after_reply(self, covered)  # type: ignore[arg-type]


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[tuple[Device, Device, Device]]:
    ids = [DeviceIdentity.generate() for _ in range(3)]
    log, secret = MembershipLog.create(ids[0], time.time())
    for other in ids[1:]:
        log.add_member(ids[0], other.public, Role.member, {0: secret}, time.time())
    devices: list[Device] = []
    for i, ident in enumerate(ids):
        store = await Store.open(tmp_path / f"state-{i}.db")
        record = SpaceRecord(
            space_id=log.space_id.hex(),
            name="notes",
            folder=tmp_path / f"folder-{i}",
            relay_url=None,
            insecure=False,
            created_at=time.time(),
            seeded=True,
            paused=False,
        )
        async with store.transaction():
            await store.add_space(record)
            await store.save_membership(record.space_id, log.to_bytes())
        sync = SpaceSync(store, ident, record, Keyring.build(log, ident))
        await sync.load()
        dev = Device(ident, store, sync)
        sync.on_sealed = dev.sealed.extend
        devices.append(dev)
    try:
        yield devices[0], devices[1], devices[2]
    finally:
        for d in devices:
            await d.store.close()


def lan_for(dev: Device) -> SpaceLan:
    rt = StubRuntime(dev.sync, dev.sync.keyring, dev.sync.record)
    space = SpaceLan(rt, dev.pk)  # type: ignore[arg-type]
    dev.sync.on_sealed = dev.sealed.extend  # keep capturing (SpaceLan hooked itself)
    return space


async def test_reordered_stream_is_applied_in_sender_order(
    trio: tuple[Device, Device, Device],
) -> None:
    a, b, _ = trio
    envs: list[bytes] = []
    text = ""
    for i in range(6):
        text += f"line {i}\n"
        envs += await a.write("f.txt", text)
    space = lan_for(b)
    session = StubSession(space, a)
    for i in (1, 0, 3, 2, 5, 4):
        await session.deliver(envs[i])
    assert b.read("f.txt") == text
    assert space.buffer.held_count == 0 and not session.requests
    # the window now knows them: relay copies are duplicates, applied once
    await b.sync.handle_remote([(n + 1, e) for n, e in enumerate(envs)])
    assert b.sync.stats.duplicates == len(envs)
    assert b.read("f.txt") == text
    assert b.sync.cursor == len(envs)  # the relay path moves the cursor; the LAN path did not


async def test_lan_path_never_moves_the_relay_cursor(trio: tuple[Device, Device, Device]) -> None:
    a, b, _ = trio
    envs = await a.write("f.txt", "hello\n")
    space = lan_for(b)
    await StubSession(space, a).deliver(envs[0])
    assert b.read("f.txt") == "hello\n"
    assert b.sync.cursor == 0
    assert await b.store.get_counter(b.sync.space_id, "relay_cursor") == 0


async def test_gap_that_does_not_fill_ends_in_a_resync(
    trio: tuple[Device, Device, Device], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _ = trio
    envs: list[bytes] = []
    text = ""
    for i in range(4):
        text += f"line {i}\n"
        envs += await a.write("f.txt", text)
    space = lan_for(b)
    session = StubSession(space, a)
    space.sessions[a.pk] = session  # type: ignore[assignment]
    await session.deliver(envs[0])
    await session.deliver(envs[2])  # envs[1] is lost on the LAN
    await session.deliver(envs[3])
    assert b.read("f.txt") == "line 0\n" and space.buffer.held_count == 2
    monkeypatch.setattr(peer_sync, "GAP_TIMEOUT_S", 0.0)
    await space.check_gaps()
    assert session.requests == ["sequence gap"] and space.buffer.held_count == 0
    text += "line 4\n"
    late = await a.write("f.txt", text)  # sealed after the loss, arrives while resyncing
    await session.deliver(late[0])
    assert session.side  # set aside until the reply
    await session.answer_resync(b)
    assert b.read("f.txt") == text
    assert not session.side and space.buffer.held_count == 0


async def test_update_depending_on_a_third_device_waits_for_a_resync(
    trio: tuple[Device, Device, Device],
) -> None:
    """C's edit reached A but not B; A then edits on top of it. Applying A's update on B before
    C's would hit the pycrdt trap (the update would be held pending and could be lost): B
    stops, asks A for a resync, and ends up with everything."""
    a, b, c = trio
    base = await a.write("f.txt", "shared line\n")
    await b.sync.handle_remote([(1, base[0])])
    await c.sync.handle_remote([(1, base[0])])
    from_c = await c.write("f.txt", "shared line\nfrom c\n")
    await a.sync.handle_remote([(2, from_c[0])])  # B never sees it (no relay, no C on the LAN)
    assert a.read("f.txt") == "shared line\nfrom c\n"
    on_top = await a.write("f.txt", "shared line\nfrom c\nand a on top\n")
    space = lan_for(b)
    session = StubSession(space, a)
    await session.deliver(on_top[0])
    assert session.requests == ["missing dependency"]
    assert b.read("f.txt") == "shared line\n"  # nothing half-applied
    await session.answer_resync(b)
    assert b.read("f.txt") == "shared line\nfrom c\nand a on top\n"
    # later LAN envelopes from A flow again
    more = await a.write("f.txt", "shared line\nfrom c\nand a on top\nmore\n")
    await session.deliver(more[0])
    assert b.read("f.txt") == "shared line\nfrom c\nand a on top\nmore\n"


async def test_state_reply_from_a_reader_is_quarantined(tmp_path: Path) -> None:
    admin, reader = DeviceIdentity.generate(), DeviceIdentity.generate()
    log, secret = MembershipLog.create(admin, time.time())
    log.add_member(admin, reader.public, Role.reader, {0: secret}, time.time())
    syncs = []
    for i, ident in enumerate((admin, reader)):
        store = await Store.open(tmp_path / f"s{i}.db")
        record = SpaceRecord(
            log.space_id.hex(), "n", tmp_path / f"f{i}", None, False, 0, True, False
        )
        async with store.transaction():
            await store.add_space(record)
            await store.save_membership(record.space_id, log.to_bytes())
        s = SpaceSync(store, ident, record, Keyring.build(log, ident))
        await s.load()
        syncs.append(s)
    admin_sync, reader_sync = syncs
    try:
        # a reader answers with whatever its replica holds: content it could have forged
        (reader_sync.root / "x.txt").write_text("forged by a reader\n")
        await reader_sync.handle_local({"x.txt"})  # held back: readers never seal
        request = StateRequest(items=[])
        replies = await reader_sync.state_reply(request)
        assert await admin_sync.handle_peer(replies) == len(replies)
        assert not (admin_sync.root / "x.txt").exists()
        assert admin_sync.stats.quarantined == 1
    finally:
        for s in syncs:
            await s.store.close()


async def test_direct_envelopes_never_enter_replay_windows(
    trio: tuple[Device, Device, Device],
) -> None:
    a, b, _ = trio
    await a.write("f.txt", "x\n")
    env = await a.sync.state_request()
    assert env is not None and L.is_direct_seq(parse_header(env).seq)
    replies = await a.sync.state_reply(StateRequest(items=[]))
    assert L.covered_seq(parse_header(replies[-1]).seq) == a.sync.seq
    assert await b.sync.handle_peer(replies) == 1
    assert b.read("f.txt") == "x\n"
    assert a.pk not in b.sync.windows or b.sync.windows[a.pk].watermark == 0
    # a replayed reply applies again harmlessly (CRDT updates are idempotent)
    assert await b.sync.handle_peer(replies) == 1
    assert b.read("f.txt") == "x\n"


async def test_relay_gap_is_repaired_by_a_lan_resync(trio: tuple[Device, Device, Device]) -> None:
    """The relay withholds A's first edit from B and delivers the next (which depends on it: B
    holds it, agent/relay_order.py). Once the gap is due a repair and A is a LAN peer, B asks
    A for a resync instead of the relay; A's reply covers A's stream, the held envelope is
    dropped as covered, the gap closes and the relay cursor is no longer held back."""
    a, b, _ = trio
    first = await a.write("f.txt", "one\n")
    second = await a.write("f.txt", "one\ntwo\n")
    now = [1000.0]
    b.sync.order = RelayOrder(clock=lambda: now[0])
    b.sync.subscribe_from()
    await b.sync.handle_remote([(2, second[0])])  # relay seq 1 (`first`) withheld
    assert b.read("f.txt") is None and b.sync.order.held and b.sync.applied_cursor == 1
    space = lan_for(b)
    session = StubSession(space, a)
    space.sessions[a.pk] = session  # type: ignore[assignment]
    now[0] += GAP_REPORT_S
    await b.sync.repair_gaps()
    assert session.requests == ["relay sequence gap"]
    assert b.sync.order.resubscribe_from is None, "the LAN answers: the relay is not asked"
    await session.answer_resync(b)
    assert b.read("f.txt") == "one\ntwo\n"
    assert b.sync.order.gaps(b.sync.windows) == [] and not b.sync.order.held
    assert b.sync.applied_cursor == 2
    assert len(first) == 1


async def test_a_lan_peer_that_is_not_the_gaps_sender_does_not_stop_the_relay_repair(
    trio: tuple[Device, Device, Device],
) -> None:
    """The relay withholds C's first edit from B; B's only LAN peer is A. A's resync may bring
    the content, but its reply says nothing about C's seqs: B asks A and also goes on with the
    relay repairs (a re-subscription now, then the state resync through the relay, whose covers
    close the gap)."""
    a, b, c = trio
    await c.write("c.txt", "one\n")
    second = await c.write("c.txt", "one\ntwo\n")
    now = [1000.0]
    b.sync.order = RelayOrder(clock=lambda: now[0])
    b.sync.subscribe_from()
    await b.sync.handle_remote([(2, second[0])])
    assert b.sync.order.held
    space = lan_for(b)
    session = StubSession(space, a)
    space.sessions[a.pk] = session  # type: ignore[assignment]
    now[0] += GAP_REPORT_S
    await b.sync.repair_gaps()
    assert session.requests == ["relay sequence gap"]
    assert b.sync.order.resubscribe_from is not None, "the relay repair goes on"
