"""A hostile relay: it withholds, reorders, duplicates, replays or forges what it delivers.

Real processes (the session's ``world``): agent ``b`` reaches the real relay through the
in-test man in the middle (``InjectingProxy``), whose ``rewrite`` hook plays the misbehaving
relay on the frames going to b. Every envelope carries its sender's sequence number inside the
signed header, so b sees the holes and the replays (agent/relay_order.py), reports them in
``status`` (``gaps``, ``offenders`` with id "relay"), repairs what it can, and never applies a
forged envelope nor one twice.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from harness import wait_until
from security.sec_helpers import (
    SYNC_TIMEOUT,
    Replica,
    Space,
    Withhold,
    World,
    create_files_payload,
    deliver_from,
    device_identity,
    resign,
)

from qmoi_sync.agent.space import UNREPAIRED_GAP

pytestmark = pytest.mark.timeout(120)

# Offset of the sender key in an envelope header: version, suite, space_id 16, epoch u32.
_SENDER_AT = 1 + 1 + 16 + 4


class Reorder:
    """Holds the next envelope of ``sender``; when the one after it comes, delivers that one,
    then the held one, then the held one again (a replay: its relay seq goes backwards)."""

    def __init__(self, sender: bytes) -> None:
        self.sender = sender
        self.held: bytes | None = None
        self.done = False
        self._lock = threading.Lock()

    def __call__(self, msg: bytes | str) -> list[bytes | str]:
        with self._lock:
            if self.done or deliver_from(msg, self.sender) is None:
                return [msg]
            assert isinstance(msg, bytes)
            if self.held is None:
                self.held = msg
                return []
            self.done = True
            return [msg, self.held, self.held]


def relay_offences(st: dict[str, Any]) -> dict[str, int]:
    return {o["what"]: o["count"] for o in st["offenders"] if o["id"] == "relay"}


def gap_of(st: dict[str, Any], dev_id: str) -> dict[str, Any] | None:
    return next((g for g in st["gaps"] if g["id"] == dev_id), None)


async def test_withheld_envelopes_are_reported_then_repaired(world: World) -> None:
    """The relay withholds a's first edit from b for good — and everything a seals after its
    second edit, for a while. a's second edit shows b the hole (a's seqs jump): it is held
    (it depends on the missing one) and reported in ``status``; re-subscribing brings nothing,
    so the relay is charged with it and b asks the other members, in a sealed envelope through
    the same relay, for what it misses. a's answers are withheld too at first; once the relay
    lets a's new envelopes through, a's answer (new seqs) brings the withheld edit: b has both
    edits, the gap is listed as repaired by a state resync from a (about 25 s)."""
    a_pk = device_identity(world.a).public.sign_pk
    a_dev_id = device_identity(world.a).public.device_id
    withhold = Withhold(a_pk, allow=1)
    world.proxy.rewrite = withhold
    try:
        world.a.write("withheld-1.txt", "first\n")
        wait_until(
            lambda: withhold.withheld and world.a.space_status("notes")["pending_out"] == 0,
            SYNC_TIMEOUT,
            "the relay stored a's edit and the proxy withheld it",
        )
        world.a.write("withheld-2.txt", "second\n")
        wait_until(
            lambda: (g := gap_of(world.status(world.b), a_dev_id)) is not None and g["held"] >= 1,
            SYNC_TIMEOUT,
            "b reports the gap in a's stream",
        )
        gap = gap_of(world.status(world.b), a_dev_id)
        assert gap is not None
        assert gap["first_missing"] == min(withhold.withheld), (gap, withhold.withheld)
        # Re-subscribing does not fill it: the relay is named, b asks the members.
        wait_until(
            lambda: (
                relay_offences(st := world.status(world.b)).get(UNREPAIRED_GAP)
                and st["repair_requests"] >= 1
            ),
            SYNC_TIMEOUT,
            "b charges the relay with the gap and asks through the relay",
        )
        assert world.b.read("withheld-1.txt") is None
        text = world.b.cli("status").stdout
        assert f"gap: {a_dev_id[:7]}" in text and "offender: relay" in text, text
        # The relay now passes a's new envelopes (the withheld ones stay withheld).
        withhold.capturing = False
        wait_until(
            lambda: (
                world.b.read("withheld-1.txt") == "first\n"
                and world.b.read("withheld-2.txt") == "second\n"
            ),
            SYNC_TIMEOUT * 2,
            "a's answer brings the withheld edit",
        )
        wait_until(
            lambda: gap_of(world.status(world.b), a_dev_id) is None,
            SYNC_TIMEOUT,
            "the gap is closed",
        )
        st = world.status(world.b)
        repaired = [r for r in st["repaired_gaps"] if r["id"] == a_dev_id]
        assert repaired and repaired[-1]["how"] == "state resync through the relay", repaired
        assert repaired[-1]["by"] == a_dev_id
        assert world.status(world.a)["repair_replies"] >= 1
        assert "gap repaired:" in world.b.cli("status").stdout
        assert min(withhold.withheld) in withhold.withheld  # never delivered to b
    finally:
        withhold.release()
        world.proxy.rewrite = None
    world.made |= {"withheld-1.txt", "withheld-2.txt"}
    world.sync_goes_on()


async def test_reordered_and_replayed_deliveries_apply_once_in_order(world: World) -> None:
    """The relay swaps two of a's envelopes and delivers the first one twice. b applies each
    once, in a's order (the later one waits for its predecessor), and names the relay."""
    a_pk = device_identity(world.a).public.sign_pk
    before = relay_offences(world.status(world.b))
    dups = world.status(world.b)["duplicates"]
    reorder = Reorder(a_pk)
    world.proxy.rewrite = reorder
    try:
        world.a.write("reordered.txt", "line 1\n")
        wait_until(lambda: reorder.held is not None, SYNC_TIMEOUT, "the proxy holds a's edit")
        world.a.write("reordered.txt", "line 1\nline 2\n")
        wait_until(lambda: reorder.done, SYNC_TIMEOUT, "the proxy delivered them swapped")
        wait_until(
            lambda: world.b.read("reordered.txt") == "line 1\nline 2\n",
            SYNC_TIMEOUT,
            "b has both edits, in order",
        )
        wait_until(
            lambda: (
                relay_offences(world.status(world.b)).get("replayed an envelope (dropped)", 0)
                > before.get("replayed an envelope (dropped)", 0)
            ),
            SYNC_TIMEOUT,
            "b names the relay for the replay",
        )
        st = world.status(world.b)
        assert relay_offences(st).get("delivered out of order", 0) > before.get(
            "delivered out of order", 0
        ), st["offenders"]
        assert st["duplicates"] > dups
    finally:
        world.proxy.rewrite = None
    world.made.add("reordered.txt")
    assert world.b.read("reordered.txt") == "line 1\nline 2\n", "applied once, not twice"


async def test_forged_deliveries_are_refused_and_charged_to_the_relay(world: World) -> None:
    """Envelopes no member sealed as delivered — one naming a as its sender but signed by
    another key, one of a's captured envelopes with a flipped ciphertext bit — are quarantined
    and charged to the relay: a, whose name they carry, is not named. So is a validly signed
    envelope m sealed for another space it belongs to, replayed into this one."""
    world.a_to_b("forgery-base.txt", "base\n")
    rep = await world.replica()
    a_key = device_identity(world.a)
    a_pk = a_key.public.sign_pk
    captured = rep.by_sender[a_pk][-1][1]
    payload = create_files_payload(Replica(world.space), ["forged.txt"], "EVIL\n")
    mine = world.space.seal(world.m_dev, payload, seq=1)  # no hole in m's stream
    claims_a = resign(
        world.m_dev, mine[:_SENDER_AT] + a_pk + mine[_SENDER_AT + 32 : -64] + bytes(64)
    )
    flipped = bytearray(captured)
    flipped[len(flipped) // 2] ^= 0x01
    other_space = Space.create(n_members=0, extra=(world.m_dev,)).seal(world.m_dev, payload)
    q = world.quarantined(world.b)
    before = relay_offences(world.status(world.b))
    world.inject(claims_a)
    world.inject(bytes(flipped))
    world.inject(other_space)
    wait_until(lambda: world.quarantined(world.b) == q + 3, SYNC_TIMEOUT, "b quarantines all")
    st = world.status(world.b)
    after = relay_offences(st)
    assert after.get("bad_signature", 0) == before.get("bad_signature", 0) + 2, st["offenders"]
    assert after.get("wrong_space", 0) == before.get("wrong_space", 0) + 1, st["offenders"]
    assert not [o for o in st["offenders"] if o["id"] == a_key.public.device_id], st["offenders"]
    world.a_to_b("after-forgery.txt", "fine\n")
    assert world.b.read("forged.txt") is None and world.a.read("forged.txt") is None
