"""The relay's blob store: encrypted chunks of binary files, kept apart from the envelope log.

One file per chunk, ``<data>/blobs/<space hex>/<id hex[:2]>/<id hex>``, holding exactly the
ciphertext a device uploaded. The relay cannot check a chunk against its id (the id is a keyed
hash of the plaintext); it checks sizes, who uploads (store.py/server.py: an authenticated writer
of the space) and the space's blob quota. Devices verify every chunk they download.

Durability: a chunk is acknowledged only once it is on disk — written to a temporary name,
fsynced, renamed, and its folder fsynced. Like the envelope store's group commit, uploads are
queued to one writer task that takes every queued chunk, writes the batch in a worker thread and
resolves the uploaders' futures afterwards: a fast uploader pipelines many chunks and their
fsyncs overlap with the network.

Garbage collection: the relay cannot tell which chunks are still referenced (manifests are
sealed), so a member device tells it (agent/blob_gc.py): it lists the space's chunk ids with
their age (``list_chunks``) and asks to drop the ones no current manifest references
(``drop``). A chunk's age is the time since its last upload by anyone (a put of a chunk the store
already has refreshes it), and ``drop`` re-checks that age against the caller's minimum under the
writer's lock, so a chunk some device has just uploaded or re-announced is never dropped by a
decision taken on an older listing.

Usage per space (bytes of stored chunks) is counted from the files the first time a space is
touched and kept in memory; the quota is checked against it in the writer, in upload order, so
concurrent uploads cannot overshoot it. A chunk the store already has is acknowledged as present
and never counted twice (identical chunks from two devices are identical ciphertexts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .tasks import cancel_and_wait

log = logging.getLogger("qmoi_sync.relay.blobs")

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[[int, int, int, int], int] | None = None
_sync_file_range_loaded = False


def _start_writeback(fd: int, length: int) -> None:
    """Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start (not wait for) the writeback of
    the first ``length`` bytes. Not a durability step (the fsync still is); a no-op where it is
    unavailable. (The agent has the same helper, agent/chunker.py; the relay imports nothing
    from the agent.)"""
    global _sync_file_range, _sync_file_range_loaded
    if not _sync_file_range_loaded:
        _sync_file_range_loaded = True
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = None
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, length, _SYNC_FILE_RANGE_WRITE)


BLOB_DIR = "blobs"
_TMP_PREFIX = ".tmp-"


class PutStatus(Enum):
    STORED = "stored"
    PRESENT = "present"
    QUOTA_EXCEEDED = "quota_exceeded"


@dataclass(slots=True)
class BlobStats:
    stored: int = 0
    stored_bytes: int = 0
    present: int = 0
    quota_refusals: int = 0
    served: int = 0
    served_bytes: int = 0
    missing: int = 0
    batches: int = 0
    dropped: int = 0
    dropped_bytes: int = 0


@dataclass(slots=True)
class _Put:
    space_id: bytes
    chunk_id: bytes
    data: bytes
    quota_bytes: int
    future: asyncio.Future[PutStatus]


@dataclass(slots=True)
class _Usage:
    bytes: int = 0
    count: int = 0


@dataclass
class BlobStore:
    """Create with :meth:`open`; ``submit_put`` / ``get`` / ``usage``; :meth:`close`."""

    root: Path
    max_batch: int = 64
    stats: BlobStats = field(default_factory=BlobStats)
    _usage: dict[bytes, _Usage] = field(default_factory=dict)
    _queue: asyncio.Queue[_Put | None] = field(default_factory=asyncio.Queue)
    _writer: asyncio.Task[None] | None = None
    _closed: bool = False
    # Held around every batch write and every drop: a put decided "present" (and refreshed)
    # cannot interleave with the deletion of that chunk.
    _io_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def open(cls, data_dir: Path, max_batch: int = 64) -> BlobStore:
        root = data_dir / BLOB_DIR
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        store = cls(root, max_batch)
        store._writer = asyncio.create_task(store._writer_loop(), name="relay-blob-writer")
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                await cancel_and_wait(self._writer)
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if p is not None and not p.future.done():
                p.future.set_exception(OSError("blob store closed"))

    # -- paths -------------------------------------------------------------------------------
    def _space_dir(self, space_id: bytes) -> Path:
        return self.root / space_id.hex()

    def path_of(self, space_id: bytes, chunk_id: bytes) -> Path:
        h = chunk_id.hex()
        return self._space_dir(space_id) / h[:2] / h

    # -- usage -------------------------------------------------------------------------------
    async def usage(self, space_id: bytes) -> int:
        return (await self._load_usage(space_id)).bytes

    async def _load_usage(self, space_id: bytes) -> _Usage:
        u = self._usage.get(space_id)
        if u is None:
            u = await asyncio.to_thread(self._scan, self._space_dir(space_id))
            self._usage.setdefault(space_id, u)
            u = self._usage[space_id]
        return u

    @staticmethod
    def _scan(base: Path) -> _Usage:
        u = _Usage()
        if not base.is_dir():
            return u
        for sub in os.scandir(base):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                if f.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(f.path)  # left by a crash before its rename: never acked
                    continue
                with contextlib.suppress(OSError):
                    u.bytes += f.stat(follow_symlinks=False).st_size
                    u.count += 1
        return u

    def usage_snapshot(self) -> list[tuple[bytes, int, int]]:
        """(space_id, bytes, chunks) of every space touched since start (for metrics)."""
        return [(s, u.bytes, u.count) for s, u in sorted(self._usage.items())]

    # -- puts --------------------------------------------------------------------------------
    async def submit_put(
        self, space_id: bytes, chunk_id: bytes, data: bytes, quota_bytes: int
    ) -> asyncio.Future[PutStatus]:
        """Queue a chunk for the next batch; the future resolves once it is durable (or
        refused). Puts are decided in submission order."""
        if self._closed:
            raise OSError("blob store closed")
        await self._load_usage(space_id)
        fut: asyncio.Future[PutStatus] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Put(space_id, chunk_id, data, quota_bytes, fut))
        return fut

    async def _writer_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            await asyncio.sleep(0)  # let already-runnable handlers queue their puts
            while len(batch) < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            # Decide in order against the usage counters (loaded by submit_put).
            decided: list[tuple[_Put, PutStatus]] = []
            pending: set[tuple[bytes, bytes]] = set()
            extra: dict[bytes, int] = {}
            for p in batch:
                key = (p.space_id, p.chunk_id)
                if key in pending:  # the same chunk twice in one batch
                    decided.append((p, PutStatus.PRESENT))
                    continue
                pending.add(key)
                used = self._usage[p.space_id].bytes + extra.get(p.space_id, 0)
                if used + len(p.data) > p.quota_bytes:
                    # unless the store has it already: checked on disk by _write_batch
                    decided.append((p, PutStatus.QUOTA_EXCEEDED))
                    continue
                extra[p.space_id] = extra.get(p.space_id, 0) + len(p.data)
                decided.append((p, PutStatus.STORED))
            try:
                async with self._io_lock:
                    results = await asyncio.to_thread(self._write_batch, decided)
            except Exception as exc:  # a disk error fails the whole batch; uploaders retry
                log.error("blob batch of %d failed: %s", len(batch), exc)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.stats.batches += 1
            for p, status in results:
                u = self._usage[p.space_id]
                if status is PutStatus.STORED:
                    u.bytes += len(p.data)
                    u.count += 1
                    self.stats.stored += 1
                    self.stats.stored_bytes += len(p.data)
                elif status is PutStatus.PRESENT:
                    self.stats.present += 1
                else:
                    self.stats.quota_refusals += 1
                if not p.future.done():
                    p.future.set_result(status)

    def _write_batch(self, decided: list[tuple[_Put, PutStatus]]) -> list[tuple[_Put, PutStatus]]:
        """In a worker thread: write new chunks to temporary names, fsync them, rename them into
        place, fsync their folders."""
        out: list[tuple[_Put, PutStatus]] = []
        written: list[tuple[int, Path, Path]] = []
        dirs: set[Path] = set()
        seen: set[Path] = set()
        try:
            for p, status in decided:
                final = self.path_of(p.space_id, p.chunk_id)
                if final in seen or final.exists():
                    if final not in seen:
                        with contextlib.suppress(OSError):
                            os.utime(final)  # uploaded again: young again (see drop)
                    out.append((p, PutStatus.PRESENT))
                    continue
                if status is PutStatus.QUOTA_EXCEEDED:
                    out.append((p, status))
                    continue
                seen.add(final)
                if not final.parent.is_dir():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    dirs.add(final.parent.parent)
                tmp = final.parent / f"{_TMP_PREFIX}{secrets.token_hex(6)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                written.append((fd, tmp, final))
                view = memoryview(p.data)
                while view:
                    view = view[os.write(fd, view) :]
                # Start this chunk's writeback now: the batch's fsyncs below then wait for I/O
                # already under way instead of each starting its own (measured here: a batch
                # pattern of 200 1-MiB chunks fsynced in 0.8-1.0 s instead of 2.9-3.3 s).
                _start_writeback(fd, len(p.data))
                out.append((p, PutStatus.STORED))
            for fd, _tmp, _final in written:
                os.fsync(fd)
            for _fd, tmp, final in written:
                os.rename(tmp, final)
                dirs.add(final.parent)
            for d in dirs:
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        finally:
            for fd, tmp, _final in written:
                with contextlib.suppress(OSError):
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # only still there if the rename did not happen
        return out

    # -- garbage collection ------------------------------------------------------------------
    async def list_chunks(
        self, space_id: bytes, after: bytes, limit: int
    ) -> tuple[list[tuple[bytes, int]], bool]:
        """Up to ``limit`` (chunk id, age in whole seconds) of the space, ids in ascending order
        and above ``after``; and whether more follow."""
        return await asyncio.to_thread(self._list, self._space_dir(space_id), after, limit)

    @staticmethod
    def _list(base: Path, after: bytes, limit: int) -> tuple[list[tuple[bytes, int]], bool]:
        if not base.is_dir():
            return [], False
        after_hex = after.hex()
        now = time.time()
        out: list[tuple[bytes, int]] = []
        for prefix in sorted(os.listdir(base)):
            if len(prefix) != 2 or prefix < after_hex[:2]:
                continue
            names = sorted(n for n in os.listdir(base / prefix) if not n.startswith(_TMP_PREFIX))
            for name in names:
                if name <= after_hex:
                    continue
                try:
                    chunk_id = bytes.fromhex(name)
                    mtime = os.stat(base / prefix / name, follow_symlinks=False).st_mtime
                except (ValueError, OSError):
                    continue
                if len(out) == limit:
                    return out, True
                out.append((chunk_id, max(0, int(now - mtime))))
        return out, False

    async def drop(self, space_id: bytes, ids: list[bytes], min_age_s: int) -> tuple[int, int]:
        """Delete these chunks of the space if each is at least ``min_age_s`` old now; returns
        (chunks dropped, bytes freed). Unknown ids are skipped."""
        usage = await self._load_usage(space_id)
        async with self._io_lock:
            dropped, freed = await asyncio.to_thread(self._drop, space_id, ids, min_age_s)
        usage.bytes = max(0, usage.bytes - freed)
        usage.count = max(0, usage.count - dropped)
        self.stats.dropped += dropped
        self.stats.dropped_bytes += freed
        return dropped, freed

    def _drop(self, space_id: bytes, ids: list[bytes], min_age_s: int) -> tuple[int, int]:
        now = time.time()
        dropped = freed = 0
        for chunk_id in ids:
            path = self.path_of(space_id, chunk_id)
            try:
                st = os.stat(path, follow_symlinks=False)
                if now - st.st_mtime < min_age_s:
                    continue
                os.unlink(path)
            except OSError:
                continue
            dropped += 1
            freed += st.st_size
        return dropped, freed

    # -- gets --------------------------------------------------------------------------------
    async def get(self, space_id: bytes, chunk_id: bytes, max_size: int) -> bytes | None:
        data = await asyncio.to_thread(self._read, self.path_of(space_id, chunk_id), max_size)
        if data is None:
            self.stats.missing += 1
        else:
            self.stats.served += 1
            self.stats.served_bytes += len(data)
        return data

    @staticmethod
    def _read(path: Path, max_size: int) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > max_size:
                log.error("blob %s is %d bytes, over the limit: not served", path.name, size)
                return None
            parts: list[bytes] = []
            got = 0
            while got < size:
                part = os.read(fd, size - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)
