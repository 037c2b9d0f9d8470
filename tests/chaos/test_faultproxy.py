"""The fault proxy itself, over real sockets: a websockets server (in this process: the proxy
is protocol-generic, it needs no relay) and a websockets client talking through it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from chaos.faultproxy import FaultProxy


class Recorder:
    """A websockets server in a thread that records what it receives and echoes it."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _handler(self, ws: ServerConnection) -> None:
        async for msg in ws:
            data = msg if isinstance(msg, bytes) else msg.encode()
            self.got.append(data)
            await ws.send(data)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def pair() -> Iterator[tuple[Recorder, FaultProxy]]:
    rec = Recorder()
    proxy = FaultProxy(rec.port, seed=1, spare_frames=1).start()
    try:
        yield rec, proxy
    finally:
        proxy.stop()
        rec.close()


async def _exchange(url: str, msgs: list[bytes], expect: int, timeout: float = 10) -> list[bytes]:
    """Send ``msgs`` then collect up to ``expect`` echoes (fewer if the link dies or idles)."""
    got: list[bytes] = []
    async with connect(url, proxy=None, open_timeout=10, compression=None) as ws:
        for m in msgs:
            await ws.send(m)
        try:
            while len(got) < expect:
                got.append(bytes(await asyncio.wait_for(ws.recv(), timeout)))
        except (TimeoutError, websockets.ConnectionClosed):
            pass
    return got


MSGS = [f"m{i}".encode() for i in range(6)]


def test_clean_pipe_keeps_every_message_in_order(pair: tuple[Recorder, FaultProxy]) -> None:
    rec, proxy = pair
    assert asyncio.run(_exchange(proxy.url, MSGS, 6)) == MSGS
    assert rec.got == MSGS


def test_dup_sends_each_faulted_frame_twice(pair: tuple[Recorder, FaultProxy]) -> None:
    rec, proxy = pair
    proxy.set("up", dup=1.0)
    asyncio.run(_exchange(proxy.url, MSGS, 11))
    # the first frame is spared (handshake), every later one arrives twice, in order
    assert rec.got == [MSGS[0]] + [m for m in MSGS[1:] for _ in (0, 1)]
    assert proxy.counts["dup_up"] == 5


def test_reorder_swaps_neighbours(pair: tuple[Recorder, FaultProxy]) -> None:
    rec, proxy = pair
    proxy.set("up", reorder=1.0)
    asyncio.run(_exchange(proxy.url, MSGS, 6))
    assert sorted(rec.got) == MSGS and rec.got != MSGS
    assert rec.got[:3] == [MSGS[0], MSGS[2], MSGS[1]]


def test_vanish_loses_frames_on_a_live_link(pair: tuple[Recorder, FaultProxy]) -> None:
    rec, proxy = pair
    proxy.drop_mode = "vanish"
    proxy.set("down", drop=1.0)
    got = asyncio.run(_exchange(proxy.url, MSGS, 6, timeout=1))
    assert rec.got == MSGS  # up is clean
    assert got == [MSGS[0]]  # every echo after the spared one vanished
    assert proxy.counts["drop_vanish_down"] == 5


def test_truncate_drop_cuts_the_connection(pair: tuple[Recorder, FaultProxy]) -> None:
    rec, proxy = pair
    proxy.set("up", drop=1.0)
    got = asyncio.run(_exchange(proxy.url, MSGS, 6, timeout=5))
    assert rec.got == [MSGS[0]] and got == [MSGS[0]]
    assert proxy.counts["drop_truncate_up"] == 1  # the rest of the stream went with the cut


def test_partition_refuses_then_heals(pair: tuple[Recorder, FaultProxy]) -> None:
    _rec, proxy = pair
    proxy.partition(True)
    with pytest.raises((OSError, websockets.InvalidHandshake, EOFError)):
        asyncio.run(_exchange(proxy.url, MSGS, 6))
    proxy.partition(False)
    assert asyncio.run(_exchange(proxy.url, MSGS, 6)) == MSGS


def test_cut_closes_live_connections(pair: tuple[Recorder, FaultProxy]) -> None:
    _rec, proxy = pair

    async def go() -> bool:
        async with connect(proxy.url, proxy=None) as ws:
            await ws.send(b"x")
            await ws.recv()
            assert await asyncio.to_thread(proxy.cut) == 1
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        return True

    assert asyncio.run(go())


def test_vanish_next_targets_one_frame_type(pair: tuple[Recorder, FaultProxy]) -> None:
    rec, proxy = pair
    proxy.vanish_next("up", 2, ord("m"))  # every MSGS payload starts with b"m"
    asyncio.run(_exchange(proxy.url, [b"x1", *MSGS[:3]], 2, timeout=2))
    assert rec.got == [b"x1", MSGS[2]]
    assert proxy.counts["vanish_up_0x6d"] == 2
