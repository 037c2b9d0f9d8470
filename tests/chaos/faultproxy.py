"""A fault-injecting TCP proxy that understands websocket (RFC 6455) framing.

Put one between an agent and the relay (both the relay link and the blob channel connect to the
same URL, so both go through it). The proxy forwards the HTTP upgrade untouched, then parses the
stream into whole websocket frames in each direction and forwards frame by frame, so every fault
acts at a message boundary:

    proxy = FaultProxy(relay.port, seed=7).start()      # proxy.url -> ws://127.0.0.1:<port>
    proxy.set(drop=0.05, dup=0.05, reorder=0.05, delay=(0.0, 0.2), throttle_bps=200_000)
    proxy.cut()                                          # close every live connection now
    proxy.partition(True) ... proxy.partition(False)     # offline: cut, refuse new connections
    proxy.clear()                                        # back to a clean pipe
    proxy.counts                                         # Counter of faults actually applied
    proxy.stop()

Faults apply only to complete data frames (text/binary with FIN); control frames (ping, pong,
close) and fragments pass untouched, so a fault never corrupts the websocket layer itself — it
models what the network can do to *messages*. ``direction`` chooses "up" (client -> upstream),
"down" (upstream -> client) or "both". The first ``spare_frames`` data frames of each
connection and direction are never faulted (the handshake: Hello/Challenge/Auth/Welcome), or
every drop there would only cost a handshake timeout.

Drop has two modes (``drop_mode``):

* ``"truncate"`` (default) is what TCP can really do: the frame and everything after it in that
  direction are lost, and the connection is cut ``cut_after`` seconds later (the other direction
  keeps flowing until then: a half-dead connection).
* ``"vanish"``: only that frame disappears and the connection lives on. TCP never does this (it
  is reliable and ordered); it is there to probe what an agent does when a message goes missing
  on a live link (bench and exploratory runs).

``vanish_next(direction, count, frame_type)`` makes exactly the next ``count`` data frames whose
first payload byte (the qmoi frame type, e.g. 0x83 Deliver, 0x04 Publish) is ``frame_type``
vanish: a targeted loss for regression tests.

Reordering holds one frame back and sends it right after the next data frame of that direction
(or after 0.5 s if none comes). The proxy runs its own asyncio loop in a daemon thread;
every method is safe to call from the test's thread. Randomness comes from ``seed`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down", "both"]
DropMode = Literal["truncate", "vanish"]

OP_CONT, OP_TEXT, OP_BIN = 0x0, 0x1, 0x2
REORDER_FLUSH_S = 0.5
MAX_FRAME_BYTES = 64 * 1024 * 1024  # beyond this the stream is nonsense: cut it


@dataclass
class Rules:
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    delay: tuple[float, float] = (0.0, 0.0)
    throttle_bps: float | None = None

    @property
    def clean(self) -> bool:
        return (
            not (self.drop or self.dup or self.reorder or self.delay[1])
            and self.throttle_bps is None
        )


@dataclass(eq=False)  # identity: connections live in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                w.transport.abort()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """One raw websocket frame: (opcode, fin, the frame's bytes exactly as on the wire)."""
    head = await reader.readexactly(2)
    fin = bool(head[0] & 0x80)
    opcode = head[0] & 0x0F
    masked = bool(head[1] & 0x80)
    n = head[1] & 0x7F
    ext = b""
    if n == 126:
        ext = await reader.readexactly(2)
        n = struct.unpack("!H", ext)[0]
    elif n == 127:
        ext = await reader.readexactly(8)
        n = struct.unpack("!Q", ext)[0]
    if n > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {n} bytes")
    rest = await reader.readexactly((4 if masked else 0) + n)
    return opcode, fin, head + ext + rest


def _frame_type(raw: bytes) -> int | None:
    """The first payload byte of a raw websocket frame (unmasked), None if empty."""
    n = raw[1] & 0x7F
    off = 2 + (2 if n == 126 else 8 if n == 127 else 0)
    if raw[1] & 0x80:
        mask, off = raw[off : off + 4], off + 4
        return raw[off] ^ mask[0] if len(raw) > off else None
    return raw[off] if len(raw) > off else None


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        seed: int = 0,
        drop_mode: DropMode = "truncate",
        cut_after: float = 0.3,
        spare_frames: int = 2,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rng = random.Random(seed)
        self.drop_mode: DropMode = drop_mode
        self.cut_after = cut_after
        self.spare_frames = spare_frames
        self.port = 0
        self.up = Rules()
        self.down = Rules()
        self.counts: Counter[str] = Counter()
        self.connections_total = 0
        self._partitioned = False
        self._vanish: dict[str, tuple[int, int]] = {}  # direction -> (frame type, how many)
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # -- commands (any thread) ------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not self._stopped.is_set():
            loop.call_soon_threadsafe(loop.stop)
            self._stopped.wait(10)
        if self._thread is not None:
            self._thread.join(10)

    def set(
        self,
        direction: Direction = "both",
        *,
        drop: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        throttle_bps: float | None = None,
    ) -> None:
        """Replace the rules of ``direction`` (probabilities per data frame)."""
        rules = Rules(drop, dup, reorder, delay, throttle_bps)
        if direction in ("up", "both"):
            self.up = rules
        if direction in ("down", "both"):
            self.down = Rules(drop, dup, reorder, delay, throttle_bps)
        if not rules.clean:
            self.counts["rules"] += 1

    def vanish_next(self, direction: Literal["up", "down"], count: int, frame_type: int) -> None:
        self._vanish[direction] = (frame_type, count)

    def clear(self) -> None:
        """A clean pipe again: no rules, and no frames left to vanish."""
        self.up = Rules()
        self.down = Rules()
        self._vanish.clear()

    def cut(self) -> int:
        """Close every live connection (both sides see a reset). Returns how many."""
        return self._call(self._cut_all)

    def partition(self, on: bool) -> None:
        """While on, live connections are cut and new ones are closed at once."""
        self._partitioned = on
        if on:
            self.counts["partition"] += 1
            self.cut()

    @property
    def live_connections(self) -> int:
        return sum(1 for c in self._conns if not c.closed)

    # -- loop side --------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], int]) -> int:
        loop = self._loop
        if loop is None or self._stopped.is_set():
            return 0
        fut = asyncio.run_coroutine_threadsafe(self._wrap(fn), loop)
        return fut.result(10)

    @staticmethod
    async def _wrap(fn: Callable[[], int]) -> int:
        return fn()

    def _cut_all(self) -> int:
        live = [c for c in self._conns if not c.closed]
        for c in live:
            c.close()
        if live:
            self.counts["cut"] += 1
        return len(live)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            loop.run_forever()
        finally:
            for c in list(self._conns):
                c.close()
            self._server.close()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
            self._stopped.set()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self._partitioned:
            cwriter.transport.abort()
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.transport.abort()  # the relay is down: the agent sees a reset, as without us
            return
        self.connections_total += 1
        conn = _Conn(cwriter, uwriter)
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, creader, uwriter, "up")),
            asyncio.create_task(self._pump(conn, ureader, cwriter, "down")),
        ]
        try:
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy stops
        finally:
            conn.close()
            for t in conn.tasks:
                t.cancel()
            self._conns.discard(conn)

    async def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        try:
            # The HTTP upgrade (request or response) passes whole.
            writer.write(await reader.readuntil(b"\r\n\r\n"))
            await writer.drain()
            data_frames = 0
            held: bytes | None = None
            held_at = 0.0
            truncated = False
            loop = asyncio.get_running_loop()
            while not conn.closed:
                try:
                    timeout = REORDER_FLUSH_S if held is not None else None
                    opcode, fin, raw = await asyncio.wait_for(read_frame(reader), timeout)
                except TimeoutError:
                    if held is not None:
                        writer.write(held)
                        held = None
                        await writer.drain()
                    continue
                if truncated:
                    continue  # the rest of this direction is lost; the cut follows
                rules = self.up if direction == "up" else self.down
                out = [raw]
                data = opcode in (OP_TEXT, OP_BIN) and fin
                if data:
                    data_frames += 1
                target = self._vanish.get(direction)
                if data and target is not None and _frame_type(raw) == target[0]:
                    self._vanish[direction] = (target[0], target[1] - 1)
                    if target[1] <= 1:
                        del self._vanish[direction]
                    self.counts[f"vanish_{direction}_{target[0]:#04x}"] += 1
                    continue
                if data and data_frames > self.spare_frames and not rules.clean:
                    r = self.rng.random
                    if rules.drop and r() < rules.drop:
                        self.counts[f"drop_{self.drop_mode}_{direction}"] += 1
                        out = []
                        if self.drop_mode == "truncate":
                            truncated = True
                            loop.call_later(self.cut_after, conn.close)
                    elif rules.dup and r() < rules.dup:
                        self.counts[f"dup_{direction}"] += 1
                        out = [raw, raw]
                    elif rules.reorder and r() < rules.reorder and held is None:
                        self.counts[f"reorder_{direction}"] += 1
                        held, held_at = raw, loop.time()
                        out = []
                    lo, hi = rules.delay
                    if hi > 0:
                        self.counts[f"delay_{direction}"] += 1
                        await asyncio.sleep(self.rng.uniform(lo, hi))
                if data and held is not None and out:
                    out.append(held)  # the held frame overtaken by this one
                    held = None
                elif held is not None and loop.time() - held_at > REORDER_FLUSH_S:
                    out.append(held)
                    held = None
                for chunk in out:
                    writer.write(chunk)
                    if rules.throttle_bps:
                        self.counts[f"throttle_{direction}"] += 1
                        await asyncio.sleep(len(chunk) / rules.throttle_bps)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.LimitOverrunError):
            pass
        finally:
            conn.close()


__all__ = ["FaultProxy", "Rules", "read_frame"]
