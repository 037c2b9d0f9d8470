"""LAN benchmark: `python bench/lan.py [--quick] [--keep]` (root: it builds network namespaces).

Two agents in two network namespaces joined by a bridge (tests/lan/netns.py: nothing leaves
those namespaces), sharing a space without any relay, so every byte goes over the LAN path
(mDNS discovery, authenticated websocket, envelopes applied through `handle_peer`).

* discovery: b's agent is (re)started `rounds` times; the time from starting the process to the
  agent's log line "LAN: ... connected for space" (found over mDNS, dialed or accepted, mutual
  challenge checked against the membership, session registered). Target: within 2 s.
* latency: one small text edit saved on a, until the bench process reads the new content from
  b's copy (inotify on b's folder + a read to confirm), as bench/scenario_latency.py does for
  the relay path. Target: p50 <= 20 ms.

* bulk (``--part bulk``; ``all`` runs every part): a 200 MiB random file written on a, until
  b's copy is complete (full size; SHA-256 checked after, not timed), over the LAN path (a space
  without relay) and through a relay in the hub namespace (a second space, LAN sync off for it,
  same machine, same namespaces), alternated run by run so both see the same load. Target: the
  LAN at least as fast as the relay. b's chunk counters (`chunks_lan` / `chunks_relay`) confirm
  which path each run took.

Writes bench/results/lan-<timestamp>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from benchlib import Inotify, percentile, verdict, workdir, write_result  # noqa: E402
from harness import wait_until  # noqa: E402


def _load_netns() -> Any:
    # tests/lan/netns.py by path: this file's own name shadows the `lan` test package.
    spec = importlib.util.spec_from_file_location("lan_netns", BENCH.parent / "tests/lan/netns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lan_netns"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


_netns = _load_netns()
NetnsUnavailable = _netns.NetnsUnavailable
NsDevice = _netns.NsDevice
NsRelay = _netns.NsRelay
lan_net = _netns.lan_net

TARGET_DISCOVERY_S = 2.0
TARGET_P50_MS = 20.0
FILE = "lan-latency.txt"
LINES = 40
TIMEOUT_S = 10.0
MiB = 1024 * 1024
BULK_SIZE = 200 * MiB
BULK_BLOCK = 8 * MiB


def _content(i: int) -> str:
    lines = [f"line {n:02d}: the quick brown fox jumps over the lazy dog\n" for n in range(LINES)]
    lines[LINES // 2] = f"line {LINES // 2:02d}: edit number {i} made at {time.time():.6f}\n"
    return "".join(lines)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _logged_after(dev: Any, since: float, needle: str) -> float | None:
    """Wall-clock time of the first log line containing `needle` at or after `since`."""
    for line in dev.log().splitlines():
        if needle in line:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at
    return None


CONNECTED = " connected for space "
LAN_UP = "LAN peers: listening on port"


def run(quick: bool, keep: bool) -> dict[str, Any]:
    rounds = 3 if quick else 10
    samples = 30 if quick else 200
    warmup = 5 if quick else 20
    with workdir("lan", keep) as tmp, lan_net(["a", "b"]) as net:
        a = NsDevice(net, "a", tmp / "home-a", tmp / "folder-a").init()
        b = NsDevice(net, "b", tmp / "home-b", tmp / "folder-b").init()
        try:
            a.cli("space", "create", "bench", "--folder", str(a.folder))
            a.start()
            token = a.cli("invite", "bench").stdout.strip().splitlines()[-1]
            t0 = time.monotonic()
            b.cli("join", token, "--folder", str(b.folder), "--name", "bench", timeout=60)
            join_s = time.monotonic() - t0

            discovery: list[float] = []
            from_lan_up: list[float] = []
            for r in range(rounds):
                if r:
                    b.stop()
                started = time.time()
                b.start()
                at = wait_until(
                    lambda s=started: _logged_after(b, s, CONNECTED), timeout=30, what="b connected"
                )
                discovery.append(at - started)
                up = _logged_after(b, started, LAN_UP)
                if up is not None:
                    from_lan_up.append(at - up)

            src, dst = a.folder / FILE, b.folder / FILE
            first = _content(-1)
            src.write_text(first)
            wait_until(lambda: _read(dst) == first, timeout=30, what="seed file on b")
            values: list[float] = []
            timeouts = 0
            with Inotify(b.folder) as ino:
                for i in range(warmup + samples):
                    text = _content(i)
                    ino.drain()
                    t1 = time.perf_counter()
                    with open(src, "w") as f:
                        f.write(text)
                    deadline = t1 + TIMEOUT_S
                    ms = None
                    while (left := (deadline - time.perf_counter()) * 1000) > 0:
                        if FILE in ino.read(left) and _read(dst) == text:
                            ms = (time.perf_counter() - t1) * 1000
                            break
                    if ms is None:
                        timeouts += 1
                        continue
                    if i >= warmup:
                        values.append(ms)
                    time.sleep(0.02)  # a person does not save 50 times a second
            status = a.status() or {}
            peer = next(
                (d for s in status.get("spaces", []) for d in s["devices"] if d["name"] == "b"),
                {},
            )
        finally:
            a.stop()
            b.stop()
    p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
    d50 = percentile(discovery, 50)
    return {
        "setup": "2 agents in 2 network namespaces on one bridge; space without relay",
        "join_over_lan_s": round(join_s, 3),
        "discovery": {
            "definition": "agent process start -> peer found over mDNS and authenticated",
            "rounds": rounds,
            "s": [round(x, 3) for x in discovery],
            "p50_s": round(d50, 3),
            "max_s": round(max(discovery), 3),
            "from_lan_service_up_s": [round(x, 3) for x in from_lan_up],
            "from_lan_service_up_p50_s": round(percentile(from_lan_up, 50), 3),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "target_s": TARGET_DISCOVERY_S,
            "verdict": verdict(max(discovery), TARGET_DISCOVERY_S),
        },
        "latency": {
            "method": "inotify on b's folder + read to confirm; in-place save on a",
            "samples": len(values),
            "warmup": warmup,
            "timeouts": timeouts,
            "ms": {
                "p50": round(p50, 2),
                "p90": round(p90, 2),
                "p99": round(p99, 2),
                "max": round(max(values), 2) if values else None,
                "min": round(min(values), 2) if values else None,
            },
            "target_p50_ms": TARGET_P50_MS,
            "verdict": verdict(p50, TARGET_P50_MS),
            "raw_ms": [round(v, 3) for v in values],
        },
        "peer_status": {k: peer.get(k) for k in ("path", "address", "rtt_ms")},
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BULK_BLOCK):
            h.update(block)
    return h.hexdigest()


def _chunk_counts(dev: Any, space: str) -> tuple[int, int]:
    st = dev.space_status(space)
    return int(st.get("chunks_lan", 0)), int(st.get("chunks_relay", 0))


def _bulk_once(a_dir: Path, b_dir: Path, name: str, seed: int) -> dict[str, Any]:
    # The random data is made ahead (not timed), as in scenario_binary.py.
    rng = random.Random(seed)
    blocks = [
        rng.randbytes(min(BULK_BLOCK, BULK_SIZE - i)) for i in range(0, BULK_SIZE, BULK_BLOCK)
    ]
    digest = hashlib.sha256(b"".join(blocks)).hexdigest()
    dst = b_dir / name
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(a_dir / name, "wb") as f:
        for block in blocks:
            f.write(block)
    t_written = time.perf_counter()
    del blocks
    wait_until(lambda: _size(dst) == BULK_SIZE, timeout=600, what=f"{name} on b", interval=0.002)
    t1 = time.perf_counter()
    return {
        "seconds": round(t1 - t0, 3),
        "write_s": round(t_written - t0, 3),
        "identical": _sha(dst) == digest,
        "load_1m_before": round(load, 2),
    }


def run_bulk(runs: int, keep: bool) -> dict[str, Any]:
    with workdir("lan-bulk", keep) as tmp, lan_net(["a", "b"]) as net:
        a = NsDevice(net, "a", tmp / "home-a", tmp / "folder-a").init()
        b = NsDevice(net, "b", tmp / "home-b", tmp / "folder-b").init()
        relay = NsRelay(data=tmp / "relay-data", net=net)
        dirs = {
            (dev.node, space): tmp / f"{space}-{dev.node}"
            for dev in (a, b)
            for space in ("lanonly", "viarelay")
        }
        try:
            relay.start()
            for dev in (a, b):
                # as scenario_binary.py: bulk work never deferred for load (the machine is busy)
                (dev.home / "policy.json").write_text(json.dumps({"load_max": 1000.0}))
            a.cli("space", "create", "lanonly", "--folder", str(dirs["a", "lanonly"]))
            a.cli(
                "space", "create", "viarelay", "--folder", str(dirs["a", "viarelay"]),
                "--relay", relay.url, "--insecure",
            )  # fmt: skip
            a.cli("config", "set", "--space", "viarelay", "lan.enabled", "false")
            a.start()
            for space in ("lanonly", "viarelay"):
                token = a.cli("invite", space).stdout.strip().splitlines()[-1]
                b.cli(
                    "join", token, "--folder", str(dirs["b", space]), "--name", space,
                    "--insecure", timeout=60,
                )  # fmt: skip
            b.cli("config", "set", "--space", "viarelay", "lan.enabled", "false")
            b.start()
            for space in ("lanonly", "viarelay"):
                (dirs["a", space] / "seed.txt").write_text(space)
                wait_until(
                    lambda sp=space: _read(dirs["b", sp] / "seed.txt") == sp,
                    timeout=60,
                    what=f"{space} syncing",
                )
            samples: dict[str, list[dict[str, Any]]] = {"lan": [], "relay": []}
            for i in range(runs):
                for path, space in (("lan", "lanonly"), ("relay", "viarelay")):
                    before = _chunk_counts(b, space)
                    one = _bulk_once(dirs["a", space], dirs["b", space], f"bulk-{i}.bin", i)
                    after = _chunk_counts(b, space)
                    one["b_chunks_lan"] = after[0] - before[0]
                    one["b_chunks_relay"] = after[1] - before[1]
                    samples[path].append(one)
            relay_blobs = sum(
                p.stat().st_size for p in (relay.data / "blobs").rglob("*") if p.is_file()
            )
        finally:
            a.stop()
            b.stop()
            relay.stop()
    med = {k: sorted(x["seconds"] for x in v)[len(v) // 2] for k, v in samples.items()}
    return {
        "setup": (
            "2 agents in 2 network namespaces (veth + bridge); LAN: space without relay; "
            "relay: a second space, LAN sync off for it, relay process in the hub namespace"
        ),
        "bytes": BULK_SIZE,
        "runs": samples,
        "median_s": med,
        "lan_over_relay": round(med["lan"] / med["relay"], 3) if med["relay"] else None,
        "relay_blob_bytes": relay_blobs,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "target": "LAN median <= relay median",
        "verdict": verdict(med["lan"], med["relay"]),
    }


def summary(r: dict[str, Any]) -> str:
    if "latency" not in r:
        return bulk_summary(r["bulk"])
    text = _latency_summary(r)
    if "bulk" in r:
        text += "\n" + bulk_summary(r["bulk"])
    return text


def bulk_summary(b: dict[str, Any]) -> str:
    m = b["median_s"]
    return (
        f"lan bulk: 200 MiB a→b median LAN {m['lan']} s vs relay {m['relay']} s "
        f"(ratio {b['lan_over_relay']}) [{b['verdict']} LAN ≤ relay]; runs LAN "
        f"{[x['seconds'] for x in b['runs']['lan']]}, relay "
        f"{[x['seconds'] for x in b['runs']['relay']]}; load {b['load_average_1_5_15'][0]}"
    )


def _latency_summary(r: dict[str, Any]) -> str:
    d, lat = r["discovery"], r["latency"]
    m = lat["ms"]
    return (
        f"lan: discovery p50 {d['p50_s']} s, max {d['max_s']} s "
        f"[{d['verdict']} ≤{d['target_s']:g} s] (after the LAN service is up: p50 "
        f"{d['from_lan_service_up_p50_s']} s; load {d['load_average_1_5_15'][0]})"
        f"; edit a→b p50 {m['p50']} ms [{lat['verdict']} ≤{lat['target_p50_ms']:g}], "
        f"p90 {m['p90']} ms, p99 {m['p99']} ms (n={lat['samples']}); join over LAN "
        f"{r['join_over_lan_s']} s"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 discovery rounds, 30 edits")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--part",
        choices=["all", "latency", "bulk"],
        default="all",
        help="latency: discovery + edit latency; bulk: 200 MiB LAN vs relay (3 runs each, 1 "
        "with --quick)",
    )
    args = p.parse_args()
    try:
        result: dict[str, Any] = {}
        if args.part in ("all", "latency"):
            result = run(args.quick, args.keep)
        if args.part in ("all", "bulk"):
            result["bulk"] = run_bulk(1 if args.quick else 3, args.keep)
    except NetnsUnavailable as exc:
        print(f"lan bench needs network namespaces: {exc}", file=sys.stderr)
        return 2
    path = write_result("lan", result, args.quick)
    print(summary(result))
    print(f"results: {path}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("latency", "bulk")})[:400])
    return 0


if __name__ == "__main__":
    os.environ.pop("QMOI_SYNC_LAN", None)
    sys.exit(main())
