"""The relay's durable store: spaces, their membership logs, and an append-only envelope log.

SQLite through aiosqlite, in WAL mode, with ``synchronous=FULL``.

Why FULL and not NORMAL: in WAL mode NORMAL survives an application crash but may lose the last
transactions on power loss or an OS crash, because the WAL is not fsynced at each commit. The
relay acknowledges a publish only after its commit, and a device may forget its copy of an
envelope once it is acknowledged, so an ack must mean *durable*. The extra fsync is paid once per
*batch*, not once per envelope, thanks to group commit (below), which keeps FULL cheap under load.

Group commit: publishes are queued to one writer task. The writer takes everything that is queued
(plus whatever arrives while it yields once to the event loop, and optionally within a short
linger), decides each envelope's fate in order (duplicate, over quota, or stored with the next
relay sequence), writes the batch in one transaction, commits, and only then resolves every
publisher's future. While a commit is in flight new publishes accumulate, so batches grow
naturally with load.

Connections: one writer connection (owned by the writer; every write goes through ``_write_lock``)
and a small pool of read-only connections for backlog pages, so readers never see uncommitted rows
and never block the writer (WAL).

Per-space metadata (head sequence, bytes used, each sender's highest stored sequence) is cached in
memory and only changed after a successful commit; on a failed commit the cache for the affected
spaces is dropped and reloaded from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import aiosqlite

from .tasks import cancel_and_wait

log = logging.getLogger("qmoi_sync.relay.store")

DB_FILENAME = "relay.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS spaces (
    space_id    BLOB PRIMARY KEY,
    log         BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    head_seq    INTEGER NOT NULL DEFAULT 0,
    bytes_used  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS envelopes (
    space_id    BLOB NOT NULL,
    relay_seq   INTEGER NOT NULL,
    sender      BLOB NOT NULL,
    sender_seq  INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    data        BLOB NOT NULL,      -- last: reading size never touches the blob's overflow pages
    UNIQUE (space_id, relay_seq),
    UNIQUE (space_id, sender, sender_seq)
);
CREATE TABLE IF NOT EXISTS truncations (
    space_id    BLOB PRIMARY KEY,
    before_seq  INTEGER NOT NULL    -- the log starts here: envelopes below it were dropped
);
CREATE TABLE IF NOT EXISTS senders (
    space_id    BLOB NOT NULL,
    sender      BLOB NOT NULL,
    max_seq     INTEGER NOT NULL,
    PRIMARY KEY (space_id, sender)
) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The store could not do what was asked (closed, unknown space, database failure)."""


class AppendStatus(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUOTA_EXCEEDED = "quota_exceeded"


@dataclass(frozen=True, slots=True)
class AppendResult:
    status: AppendStatus
    #: The relay sequence assigned (STORED), the original's if still stored (DUPLICATE), else 0.
    relay_seq: int


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    space_id: bytes
    relay_seq: int
    sender: bytes
    sender_seq: int
    data: bytes
    #: Opaque tag given to :meth:`RelayStore.submit_append` (e.g. the publishing connection);
    #: not persisted.
    origin: object | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SpaceRecord:
    space_id: bytes
    log: bytes
    created_at: int
    head_seq: int
    bytes_used: int


#: Called synchronously, right after a commit, with the envelopes stored for one space, in order.
CommitListener = Callable[[bytes, Sequence[StoredEnvelope]], None]


@dataclass(slots=True)
class _SpaceMeta:
    head_seq: int
    bytes_used: int
    sender_max: dict[bytes, int]


@dataclass(slots=True)
class _Pending:
    space_id: bytes
    sender: bytes
    sender_seq: int
    data: bytes
    quota_bytes: int
    future: asyncio.Future[AppendResult]
    origin: object | None = None


@dataclass(slots=True)
class StoreStats:
    batches: int = 0
    appended: int = 0
    duplicates: int = 0
    quota_refusals: int = 0
    largest_batch: int = 0


class RelayStore:
    """Durable relay state. Create with :meth:`open`, release with :meth:`close`."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        readers: list[aiosqlite.Connection],
        *,
        max_batch: int,
        max_batch_bytes: int,
        linger_s: float,
    ) -> None:
        self._db = writer
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers = list(readers)
        for r in readers:
            self._readers.put_nowait(r)
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._linger_s = linger_s
        self._write_lock = asyncio.Lock()
        self._meta: dict[bytes, _SpaceMeta] = {}
        self._space_count = 0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._listeners: list[CommitListener] = []
        self._closed = False
        self._writer_task: asyncio.Task[None] | None = None
        self.stats = StoreStats()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        readers: int = 2,
        max_batch: int = 1_000,
        max_batch_bytes: int = 32 * 1024 * 1024,
        linger_s: float = 0.0,
    ) -> RelayStore:
        """Open (creating if needed) the store in ``data_dir`` and start the writer task."""
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        path = data_dir / DB_FILENAME
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader_conns: list[aiosqlite.Connection] = []
        try:
            await writer.execute("PRAGMA journal_mode=WAL")
            await writer.execute("PRAGMA synchronous=FULL")
            await writer.execute("PRAGMA busy_timeout=10000")
            await writer.executescript(_SCHEMA)
            await cls._check_schema_version(writer)
            for _ in range(max(1, readers)):
                r = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
                reader_conns.append(r)
                await r.execute("PRAGMA busy_timeout=10000")
                await r.execute("PRAGMA query_only=1")
            store = cls(
                writer,
                reader_conns,
                max_batch=max_batch,
                max_batch_bytes=max_batch_bytes,
                linger_s=linger_s,
            )
            async with writer.execute("SELECT COUNT(*) FROM spaces") as cur:
                row = await cur.fetchone()
            store._space_count = int(row[0]) if row else 0
        except BaseException:
            for r in reader_conns:
                await r.close()
            await writer.close()
            raise
        store._writer_task = asyncio.create_task(store._writer_loop(), name="relay-store-writer")
        return store

    @staticmethod
    async def _check_schema_version(db: aiosqlite.Connection) -> None:
        async with db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
            row = await cur.fetchone()
        if row is None:
            await db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"unsupported relay store schema version {row[0]}")

    async def close(self) -> None:
        """Stop accepting publishes, finish what is queued, close the database."""
        if self._closed:
            return
        self._closed = True
        task = self._writer_task
        if task is not None:
            # Let the writer drain what is already queued, then stop it.
            self._queue.put_nowait(_SENTINEL)
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                await cancel_and_wait(task)
        # Fail anything that raced in after the sentinel.
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if p is not _SENTINEL and not p.future.done():
                p.future.set_exception(StoreError("store closed"))
        async with self._write_lock:
            for r in self._all_readers:
                await r.close()
            await self._db.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ spaces

    @property
    def space_count(self) -> int:
        return self._space_count

    async def get_space(self, space_id: bytes) -> SpaceRecord | None:
        async with (
            self._reader() as db,
            db.execute(
                "SELECT log, created_at, head_seq, bytes_used FROM spaces WHERE space_id=?",
                (space_id,),
            ) as cur,
        ):
            row = await cur.fetchone()
        if row is None:
            return None
        return SpaceRecord(space_id, bytes(row[0]), int(row[1]), int(row[2]), int(row[3]))

    async def create_space(
        self, space_id: bytes, log_bytes: bytes, *, max_spaces: int, now: int | None = None
    ) -> bool:
        """Register a new space. Returns False if it already exists.

        Raises :class:`SpaceLimitError` if ``max_spaces`` spaces are already registered.
        """
        self._check_open()
        created = int(time.time()) if now is None else now
        async with self._write_lock:
            async with self._db.execute(
                "SELECT 1 FROM spaces WHERE space_id=?", (space_id,)
            ) as cur:
                if await cur.fetchone() is not None:
                    return False
            if self._space_count >= max_spaces:
                raise SpaceLimitError(f"relay already holds {self._space_count} spaces")
            await self._db.execute(
                "INSERT INTO spaces(space_id, log, created_at, head_seq, bytes_used) "
                "VALUES (?, ?, ?, 0, 0)",
                (space_id, log_bytes, created),
            )
            self._space_count += 1
            self._meta[space_id] = _SpaceMeta(0, 0, {})
            return True

    async def update_log(self, space_id: bytes, log_bytes: bytes) -> None:
        """Replace a space's stored membership log (the caller checked it extends the old one)."""
        self._check_open()
        async with self._write_lock:
            cur = await self._db.execute(
                "UPDATE spaces SET log=? WHERE space_id=?", (log_bytes, space_id)
            )
            if cur.rowcount != 1:
                raise StoreError("unknown space")

    async def head_seq(self, space_id: bytes) -> int:
        """The highest committed relay sequence of a space (0 if empty)."""
        return (await self._load_meta(space_id)).head_seq

    def committed_head(self, space_id: bytes) -> int | None:
        """Synchronous view of the committed head; None if the space's metadata is not loaded."""
        meta = self._meta.get(space_id)
        return None if meta is None else meta.head_seq

    async def bytes_used(self, space_id: bytes) -> int:
        return (await self._load_meta(space_id)).bytes_used

    async def space_usage(self) -> list[tuple[bytes, int]]:
        """Every space's committed envelope bytes, ``(space_id, bytes_used)`` (for metrics)."""
        async with (
            self._reader() as db,
            db.execute("SELECT space_id, bytes_used FROM spaces ORDER BY space_id") as cur,
        ):
            return [(bytes(sid), int(n)) for sid, n in await cur.fetchall()]

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store is usable: open, its group-commit writer
        alive, and the database answering a read (used by the relay's ``/healthz``)."""
        self._check_open()
        task = self._writer_task
        if task is None or task.done():
            raise StoreError("the group-commit writer is not running")
        try:
            async with self._reader() as db, db.execute("SELECT 1") as cur:
                await cur.fetchone()
        except aiosqlite.Error as exc:
            raise StoreError(f"database read failed: {exc}") from exc

    async def sender_max_seq(self, space_id: bytes, sender: bytes) -> int:
        return (await self._load_meta(space_id)).sender_max.get(sender, 0)

    async def _load_meta(self, space_id: bytes) -> _SpaceMeta:
        meta = self._meta.get(space_id)
        if meta is not None:
            return meta
        self._check_open()
        async with self._write_lock:
            meta = self._meta.get(space_id)
            if meta is not None:
                return meta
            return await self._load_meta_locked(space_id)

    async def _load_meta_locked(self, space_id: bytes) -> _SpaceMeta:
        async with self._db.execute(
            "SELECT head_seq, bytes_used FROM spaces WHERE space_id=?", (space_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise StoreError("unknown space")
        async with self._db.execute(
            "SELECT sender, max_seq FROM senders WHERE space_id=?", (space_id,)
        ) as cur:
            senders = {bytes(s): int(m) for s, m in await cur.fetchall()}
        meta = _SpaceMeta(int(row[0]), int(row[1]), senders)
        self._meta[space_id] = meta
        return meta

    # ------------------------------------------------------------------ envelopes

    def submit_append(
        self,
        space_id: bytes,
        sender: bytes,
        sender_seq: int,
        data: bytes,
        *,
        quota_bytes: int,
        origin: object | None = None,
    ) -> asyncio.Future[AppendResult]:
        """Queue one envelope for the next group commit; the future resolves after the commit.

        Ordering: envelopes are decided in submission order, so a connection that pipelines
        publishes gets its acks in order.
        """
        self._check_open()
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(
            _Pending(space_id, sender, sender_seq, data, quota_bytes, fut, origin)
        )
        return fut

    async def append(
        self, space_id: bytes, sender: bytes, sender_seq: int, data: bytes, *, quota_bytes: int
    ) -> AppendResult:
        return await self.submit_append(space_id, sender, sender_seq, data, quota_bytes=quota_bytes)

    async def read_page(
        self,
        space_id: bytes,
        after_seq: int,
        *,
        max_count: int = 256,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> list[tuple[int, bytes]]:
        """Committed envelopes with ``relay_seq > after_seq``, in order, bounded in count and bytes.

        Always returns at least one envelope if one exists, however large.
        """
        async with self._reader() as db:
            async with db.execute(
                "SELECT relay_seq, size FROM envelopes WHERE space_id=? AND relay_seq>? "
                "ORDER BY relay_seq LIMIT ?",
                (space_id, after_seq, max_count),
            ) as cur:
                sizes = list(await cur.fetchall())
            if not sizes:
                return []
            total = 0
            last = int(sizes[0][0])
            for seq, size in sizes:
                if total and total + int(size) > max_bytes:
                    break
                total += int(size)
                last = int(seq)
            async with db.execute(
                "SELECT relay_seq, data FROM envelopes WHERE space_id=? AND relay_seq>? "
                "AND relay_seq<=? ORDER BY relay_seq",
                (space_id, after_seq, last),
            ) as cur:
                rows = await cur.fetchall()
        return [(int(seq), bytes(data)) for seq, data in rows]

    async def log_start(self, space_id: bytes) -> int:
        """The lowest relay sequence the log still holds or will hold (1 until truncated)."""
        async with (
            self._reader() as db,
            db.execute("SELECT before_seq FROM truncations WHERE space_id=?", (space_id,)) as cur,
        ):
            row = await cur.fetchone()
        return max(1, int(row[0])) if row else 1

    async def _has_envelope(self, space_id: bytes, sender: bytes, sender_seq: int) -> bool:
        async with self._db.execute(
            "SELECT 1 FROM envelopes WHERE space_id=? AND sender=? AND sender_seq=?",
            (space_id, sender, sender_seq),
        ) as cur:
            return await cur.fetchone() is not None

    async def drop_before(self, space_id: bytes, before_seq: int) -> int:
        """Delete the envelopes of a space with ``relay_seq < before_seq``; returns bytes freed.

        Relay sequence numbers are never reused: the head is unchanged. Per-sender max sequences
        are kept. A resend of a dropped envelope (its Ack was lost) is stored again, as a late
        envelope: receivers drop it as a replay, and nothing is ever acked without being stored.
        """
        self._check_open()
        await self._load_meta(space_id)
        async with self._write_lock:
            meta = self._meta.get(space_id) or await self._load_meta_locked(space_id)
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                async with self._db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM envelopes WHERE space_id=? AND relay_seq<?",
                    (space_id, before_seq),
                ) as cur:
                    row = await cur.fetchone()
                freed = int(row[0]) if row else 0
                await self._db.execute(
                    "DELETE FROM envelopes WHERE space_id=? AND relay_seq<?", (space_id, before_seq)
                )
                await self._db.execute(
                    "UPDATE spaces SET bytes_used=bytes_used-? WHERE space_id=?", (freed, space_id)
                )
                await self._db.execute(
                    "INSERT INTO truncations(space_id, before_seq) VALUES (?, ?)"
                    " ON CONFLICT(space_id) DO UPDATE SET"
                    " before_seq=MAX(before_seq, excluded.before_seq)",
                    (space_id, before_seq),
                )
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                self._meta.pop(space_id, None)
                raise
            meta.bytes_used -= freed
            return freed

    # ------------------------------------------------------------------ writer

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store closed")

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        self._check_open()
        db = await self._readers.get()
        try:
            yield db
        finally:
            self._readers.put_nowait(db)

    async def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            await self._db.execute("ROLLBACK")

    async def _writer_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _SENTINEL:
                break
            batch = [first]
            size = len(first.data)
            # Yield once so handler tasks that are already runnable can enqueue their publishes,
            # then take everything queued (bounded). Optionally linger for stragglers.
            await asyncio.sleep(0)
            deadline = time.monotonic() + self._linger_s
            while len(batch) < self._max_batch and size < self._max_batch_bytes:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is _SENTINEL:
                    stopping = True
                    break
                batch.append(item)
                size += len(item.data)
            try:
                await self._commit_batch(batch)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(StoreError("store closed"))
                raise
            except Exception as exc:  # the batch failed as a whole; publishers get the error
                log.exception("group commit failed batch=%d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(StoreError(f"commit failed: {exc}"))

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        async with self._write_lock:
            # Make sure every space in the batch has its metadata loaded.
            for p in batch:
                if p.space_id not in self._meta:
                    try:
                        await self._load_meta_locked(p.space_id)
                    except StoreError as exc:
                        p.future.set_exception(exc)
            # A *cancelled* future only means its waiter went away (e.g. the publisher's
            # connection closed and its ack task was cancelled): the envelope is still decided
            # and stored. Skipping it would store the sender's later envelopes, so its resend
            # would be taken for a duplicate (seq <= sender max) and acked, i.e. lost.
            live = [p for p in batch if p.future.cancelled() or not p.future.done()]
            # Decide each envelope's fate in order against a working copy of the metadata.
            work: dict[bytes, _SpaceMeta] = {}
            decisions: list[tuple[_Pending, AppendStatus, int]] = []
            rows: list[tuple[bytes, int, bytes, int, int, bytes]] = []
            stored: dict[bytes, list[StoredEnvelope]] = {}
            in_batch: set[tuple[bytes, bytes, int]] = set()
            for p in live:
                w = work.get(p.space_id)
                if w is None:
                    m = self._meta[p.space_id]
                    w = _SpaceMeta(m.head_seq, m.bytes_used, dict(m.sender_max))
                    work[p.space_id] = w
                key = (p.space_id, p.sender, p.sender_seq)
                if p.sender_seq <= w.sender_max.get(p.sender, 0) and (
                    key in in_batch or await self._has_envelope(*key)
                ):
                    decisions.append((p, AppendStatus.DUPLICATE, 0))
                    continue
                # Below the sender's max but never stored is a *late* envelope, not a
                # duplicate: one this relay dropped (rate limit, quota) or that was lost on the
                # way while the sender's later ones got through. Acking it as a duplicate made
                # the sender forget it: lost for every device. It is stored (receivers' replay
                # windows take sender seqs in any order).
                if w.bytes_used + len(p.data) > p.quota_bytes:
                    decisions.append((p, AppendStatus.QUOTA_EXCEEDED, 0))
                    continue
                w.head_seq += 1
                w.bytes_used += len(p.data)
                w.sender_max[p.sender] = max(p.sender_seq, w.sender_max.get(p.sender, 0))
                in_batch.add(key)
                rows.append((p.space_id, w.head_seq, p.sender, p.sender_seq, len(p.data), p.data))
                stored.setdefault(p.space_id, []).append(
                    StoredEnvelope(p.space_id, w.head_seq, p.sender, p.sender_seq, p.data, p.origin)
                )
                decisions.append((p, AppendStatus.STORED, w.head_seq))

            if rows:
                senders: dict[tuple[bytes, bytes], int] = {}
                for space_id, _rs, sender, _ss, _sz, _d in rows:
                    senders[(space_id, sender)] = work[space_id].sender_max[sender]
                try:
                    await self._db.execute("BEGIN IMMEDIATE")
                    await self._db.executemany(
                        "INSERT INTO envelopes(space_id, relay_seq, sender, sender_seq, size, data)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    await self._db.executemany(
                        "INSERT INTO senders(space_id, sender, max_seq) VALUES (?, ?, ?) "
                        "ON CONFLICT(space_id, sender) DO UPDATE SET max_seq=excluded.max_seq",
                        [(s, snd, seq) for (s, snd), seq in senders.items()],
                    )
                    await self._db.executemany(
                        "UPDATE spaces SET head_seq=?, bytes_used=? WHERE space_id=?",
                        [(w.head_seq, w.bytes_used, s) for s, w in work.items()],
                    )
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    for s in work:
                        self._meta.pop(s, None)
                    raise
                for s, w in work.items():
                    self._meta[s] = w

            # Committed: the original relay_seq of each duplicate, for the Ack.
            resolved: list[tuple[_Pending, AppendResult]] = []
            for p, status, seq in decisions:
                if status is AppendStatus.DUPLICATE:
                    async with self._db.execute(
                        "SELECT relay_seq FROM envelopes WHERE space_id=? AND sender=? "
                        "AND sender_seq=?",
                        (p.space_id, p.sender, p.sender_seq),
                    ) as cur:
                        row = await cur.fetchone()
                    seq = int(row[0]) if row is not None else 0
                resolved.append((p, AppendResult(status, seq)))

        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.appended += len(rows)
        self.stats.duplicates += sum(1 for _p, st, _s in decisions if st is AppendStatus.DUPLICATE)
        self.stats.quota_refusals += sum(
            1 for _p, st, _s in decisions if st is AppendStatus.QUOTA_EXCEEDED
        )
        # Fan-out first (synchronously, in commit order), then wake the publishers.
        for space_id, envs in stored.items():
            for listener in self._listeners:
                try:
                    listener(space_id, envs)
                except Exception:
                    log.exception("commit listener failed")
        for p, result in resolved:
            if not p.future.done():
                p.future.set_result(result)


class SpaceLimitError(StoreError):
    """The relay already holds its maximum number of spaces."""


_SENTINEL: _Pending = object()  # type: ignore[assignment]
