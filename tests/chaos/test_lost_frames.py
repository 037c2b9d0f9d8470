"""Regression tests: a frame lost on a live relay connection (the link stays up).

Found by the chaos runner with the proxy's "vanish" drops (seeds 11 and 12): a Deliver that
vanished was skipped for good (the device applied the later ones and moved its cursor past
it), and a Publish or Ack that vanished left the change in the outbox until some unrelated
reconnect. Each test makes exactly one such frame vanish and checks the other device still
gets the change although the link stays up (agent/relay_order.py repairs the delivery gap,
agent/ack_watch.py resends the unacknowledged publish).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from harness import Device, Relay, create_space, invite, join, wait_until

from chaos.faultproxy import FaultProxy
from chaos.runner import set_relay_url

DELIVER, PUBLISH = 0x83, 0x04
# The agent subscribes again once a gap is open GAP_REPORT_S (3 s), and reconnects after
# ACK_TIMEOUT_S (20 s) without an Ack; generous on top.
TIMEOUT = 90


@contextlib.contextmanager
def two_devices(tmp: Path) -> Iterator[tuple[Device, Device, FaultProxy]]:
    """a on the relay directly, b through a fault proxy."""
    relay = Relay(tmp / "relay-data").start()
    proxy = FaultProxy(relay.port).start()
    a = Device(tmp / "home-a", tmp / "folder-a", "a").init()
    b = Device(tmp / "home-b", tmp / "folder-b", "b").init()
    try:
        create_space(a, relay)
        a.start()
        join(b, invite(a))
        set_relay_url(b, proxy.url)
        b.start()
        a.write("first.txt", "hello\n")
        wait_until(lambda: b.read("first.txt") == "hello\n", timeout=TIMEOUT, what="b synced")
        yield a, b, proxy
    finally:
        a.stop()
        b.stop()
        relay.stop()
        proxy.stop()


def test_deliver_or_publish_lost_on_a_live_link_is_recovered(tmp_path: Path) -> None:
    # One cluster for both losses: setting up agents is most of the cost.
    with two_devices(tmp_path) as (a, b, proxy):
        # 1. a Deliver to b vanishes; a later one reveals the hole; b subscribes again
        proxy.vanish_next("down", 1, DELIVER)
        a.write("lost.txt", "this Deliver vanishes\n")
        wait_until(lambda: proxy.counts["vanish_down_0x83"] == 1, timeout=TIMEOUT, what="loss")
        a.write("later.txt", "this one reveals the hole\n")
        wait_until(
            lambda: (
                b.read("lost.txt") == "this Deliver vanishes\n"
                and b.read("later.txt") == "this one reveals the hole\n"
            ),
            timeout=TIMEOUT,
            what="b has the lost change",
        )
        # fetched again by a new subscription on the same connection (agent/relay_link.py)
        assert "sequence gap; subscribing again" in b.log()

        # 2. b's Publish vanishes: no Ack comes, b reconnects and resends its outbox
        proxy.vanish_next("up", 1, PUBLISH)
        b.write("from-b.txt", "this Publish vanishes\n")
        wait_until(lambda: proxy.counts["vanish_up_0x04"] == 1, timeout=TIMEOUT, what="loss")
        wait_until(
            lambda: a.read("from-b.txt") == "this Publish vanishes\n",
            timeout=TIMEOUT,
            what="a has b's change",
        )
        wait_until(lambda: b.space_status()["pending_out"] == 0, what="b's outbox acknowledged")
