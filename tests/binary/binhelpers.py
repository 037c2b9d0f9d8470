"""Helpers for the binary-file tests: clusters with pinned resource readings, an optional
throttled byte-counting TCP proxy in front of the relay, relay metrics, file digests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Device, Relay, create_space, free_port, invite, join, wait_until
from resource_env import Readings, resource_device

MiB = 1024 * 1024


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write like an application that saves in one go: temp name (ignored), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class CountingProxy:
    """A TCP proxy (thread + asyncio loop) counting bytes each way, optionally throttling the
    client->relay direction to `up_bytes_per_s` (so a transfer lasts long enough to interrupt)."""

    def __init__(self, upstream_port: int, up_bytes_per_s: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.rate = up_bytes_per_s
        self.port = 0
        self.up = 0
        self.down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> CountingProxy:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_w, "up"), self._pump(up_r, writer, "down"), return_exceptions=True
        )
        for w in (writer, up_w):
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, d: str) -> None:
        try:
            while data := await src.read(1 << 16):
                setattr(self, d, getattr(self, d) + len(data))
                if d == "up" and self.rate:
                    await asyncio.sleep(len(data) / self.rate)  # throttle, not a wait
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


@dataclass
class BinCluster:
    relay: Relay
    devices: list[Device]
    readings: dict[str, Readings]
    tmp: Path
    metrics_port: int = 0
    proxy: CountingProxy | None = None
    extra: tuple[str, ...] = ()
    stopped: list[Device] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(qmoi_relay_chunk_\S+)\s+(\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def restart_relay(self, extra: tuple[str, ...] | None = None) -> None:
        self.relay.start(self._relay_args(extra if extra is not None else self.extra))

    def _relay_args(self, extra: tuple[str, ...]) -> tuple[str, ...]:
        return ("--metrics-port", str(self.metrics_port), *extra)

    def blob_files(self) -> list[Path]:
        root = self.relay.data / "blobs"
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


@contextlib.contextmanager
def bin_cluster(
    tmp: Path,
    names: tuple[str, ...] = ("a", "b"),
    relay_extra: tuple[str, ...] = (),
    proxy_rate: float | None = None,
    use_proxy: bool = False,
    readings: dict[str, dict[str, Any]] | None = None,
) -> Iterator[BinCluster]:
    """A relay (with /metrics), optionally behind a counting proxy, and joined devices whose
    resource readings are pinned (an idle machine on AC unless `readings` says otherwise)."""
    metrics_port = free_port()
    relay = Relay(tmp / "relay-data")
    c = BinCluster(relay, [], {}, tmp, metrics_port, extra=relay_extra)
    relay.start(c._relay_args(relay_extra))
    if use_proxy or proxy_rate:
        c.proxy = CountingProxy(relay.port, proxy_rate).start()
    made = {n: resource_device(tmp, n, **(readings or {}).get(n, {})) for n in names}
    c.devices = [d for d, _ in made.values()]
    c.readings = {n: r for n, (_, r) in made.items()}
    target: Any = c.proxy if c.proxy is not None else relay
    try:
        create_space(c.devices[0], target)
        c.devices[0].start()
        for dev in c.devices[1:]:
            join(dev, invite(c.devices[0]))
            dev.start()
        yield c
    finally:
        for dev in c.devices:
            dev.stop()
        relay.stop()
        if c.proxy is not None:
            c.proxy.stop()


def space(dev: Device) -> dict[str, Any]:
    return dev.space_status()


def wait_file(dev: Device, rel: str, digest: str | None, timeout: float = 60) -> None:
    wait_until(
        lambda: file_sha(dev.folder / rel) == digest,
        timeout=timeout,
        what=f"{rel} on {dev.name} to have sha256 {digest and digest[:12]}",
    )


def wait_settled(dev: Device, timeout: float = 60) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        s = space(dev)
        busy = s["pending_out"] or s["pending_up_files"] or s["pending_down_files"]
        return None if busy else s

    return wait_until(ok, timeout=timeout, what=f"{dev.name} settled")  # type: ignore[no-any-return]


def tree_digests(dev: Device) -> dict[str, str]:
    out = {}
    for p in sorted(dev.folder.rglob("*")):
        if p.is_file() and not p.name.startswith(".qmoi-tmp"):
            out[p.relative_to(dev.folder).as_posix()] = file_sha(p) or ""
    return out


def log_excerpt(c: BinCluster) -> str:
    return "\n".join(f"--- {d.name}\n{d.log()[-4000:]}" for d in c.devices) + json.dumps(
        [space(d)["warnings"] for d in c.devices if d.proc]
    )


def now() -> float:
    return time.monotonic()
