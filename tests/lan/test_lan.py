"""LAN peers with real mDNS between network namespaces (real agent processes, no mocks).

One shared world per module (like the security suite): namespaces a, b, c and f joined by a
LAN bridge (mDNS) and a separate relay network whose relay (in the hub namespace) starts
stopped. The tests run in order and build on each other:

1. relay configured but down: B joins A's space over the LAN, files flow both ways, binary
   files too (their chunks straight from the peer);
2. spoofed announcements (forged tag; replayed real tag behind a key outside the membership)
   get no envelope, state vector, log, welcome or chunk;
3. the relay starts: A's and B's outboxes drain and the chunks owed to the relay are uploaded;
   a third device C that only uses the relay gets every file;
4. an edit arriving over the LAN and through the relay is applied once; with both paths up a
   binary file's chunks come over the LAN;
5. B's LAN link goes down: edits keep flowing both ways through the relay, then the LAN comes
   back; a binary transfer cut mid-way finishes through the relay without starting over;
6. a space without any relay: invite and join over the LAN, files (text and binary) both ways.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from harness import wait_until
from lan.netns import LanNet, NsDevice, NsRelay, python_in
from resource_env import Readings

pytestmark = pytest.mark.slow

FAKE_PEER = Path(__file__).with_name("fake_peer.py")
#: The issue's target is a new peer found and authenticated within 2 s of its agent starting
#: (bench/lan.py measures it). Here it is asserted from the moment the agent's LAN service is up
#: (Python start-up and opening the database are not discovery; on a loaded CI machine they
#: alone can take seconds), with headroom.
DISCOVERY_LIMIT_S = 3.0


@dataclass
class World:
    net: LanNet
    tmp: Path
    relay: NsRelay
    a: NsDevice
    b: NsDevice
    c: NsDevice
    space_id: str = ""


@pytest.fixture(scope="module")
def world(net: LanNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("lan")
    relay = NsRelay(data=tmp / "relay-data", net=net)
    devs = [NsDevice(net, n, tmp / f"home-{n}", tmp / f"folder-{n}") for n in ("a", "b", "c")]
    w = World(net, tmp, relay, *devs)
    try:
        for d in devs:
            d.init()
            # Pinned resource readings (an idle machine on AC): the resource policy would
            # otherwise hold binary transfers back while the shared test machine is loaded.
            readings = Readings(tmp / f"resources-{d.node}.json")
            readings.set()
            d.env["QMOI_SYNC_TEST_RESOURCES"] = str(readings.path)
        # A and B do LAN on their LAN cable only (so unplugging it really cuts the LAN path);
        # C is a relay-only device.
        for d in (w.a, w.b):
            d.cli("config", "set", "lan.interfaces", "lan0")
        w.c.cli("config", "set", "lan.enabled", "false")
        yield w
    finally:
        for d in devs:
            d.stop()
        relay.stop()


def logged_at(dev: NsDevice, needle: str) -> float | None:
    """Wall-clock time of the first line of an agent's log that contains `needle`."""
    for line in dev.log().splitlines():
        if needle in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def path_of(dev: NsDevice, space: str, other: str) -> dict[str, Any] | None:
    for row in dev.space_status(space)["devices"]:
        if row["name"] == other:
            return row  # type: ignore[no-any-return]
    return None


def test_relay_down_lan_join_and_sync_both_ways(world: World) -> None:
    w = world
    w.relay.port = 18765  # not started: the relay is configured but down
    w.space_id = (
        w.a.cli(
            "space",
            "create",
            "notes",
            "--folder",
            str(w.a.folder),
            "--relay",
            w.relay.url,
            "--insecure",
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    w.a.space = "notes"
    w.a.write("from-a.txt", "written on a before b existed\n")
    w.a.start()
    token = w.a.cli("invite", "notes").stdout.strip().splitlines()[-1]
    # The relay is unreachable: the join succeeds over the LAN.
    out = w.b.cli(
        "join", token, "--folder", str(w.b.folder), "--name", "notes", "--insecure", timeout=60
    )
    assert "joined space notes" in out.stdout
    w.b.space = "notes"
    started = time.time()
    w.b.start()
    wait_until(
        lambda: w.b.read("from-a.txt") == "written on a before b existed\n",
        what="a's file reaches b over the LAN",
    )
    t = wait_until(lambda: logged_at(w.b, " connected for space "), what="b logs its LAN peer")
    up = logged_at(w.b, "LAN peers: listening on port")
    assert up is not None and up >= started - 1
    assert t - up < DISCOVERY_LIMIT_S, (
        f"b found and authenticated a {t - up:.2f}s after its LAN service was up "
        f"({t - started:.2f}s after its process started)"
    )

    w.b.write("from-b.txt", "hello from b\n")
    wait_until(lambda: w.a.read("from-b.txt") == "hello from b\n", what="b→a over the LAN")
    w.a.write("from-a.txt", "written on a before b existed\nand edited after\n")
    wait_until(
        lambda: w.b.read("from-a.txt") == "written on a before b existed\nand edited after\n",
        what="a's edit reaches b over the LAN",
    )
    row = path_of(w.a, "notes", "b")
    assert row is not None and row["path"] == "lan", row
    assert row["address"].startswith("10.213.1.")
    st = w.a.space_status("notes")
    assert st["relay"]["connected"] is False and st["lan"]["peers"] == 1
    assert st["pending_out"] > 0  # the relay outbox still holds everything for later


def sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def random_file(path: Path, size: int) -> str:
    """A binary file of random bytes (incompressible, and not text): its SHA-256."""
    data = os.urandom(size)
    tmp = path.with_name(f".~{path.name}")  # written whole, then renamed: one watcher event
    tmp.write_bytes(data)
    tmp.rename(path)
    return hashlib.sha256(data).hexdigest()


def counters(dev: NsDevice, space: str) -> dict[str, int]:
    """Chunk counters of a space: fetched by path (lan/relay) and served/received over LAN."""
    st = dev.space_status(space)
    lan = st["lan"] or {}
    return {
        "lan": st["chunks_lan"],
        "relay": st["chunks_relay"],
        "lan_bytes": st["chunk_bytes_lan"],
        "relay_bytes": st["chunk_bytes_relay"],
        "served": lan.get("chunks_served", 0),
        "received_bytes": lan.get("chunk_bytes_received", 0),
    }


def test_relay_down_binary_files_flow_over_lan(world: World) -> None:
    """Relay configured but stopped: binary files (several MiB, random) arrive byte-identical
    both ways, every chunk fetched from the peer over the LAN."""
    w = world
    a_sum = random_file(w.a.folder / "photo-a.bin", 6 * 1024 * 1024 + 12345)
    b_sum = random_file(w.b.folder / "photo-b.bin", 5 * 1024 * 1024 + 777)
    wait_until(lambda: sha(w.b.folder / "photo-a.bin") == a_sum, what="a's binary file on b")
    wait_until(lambda: sha(w.a.folder / "photo-b.bin") == b_sum, what="b's binary file on a")
    for dev, other in ((w.a, w.b), (w.b, w.a)):
        got = counters(dev, "notes")
        assert got["lan"] >= 3 and got["relay"] == 0, got  # 5-6 MiB: at least 3 chunks
        assert counters(other, "notes")["served"] >= 3
        row = path_of(dev, "notes", other.name)
        assert row is not None and row["lan_chunk_bytes_in"] >= 5 * 1024 * 1024, row
    st = w.a.space_status("notes")
    assert st["relay"]["connected"] is False and st["pending_up_files"] == 1  # owed to the relay
    human = w.b.cli("status", check=False).stdout  # the plain `status` says where chunks came from
    assert re.search(r"chunks \d+ lan / 0 relay", human), human


def a_chunk_id(dev: NsDevice, path: str) -> str:
    """The id of the first chunk of a binary file, from the agent's own chunk index."""
    db = next(dev.home.rglob("state.db"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute(
            "SELECT chunk_id FROM chunk_index WHERE path=? ORDER BY offset LIMIT 1", (path,)
        ).fetchone()
    assert row is not None, f"no chunk of {path} in {db}"
    return bytes(row[0]).hex()


def _fake_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_spoofed_announcements_get_nothing(world: World) -> None:
    w = world
    out = w.tmp / "fake.jsonl"
    log = w.tmp / "fake.log"
    before_a = w.a.space_status("notes")["lan"]["refused"]
    served = {d.name: counters(d, "notes")["served"] for d in (w.a, w.b)}
    # the fake asks whichever member it dials for a chunk both of them hold
    chunk = a_chunk_id(w.a, "photo-a.bin")
    proc = python_in(
        w.net,
        "f",
        FAKE_PEER,
        "--out",
        str(out),
        "--space-id",
        w.space_id,
        "--duration",
        "6",
        "--chunk-id",
        chunk,
        log=log,
    )
    try:
        # The agents dial the replayed-tag advertisement and refuse the non-member behind it;
        # the fake's own dial to A is refused after its (valid) signature.
        wait_until(
            lambda: any(e["event"] == "done" for e in _fake_events(out)),
            timeout=40,
            what=f"fake peer finished (log: {log.read_text() if log.exists() else ''})",
        )
    finally:
        proc.kill()
        proc.wait()
    events = _fake_events(out)
    copied = next(e for e in events if e["event"] == "copied")
    assert copied["member"].startswith(("10.213.1.1:", "10.213.1.2:"))
    forged_port = 47801
    replay_port = 47802
    # Nobody even connected to the advertisement with a forged tag.
    assert not [e for e in events if e.get("port") == forged_port and e["event"] != "advertised"]
    # Members connected to the replayed tag (the test exercised the membership check) ...
    hellos = [e for e in events if e.get("port") == replay_port and e.get("frame") == "PeerHello"]
    assert hellos, events
    # ... and sent nothing after their hello: no key, no log, no envelope, no state vector.
    received = {e.get("frame") for e in events if e["event"] in ("frame", "client_frame")}
    assert received <= {"PeerHello", "PeerChallenge"}, received
    # As a client with a valid signature but a key outside the membership: refused after Auth,
    # and its chunk requests (sent right behind the Auth) got no answer, no chunk data.
    client = [e["frame"] for e in events if e["event"] == "client_frame"]
    assert client == ["PeerChallenge"], client
    assert any(e["event"] == "chunk_asked" for e in events), events
    assert {d.name: counters(d, "notes")["served"] for d in (w.a, w.b)} == served
    assert "not a member" in w.a.log() + w.b.log()
    assert w.a.space_status("notes")["lan"]["refused"] > before_a
    # the real peers are still connected to each other
    row = path_of(w.a, "notes", "b")
    assert row is not None and row["path"] == "lan"


def test_relay_starts_and_catches_up(world: World) -> None:
    w = world
    w.relay.start()
    for d in (w.a, w.b):
        wait_until(
            lambda d=d: d.space_status("notes")["pending_out"] == 0,
            timeout=45,
            what=f"{d.name}'s outbox drained to the relay once it is up",
        )
    token = w.a.cli("invite", "notes").stdout.strip().splitlines()[-1]
    w.c.cli("join", token, "--folder", str(w.c.folder), "--name", "notes", "--insecure", timeout=60)
    w.c.space = "notes"
    w.c.start()
    # the chunks a published while the relay was down are uploaded now that it is up
    wait_until(
        lambda: w.a.space_status("notes")["pending_up_files"] == 0,
        timeout=60,
        what="a's chunks owed to the relay uploaded",
    )
    expected = w.a.tree()
    assert set(expected) == {"from-a.txt", "from-b.txt", "photo-a.bin", "photo-b.bin"}
    wait_until(lambda: w.c.tree() == expected, timeout=60, what="relay-only c gets every file")
    assert counters(w.c, "notes")["relay"] >= 6 and counters(w.c, "notes")["lan"] == 0
    assert w.c.space_status("notes")["lan"]["enabled"] is False
    row = path_of(w.c, "notes", "a")
    assert row is not None and row["path"] == "relay", row


def test_edit_on_both_paths_is_applied_once(world: World) -> None:
    w = world
    wait_until(
        lambda: (path_of(w.b, "notes", "a") or {}).get("path") == "lan", what="a and b on the LAN"
    )
    before = w.b.space_status("notes")["duplicates"]
    text = ""
    for i in range(5):
        text += f"line {i} from a\n"
        w.a.write("both.txt", text)
        wait_until(lambda t=text: w.b.read("both.txt") == t, what=f"edit {i} reaches b")
    for d in (w.b, w.c):
        wait_until(lambda d=d: d.read("both.txt") == text, what=f"{d.name} converges")
    # every envelope reached b twice (LAN first, then the relay) and was applied once
    wait_until(
        lambda: w.b.space_status("notes")["duplicates"] >= before + 5,
        timeout=20,
        what="relay copies dropped as duplicates on b",
    )
    assert w.b.read("both.txt") == text and w.c.read("both.txt") == text


def test_both_paths_up_chunks_come_over_the_lan(world: World) -> None:
    w = world
    wait_until(
        lambda: (path_of(w.b, "notes", "a") or {}).get("path") == "lan", what="a and b on the LAN"
    )
    before = counters(w.b, "notes")
    digest = random_file(w.a.folder / "both-paths.bin", 8 * 1024 * 1024 + 99)
    wait_until(lambda: sha(w.b.folder / "both-paths.bin") == digest, what="binary file on b")
    after = counters(w.b, "notes")
    # a published it once the relay held its chunks, yet b took every one from a over the LAN
    assert after["lan"] - before["lan"] >= 4, (before, after)
    assert after["relay"] == before["relay"], (before, after)
    wait_until(
        lambda: sha(w.c.folder / "both-paths.bin") == digest, what="relay-only c gets it too"
    )


def _tc(net: LanNet, *args: str) -> None:
    subprocess.run(["tc", "-n", net.hub, *args], check=True, capture_output=True, timeout=20)


def test_link_down_mid_transfer_finishes_through_the_relay(world: World) -> None:
    """B's LAN cable is pulled while it fetches a binary file from A over the LAN: the rest
    comes through the relay, and what already arrived is kept (not fetched again)."""
    w = world
    wait_until(
        lambda: (path_of(w.b, "notes", "a") or {}).get("path") == "lan", what="a and b on the LAN"
    )
    size = 24 * 1024 * 1024
    # Slow the LAN towards b (the hub's end of b's LAN cable) so the transfer takes seconds.
    hub_end = f"l{w.net.nodes['b']}-b"
    _tc(w.net, "qdisc", "add", "dev", hub_end, "root", "tbf", "rate", "24mbit",
        "burst", "64kb", "latency", "2s")  # fmt: skip
    before = counters(w.b, "notes")
    try:
        digest = random_file(w.a.folder / "cut.bin", size)
        wait_until(
            lambda: counters(w.b, "notes")["received_bytes"] > before["received_bytes"],
            what="b receives chunks over the LAN",
        )
        w.net.link("b", up=False)
        try:
            wait_until(
                lambda: sha(w.b.folder / "cut.bin") == digest,
                timeout=60,
                what="the transfer finishes through the relay",
            )
        finally:
            w.net.link("b", up=True)
    finally:
        _tc(w.net, "qdisc", "del", "dev", hub_end, "root")
    after = counters(w.b, "notes")
    lan = after["lan_bytes"] - before["lan_bytes"]
    relay = after["relay_bytes"] - before["relay_bytes"]
    assert lan > 0 and relay > 0, (before, after)
    # resumed, not restarted: the relay sent only what the LAN had not delivered
    assert relay < size, (lan, relay)
    wait_until(
        lambda: (path_of(w.a, "notes", "b") or {}).get("path") == "lan",
        timeout=40,
        what="the LAN path comes back",
    )


def test_peer_disappears_falls_back_to_relay(world: World) -> None:
    w = world
    w.net.link("b", up=False)
    try:
        text = ""
        for i in range(4):
            text += f"while b is off the LAN {i}\n"
            w.a.write("fallback.txt", text)
        w.b.write("from-b-offline.txt", "b, relay only\n")
        wait_until(
            lambda: w.b.read("fallback.txt") == text,
            timeout=30,
            what="a's edits reach b through the relay",
        )
        wait_until(
            lambda: w.a.read("from-b-offline.txt") == "b, relay only\n",
            timeout=30,
            what="b's edit reaches a through the relay",
        )
        wait_until(
            lambda: (path_of(w.a, "notes", "b") or {}).get("path") == "relay",
            timeout=30,
            what="a sees b through the relay only",
        )
    finally:
        w.net.link("b", up=True)
    wait_until(
        lambda: (path_of(w.a, "notes", "b") or {}).get("path") == "lan",
        timeout=40,
        what="the LAN path comes back",
    )
    w.b.write("back.txt", "back on the LAN\n")
    wait_until(lambda: w.a.read("back.txt") == "back on the LAN\n", what="b→a again")
    for d in (w.a, w.b, w.c):
        wait_until(lambda d=d: d.read("fallback.txt") == text, what=f"{d.name} has every edit")


def test_lan_only_space_invite_and_join(world: World) -> None:
    w = world
    w.a.stop()
    w.a.cli("space", "create", "solo", "--folder", str(w.tmp / "solo-a"))
    w.a.start()
    solo_a = w.tmp / "solo-a"
    (solo_a / "one.txt").write_text("one, from a\n")
    token = w.a.cli("invite", "solo").stdout.strip().splitlines()[-1]
    w.b.stop()
    w.b.cli("join", token, "--folder", str(w.tmp / "solo-b"), "--name", "solo", timeout=60)
    w.b.start()
    solo_b = w.tmp / "solo-b"
    wait_until(
        lambda: (
            (solo_b / "one.txt").exists() and (solo_b / "one.txt").read_text() == "one, from a\n"
        ),
        what="a→b in the LAN-only space",
    )
    (solo_b / "two.txt").write_text("two, from b\n")
    wait_until(
        lambda: (
            (solo_a / "two.txt").exists() and (solo_a / "two.txt").read_text() == "two, from b\n"
        ),
        what="b→a in the LAN-only space",
    )
    # binary files, random and several MiB, both ways: their chunks can only come from the peer
    a_sum = random_file(solo_a / "solo-a.bin", 7 * 1024 * 1024 + 3)
    b_sum = random_file(solo_b / "solo-b.bin", 4 * 1024 * 1024 + 5)
    wait_until(lambda: sha(solo_b / "solo-a.bin") == a_sum, what="a's binary file on b (LAN only)")
    wait_until(lambda: sha(solo_a / "solo-b.bin") == b_sum, what="b's binary file on a (LAN only)")
    assert counters(w.b, "solo")["lan"] >= 3 and counters(w.a, "solo")["lan"] >= 2
    st = w.a.space_status("solo")
    assert st["relay"]["url"] is None and st["pending_out"] == 0 and st["pending_up_files"] == 0
    row = path_of(w.a, "solo", "b")
    assert row is not None and row["path"] == "lan" and row["name"] == "b"
    assert re.match(r"10\.213\.1\.2:\d+$", row["address"]), row
    # the relay space kept syncing after both restarts
    w.a.write("after-restart.txt", "still syncing\n")
    wait_until(lambda: w.c.read("after-restart.txt") == "still syncing\n", what="notes still syncs")


def test_revoked_device_is_cut_off_the_lan(world: World) -> None:
    """A device removed from a LAN-only space loses its session at once and cannot get a new
    one: what it writes afterwards never reaches the others."""
    w = world
    solo_a, solo_b = w.tmp / "solo-a", w.tmp / "solo-b"
    refused = w.a.space_status("solo")["lan"]["refused"]
    w.a.cli("revoke", "solo", "b")
    wait_until(lambda: w.a.space_status("solo")["lan"]["peers"] == 0, what="b's session closed")
    assert path_of(w.a, "solo", "b") is None  # not a member any more
    (solo_b / "after-revoke.txt").write_text("b, removed\n")
    # b learns of its removal from the log a sent, or redials and is refused: either way it has
    # no way in any more
    wait_until(
        lambda: (
            w.b.space_status("solo")["state"] == "error"
            or w.a.space_status("solo")["lan"]["refused"] > refused
        ),
        what="b knows it was removed, or a refused it",
    )
    (solo_a / "after-revoke-a.txt").write_text("a, after the revocation\n")
    wait_until(lambda: w.a.space_status("solo")["files"] >= 5, what="a took in its own file")
    assert not (solo_a / "after-revoke.txt").exists()
    assert w.a.space_status("solo")["lan"]["peers"] == 0
