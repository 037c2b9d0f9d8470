"""edit_bytes: bytes on the wire for a one-character edit in a 1 MB text file.

The space is created with the URL of a byte-counting TCP proxy (bench/proxy.py) in front of the
relay, so every agent's relay connection goes through it (the invite carries that URL to b as
well). Connections are attributed to agent a by matching the proxy's client ports with a's own
TCP sockets (psutil). Steps:

1. write a 1 MB text file on a, wait until b has it byte for byte and both agents are idle
   (the bytes of this initial sync are reported too);
2. for each edit: reset, insert one character at some position in the middle of the file,
   wait until b has the new content, a's outbox is empty (the relay acked), and no byte moved
   through the proxy for 100 ms; report a→relay and relay→a bytes (raw, and net of the
   background rate measured in step 3 times the edit's window);
3. background noise: count over an idle window of 25 s (longer than the 20 s websocket ping
   interval) to get the rate of bytes the agents send on their own (pings/pongs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
from benchlib import Relay, cluster, verdict, wait_until, workdir
from proxy import CountingProxy

TARGET_BYTES = 1024
FILE = "big.txt"
SIZE = 1_000_000
QUIET_S = 0.1


def _big_text() -> str:
    lines = []
    n = 0
    total = 0
    while total < SIZE:
        line = f"{n:06d} the quick brown fox jumps over the lazy dog; pack my box with jugs\n"
        lines.append(line)
        total += len(line)
        n += 1
    return "".join(lines)[: SIZE - 1] + "\n"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _ports_of(pid: int, proxy_port: int) -> set[int]:
    proc = psutil.Process(pid)
    return {
        c.laddr.port
        for c in proc.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == proxy_port
    }


def _wait_quiet(proxy: CountingProxy) -> float:
    """Wait until no byte moved through the proxy for QUIET_S; return when the last one did."""
    last = proxy.totals()
    last_change = time.perf_counter()
    while time.perf_counter() - last_change < QUIET_S:
        time.sleep(0.005)
        now = proxy.totals()
        if now != last:
            last, last_change = now, time.perf_counter()
    return last_change


def run(quick: bool, keep: bool = False) -> dict[str, Any]:
    edits = 3 if quick else 10
    noise_window = 5.0 if quick else 25.0
    holder: dict[str, CountingProxy] = {}

    def via_proxy(relay: Relay) -> str:
        holder["proxy"] = CountingProxy("127.0.0.1", relay.port).start()
        return holder["proxy"].url

    try:
        with workdir("edit-bytes", keep) as tmp, cluster(tmp, space_url=via_proxy) as c:
            proxy = holder["proxy"]
            src, dst = c.a.folder / FILE, c.b.folder / FILE
            text = _big_text()
            c.a.wait_idle()
            c.b.wait_idle()
            a_ports = _ports_of(c.a.pid, proxy.port)
            if not a_ports:
                raise RuntimeError("agent a has no connection through the proxy")

            # 1. initial sync of the 1 MB file
            _wait_quiet(proxy)
            proxy.reset()
            t0 = time.perf_counter()
            src.write_text(text)
            wait_until(lambda: _read(dst) == text, timeout=120, what="1 MB file on b")
            t_initial = time.perf_counter() - t0
            c.a.wait_idle()
            c.b.wait_idle()
            _wait_quiet(proxy)
            initial_up, initial_down = proxy.totals(a_ports)

            # 2. one-character edits
            results = []
            for k in range(edits):
                a_ports = _ports_of(c.a.pid, proxy.port)  # in case a reconnected
                _wait_quiet(proxy)
                proxy.reset()
                pos = len(text) // 2 + k * 7919
                text = text[:pos] + "Z" + text[pos:]
                t0 = time.perf_counter()
                src.write_text(text)
                wait_until(
                    lambda t=text: _read(dst) == t, timeout=60, what="edit on b", interval=0.001
                )
                t_seen = time.perf_counter() - t0
                c.a.wait_idle()
                t_end = _wait_quiet(proxy) - t0
                up, down = proxy.totals(a_ports)
                all_up, all_down = proxy.totals()
                results.append(
                    {
                        "a_to_relay_raw": up,
                        "relay_to_a_raw": down,
                        "all_conns_up_raw": all_up,
                        "all_conns_down_raw": all_down,
                        "window_s": round(t_end, 3),
                        "visible_on_b_ms": round(t_seen * 1000, 1),
                    }
                )

            # 2. background traffic rate (pings/pongs, keepalives) over an idle window that
            # spans at least one websocket ping interval (20 s) in a full run
            _wait_quiet(proxy)
            proxy.reset()
            t0 = time.perf_counter()
            time.sleep(noise_window)
            noise_s = time.perf_counter() - t0
            noise_up, noise_down = proxy.totals(a_ports)
    finally:
        if "proxy" in holder:
            holder["proxy"].stop()

    rate_up = noise_up / noise_s
    for r in results:
        r["noise_estimate"] = round(rate_up * r["window_s"], 1)
        r["a_to_relay_net"] = max(0, round(r["a_to_relay_raw"] - r["noise_estimate"]))
    ups = sorted(r["a_to_relay_net"] for r in results)
    median = ups[len(ups) // 2]
    return {
        "file_size": SIZE,
        "edit": "insert one ASCII character near the middle of the file (in-place save)",
        "method": "TCP byte-counting proxy between the agents and the relay; a's connections "
        "identified by client port (psutil)",
        "initial_sync": {
            "seconds": round(t_initial, 3),
            "a_to_relay_bytes": initial_up,
            "relay_to_a_bytes": initial_down,
        },
        "noise": {
            "window_s": round(noise_s, 2),
            "a_to_relay": noise_up,
            "relay_to_a": noise_down,
            "a_to_relay_per_s": round(rate_up, 2),
        },
        "edits": results,
        "a_to_relay_net_median": median,
        "a_to_relay_net_max": ups[-1],
        "target_bytes": TARGET_BYTES,
        "verdict": verdict(median, TARGET_BYTES),
    }


def summary(r: dict[str, Any]) -> str:
    e = r["edits"]
    raw = sorted(x["a_to_relay_raw"] for x in e)
    lat = sorted(x["visible_on_b_ms"] for x in e)
    return (
        f"edit_bytes (1 char in 1 MB, n={len(e)}): a→relay median {r['a_to_relay_net_median']} B "
        f"net (raw {raw[0]}-{raw[-1]} B, noise {r['noise']['a_to_relay']} B) "
        f"[{r['verdict']} ≤{TARGET_BYTES} B]; visible on b in {lat[len(lat) // 2]} ms median; "
        f"initial 1 MB sync {r['initial_sync']['seconds']} s, "
        f"{r['initial_sync']['a_to_relay_bytes']} B up"
    )
