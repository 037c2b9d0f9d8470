"""Device awareness end to end: real relay and agent processes whose battery/AC/load/disk readings
come from a JSON file the test rewrites (the QMOI_SYNC_TEST_RESOURCES hook); the policy acting on
them is the agent's real one."""

from __future__ import annotations

from pathlib import Path

from harness import Device, wait_until
from resource_env import GiB, MiB, peer, policy, resource_cluster, warnings, write_atomic

BIG = "".join(f"{i:07d} a line of a large text file, bulk work to send\n" for i in range(40000))
assert 2 * MiB < len(BIG) < 4 * MiB


def _fail_with_logs(devices: list[Device], exc: AssertionError) -> AssertionError:
    logs = "\n".join(f"--- {d.name}\n{d.log()[-4000:]}" for d in devices)
    return AssertionError(f"{exc}\n{logs}")


def test_low_battery_defers_bulk_but_small_edits_flow(tmp_path: Path) -> None:
    readings = {"a": {"on_ac": False, "battery_percent": 10.0}, "b": {}}
    with resource_cluster(tmp_path, readings) as (_relay, (a, b), r):
        try:
            wait_until(
                lambda: policy(a).get("state") == "deferring_bulk", what="a deferring bulk work"
            )
            assert any("on battery at 10%" in x for x in policy(a)["reasons"]), policy(a)
            assert policy(b)["state"] == "normal"
            # b learns a's capabilities from the DeviceInfo a published at start.
            caps = wait_until(lambda: peer(b, "a").get("capabilities"), what="a's capabilities")
            assert caps["on_ac"] is False and caps["battery_percent"] == 10.0
            assert caps["cpu_count"] >= 1 and caps["memory_total"] > 0
            assert peer(b, "a")["platform"] and peer(b, "a")["last_seen"]

            # Small text keeps flowing.
            a.write("small.txt", "a small edit\n")
            wait_until(lambda: b.read("small.txt") == "a small edit\n", what="small file a→b")

            # A 2 MiB text file is bulk work: deferred, reported, not sent.
            write_atomic(a, "big.txt", BIG)
            wait_until(
                lambda: any("large file(s)" in w for w in warnings(a)),
                what="big.txt reported as deferred on a",
            )
            # Anything a sends after the deferral reaches b in order: once this later small
            # edit is on b, big.txt would be there too had it been sent.
            a.write("small.txt", "a small edit\nand another one\n")
            wait_until(
                lambda: b.read("small.txt") == "a small edit\nand another one\n",
                what="second small edit a→b",
            )
            assert b.read("big.txt") is None
            assert a.space_status()["pending_out"] == 0

            # Back on AC: the deferred file is ingested and sent.
            r["a"].set(on_ac=True, battery_percent=10.0)
            wait_until(lambda: policy(a).get("state") == "normal", what="a back to normal")
            wait_until(lambda: b.read("big.txt") == BIG, timeout=60, what="big.txt on b")
            assert not any("large file(s)" in w for w in warnings(a))
            # The power change is announced to the space.
            wait_until(
                lambda: (peer(b, "a").get("capabilities") or {}).get("on_ac") is True,
                what="b sees a on AC",
            )
        except AssertionError as exc:
            raise _fail_with_logs([a, b], exc) from None


def test_sustained_load_defers_bulk(tmp_path: Path) -> None:
    with resource_cluster(tmp_path, {"a": {"load": 1.7}, "b": {}}) as (_relay, (a, b), r):
        try:
            wait_until(lambda: policy(a).get("state") == "deferring_bulk", what="a deferring")
            assert any("system load 1.70" in x for x in policy(a)["reasons"]), policy(a)
            write_atomic(a, "big.txt", BIG)
            wait_until(lambda: any("large file(s)" in w for w in warnings(a)), what="deferred")
            a.write("after.txt", "sent after big.txt was deferred\n")
            wait_until(lambda: b.read("after.txt") is not None, what="after.txt on b")
            assert b.read("big.txt") is None
            r["a"].set(load=0.2)
            wait_until(lambda: b.read("big.txt") == BIG, timeout=60, what="big.txt on b")
        except AssertionError as exc:
            raise _fail_with_logs([a, b], exc) from None


def test_low_disk_holds_writes_until_space_is_freed(tmp_path: Path) -> None:
    base = "line 1: alpha\nline 2: beta\nline 3: gamma\n"
    with resource_cluster(tmp_path, {"a": {}, "b": {}}) as (_relay, (a, b), r):
        try:
            a.write("existing.txt", base)
            wait_until(lambda: b.read("existing.txt") == base, what="existing.txt on b")

            r["b"].set(disk_free=100 * MiB, disk_total=100 * GiB)
            wait_until(lambda: policy(b).get("state") == "disk_full", what="b sees a full disk")
            disk_warning = wait_until(
                lambda: next((w for w in warnings(b) if "disk almost full on" in w), None),
                what="disk warning on b",
            )
            assert "100 MiB free; not writing new files until space is freed" in disk_warning

            # A new remote file and a remote edit are applied and committed on b, not written.
            a.write("new.txt", "created while b's disk is full\n")
            a.write("existing.txt", base.replace("alpha", "ALPHA (edited on a)"))
            wait_until(
                lambda: any("(2 file(s) waiting)" in w for w in warnings(b)),
                what="b holding two documents back",
            )
            assert b.read("new.txt") is None
            assert b.read("existing.txt") == base

            # The user edits b's stale copy while its agent is down; the restart must neither
            # lose the held-back documents nor let this edit revert a's change.
            b.stop()
            b.write("existing.txt", base.replace("gamma", "GAMMA (edited on b)"))
            b.start()
            wait_until(
                lambda: any("file(s) waiting" in w for w in warnings(b)), what="still waiting"
            )
            assert b.read("new.txt") is None

            r["b"].set(disk_free=20 * GiB, disk_total=100 * GiB)
            merged = base.replace("alpha", "ALPHA (edited on a)").replace(
                "gamma", "GAMMA (edited on b)"
            )
            wait_until(
                lambda: b.read("new.txt") == "created while b's disk is full\n",
                what="new.txt written on b once space is free",
            )
            wait_until(lambda: b.read("existing.txt") == merged, what="merged edit on b")
            wait_until(lambda: a.read("existing.txt") == merged, what="merged edit on a")
            wait_until(lambda: policy(b).get("state") == "normal", what="b back to normal")
            assert not any("disk almost full" in w for w in warnings(b))
        except AssertionError as exc:
            raise _fail_with_logs([a, b], exc) from None


def test_status_shows_agent_usage(tmp_path: Path) -> None:
    with resource_cluster(tmp_path, {"a": {}}) as (_relay, (a,), _r):
        st = a.status()
        assert st is not None and a.proc is not None
        agent = st["agent"]
        assert agent["pid"] == a.proc.pid
        assert agent["rss_bytes"] > 10 * MiB
        assert agent["cpu_percent"] >= 0.0
        # Shown with 0.1 s resolution: 0.0 right after the start, then it grows.
        assert agent["uptime_s"] >= 0
        wait_until(lambda: (a.status() or {})["agent"]["uptime_s"] > 0, 30, "uptime grows")
        assert agent["policy"]["state"] == "normal"
        assert agent["policy"]["on_ac"] is True
        me = next(d for d in st["spaces"][0]["devices"] if d["this_device"])
        assert me["capabilities"]["disk_free"] == 50 * GiB
        out = a.cli("status").stdout
        assert "agent" in out and "rss" in out
