"""Replays and removed/unknown keys, at the relay and at the agent.

Real processes (the session's ``world``): a relay, agents ``a`` (admin) and ``b``, and member
``m`` (init + join, never started; the test speaks for it). ``b`` reaches the relay through an
in-test man in the middle that forwards everything and can inject frames: what a compromised relay
could deliver. So the agent's own defences are exercised where the relay's checks would otherwise
stop the input first.
"""

from __future__ import annotations

import time

import pytest
from harness import Device, invite, join, wait_until
from security.sec_helpers import (
    SYNC_TIMEOUT,
    Replica,
    Space,
    Wire,
    World,
    create_files_payload,
    device_identity,
)

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.protocol.payload import DeviceInfo, encode_payload

pytestmark = pytest.mark.timeout(120)


def name_of_m(world: World) -> str | None:
    for d in world.status(world.b)["devices"]:
        if d["short_id"] == world.m_dev.public.short_id:
            return d["name"]  # type: ignore[no-any-return]
    return None


async def test_relay_dedups_a_captured_envelope_republished_with_the_senders_key(
    world: World,
) -> None:
    """Someone holding a's key (or a buggy a) re-publishes a's captured envelopes: the relay
    answers "duplicate" with the original relay sequence and stores nothing."""
    world.a_to_b("captured.txt", "v1\n")
    rep = Replica(world.space)
    reader = await world.wire_as()
    await rep.catch_up(reader)
    a_key = device_identity(world.a)
    captured = rep.by_sender[a_key.public.sign_pk]
    assert len(captured) >= 2
    head_before = len(await reader.read_log())

    w = await world.wire_as(a_key)
    newest_seq, newest = captured[-1]
    ack = await w.publish(newest)
    assert isinstance(ack, F.Ack) and ack.duplicate and ack.relay_seq == newest_seq, ack
    oldest_seq, oldest = captured[0]
    ack = await w.publish(oldest)  # an older seq after a newer one
    assert isinstance(ack, F.Ack) and ack.duplicate and ack.relay_seq == oldest_seq, ack
    reader2 = await world.wire_as()
    assert len(await reader2.read_log()) == head_before, "a replay must not be stored"
    world.a_to_b("after-replay.txt", "still syncing\n")


async def test_agent_drops_a_replay_the_relay_did_not_stop(world: World) -> None:
    """m renames itself twice through the real relay; a (compromised) relay then delivers the
    first DeviceInfo again. b's replay window must drop it: the name stays the second one."""
    w = await world.wire_as()
    first = world.space.seal(world.m_dev, encode_payload(DeviceInfo("m-first", "test", "0")))
    second = world.space.seal(world.m_dev, encode_payload(DeviceInfo("m-second", "test", "0")))
    for env in (first, second):
        ack = await w.publish(env)
        assert isinstance(ack, F.Ack) and not ack.duplicate, ack
    wait_until(lambda: name_of_m(world) == "m-second", SYNC_TIMEOUT, "b learns m's name")
    q = world.quarantined(world.b)

    world.inject(first)
    # A fresh envelope injected after the replay: once its file exists, the replay was handled.
    rep = Replica(world.space)
    marker = create_files_payload(rep, ["marker-replay.txt"], "marker\n")
    world.inject(world.space.seal(world.m_dev, marker))
    wait_until(lambda: world.b.read("marker-replay.txt") == "marker\n", SYNC_TIMEOUT, "marker")
    assert name_of_m(world) == "m-second", "a replayed envelope was applied"
    assert world.quarantined(world.b) == q, "a replay is dropped, not quarantined"


async def test_agent_rejects_an_envelope_from_an_unknown_key(world: World) -> None:
    """An outsider who somehow holds the current epoch key cannot get past the relay
    (not_a_member); delivered by a compromised relay, b quarantines its envelope."""
    outsider = DeviceIdentity.generate()
    w = await Wire.open(world.relay.url)
    res = await w.auth(outsider, world.space.space_id)
    assert isinstance(res, F.Error) and res.code == "not_a_member", res

    q = world.quarantined(world.b)
    rep = Replica(world.space)
    world.inject(world.space.seal(outsider, create_files_payload(rep, ["intruder.txt"], "EVIL\n")))
    wait_until(lambda: world.quarantined(world.b) == q + 1, SYNC_TIMEOUT, "b quarantines it")
    world.a_to_b("after-intruder.txt", "fine\n")
    assert world.b.read("intruder.txt") is None and world.a.read("intruder.txt") is None


async def test_compromised_relay_cannot_break_the_agent(world: World) -> None:
    """What a relay could send besides envelopes: garbage and text frames cost the agent its
    connection (it reconnects), a garbage envelope is quarantined, a forged membership log is
    ignored with a warning. Sync goes on afterwards."""
    for bad in (b"\x42" + bytes(100), "a text frame", F.encode_frame(F.Deliver(1, b""))[:7]):
        before = world.proxy.connections
        world.proxy.inject_raw(bad)
        wait_until(
            lambda before=before: world.proxy.connections > before and world.proxy.connected(),
            SYNC_TIMEOUT,
            f"b reconnects after {bad!r:.20}",
        )
    q = world.quarantined(world.b)
    world.inject(b"\x01" + bytes(300))
    wait_until(lambda: world.quarantined(world.b) == q + 1, SYNC_TIMEOUT, "garbage quarantined")

    members = world.members_known_to(world.b)
    outsider = DeviceIdentity.generate()
    forged, secret = MembershipLog.create(outsider, now=time.time(), space_id=world.space.space_id)
    for _ in range(len(world.space.log) + 2):  # longer than the real log
        forged.add_member(outsider, DeviceIdentity.generate().public, Role.admin, {0: secret}, 0)
    world.proxy.inject(F.Membership(log=forged.to_bytes()))
    wait_until(
        lambda: any("rewrites history" in w for w in world.status(world.b)["warnings"]),
        SYNC_TIMEOUT,
        "b ignores the forged log",
    )
    assert world.members_known_to(world.b) == members
    world.sync_goes_on()


async def test_removed_member_is_refused_by_the_relay_and_by_the_agent(world: World) -> None:
    # A member of its own (so the session's m stays usable whatever the test order).
    tmp = world.tmp
    gone = Device(tmp / "home-gone", tmp / "folder-gone", "gone").init()
    join(gone, invite(world.a))
    space, dev = Space.of_device(gone)
    pk = dev.public.sign_pk
    wait_until(lambda: pk in world.members_known_to(world.b), SYNC_TIMEOUT, "b knows it")
    w_open = await Wire.open(world.relay.url)  # connected while it is removed
    assert isinstance(await w_open.auth(dev, space.space_id), F.Welcome)

    world.a.cli("revoke", "notes", dev.public.short_id)
    wait_until(lambda: pk not in world.members_known_to(world.b), SYNC_TIMEOUT, "b learns it")
    # The relay: the open connection is cut, a new one refused.
    err = await w_open.recv_skipping()
    assert isinstance(err, F.Error) and err.code == "revoked" and err.fatal, err
    w = await Wire.open(world.relay.url)
    res = await w.auth(dev, space.space_id)
    assert isinstance(res, F.Error) and res.code == "not_a_member" and res.fatal, res

    # Content of the new epoch reaches b (this also moves b's epoch fence past the removal).
    world.a_to_b("after-removal.txt", "new epoch\n")
    # The removed device still holds the old epoch key and seals a new envelope with it; a
    # compromised relay delivers it to b, which must refuse it.
    q = world.quarantined(world.b)
    payload = create_files_payload(Replica(space), ["ghost.txt"], "EVIL\n")
    world.inject(space.seal(dev, payload, epoch=0))
    wait_until(lambda: world.quarantined(world.b) == q + 1, SYNC_TIMEOUT, "b quarantines it")
    world.a_to_b("after-ghost.txt", "fine\n")
    assert world.b.read("ghost.txt") is None and world.a.read("ghost.txt") is None
