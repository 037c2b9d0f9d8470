"""Local chunk bookkeeping for binary files, in the agent's SQLite database (state.db).

* ``chunk_acked``: chunk ids the relay has acknowledged for a space, with when (upload progress).
  An upload interrupted by a relay restart, a network cut or an agent crash resumes by skipping
  these: they are neither encrypted nor sent again. An ack older than ``ACK_TRUST_S`` is not
  trusted (the chunk is uploaded again, which also makes it young on the relay): the relay may
  have garbage-collected it since (agent/blob_gc.py).
* ``chunk_index``: where each chunk can be read on this device — (chunk id -> file path, offset,
  length, file size and mtime). Filled when a binary file is ingested or materialized, so a new
  version of a file (or another file sharing content) is assembled from local bytes and only the
  missing chunks are fetched. Rows are hints: a reader re-checks the file's size and mtime and
  re-verifies the chunk id of what it reads, and drops rows that no longer hold.
* ``binary_base``: for each binary file materialized or ingested here, the version vector of the
  manifest its bytes on disk came from. A local edit of that file is a new version *derived from
  that one*, which is how concurrent edits on two devices are told apart from sequential ones.

The tables belong to this module (created by :meth:`ChunkStore.ensure_schema`), not to store.py.
Writes go through ``Store.transaction()`` so they never interleave with a space's commit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.store import Store, from_sql_int, to_sql_int

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunk_acked (
    space_id TEXT NOT NULL, chunk_id BLOB NOT NULL, acked_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (space_id, chunk_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk_index (
    space_id TEXT NOT NULL, chunk_id BLOB NOT NULL, path TEXT NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, file_size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (space_id, chunk_id, path, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunk_index_by_path ON chunk_index (space_id, path);
CREATE TABLE IF NOT EXISTS binary_base (
    space_id TEXT NOT NULL, fid BLOB NOT NULL, vv TEXT NOT NULL, PRIMARY KEY (space_id, fid)
);
"""

#: How long a relay acknowledgement is trusted (see the module docstring).
ACK_TRUST_S = 24 * 3600

#: Local sources looked up per chunk (a chunk repeated in many files needs only one).
MAX_SOURCES = 4


@dataclass(frozen=True, slots=True)
class ChunkSource:
    path: str
    offset: int
    length: int
    file_size: int
    mtime_ns: int


class ChunkStore:
    def __init__(self, store: Store, space_id: str) -> None:
        self.store = store
        self.space_id = space_id

    async def ensure_schema(self) -> None:
        await self.store.apply_schema(_SCHEMA)
        cols = await self.store.db.execute_fetchall("PRAGMA table_info(chunk_acked)")
        if "acked_at" not in {str(c[1]) for c in cols}:
            # A database from before garbage collection: its acks count as old (re-uploaded).
            async with self.store.transaction():
                await self.store.db.execute(
                    "ALTER TABLE chunk_acked ADD COLUMN acked_at REAL NOT NULL DEFAULT 0"
                )

    # -- upload progress ---------------------------------------------------------------------
    async def acked(self, ids: Iterable[bytes]) -> set[bytes]:
        """Which of ``ids`` the relay has acknowledged within ``ACK_TRUST_S``."""
        want = list(dict.fromkeys(ids))
        out: set[bytes] = set()
        since = wall() - ACK_TRUST_S
        for i in range(0, len(want), 500):
            part = want[i : i + 500]
            rows = await self.store.db.execute_fetchall(
                "SELECT chunk_id FROM chunk_acked WHERE space_id=? AND acked_at>=? AND chunk_id IN"
                f" ({','.join('?' * len(part))})",
                (self.space_id, since, *part),
            )
            out.update(bytes(r[0]) for r in rows)
        return out

    async def add_acked(self, ids: Iterable[bytes]) -> None:
        now = wall()
        rows = [(self.space_id, i, now) for i in ids]
        if rows:
            async with self.store.transaction():
                await self.store.db.executemany(
                    "INSERT OR REPLACE INTO chunk_acked(space_id, chunk_id, acked_at)"
                    " VALUES (?,?,?)",
                    rows,
                )

    async def forget_acked(self, ids: Iterable[bytes]) -> None:
        """The relay does not have these after all (it said ChunkMissing): upload them again."""
        rows = [(self.space_id, i) for i in ids]
        if rows:
            async with self.store.transaction():
                await self.store.db.executemany(
                    "DELETE FROM chunk_acked WHERE space_id=? AND chunk_id=?", rows
                )

    # -- local sources -----------------------------------------------------------------------
    async def sources(self, chunk_id: bytes) -> list[ChunkSource]:
        rows = await self.store.db.execute_fetchall(
            "SELECT path, offset, length, file_size, mtime_ns FROM chunk_index"
            " WHERE space_id=? AND chunk_id=? LIMIT ?",
            (self.space_id, chunk_id, MAX_SOURCES),
        )
        # mtime past 2262 or before 1677: stored as a blob (store.to_sql_int)
        return [
            ChunkSource(r[0], int(r[1]), int(r[2]), int(r[3]), from_sql_int(r[4])) for r in rows
        ]

    async def with_sources(self, ids: Iterable[bytes]) -> set[bytes]:
        """Which of ``ids`` some local file is recorded to hold (one query per 500 ids: a
        download asks once for all its chunks instead of once per chunk)."""
        want = list(dict.fromkeys(ids))
        out: set[bytes] = set()
        for i in range(0, len(want), 500):
            part = want[i : i + 500]
            rows = await self.store.db.execute_fetchall(
                "SELECT DISTINCT chunk_id FROM chunk_index WHERE space_id=? AND chunk_id IN"
                f" ({','.join('?' * len(part))})",
                (self.space_id, *part),
            )
            out.update(bytes(r[0]) for r in rows)
        return out

    async def set_file_chunks(
        self, path: str, file_size: int, mtime_ns: int, chunks: Iterable[tuple[bytes, int]]
    ) -> None:
        """Record the chunks of the file now at ``path`` (replacing what was recorded there)."""
        rows = []
        offset = 0
        mtime = to_sql_int(mtime_ns)  # SQLite's INTEGER is 64-bit: a far-future mtime is not
        for cid, length in chunks:
            rows.append((self.space_id, cid, path, offset, length, file_size, mtime))
            offset += length
        async with self.store.transaction():
            await self.store.db.execute(
                "DELETE FROM chunk_index WHERE space_id=? AND path=?", (self.space_id, path)
            )
            await self.store.db.executemany(
                "INSERT OR REPLACE INTO chunk_index(space_id, chunk_id, path, offset, length,"
                " file_size, mtime_ns) VALUES (?,?,?,?,?,?,?)",
                rows,
            )

    async def drop_path(self, path: str) -> None:
        async with self.store.transaction():
            await self.store.db.execute(
                "DELETE FROM chunk_index WHERE space_id=? AND path=?", (self.space_id, path)
            )

    # -- version bases -----------------------------------------------------------------------
    async def bases(self) -> dict[bytes, dict[str, int]]:
        rows = await self.store.db.execute_fetchall(
            "SELECT fid, vv FROM binary_base WHERE space_id=?", (self.space_id,)
        )
        out: dict[bytes, dict[str, int]] = {}
        for fid, raw in rows:
            try:
                vv = json.loads(raw)
            except ValueError:
                continue
            if isinstance(vv, dict):
                out[bytes(fid)] = {str(k): int(v) for k, v in vv.items() if isinstance(v, int)}
        return out

    async def set_base(self, fid: bytes, vv: Mapping[str, int]) -> None:
        async with self.store.transaction():
            await self.store.db.execute(
                "INSERT INTO binary_base(space_id, fid, vv) VALUES (?,?,?)"
                " ON CONFLICT(space_id, fid) DO UPDATE SET vv=excluded.vv",
                (self.space_id, fid, json.dumps(dict(vv), sort_keys=True)),
            )
