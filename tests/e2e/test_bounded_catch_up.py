"""A large catch-up with the relay link's delivery queue bounded far below one envelope
(agent/deliver_gate.py, QMOI_SYNC_DELIVER_QUEUE_BYTES): the reader stops reading after every
envelope until it is applied, and the device still converges, with nothing quarantined, while
a third device joins (a Membership frame in the middle of the stream) and writes."""

from __future__ import annotations

from pathlib import Path

from harness import Device, Relay, create_space, invite, join, wait_converged, wait_idle, wait_until

FILES = 1500


def test_catch_up_converges_with_a_tiny_delivery_bound(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay-data").start()
    a = Device(tmp_path / "home-a", tmp_path / "folder-a", "a").init()
    tiny = {"QMOI_SYNC_DELIVER_QUEUE_BYTES": "2048"}
    b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b", env=tiny).init()
    c = Device(tmp_path / "home-c", tmp_path / "folder-c", "c", env=tiny).init()
    try:
        create_space(a, relay)
        for i in range(FILES):
            a.write(f"d{i % 30}/f{i}.txt", f"file {i}\n" + "x" * (i % 200) + "\n")
        a.start()
        wait_until(
            lambda: a.space_status()["files"] >= FILES, timeout=120, what="a indexed its files"
        )
        wait_idle(a, timeout=120)
        join(b, invite(a))
        b.start()
        # While b catches up: c joins (the relay sends b a Membership frame) and writes.
        join(c, invite(a))
        c.start()
        c.write("from-c.txt", "c was here\n")
        tree = wait_converged([a, b, c], timeout=240, what="a, b and c converge")
        assert len([p for p in tree if p.endswith(".txt")]) == FILES + 1
        for dev in (a, b, c):
            assert dev.space_status()["quarantined"] == 0, dev.log()
    finally:
        for dev in (a, b, c):
            dev.stop()
        relay.stop()
