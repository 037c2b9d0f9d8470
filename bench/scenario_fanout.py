"""relay-fanout / load: one real relay process, many simulated devices on loopback.

`run(clients, duration_s, quick)` starts ONE `qmoi-sync relay serve` process (its own data dir)
and `clients` simulated devices in one or two client processes (asyncio; many websockets each),
so the client side is not what is measured. Every device is real as far as the relay can tell:
its own Ed25519 identity, a member of a space whose signed membership log the relay verified
(built here with the protocol API: genesis by the space's admin, then one `add` per member), and
it authenticates with the relay's challenge and subscribes like an agent does.

Spaces: one space of `clients` devices when `clients <= 1000` (the `relay-fanout` scenario of
issue 8), otherwise spaces of `space_size` (default 100) members (the 2,000-connection load test
of issue 9). In every space `publishers` members publish real sealed envelopes (ChaCha20-Poly1305
+ Ed25519, as an agent seals them) at a steady rate; every other member of the space receives
each one (the relay never echoes a device's own envelopes).

Measured:
* connections held: authenticated, subscribed and caught up, and still open at the end;
* envelopes delivered per second (summed over receivers) over the publishing window, and how
  many of the expected deliveries (publishes x other members) arrived;
* relay RSS (psutil) before any device connects and once all are connected and idle ->
  RSS per connection; its peak during publishing;
* delivery latency (p50/p99/max): the publisher stamps its wall-clock send time (µs) in the
  envelope's sender sequence number (strictly increasing per sender, as the relay requires) and
  in the sealed payload; a receiver takes `now - seq` at arrival (same machine, same clock). A
  sample of deliveries (1 in `OPEN_SAMPLE`) is fully opened (signature, key commitment, AEAD)
  to check that the payload carries the same stamp: receivers otherwise only parse the header,
  so that client CPU stays small beside the relay's;
* relay CPU time (connecting, publishing) and deliveries per relay CPU-second: on a shared
  machine the latency mostly measures the queue for a core, the CPU cost per delivery does not;
* errors: refused handshakes, Error frames, unexpected closes.

Bounded: every phase has a deadline, the whole run stops by itself, and every process it
started (relay, client workers) is terminated in `finally`.

CLI: ``python bench/scenario_fanout.py --clients 2000 --duration 20`` (results go to
bench/results/relay_fanout-<timestamp>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_connection_wait
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import open_envelope, parse_header, seal
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role

SCENARIO = "relay_fanout"
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

#: One receiver delivery in OPEN_SAMPLE is fully opened (crypto) to check its payload.
OPEN_SAMPLE = 50
#: Handshakes in flight per client process (the relay's listen backlog and CPU set the pace).
CONNECT_CONCURRENCY = 64
#: Bytes of sealed payload per envelope (a small CRDT update is of this order).
PAYLOAD_BYTES = 256
#: Offered deliveries per second (publishes x receivers) when no rate is given.
DEFAULT_TARGET_DELIVERIES_PER_S = 5_000.0


class FanoutError(Exception):
    pass


# ------------------------------------------------------------------------------ the plan


@dataclass
class Device:
    private: bytes  # 64-byte identity (Ed25519 + X25519 seeds)
    space: int  # index into Plan.spaces
    publisher: bool


@dataclass
class SpacePlan:
    space_id: bytes
    msg_key: bytes  # epoch 0 message key (what every member unwraps from the log)
    log: bytes
    admin_private: bytes
    members: int


@dataclass
class Plan:
    spaces: list[SpacePlan]
    devices: list[Device]
    rate_per_publisher: float


def build_plan(
    clients: int, space_size: int, publishers: int, rate_per_publisher: float | None
) -> Plan:
    """Real identities and signed membership logs: each space's device 0 is its admin."""
    spaces: list[SpacePlan] = []
    devices: list[Device] = []
    now = time.time()
    remaining = clients
    while remaining > 0:
        n = min(space_size, remaining)
        remaining -= n
        ids = [DeviceIdentity.generate() for _ in range(n)]
        log, secret0 = MembershipLog.create(ids[0], now)
        for dev in ids[1:]:
            log.add_member(ids[0], dev.public, Role.member, {0: secret0}, now)
        keys = derive_epoch_keys(log.space_id, 0, secret0)
        idx = len(spaces)
        spaces.append(
            SpacePlan(log.space_id, keys.msg, log.to_bytes(), ids[0].to_private_bytes(), n)
        )
        pubs = min(publishers, n - 1) if n > 1 else 0
        for i, dev in enumerate(ids):
            devices.append(Device(dev.to_private_bytes(), idx, publisher=0 < i <= pubs))
    if rate_per_publisher is None:
        # Offer about DEFAULT_TARGET_DELIVERIES_PER_S in total, whatever the shape.
        fan = sum(
            (min(publishers, s.members - 1) if s.members > 1 else 0) * (s.members - 1)
            for s in spaces
        )
        rate_per_publisher = DEFAULT_TARGET_DELIVERIES_PER_S / max(1, fan)
        rate_per_publisher = max(0.5, min(rate_per_publisher, 400.0))
    return Plan(spaces, devices, rate_per_publisher)


# ------------------------------------------------------------------------------ relay process


def _cli() -> str:
    cli = shutil.which("qmoi-sync", path=str(Path(sys.executable).parent)) or shutil.which(
        "qmoi-sync"
    )
    if cli is None:
        raise FanoutError("the qmoi-sync console script is not installed (pip install -e .)")
    return cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile(needed: int) -> tuple[int, int]:
    """Raise the soft fd limit (inherited by the relay and the client workers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise FanoutError(f"RLIMIT_NOFILE is {soft} (hard {hard}); {needed} descriptors needed")
    return soft, hard


def _start_relay(data: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [
                _cli(),
                "relay",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data",
                str(data),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise FanoutError(f"relay exited early:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, port
        if time.monotonic() > deadline:
            raise FanoutError("relay did not listen within 30 s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------ device client


async def _handshake(
    url: str, ident: DeviceIdentity, space_id: bytes, log: bytes, timeout: float
) -> tuple[ClientConnection, int]:
    """Hello / Challenge / Auth / Welcome; returns the socket and the space's head seq."""
    ws = await connect(
        url,
        compression=None,
        max_size=F.MAX_FRAME,
        open_timeout=timeout,
        ping_interval=None,  # the relay pings; keeping idle clients cheap
        close_timeout=2,
    )
    try:
        async with asyncio.timeout(timeout):
            pk = ident.public.sign_pk
            await ws.send(F.encode_frame(F.Hello(space_id, pk, F.PROTO_VERSION)))
            while True:
                frame = F.decode_frame(_as_bytes(await ws.recv()))
                if isinstance(frame, F.Challenge):
                    break
                if isinstance(frame, F.Error):
                    raise FanoutError(f"relay refused Hello: {frame.code} {frame.message}")
            sig = ident.sign(F.auth_message(frame.nonce, space_id, pk))
            await ws.send(F.encode_frame(F.Auth(sig, log)))
            while True:
                frame = F.decode_frame(_as_bytes(await ws.recv()))
                if isinstance(frame, F.Welcome):
                    return ws, frame.head_seq
                if isinstance(frame, F.Error):
                    raise FanoutError(f"relay refused Auth: {frame.code} {frame.message}")
    except BaseException:
        await ws.close()
        raise


def _as_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        raise FanoutError("relay sent a text frame")
    return data


def register_spaces(url: str, plan: Plan, timeout: float = 60.0) -> None:
    """Each space's admin authenticates once with the full log (the relay verifies it and
    registers the space); every other device then authenticates with an empty log, as an agent
    whose log the relay already holds does."""

    async def one(sp: SpacePlan) -> None:
        ident = DeviceIdentity.from_private_bytes(sp.admin_private)
        ws, _head = await _handshake(url, ident, sp.space_id, sp.log, timeout)
        await ws.close()

    async def main() -> None:
        sem = asyncio.Semaphore(8)

        async def guarded(sp: SpacePlan) -> None:
            async with sem:
                await one(sp)

        await asyncio.gather(*(guarded(sp) for sp in plan.spaces))

    asyncio.run(main())


@dataclass
class _Stats:
    connected: int = 0
    connect_failed: int = 0
    caught_up: int = 0
    closed_early: int = 0
    error_frames: int = 0
    publishes: int = 0
    acks: int = 0
    delivered: int = 0  # in the measuring window (envelopes stamped inside it)
    delivered_total: int = 0
    presence_frames: int = 0
    opened: int = 0
    open_mismatch: int = 0
    lost_while_running: int = 0


class _Worker:
    """One client process: many device connections on one asyncio loop."""

    def __init__(self, url: str, plan: Plan, indices: list[int], pipe: Connection) -> None:
        self.url = url
        self.plan = plan
        self.indices = indices
        self.pipe = pipe
        self.stats = _Stats()
        self.latencies_us = array("d")
        self.window = (0.0, 0.0)  # µs wall clock: envelopes stamped inside count
        self.errors: list[str] = []
        self.conns: dict[int, ClientConnection] = {}
        self.caught_up: set[int] = set()
        self.caught_event = asyncio.Event()
        self.readers: list[asyncio.Task[None]] = []
        self.stopping = False
        self.keys = {i: sp.msg_key for i, sp in enumerate(plan.spaces)}
        self.publishes_by_space: dict[int, int] = {}

    def _error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    async def _connect_one(self, i: int, sem: asyncio.Semaphore) -> None:
        dev = self.plan.devices[i]
        sp = self.plan.spaces[dev.space]
        ident = DeviceIdentity.from_private_bytes(dev.private)
        async with sem:
            try:
                ws, head = await _handshake(self.url, ident, sp.space_id, b"", 120.0)
                await ws.send(F.encode_frame(F.Subscribe(head)))
            except (OSError, TimeoutError, WebSocketException, FanoutError) as exc:
                self.stats.connect_failed += 1
                self._error(f"connect device {i}: {type(exc).__name__}: {exc}")
                return
        self.conns[i] = ws
        self.stats.connected += 1
        self.readers.append(asyncio.create_task(self._read(i, ws)))

    async def _read(self, i: int, ws: ClientConnection) -> None:
        dev = self.plan.devices[i]
        space_id = self.plan.spaces[dev.space].space_id
        keys = {0: self.keys[dev.space]}
        st = self.stats
        lat = self.latencies_us
        try:
            async for data in ws:
                now_us = time.time_ns() / 1000.0
                frame = F.decode_frame(_as_bytes(data))
                if isinstance(frame, F.Deliver):
                    header = parse_header(frame.envelope)
                    st.delivered_total += 1
                    lo, hi = self.window
                    if lo <= header.seq < hi:
                        st.delivered += 1
                        lat.append(now_us - header.seq)
                    if st.delivered_total % OPEN_SAMPLE == 0:
                        opened = open_envelope(frame.envelope, space_id, keys, lambda _pk: True)
                        st.opened += 1
                        if struct.unpack_from(">Q", opened.plaintext)[0] != header.seq:
                            st.open_mismatch += 1
                elif isinstance(frame, F.Ack):
                    st.acks += 1
                elif isinstance(frame, F.CaughtUp):
                    if i not in self.caught_up:
                        self.caught_up.add(i)
                        st.caught_up += 1
                        if st.caught_up >= len(self.indices) - st.connect_failed:
                            self.caught_event.set()
                elif isinstance(frame, F.Presence):
                    st.presence_frames += 1
                elif isinstance(frame, F.Error):
                    st.error_frames += 1
                    self._error(f"device {i}: Error {frame.code}: {frame.message}")
        except ConnectionClosed as exc:
            if not self.stopping:
                self._error(f"device {i} closed: {exc}")
        finally:
            if not self.stopping:
                st.closed_early += 1
                self.conns.pop(i, None)

    async def _publish(self, i: int, start_us: float, end_us: float) -> None:
        dev = self.plan.devices[i]
        sp = self.plan.spaces[dev.space]
        ident = DeviceIdentity.from_private_bytes(dev.private)
        period = 1.0 / self.plan.rate_per_publisher
        pad = os.urandom(PAYLOAD_BYTES - 8)
        # Spread the publishers' phases so that they do not all fire at once.
        loop = asyncio.get_running_loop()
        t0 = loop.time() + max(0.0, (start_us - time.time_ns() / 1000.0) / 1e6)
        t0 += (i * 0.6180339887 % 1.0) * period
        k = 0
        last = 0
        while True:
            await asyncio.sleep(max(0.0, t0 + k * period - loop.time()))
            stamp = max(last + 1, time.time_ns() // 1000)
            if stamp >= end_us:
                return
            ws = self.conns.get(i)
            if ws is None:
                return
            env = seal(ident, sp.space_id, 0, sp.msg_key, stamp, struct.pack(">Q", stamp) + pad)
            try:
                await ws.send(F.encode_frame(F.Publish(env)))
            except ConnectionClosed:
                return
            last = stamp
            self.stats.publishes += 1
            self.publishes_by_space[dev.space] = self.publishes_by_space.get(dev.space, 0) + 1
            k += 1

    async def main(self) -> None:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        t_connect = time.monotonic()
        await asyncio.gather(*(self._connect_one(i, sem) for i in self.indices))
        if self.stats.connected == 0:
            self.caught_event.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(120):
                await self.caught_event.wait()
        self.pipe.send(
            {
                "phase": "connected",
                "connected": self.stats.connected,
                "caught_up": self.stats.caught_up,
                "connect_s": time.monotonic() - t_connect,
            }
        )
        loop = asyncio.get_running_loop()
        msg = await loop.run_in_executor(None, self.pipe.recv)
        if msg.get("phase") == "go":
            start_us, end_us, drain_s = msg["start_us"], msg["end_us"], msg["drain_s"]
            self.window = (start_us, end_us)
            pubs = [
                asyncio.create_task(self._publish(i, start_us, end_us))
                for i in self.indices
                if self.plan.devices[i].publisher
            ]
            await asyncio.gather(*pubs)
            # Let the last envelopes arrive (bounded), then report.
            await asyncio.sleep(max(0.0, (end_us - time.time_ns() / 1000.0) / 1e6))
            await self._drain(drain_s)
        self.stats.lost_while_running = (
            len(self.indices) - self.stats.connect_failed - len(self.conns)
        )
        self.stopping = True
        lat = sorted(self.latencies_us)
        self.pipe.send(
            {
                "phase": "done",
                "stats": vars(self.stats),
                "publishes_by_space": self.publishes_by_space,
                "latencies_us": _downsample(lat, 20_000),
                "latency_count": len(lat),
                "errors": self.errors,
                "held": len(self.conns),
            }
        )
        await asyncio.gather(
            *(ws.close() for ws in list(self.conns.values())), return_exceptions=True
        )
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    async def _drain(self, drain_s: float) -> None:
        """Wait (at most drain_s) until this worker's publishes are all acked and deliveries
        have stopped growing for 2 s: the last envelopes of the window still count."""
        deadline = time.monotonic() + drain_s
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = time.monotonic()
            if self.stats.delivered_total != last:
                last, quiet_since = self.stats.delivered_total, now
            elif self.stats.acks >= self.stats.publishes and now - quiet_since >= 2.0:
                return
            await asyncio.sleep(0.25)


def _downsample(sorted_values: list[float], limit: int) -> list[float]:
    """An evenly spaced subset of a sorted list (keeps its percentiles)."""
    if len(sorted_values) <= limit:
        return list(sorted_values)
    step = len(sorted_values) / limit
    return [sorted_values[int(k * step)] for k in range(limit)] + [sorted_values[-1]]


def _worker_main(url: str, plan: Plan, indices: list[int], pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        asyncio.run(_Worker(url, plan, indices, pipe).main())
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send({"phase": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise


# ------------------------------------------------------------------------------ the run


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _cpu(t: Any) -> float:
    return float(t.user + t.system)


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat): how
    much of the latency is the shared machine's queue for a core rather than relay work."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _recv_all(pipes: list[Connection], timeout: float, what: str) -> list[dict[str, Any]]:
    """One report from every worker; fails as soon as one worker fails or dies."""
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(pipes):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FanoutError(f"client workers: no {what} report within {timeout:.0f} s")
        ready = mp_connection_wait([p for i, p in enumerate(pipes) if i not in got], left)
        for p in ready:
            assert isinstance(p, Connection)
            try:
                msg: dict[str, Any] = p.recv()
            except EOFError:
                raise FanoutError(f"a client worker exited before its {what} report") from None
            if msg.get("phase") == "failed":
                raise FanoutError(f"client worker failed: {msg.get('error')}")
            got[pipes.index(p)] = msg
    return [got[i] for i in range(len(pipes))]


def _sigterm(_sig: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through run()'s finally: every process is stopped


def run(
    clients: int,
    duration_s: float = 10.0,
    quick: bool = False,
    *,
    space_size: int | None = None,
    publishers: int = 2,
    rate_per_publisher: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run the scenario; returns a JSON-able result (see the module docstring)."""
    if clients < 2:
        raise ValueError("clients must be at least 2 (a publisher and a receiver)")
    if quick:
        duration_s = min(duration_s, 5.0)
    if space_size is None:
        space_size = clients if clients <= 1000 else 100
    nworkers = workers or (1 if clients <= 200 else 2)
    nofile = _raise_nofile(clients + 1024)
    t_plan = time.monotonic()
    plan = build_plan(clients, space_size, publishers, rate_per_publisher)
    plan_s = time.monotonic() - t_plan
    tmp = Path(tempfile.mkdtemp(prefix="qmoi-fanout-"))
    relay: subprocess.Popen[bytes] | None = None
    completed = False
    procs: list[Any] = []
    pipes: list[Connection] = []
    try:
        relay, port = _start_relay(tmp / "relay-data", tmp / "relay.log")
        url = f"ws://127.0.0.1:{port}"
        rproc = psutil.Process(relay.pid)
        register_spaces(url, plan)
        rss_base = rproc.memory_info().rss
        cpu_base = rproc.cpu_times()
        ctx = mp.get_context("fork")
        # Interleave devices over workers so that each space spans every worker.
        for w in range(nworkers):
            parent_end, child_end = ctx.Pipe()
            idx = list(range(w, clients, nworkers))
            p = ctx.Process(target=_worker_main, args=(url, plan, idx, child_end), daemon=True)
            p.start()
            child_end.close()
            procs.append(p)
            pipes.append(parent_end)
        t0 = time.monotonic()
        connected = _recv_all(pipes, 600, "connected")
        connect_s = time.monotonic() - t0
        # Let the Presence storm of the connects settle before reading the idle RSS.
        time.sleep(2.0)
        rss_connected = rproc.memory_info().rss
        cpu0 = rproc.cpu_times()
        wait0 = _runqueue_wait_s(relay.pid)
        start_us = time.time_ns() / 1000.0 + 1e6
        end_us = start_us + duration_s * 1e6
        drain_s = 20.0  # an upper bound: workers stop as soon as deliveries are complete
        for pp in pipes:
            pp.send({"phase": "go", "start_us": start_us, "end_us": end_us, "drain_s": drain_s})
        rss_peak = rss_connected
        deadline = time.monotonic() + duration_s + 1.0
        while time.monotonic() < deadline:
            rss_peak = max(rss_peak, rproc.memory_info().rss)
            time.sleep(0.25)
        cpu1 = rproc.cpu_times()
        wait1 = _runqueue_wait_s(relay.pid)
        done = _recv_all(pipes, duration_s + drain_s + 120, "done")
        rss_peak = max(rss_peak, rproc.memory_info().rss)
        relay_alive = relay.poll() is None
        completed = True
    finally:
        for p in procs:
            # Workers that reported "done" exit by themselves; after a failure or a signal
            # they may still be connecting: terminate them at once.
            p.join(timeout=30 if completed else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for pp in pipes:
            pp.close()
        _stop(relay)
        log_tail = ""
        with contextlib.suppress(OSError):
            log_tail = "\n".join((tmp / "relay.log").read_text(errors="replace").splitlines()[-20:])
        shutil.rmtree(tmp, ignore_errors=True)

    agg: dict[str, int] = {}
    for d in done:
        for k, v in d["stats"].items():
            agg[k] = agg.get(k, 0) + v
    pubs_by_space: dict[int, int] = {}
    for d in done:
        for k, v in d["publishes_by_space"].items():
            pubs_by_space[int(k)] = pubs_by_space.get(int(k), 0) + v
    expected = sum(n * (plan.spaces[s].members - 1) for s, n in pubs_by_space.items())
    lat_ms = sorted(x / 1000.0 for d in done for x in d["latencies_us"])
    held = sum(d["held"] for d in done)
    result: dict[str, Any] = {
        "clients": clients,
        "spaces": len(plan.spaces),
        "space_size": space_size,
        "publishers_per_space": publishers,
        "rate_per_publisher_hz": round(plan.rate_per_publisher, 3),
        "payload_bytes": PAYLOAD_BYTES,
        "duration_s": duration_s,
        "client_processes": nworkers,
        "rlimit_nofile": list(nofile),
        "plan_s": round(plan_s, 2),
        "connect_s": round(connect_s, 2),
        "connected": sum(c["connected"] for c in connected),
        "caught_up": sum(c["caught_up"] for c in connected),
        "connections_held": held,
        "connect_failed": agg.get("connect_failed", 0),
        "closed_early": agg.get("closed_early", 0),
        "error_frames": agg.get("error_frames", 0),
        "presence_frames": agg.get("presence_frames", 0),
        "publishes": agg.get("publishes", 0),
        "acks": agg.get("acks", 0),
        "expected_deliveries": expected,
        "delivered": agg.get("delivered", 0),
        "delivered_total": agg.get("delivered_total", 0),
        "delivered_fraction": round(agg.get("delivered", 0) / expected, 4) if expected else None,
        "envelopes_per_s": round(agg.get("delivered", 0) / duration_s, 1),
        "publishes_per_s": round(agg.get("publishes", 0) / duration_s, 1),
        "p99_latency_ms": round(_percentile(lat_ms, 99), 2),
        "latency_ms": {
            "p50": round(_percentile(lat_ms, 50), 2),
            "p99": round(_percentile(lat_ms, 99), 2),
            "max": round(lat_ms[-1], 2) if lat_ms else None,
            "samples": sum(d["latency_count"] for d in done),
        },
        "opened_sample": agg.get("opened", 0),
        "opened_mismatch": agg.get("open_mismatch", 0),
        "relay_rss_mb": {
            "baseline": round(rss_base / 2**20, 1),
            "connected_idle": round(rss_connected / 2**20, 1),
            "peak_publishing": round(rss_peak / 2**20, 1),
        },
        "relay_rss_per_connection_kb": round((rss_connected - rss_base) / 1024 / clients, 1),
        "relay_cpu_s_connecting": round(_cpu(cpu0) - _cpu(cpu_base), 2),
        "relay_cpu_s_publishing": round(_cpu(cpu1) - _cpu(cpu0), 2),
        "relay_runqueue_wait_s_publishing": round(wait1 - wait0, 2),
        # Load-independent cost: on a shared machine latency measures the queue for the CPU,
        # this what the relay spends per delivery when it runs.
        "deliveries_per_relay_cpu_s": (
            round(agg.get("delivered", 0) / (_cpu(cpu1) - _cpu(cpu0)))
            if _cpu(cpu1) > _cpu(cpu0)
            else None
        ),
        "relay_alive_at_end": relay_alive,
        "client_errors": [e for d in done for e in d["errors"]][:20],
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    if result["client_errors"] or not relay_alive:
        result["relay_log_tail"] = log_tail
    return result


def write_result(result: dict[str, Any], quick: bool) -> Path:
    """bench/results/relay_fanout-<timestamp>.json, in the layout of the other scenarios."""
    info: dict[str, Any] = {}
    try:  # the shared helper when it can be found (package or script layout)
        if __package__:
            from . import benchlib  # type: ignore[import-not-found]
        else:
            sys.path.insert(0, str(BENCH_DIR))
            import benchlib  # type: ignore[import-not-found,no-redef]
        return Path(benchlib.write_result(SCENARIO, result, quick))
    except ImportError:
        info = {
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(),
        }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{SCENARIO}-{stamp}.json"
    doc = {"scenario": SCENARIO, "quick": quick, "machine": info, **result}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def summary(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"relay_fanout: {r['connections_held']}/{r['clients']} connections held "
        f"({r['spaces']} space(s) of {r['space_size']}), "
        f"{r['envelopes_per_s']} envelopes/s delivered "
        f"({r['delivered_fraction']} of expected), p50 {lat['p50']} ms p99 {lat['p99']} ms, "
        f"relay RSS {r['relay_rss_per_connection_kb']} KB/connection "
        f"({r['relay_rss_mb']['baseline']} -> {r['relay_rss_mb']['connected_idle']} MB), "
        f"{r['deliveries_per_relay_cpu_s']} deliveries per relay CPU-second, "
        f"load {r['loadavg_1_5_15']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relay fan-out / connection load (one relay process)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--duration", type=float, default=10.0, help="publishing window, s")
    p.add_argument("--space-size", type=int, default=None, help="members per space")
    p.add_argument("--publishers", type=int, default=2, help="publishing members per space")
    p.add_argument("--rate", type=float, default=None, help="envelopes/s per publisher")
    p.add_argument("--workers", type=int, default=None, help="client processes (1 or 2)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-save", action="store_true", help="print only, write no result file")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    result = run(
        args.clients,
        args.duration,
        args.quick,
        space_size=args.space_size,
        publishers=args.publishers,
        rate_per_publisher=args.rate,
        workers=args.workers,
    )
    print(json.dumps(result, indent=2))
    print(summary(result))
    if not args.no_save:
        print(f"wrote {write_result(result, args.quick)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
