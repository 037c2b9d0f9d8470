"""The relay link's bound on delivered-but-unapplied envelopes (agent/deliver_gate.py).

The link tests run a real `RelayLink` and a real `SpaceSync` (SQLite store, folder) against a
scripted relay on a real localhost websocket: it speaks the relay's frames but sends exactly the
stream the case needs (a Membership frame *behind* envelopes that need it), which the real relay
only does by a race between its tasks."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_space import make_sync
from websockets.asyncio.server import ServerConnection, serve

from qmoi_sync.agent import space as space_mod
from qmoi_sync.agent.deliver_gate import (
    DEFAULT_QUEUE_BYTES,
    QUEUE_BYTES_ENV,
    DeliverGate,
    queue_bytes_from_env,
)
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.relay_link import RelayLink
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.store import Store
from qmoi_sync.agent.textdoc import ingest_disk_text, new_text_doc
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import DeviceInfo, DocUpdate, Updates, encode_payload


@dataclass
class World:
    """An admin and the receiving member; ``after`` adds a third device, so epoch 1 exists."""

    admin: DeviceIdentity
    member: DeviceIdentity
    before: MembershipLog
    after: MembershipLog
    secrets: dict[int, bytes]
    seq: int = 0

    def seal(self, epoch: int, payload: bytes) -> bytes:
        self.seq += 1
        space = self.before.space_id
        key = derive_epoch_keys(space, epoch, self.secrets[epoch]).msg
        return seal(self.admin, space, epoch, key, self.seq, payload)

    def info(self, epoch: int, name: str) -> bytes:
        return self.seal(epoch, encode_payload(DeviceInfo(name, "test", "0")))

    def edit(self) -> bytes:
        update = ingest_disk_text(new_text_doc(), "some text\n" * 50)
        assert update is not None
        items = [DocUpdate(doc_id=os.urandom(16), update=update)]
        return self.seal(0, encode_payload(Updates(items=items)))


def make_world() -> World:
    admin, member, gone = (DeviceIdentity.generate() for _ in range(3))
    log, s0 = MembershipLog.create(admin, time.time())
    log.add_member(admin, member.public, Role.member, {0: s0}, time.time())
    log.add_member(admin, gone.public, Role.member, {0: s0}, time.time())
    before = log.copy()
    _op, s1 = log.remove_member(admin, gone.public.sign_pk, time.time())
    return World(admin, member, before, log, {0: s0, 1: s1})


# -- the gate alone ----------------------------------------------------------------------------


async def _let_the_loop_run(rounds: int = 20) -> None:
    """Let every ready callback run a number of times (the gate waits on events of this loop
    only, so a waiter that wrongly passes is done after a few rounds): no wall-clock wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_a_full_gate_waits_until_the_applier_frees_room() -> None:
    wanted = asyncio.Event()
    gate = DeliverGate(100, wanted)
    await asyncio.wait_for(gate.wait_for_room(), 5)
    gate.added(150)  # one envelope larger than the bound still goes, alone
    waiter = asyncio.create_task(gate.wait_for_room())
    await _let_the_loop_run()  # give it a chance to (wrongly) pass
    assert not waiter.done()
    gate.taken(150)  # the applier took it: room for the next while it is applied
    await asyncio.wait_for(waiter, 5)
    assert gate.queued == 1 and gate.queued_bytes == 150  # status: not applied yet
    gate.applied(1, 150)
    assert gate.queued == 0 and gate.queued_bytes == 0 and gate.waiting_bytes == 0


async def test_a_full_gate_opens_while_a_membership_log_is_wanted() -> None:
    wanted = asyncio.Event()
    gate = DeliverGate(10, wanted)
    gate.added(10)
    waiter = asyncio.create_task(gate.wait_for_room())
    await _let_the_loop_run()
    assert not waiter.done()
    wanted.set()  # SpaceSync.handle_remote waits for a longer log
    await asyncio.wait_for(waiter, 5)
    gate.added(10)
    await asyncio.wait_for(gate.wait_for_room(), 5)  # still open: read on past the bound
    wanted.clear()
    assert gate.full()


def test_bound_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(QUEUE_BYTES_ENV, raising=False)
    assert queue_bytes_from_env() == DEFAULT_QUEUE_BYTES
    monkeypatch.setenv(QUEUE_BYTES_ENV, "4096")
    assert queue_bytes_from_env() == 4096
    for bad in ("4k", "0", "-1"):
        caplog.clear()
        monkeypatch.setenv(QUEUE_BYTES_ENV, bad)
        assert queue_bytes_from_env() == DEFAULT_QUEUE_BYTES  # syncing goes on, bounded
        assert QUEUE_BYTES_ENV in caplog.text and repr(bad) in caplog.text


# -- a real RelayLink against a scripted relay -------------------------------------------------


@asynccontextmanager
async def scripted_relay(log: bytes, frames: list[F.Frame]) -> AsyncIterator[str]:
    """A localhost websocket that answers the link's handshake with Welcome(``log``), waits for
    its Subscribe, then sends ``frames`` in order and keeps the connection open."""

    async def handler(ws: ServerConnection) -> None:
        hello = F.decode_frame(bytes(await ws.recv()))
        assert isinstance(hello, F.Hello)
        await ws.send(F.encode_frame(F.Challenge(nonce=os.urandom(32))))
        auth = F.decode_frame(bytes(await ws.recv()))
        assert isinstance(auth, F.Auth)
        await ws.send(F.encode_frame(F.Welcome(head_seq=0, log=log)))
        sub = F.decode_frame(bytes(await ws.recv()))
        assert isinstance(sub, F.Subscribe)
        for frame in frames:
            await ws.send(F.encode_frame(frame))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


def on_membership_for(sync: SpaceSync, world: World) -> Callable[[bytes], asyncio.Future[None]]:
    async def on_membership(data: bytes) -> None:
        new = MembershipLog.from_bytes(data, expected_space_id=world.before.space_id)
        if len(new) > len(sync.keyring.log):
            sync.set_keyring(Keyring.build(new, world.member))

    return on_membership  # type: ignore[return-value]


async def run_link(sync: SpaceSync, world: World, url: str, bound: int) -> RelayLink:
    """Run a link until the applier has passed the scripted relay's CaughtUp (so everything
    delivered before it is applied), then stop it."""

    async def no_join(_rid: int, _req: bytes) -> None:
        return None

    link = RelayLink(
        sync,
        url,
        membership_log=world.before.to_bytes,
        on_membership=on_membership_for(sync, world),
        on_join_forward=no_join,
        deliver_queue_bytes=bound,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await asyncio.wait_for(link.caught_up.wait(), 60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return link


async def test_membership_frame_behind_a_full_queue_is_read_and_nothing_quarantined(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Envelopes of epoch 1 reach the device before the Membership frame that gives it epoch 1's
    # key. With a 1-byte bound the reader may queue only one of them; the applier waits for the
    # log (up to MEMBERSHIP_WAIT_S), and the log is behind the other queued envelopes: the
    # reader must read on past the bound, or the wait runs out and the envelope is quarantined.
    monkeypatch.setattr(space_mod, "MEMBERSHIP_WAIT_S", 10.0)
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.before)
    names = [f"admin-{i}" for i in range(6)]
    frames: list[F.Frame] = [
        F.Deliver(relay_seq=i + 1, envelope=w.info(1, name)) for i, name in enumerate(names)
    ]
    frames += [F.Membership(log=w.after.to_bytes()), F.CaughtUp(head_seq=len(names))]
    async with scripted_relay(w.before.to_bytes(), frames) as url:
        link = await run_link(sync, w, url, 1)
    assert sync.stats.quarantined == 0 and sync.cursor == len(names)
    infos = await store.device_infos(sync.space_id)
    assert {i["name"] for i in infos.values()} <= set(names) and infos
    assert sync.epoch_fence == 1
    assert link.pending_in == 0


async def test_a_large_backlog_is_applied_in_order_within_the_bound(
    store: Store, tmp_path: Path
) -> None:
    w = make_world()
    sync = await make_sync(store, tmp_path / "folder", w.member, w.before)
    envelopes = [w.edit() for _ in range(40)]
    bound = 2 * max(len(e) for e in envelopes)
    frames: list[F.Frame] = [
        F.Deliver(relay_seq=i + 1, envelope=e) for i, e in enumerate(envelopes)
    ]
    frames.append(F.CaughtUp(head_seq=len(envelopes)))
    applied: list[int] = []
    most = 0
    original = sync.handle_remote

    async def observe(delivered: list[tuple[int, bytes]]) -> None:
        # Observed, not replaced: the queue's bytes as the applier takes a batch.
        nonlocal most
        most = max(most, sum(len(e) for _, e in delivered))
        applied.extend(s for s, _ in delivered)
        await original(delivered)

    sync.handle_remote = observe  # type: ignore[method-assign]
    async with scripted_relay(w.before.to_bytes(), frames) as url:
        await run_link(sync, w, url, bound)
    assert applied == list(range(1, len(envelopes) + 1))  # none dropped, none reordered
    # Below the bound before each one queued: at most the bound plus one envelope.
    assert most <= bound + max(len(e) for e in envelopes)
    assert sync.stats.quarantined == 0
