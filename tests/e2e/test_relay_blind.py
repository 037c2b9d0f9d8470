"""The relay is blind: neither its data directory (SQLite database, WAL included) nor the bytes
on the wire between agents and relay contain any file name or content written in the test.

A small TCP forwarding proxy in the test process sits between the agents and the relay and
records every byte both ways. Client-to-relay websocket frames are masked (RFC 6455 §5.3), so
the recorded streams are also decoded into unmasked frame payloads before searching: a plain
grep of masked bytes would prove nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from harness import (
    Device,
    Relay,
    create_space,
    grep_bytes,
    invite,
    join,
    wait_converged,
    wait_until,
)


@dataclass
class _Url:
    url: str


class RecordingProxy:
    """Forward 127.0.0.1:<port> to the relay, recording each connection's bytes both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.up: list[bytearray] = []  # client -> relay, one buffer per connection
        self.down: list[bytearray] = []  # relay -> client
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> RecordingProxy:
        self._thread.start()

        async def serve() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up, down = bytearray(), bytearray()
        with self._lock:
            self.up.append(up)
            self.down.append(down)
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(reader, w2, up), self._pipe(r2, writer, down))
        finally:
            for w in (writer, w2):
                w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray
    ) -> None:
        try:
            while data := await src.read(65536):
                with self._lock:
                    record += data
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()

    def streams(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return [("up", bytes(b)) for b in self.up] + [("down", bytes(b)) for b in self.down]


def ws_payloads(stream: bytes) -> tuple[bytes, bytes]:
    """(HTTP handshake, concatenated unmasked frame payloads) of one direction of a websocket
    connection. Stops at a truncated trailing frame."""
    head_end = stream.find(b"\r\n\r\n")
    if head_end < 0:
        return stream, b""
    head, pos = stream[: head_end + 4], head_end + 4
    out = bytearray()
    while pos + 2 <= len(stream):
        b1 = stream[pos + 1]
        masked, n = b1 & 0x80, b1 & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(stream[pos : pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(stream[pos : pos + 8], "big")
            pos += 8
        key = b""
        if masked:
            key = stream[pos : pos + 4]
            pos += 4
        payload = stream[pos : pos + n]
        if len(payload) < n or (masked and len(key) < 4):
            break
        if masked:
            payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        out += payload
        pos += n
    return head, bytes(out)


def test_relay_sees_no_names_or_contents(tmp_path: Path) -> None:
    # Distinctive markers: names and contents nothing else in the system could contain.
    tok = {k: secrets.token_hex(10) for k in ("dir", "f1", "f2", "f3", "ren", "c1", "c2", "c3")}
    d = f"folder{tok['dir']}"
    f1, f2, f3 = (f"{d}/name{tok['f1']}.txt", f"name{tok['f2']}.md", f"name{tok['f3']}.txt")
    renamed = f"{d}/renamed{tok['ren']}.txt"
    c1 = f"content{tok['c1']} first secret line\n"
    c2 = f"content{tok['c2']} second secret, written on b\n"
    c3 = f"content{tok['c3']} appended edit\n" * 3

    relay = Relay(tmp_path / "relay-data").start()
    proxy = RecordingProxy(relay.port).start()
    a = Device(tmp_path / "home-a", tmp_path / "folder-a", "a").init()
    b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b").init()
    try:
        space_id = bytes.fromhex(create_space(a, _Url(proxy.url)))  # type: ignore[arg-type]
        a.start()
        join(b, invite(a))
        b.start()

        a.write(f1, c1)
        b.write(f2, c2)
        wait_until(lambda: b.read(f1) == c1 and a.read(f2) == c2, what="files both ways")
        a.write(f1, c1 + c3)  # an edit
        a.write(f3, "short\n")
        wait_until(
            lambda: b.read(f1) == c1 + c3 and b.read(f3) == "short\n", what="edit, new file at b"
        )
        os.rename(b.folder / f3, b.folder / renamed)  # a rename on b
        wait_until(lambda: a.read(renamed) == "short\n", what="rename reaches a")
        (a.folder / f2).unlink()  # a delete
        wait_until(lambda: b.read(f2) is None, what="delete reaches b")
        tree = wait_converged([a, b])
        assert set(tree) == {f1, renamed}

        needles = [t.encode() for t in tok.values()]
        # Sanity: the markers still alive are really on disk, on both devices.
        alive = [tok[k].encode() for k in ("dir", "f1", "ren", "c1", "c3")]
        for dev in (a, b):
            on_disk = b"".join(p.encode() + v for p, v in dev.tree().items())
            assert all(n in on_disk for n in alive), dev.name

        # Relay data directory while the relay runs (WAL not yet checkpointed) and after.
        files = sorted(p.name for p in relay.data.rglob("*") if p.is_file())
        assert any(n.endswith("-wal") for n in files), f"expected a live SQLite WAL: {files}"
        hits = grep_bytes(relay.data, needles)
        assert hits == [], f"relay data dir leaks: {hits}"
        assert grep_bytes(relay.data, [space_id]), "sanity: the relay stores this space"

        # The wire, raw and websocket-decoded (unmasked) in both directions.
        streams = proxy.streams()
        assert len(streams) >= 4, "expected at least a's, b's and the join connections"
        total = 0
        hellos = 0
        for direction, raw in streams:
            head, payload = ws_payloads(raw)
            total += len(payload)
            # Sanity for the decoder: a device's Hello frame carries the raw space id.
            hellos += direction == "up" and space_id in payload
            assert b"permessage-deflate" not in head, "compressed frames would hide plaintext"
            for n in needles:
                assert n not in raw, f"marker {n!r} in raw {direction} traffic"
                assert n not in payload, f"marker {n!r} in decoded {direction} frames"
        assert total > 2000, f"capture looks empty ({total} payload bytes)"
        assert hellos >= 2, "decoder sanity: no Hello frame with the space id found"
    finally:
        b.stop()
        a.stop()
        proxy.stop()
        relay.stop()
    # Once stopped (WAL checkpointed into the main database file), still nothing.
    hits = grep_bytes(relay.data, [t.encode() for t in tok.values()])
    assert hits == [], f"relay data dir leaks after shutdown: {hits}"
