"""A byte-counting TCP proxy (asyncio, in a background thread of the bench process).

It sits between agents and the relay and counts the bytes of every connection in each direction
(raw TCP payload: websocket framing, frame headers and ping/pong included, TLS would be too).
Connections are keyed by the client's (local) port, so a scenario can attribute traffic to one
agent process by looking at that process's sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ConnCounter:
    client_port: int
    opened: float = field(default_factory=time.monotonic)
    up: int = 0  # client -> upstream (agent -> relay)
    down: int = 0  # upstream -> client (relay -> agent)
    closed: bool = False


class CountingProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.conns: list[ConnCounter] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> CountingProxy:
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        loop.run_forever()
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        loop.close()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # -- counting ----------------------------------------------------------------------------
    def totals(self, ports: set[int] | None = None) -> tuple[int, int]:
        """(up, down) bytes summed over the connections whose client port is in `ports`."""
        up = down = 0
        for c in list(self.conns):
            if ports is None or c.client_port in ports:
                up += c.up
                down += c.down
        return up, down

    def reset(self) -> None:
        for c in list(self.conns):
            c.up = 0
            c.down = 0

    # -- pumping -----------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        counter = ConnCounter(client_port=int(peer[1]) if peer else 0)
        self.conns.append(counter)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(reader, up_w, counter, "up"),
                self._pump(up_r, writer, counter, "down"),
            )
        finally:
            counter.closed = True
            for w in (writer, up_w):
                with contextlib.suppress(Exception):
                    w.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: ConnCounter, attr: str
    ) -> None:
        try:
            while True:
                data = await src.read(1 << 16)
                if not data:
                    break
                setattr(counter, attr, getattr(counter, attr) + len(data))
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.write_eof()
