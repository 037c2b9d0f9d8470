"""The agent's durable state: one SQLite database (WAL) per device home.

Everything that must survive a crash lives here: space configs, membership logs, CRDT document
states (a compacted state plus appended updates), the outbox of sealed envelopes, per-sender replay
windows, the relay cursor, the record of what was last materialized on disk, pending invites and
quarantined envelopes. A delta is acknowledged (relay cursor advanced) only in the same
transaction that makes its effect durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.crashpoint import crashpoint
from qmoi_sync.agent.index import FID_BYTES

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spaces (
    space_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    folder TEXT NOT NULL,
    relay_url TEXT,
    insecure INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    seeded INTEGER NOT NULL DEFAULT 0,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS membership (space_id TEXT PRIMARY KEY, log BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    space_id TEXT NOT NULL, doc_id BLOB NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY (space_id, doc_id)
);
CREATE TABLE IF NOT EXISTS doc_updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id TEXT NOT NULL, doc_id BLOB NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS doc_updates_by_doc ON doc_updates (space_id, doc_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    space_id TEXT NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY (space_id, seq)
);
CREATE TABLE IF NOT EXISTS counters (
    space_id TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (space_id, name)
);
CREATE TABLE IF NOT EXISTS replay (
    space_id TEXT NOT NULL, sender BLOB NOT NULL, window BLOB NOT NULL,
    PRIMARY KEY (space_id, sender)
);
CREATE TABLE IF NOT EXISTS files (
    space_id TEXT NOT NULL, path TEXT NOT NULL, fid BLOB NOT NULL, hash BLOB NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    PRIMARY KEY (space_id, path)
);
CREATE TABLE IF NOT EXISTS invites (
    space_id TEXT NOT NULL, invite_id BLOB NOT NULL, secret BLOB NOT NULL,
    role TEXT NOT NULL, expires_at REAL NOT NULL, created_at REAL NOT NULL, used_at REAL,
    PRIMARY KEY (space_id, invite_id)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, space_id TEXT NOT NULL, sender BLOB,
    reason TEXT NOT NULL, at REAL NOT NULL, envelope BLOB
);
CREATE TABLE IF NOT EXISTS pending_materialize (
    space_id TEXT NOT NULL, doc_id BLOB NOT NULL, PRIMARY KEY (space_id, doc_id)
);
CREATE TABLE IF NOT EXISTS device_info (
    space_id TEXT NOT NULL, sign_pk BLOB NOT NULL, info TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (space_id, sign_pk)
);
CREATE TABLE IF NOT EXISTS materialize_base (
    space_id TEXT NOT NULL, doc_id BLOB NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY (space_id, doc_id)
);
"""

# Appended updates per document before they are folded into one state blob.
COMPACT_AFTER = 64
# File records read per query when a space loads (bounds the rows alive at once).
_FILE_ROWS_PER_PAGE = 5000


@dataclass(frozen=True)
class SpaceRecord:
    space_id: str
    name: str
    folder: Path
    relay_url: str | None
    insecure: bool
    created_at: float
    seeded: bool
    paused: bool


# FileRecord's packed layout (little-endian): fid, size, mtime as whole seconds + nanoseconds
# (0..999,999,999), inode; the content hash is the rest (16 bytes for a text file's hash and
# for a folder's mark, 32 for a binary file's manifest hash). The widths are the kernel's own:
# off_t (signed 64 bits), time_t seconds (signed 64 bits; st_mtime_ns reaches ~2^93 since it
# is seconds * 10^9, beyond any one 64-bit field), ino_t (unsigned 64 bits), so every value
# os.stat can return packs exactly; anything else is refused when the record is made.
_HEAD = struct.Struct(f"<{FID_BYTES}sqqIQ")
_HASH_AT = _HEAD.size
_MTIME_AT = FID_BYTES + 8
_INODE_AT = _MTIME_AT + 12
_NS = 1_000_000_000
# Bound once (a property read is one call, no attribute lookups), typed for what they return.
_pack_head: Callable[[bytes, int, int, int, int], bytes] = _HEAD.pack
_size_at: Callable[[bytes, int], tuple[int]] = struct.Struct("<q").unpack_from
_mtime_at: Callable[[bytes, int], tuple[int, int]] = struct.Struct("<qI").unpack_from
_inode_at: Callable[[bytes, int], tuple[int]] = struct.Struct("<Q").unpack_from
_stat_at: Callable[[bytes, int], tuple[int, int, int, int]] = struct.Struct("<qqIQ").unpack_from


class FileRecord:
    """What this device last saw of one tracked file (or folder) on disk: its path, file id,
    content hash and stat (size, mtime, inode). One per tracked file stays in memory, so it is
    the path (shared with the dict key) plus ONE packed bytes value, decoded on access: 141 B
    a text file's record instead of 270 B for a 6-slot object, fid and hash bytes and three
    stat ints (sys.getsizeof; bench/record_memory.py). Behaves like the frozen dataclass it
    replaced: the same constructor, attribute names, equality, hash and repr; immutable
    (``with_path`` makes a moved copy)."""

    __slots__ = ("_packed", "path")
    __match_args__ = ("path", "fid", "hash", "size", "mtime_ns", "inode")
    path: str
    _packed: bytes

    def __init__(
        self, path: str, fid: bytes, hash: bytes, size: int, mtime_ns: int, inode: int
    ) -> None:
        if len(fid) != FID_BYTES:
            raise ValueError(f"file record {path!r}: fid must be {FID_BYTES} bytes, not {len(fid)}")
        if not isinstance(mtime_ns, int):
            raise TypeError(f"file record {path!r}: mtime_ns must be an int, not {mtime_ns!r}")
        sec, ns = divmod(mtime_ns, _NS)
        try:
            packed = _pack_head(fid, size, sec, ns, inode) + hash
        except struct.error as exc:  # out of range, or not an int
            raise ValueError(
                f"file record {path!r}: size={size!r} mtime_ns={mtime_ns!r} inode={inode!r}"
                f" cannot be a file's stat ({exc})"
            ) from None
        except TypeError as exc:  # a hash that is not bytes
            raise TypeError(f"file record {path!r}: hash {hash!r}: {exc}") from None
        _set_path(self, path)
        _set_packed(self, packed)

    @property
    def fid(self) -> bytes:
        return self._packed[:FID_BYTES]

    @property
    def hash(self) -> bytes:
        return self._packed[_HASH_AT:]

    @property
    def size(self) -> int:
        return _size_at(self._packed, FID_BYTES)[0]

    @property
    def mtime_ns(self) -> int:
        sec, ns = _mtime_at(self._packed, _MTIME_AT)
        return sec * _NS + ns

    @property
    def inode(self) -> int:
        return _inode_at(self._packed, _INODE_AT)[0]

    def stat_key(self) -> tuple[int, int, int]:
        """``(size, mtime_ns, inode)`` in one decode (~3x faster than the three properties):
        what a rescan compares with the disk."""
        size, sec, ns, inode = _stat_at(self._packed, FID_BYTES)
        return size, sec * _NS + ns, inode

    def with_path(self, path: str) -> FileRecord:
        """The same record at another path (a folder moved as a whole); shares the packed
        value."""
        rec = object.__new__(FileRecord)
        _set_path(rec, path)
        _set_packed(rec, self._packed)
        return rec

    def _astuple(self) -> tuple[str, bytes, bytes, int, int, int]:
        return self.path, self.fid, self.hash, *self.stat_key()

    def __eq__(self, other: object) -> bool:
        # The packing is one-to-one (fixed-width fields, canonical seconds/nanoseconds split,
        # the hash is the rest), so comparing it is comparing every field, as the dataclass did.
        if other.__class__ is not self.__class__ or not isinstance(other, FileRecord):
            return NotImplemented
        return self.path == other.path and self._packed == other._packed

    def __hash__(self) -> int:
        return hash(self._astuple())  # what the frozen dataclass hashed

    def __repr__(self) -> str:
        path, fid, digest, size, mtime_ns, inode = self._astuple()
        return (
            f"FileRecord(path={path!r}, fid={fid!r}, hash={digest!r}, size={size!r},"
            f" mtime_ns={mtime_ns!r}, inode={inode!r})"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[FileRecord], tuple[str, bytes, bytes, int, int, int]]:
        return FileRecord, self._astuple()


# The slots' own setters: __setattr__ refuses every assignment (the record is frozen).
_set_path: Callable[[FileRecord, str], None] = vars(FileRecord)["path"].__set__
_set_packed: Callable[[FileRecord, bytes], None] = vars(FileRecord)["_packed"].__set__


def records_by_fid(records: Iterable[FileRecord], fids: Iterable[bytes]) -> dict[bytes, FileRecord]:
    """The records of these fids (the last one of a fid if several), in one pass that keeps
    only the matches. Run per applied envelope over every tracked file: it reads the packed
    fid directly, since the ``fid`` property call doubled the pass (14.3 vs 8.2 ms at 100,000
    files), and keeps no table of every fid (~5 MB at 100,000 files)."""
    want = set(fids)
    if not want:
        return {}
    return {r._packed[:FID_BYTES]: r for r in records if r._packed[:FID_BYTES] in want}


@dataclass(frozen=True)
class InviteRecord:
    space_id: str
    invite_id: bytes
    secret: bytes
    role: str
    expires_at: float
    used_at: float | None


class Store:
    """Thin typed wrapper over one aiosqlite connection. Not shared across processes' writers:
    the running agent owns it; offline CLI commands open it only while holding the agent lock."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        # One connection is shared by every space of the agent; transactions must not overlap.
        self.tx_lock = asyncio.Lock()
        # Per space, every document id with stored state or updates, so that load_doc answers
        # "nothing stored" for a brand-new document (each new file of a burst) without a query.
        # Exact because this connection is the only writer (above); ids are noted *before*
        # they are written, so a reader can only see a stale "maybe" (then it queries), never
        # a wrong "nothing". `_doc_ids_loading` collects ids noted while the set is loading.
        self._doc_ids: dict[str, set[bytes]] = {}
        self._doc_ids_loading: dict[str, set[bytes]] = {}

    @classmethod
    async def open(cls, path: Path) -> Store:
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable across process crashes (SIGKILL), which is what a sync
        # agent must survive; FULL would add an fsync per commit for power loss only.
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.executescript(_SCHEMA)
        await db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
        )
        return cls(db)

    async def close(self) -> None:
        await self.db.close()

    async def shrink_memory(self) -> None:
        """Give back the connection's page cache (refilled from disk on demand): after a large
        batch it holds up to its 2 MiB limit that an idle agent does not need."""
        await self.db.execute("PRAGMA shrink_memory")

    # -- transactions -------------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self.tx_lock:
            # A cancellation can land while aiosqlite's thread still runs BEGIN or COMMIT, which
            # would leave the shared connection inside a transaction; every later BEGIN would
            # then fail ("cannot start a transaction within a transaction"). Clean up first.
            if self.db.in_transaction:
                await asyncio.shield(self.db.execute("ROLLBACK"))
            await asyncio.shield(self.db.execute("BEGIN IMMEDIATE"))
            crashpoint("sqlite.begin")
            try:
                yield
                crashpoint("sqlite.commit")
                await asyncio.shield(self.db.execute("COMMIT"))
                crashpoint("sqlite.committed")
            except BaseException:
                if self.db.in_transaction:
                    # A shielded COMMIT may still be finishing: then there is nothing to undo.
                    with contextlib.suppress(sqlite3.OperationalError):
                        await asyncio.shield(self.db.execute("ROLLBACK"))
                raise

    async def apply_schema(self, script: str) -> None:
        """Run a module's own ``CREATE TABLE IF NOT EXISTS`` script (chunk index, settings map).

        sqlite3's ``executescript`` first COMMITs any open transaction. On this shared
        connection that would be another coroutine's transaction, committed half-way (a batch's
        updates without its cursor), whose own COMMIT then fails with "no transaction is
        active": that is how a space started by a SIGHUP reload killed another space's relay
        link. Hence under the transaction lock, like a transaction."""
        async with self.tx_lock:
            if self.db.in_transaction:
                await asyncio.shield(self.db.execute("ROLLBACK"))
            await asyncio.shield(self.db.executescript(script))

    # -- spaces -------------------------------------------------------------------------------
    async def add_space(self, rec: SpaceRecord) -> None:
        await self.db.execute(
            "INSERT INTO spaces(space_id, name, folder, relay_url, insecure, created_at, seeded,"
            " paused) VALUES (?,?,?,?,?,?,?,?)",
            (
                rec.space_id,
                rec.name,
                str(rec.folder),
                rec.relay_url,
                int(rec.insecure),
                rec.created_at,
                int(rec.seeded),
                int(rec.paused),
            ),
        )

    async def spaces(self) -> list[SpaceRecord]:
        async with self.db.execute(
            "SELECT space_id, name, folder, relay_url, insecure, created_at, seeded, paused"
            " FROM spaces ORDER BY created_at"
        ) as cur:
            rows = await cur.fetchall()
        return [
            SpaceRecord(r[0], r[1], Path(r[2]), r[3], bool(r[4]), r[5], bool(r[6]), bool(r[7]))
            for r in rows
        ]

    async def set_space_seeded(self, space_id: str) -> None:
        await self.db.execute("UPDATE spaces SET seeded=1 WHERE space_id=?", (space_id,))

    async def set_space_name(self, space_id: str, name: str) -> None:
        await self.db.execute("UPDATE spaces SET name=? WHERE space_id=?", (name, space_id))

    async def set_space_paused(self, space_id: str, paused: bool) -> None:
        await self.db.execute(
            "UPDATE spaces SET paused=? WHERE space_id=?", (int(paused), space_id)
        )

    # -- membership ---------------------------------------------------------------------------
    async def save_membership(self, space_id: str, log: bytes) -> None:
        await self.db.execute(
            "INSERT INTO membership(space_id, log) VALUES (?, ?)"
            " ON CONFLICT(space_id) DO UPDATE SET log=excluded.log",
            (space_id, log),
        )

    async def load_membership(self, space_id: str) -> bytes | None:
        async with self.db.execute(
            "SELECT log FROM membership WHERE space_id=?", (space_id,)
        ) as cur:
            row = await cur.fetchone()
        return bytes(row[0]) if row else None

    # -- documents ----------------------------------------------------------------------------
    async def _known_doc_ids(self, space_id: str) -> set[bytes]:
        known = self._doc_ids.get(space_id)
        if known is None:
            noted = self._doc_ids_loading.setdefault(space_id, set())
            ids = await self.doc_ids(space_id)
            known = self._doc_ids.setdefault(space_id, set())
            known.update(ids)
            known.update(noted)
            self._doc_ids_loading.pop(space_id, None)
        return known

    def _note_doc_ids(self, space_id: str, doc_ids: Iterable[bytes]) -> None:
        for target in (self._doc_ids.get(space_id), self._doc_ids_loading.get(space_id)):
            if target is not None:
                target.update(doc_ids)

    async def has_doc(self, space_id: str, doc_id: bytes) -> bool:
        """Whether anything of this document is stored (no query: the id set is kept)."""
        return doc_id in await self._known_doc_ids(space_id)

    async def load_doc(self, space_id: str, doc_id: bytes) -> tuple[bytes | None, list[bytes]]:
        """The compacted state (if any) and the updates appended since, in order."""
        if doc_id not in await self._known_doc_ids(space_id):
            return None, []
        # One query, one hop to the database thread (instead of two queries of four hops each:
        # execute, fetch, close): this runs for every document touched, thousands of times in
        # a burst of new files.
        rows = await self.db.execute_fetchall(
            "SELECT 0, 0, state FROM docs WHERE space_id=? AND doc_id=?"
            " UNION ALL SELECT 1, id, data FROM doc_updates WHERE space_id=? AND doc_id=?"
            " ORDER BY 1, 2",
            (space_id, doc_id, space_id, doc_id),
        )
        state: bytes | None = None
        updates: list[bytes] = []
        for kind, _id, data in rows:
            if kind == 0:
                state = bytes(data)
            else:
                updates.append(bytes(data))
        return state, updates

    async def doc_ids(self, space_id: str) -> list[bytes]:
        async with self.db.execute(
            "SELECT doc_id FROM docs WHERE space_id=? UNION SELECT doc_id FROM doc_updates"
            " WHERE space_id=?",
            (space_id, space_id),
        ) as cur:
            return [bytes(r[0]) for r in await cur.fetchall()]

    async def append_doc_updates(
        self, space_id: str, items: Iterable[tuple[bytes, bytes]]
    ) -> list[bytes]:
        """Append updates; returns doc ids that crossed the compaction threshold."""
        rows = list(items)
        self._note_doc_ids(space_id, [d for d, _ in rows])
        await self.db.executemany(
            "INSERT INTO doc_updates(space_id, doc_id, data) VALUES (?,?,?)",
            [(space_id, d, u) for d, u in rows],
        )
        due: list[bytes] = []
        doc_ids = list(dict.fromkeys(d for d, _ in rows))
        # One counting query per 500 documents (a burst of new files touches thousands).
        for i in range(0, len(doc_ids), 500):
            chunk = doc_ids[i : i + 500]
            counts = await self.db.execute_fetchall(
                "SELECT doc_id, COUNT(*) FROM doc_updates WHERE space_id=? AND doc_id IN"
                f" ({','.join('?' * len(chunk))}) GROUP BY doc_id",
                (space_id, *chunk),
            )
            due.extend(bytes(d) for d, n in counts if n >= COMPACT_AFTER)
        return due

    async def doc_update_sizes(self, space_id: str, doc_id: bytes) -> list[tuple[int, int]]:
        """(row id, byte length) of the updates appended since the compacted state, in order."""
        rows = await self.db.execute_fetchall(
            "SELECT id, length(data) FROM doc_updates WHERE space_id=? AND doc_id=? ORDER BY id",
            (space_id, doc_id),
        )
        return [(int(r[0]), int(r[1])) for r in rows]

    async def doc_updates_by_id(self, space_id: str, ids: list[int]) -> list[bytes]:
        """The updates with these row ids, in id order."""
        rows = await self.db.execute_fetchall(
            f"SELECT data FROM doc_updates WHERE space_id=? AND id IN ({','.join('?' * len(ids))})"
            " ORDER BY id",
            (space_id, *ids),
        )
        return [bytes(r[0]) for r in rows]

    async def merge_doc_updates(self, space_id: str, ids: list[int], merged: bytes) -> None:
        """Replace consecutive update rows ``ids`` by ``merged`` (their merge), which keeps the
        first row's id and so its place in the order."""
        await self.db.execute(
            "UPDATE doc_updates SET data=? WHERE space_id=? AND id=?", (merged, space_id, ids[0])
        )
        await self.db.execute(
            f"DELETE FROM doc_updates WHERE space_id=? AND id IN ({','.join('?' * len(ids[1:]))})",
            (space_id, *ids[1:]),
        )

    async def compact_doc(self, space_id: str, doc_id: bytes, state: bytes) -> None:
        self._note_doc_ids(space_id, [doc_id])
        await self.db.execute(
            "INSERT INTO docs(space_id, doc_id, state) VALUES (?,?,?)"
            " ON CONFLICT(space_id, doc_id) DO UPDATE SET state=excluded.state",
            (space_id, doc_id, state),
        )
        await self.db.execute(
            "DELETE FROM doc_updates WHERE space_id=? AND doc_id=?", (space_id, doc_id)
        )

    # -- counters -----------------------------------------------------------------------------
    async def get_counter(self, space_id: str, name: str, default: int = 0) -> int:
        async with self.db.execute(
            "SELECT value FROM counters WHERE space_id=? AND name=?", (space_id, name)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else default

    async def set_counter(self, space_id: str, name: str, value: int) -> None:
        await self.db.execute(
            "INSERT INTO counters(space_id, name, value) VALUES (?,?,?)"
            " ON CONFLICT(space_id, name) DO UPDATE SET value=excluded.value",
            (space_id, name, value),
        )

    # -- outbox -------------------------------------------------------------------------------
    async def add_outbox(self, space_id: str, seq: int, envelope: bytes) -> None:
        await self.db.execute(
            "INSERT INTO outbox(space_id, seq, envelope) VALUES (?,?,?)", (space_id, seq, envelope)
        )

    async def outbox(
        self, space_id: str, after_seq: int = 0, limit: int = 256
    ) -> list[tuple[int, bytes]]:
        async with self.db.execute(
            "SELECT seq, envelope FROM outbox WHERE space_id=? AND seq>? ORDER BY seq LIMIT ?",
            (space_id, after_seq, limit),
        ) as cur:
            return [(int(r[0]), bytes(r[1])) for r in await cur.fetchall()]

    async def outbox_count(self, space_id: str) -> int:
        async with self.db.execute(
            "SELECT COUNT(*) FROM outbox WHERE space_id=?", (space_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def outbox_bytes(self, space_id: str) -> int:
        async with self.db.execute(
            "SELECT COALESCE(SUM(LENGTH(envelope)), 0) FROM outbox WHERE space_id=?", (space_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def delete_outbox(self, space_id: str, seqs: Sequence[int]) -> None:
        await self.db.executemany(
            "DELETE FROM outbox WHERE space_id=? AND seq=?", [(space_id, s) for s in seqs]
        )

    # -- replay windows -----------------------------------------------------------------------
    async def load_replay(self, space_id: str) -> dict[bytes, bytes]:
        async with self.db.execute(
            "SELECT sender, window FROM replay WHERE space_id=?", (space_id,)
        ) as cur:
            return {bytes(r[0]): bytes(r[1]) for r in await cur.fetchall()}

    async def save_replay(self, space_id: str, sender: bytes, window: bytes) -> None:
        await self.db.execute(
            "INSERT INTO replay(space_id, sender, window) VALUES (?,?,?)"
            " ON CONFLICT(space_id, sender) DO UPDATE SET window=excluded.window",
            (space_id, sender, window),
        )

    # -- materialized files -------------------------------------------------------------------
    async def files(self, space_id: str) -> dict[str, FileRecord]:
        # Page by page (in key order, each page one whole statement): all rows at once held
        # ~30 MB of row tuples, bytes and ints at 100,000 files next to the records made of them.
        out: dict[str, FileRecord] = {}
        select = "SELECT path, fid, hash, size, mtime_ns, inode FROM files WHERE space_id=?"
        sql = f"{select} ORDER BY path LIMIT ?"
        args: tuple[str | int, ...] = (space_id, _FILE_ROWS_PER_PAGE)
        while True:
            async with self.db.execute(sql, args) as cur:
                rows = list(await cur.fetchall())
            for r in rows:
                out[r[0]] = FileRecord(
                    r[0], r[1], r[2], r[3], from_sql_int(r[4]), from_sql_int(r[5])
                )
            if len(rows) < _FILE_ROWS_PER_PAGE:
                return out
            sql = f"{select} AND path>? ORDER BY path LIMIT ?"
            args = (space_id, rows[-1][0], _FILE_ROWS_PER_PAGE)

    async def put_file(self, space_id: str, rec: FileRecord) -> None:
        await self.db.execute(
            "INSERT INTO files(space_id, path, fid, hash, size, mtime_ns, inode)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT(space_id, path) DO UPDATE SET"
            " fid=excluded.fid, hash=excluded.hash, size=excluded.size,"
            " mtime_ns=excluded.mtime_ns, inode=excluded.inode",
            _file_row(space_id, rec),
        )

    async def delete_file(self, space_id: str, path: str) -> None:
        await self.db.execute("DELETE FROM files WHERE space_id=? AND path=?", (space_id, path))

    async def put_files(self, space_id: str, recs: Iterable[FileRecord]) -> None:
        await self.db.executemany(
            "INSERT INTO files(space_id, path, fid, hash, size, mtime_ns, inode)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT(space_id, path) DO UPDATE SET"
            " fid=excluded.fid, hash=excluded.hash, size=excluded.size,"
            " mtime_ns=excluded.mtime_ns, inode=excluded.inode",
            [_file_row(space_id, r) for r in recs],
        )

    async def delete_files(self, space_id: str, paths: Iterable[str]) -> None:
        await self.db.executemany(
            "DELETE FROM files WHERE space_id=? AND path=?", [(space_id, p) for p in paths]
        )

    # -- invites ------------------------------------------------------------------------------
    async def add_invite(self, rec: InviteRecord) -> None:
        await self.db.execute(
            "INSERT INTO invites(space_id, invite_id, secret, role, expires_at, created_at,"
            " used_at) VALUES (?,?,?,?,?,?,NULL)",
            (rec.space_id, rec.invite_id, rec.secret, rec.role, rec.expires_at, wall()),
        )

    async def get_invite(self, space_id: str, invite_id: bytes) -> InviteRecord | None:
        async with self.db.execute(
            "SELECT space_id, invite_id, secret, role, expires_at, used_at FROM invites"
            " WHERE space_id=? AND invite_id=?",
            (space_id, invite_id),
        ) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return InviteRecord(r[0], bytes(r[1]), bytes(r[2]), r[3], r[4], r[5])

    async def mark_invite_used(self, space_id: str, invite_id: bytes) -> None:
        await self.db.execute(
            "UPDATE invites SET used_at=? WHERE space_id=? AND invite_id=?",
            (wall(), space_id, invite_id),
        )

    # -- documents committed but not yet written to disk (crash repair) ------------------------
    async def set_pending(self, space_id: str, doc_ids: Sequence[bytes]) -> None:
        await self.db.execute("DELETE FROM pending_materialize WHERE space_id=?", (space_id,))
        await self.db.executemany(
            "INSERT OR IGNORE INTO pending_materialize(space_id, doc_id) VALUES (?,?)",
            [(space_id, d) for d in doc_ids],
        )

    async def get_pending(self, space_id: str) -> list[bytes]:
        async with self.db.execute(
            "SELECT doc_id FROM pending_materialize WHERE space_id=?", (space_id,)
        ) as cur:
            return [bytes(r[0]) for r in await cur.fetchall()]

    # -- the document state a stale file on disk was written from (disk full: not rewritten) --
    async def put_materialize_base(self, space_id: str, doc_id: bytes, state: bytes) -> None:
        await self.db.execute(
            "INSERT INTO materialize_base(space_id, doc_id, state) VALUES (?,?,?)"
            " ON CONFLICT(space_id, doc_id) DO UPDATE SET state=excluded.state",
            (space_id, doc_id, state),
        )

    async def delete_materialize_base(self, space_id: str, doc_id: bytes) -> None:
        await self.db.execute(
            "DELETE FROM materialize_base WHERE space_id=? AND doc_id=?", (space_id, doc_id)
        )

    async def materialize_bases(self, space_id: str) -> dict[bytes, bytes]:
        async with self.db.execute(
            "SELECT doc_id, state FROM materialize_base WHERE space_id=?", (space_id,)
        ) as cur:
            return {bytes(r[0]): bytes(r[1]) for r in await cur.fetchall()}

    # -- quarantine ---------------------------------------------------------------------------
    async def quarantine(
        self, space_id: str, sender: bytes | None, reason: str, envelope: bytes | None
    ) -> None:
        await self.db.execute(
            "INSERT INTO quarantine(space_id, sender, reason, at, envelope) VALUES (?,?,?,?,?)",
            (space_id, sender, reason[:500], wall(), envelope),
        )

    async def quarantine_count(self, space_id: str) -> int:
        async with self.db.execute(
            "SELECT COUNT(*) FROM quarantine WHERE space_id=?", (space_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def quarantine_by_sender(self, space_id: str) -> list[tuple[bytes, str, int, float]]:
        """(sender, reason, count, last time) of the quarantined envelopes of verified senders."""
        async with self.db.execute(
            "SELECT sender, reason, COUNT(*), MAX(at) FROM quarantine"
            " WHERE space_id=? AND sender IS NOT NULL GROUP BY sender, reason",
            (space_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [(bytes(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    # -- device info (names travel encrypted, so they are only known from the space) ----------
    async def put_device_info(self, space_id: str, sign_pk: bytes, info: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO device_info(space_id, sign_pk, info, seen_at) VALUES (?,?,?,?)"
            " ON CONFLICT(space_id, sign_pk) DO UPDATE SET info=excluded.info,"
            " seen_at=excluded.seen_at",
            (space_id, sign_pk, json.dumps(info), wall()),
        )

    async def device_seen(self, space_id: str) -> dict[bytes, float]:
        """When each device's info was last received (unix seconds)."""
        async with self.db.execute(
            "SELECT sign_pk, seen_at FROM device_info WHERE space_id=?", (space_id,)
        ) as cur:
            return {bytes(r[0]): float(r[1]) for r in await cur.fetchall()}

    async def device_infos(self, space_id: str) -> dict[bytes, dict[str, Any]]:
        async with self.db.execute(
            "SELECT sign_pk, info FROM device_info WHERE space_id=?", (space_id,)
        ) as cur:
            return {bytes(r[0]): json.loads(r[1]) for r in await cur.fetchall()}


# SQLite integers are signed 64-bit: an inode >= 2^63 (ino_t is unsigned) or an mtime past
# 2262 or before 1677 does not fit (sqlite3 raises OverflowError, failing the whole batch's
# transaction). Such a value is stored as a 16-byte two's-complement BLOB instead, which the
# INTEGER column keeps as it is (affinity converts text, never blobs), and read back exactly.
_SQL_INT_MIN, _SQL_INT_MAX = -(1 << 63), (1 << 63) - 1


def to_sql_int(v: int) -> int | bytes:
    return v if _SQL_INT_MIN <= v <= _SQL_INT_MAX else v.to_bytes(16, "big", signed=True)


def from_sql_int(v: int | bytes) -> int:
    return v if isinstance(v, int) else int.from_bytes(v, "big", signed=True)


def _file_row(space_id: str, rec: FileRecord) -> tuple[str, str, bytes, bytes, int, Any, Any]:
    size, mtime_ns, inode = rec.stat_key()
    return space_id, rec.path, rec.fid, rec.hash, size, to_sql_int(mtime_ns), to_sql_int(inode)
