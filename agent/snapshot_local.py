"""This device's own snapshot records: ``<home>/snapshots.db`` (SQLite, WAL).

Kept apart from ``state.db`` (the sync state) because it is a cache plus a few facts that only
matter to snapshots, read by CLI commands while the agent runs:

- ``known``: object names this device uploaded or saw referenced, per bucket target (so a
  snapshot after a one-file change uploads only that file's objects; anything not referenced by
  the manifest a snapshot builds on is re-checked with HEAD before it is reused);
- ``doc_raw``: per document, a hash of its stored bytes at the last snapshot this device took and
  that snapshot's manifest key (an unchanged document is not even loaded next time);
- ``last_seen``: the highest manifest this device ever saw per space and target (seq, hash):
  a restore that finds only older ones warns (rollback or deleted manifests);
- ``status``: last snapshot, last error (what ``status`` shows when the agent is not running).

Every call is short and runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILENAME = "snapshots.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS known (
    target TEXT NOT NULL, name BLOB NOT NULL, PRIMARY KEY (target, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS doc_raw (
    space TEXT NOT NULL, target TEXT NOT NULL, doc_id BLOB NOT NULL, raw_hash BLOB NOT NULL,
    manifest TEXT NOT NULL, PRIMARY KEY (space, target, doc_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_seen (
    space TEXT NOT NULL, target TEXT NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL,
    manifest TEXT NOT NULL, PRIMARY KEY (space, target)
);
CREATE TABLE IF NOT EXISTS status (space TEXT PRIMARY KEY, info TEXT NOT NULL);
"""


class LocalRecords:
    def __init__(self, home: Path) -> None:
        self.path = home / FILENAME
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn().execute(sql, tuple(args)).fetchall()

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            try:
                db.executemany(sql, rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- known objects ------------------------------------------------------------------------
    async def known(self, target: str) -> set[bytes]:
        rows = await asyncio.to_thread(self._run, "SELECT name FROM known WHERE target=?", [target])
        return {bytes(r[0]) for r in rows}

    async def add_known(self, target: str, names: Iterable[bytes]) -> None:
        rows = [(target, n) for n in names]
        if rows:
            await asyncio.to_thread(
                self._many, "INSERT OR IGNORE INTO known(target, name) VALUES (?,?)", rows
            )

    async def forget_known(self, target: str, names: Iterable[bytes]) -> None:
        rows = [(target, n) for n in names]
        if rows:
            await asyncio.to_thread(self._many, "DELETE FROM known WHERE target=? AND name=?", rows)

    # -- per-document raw hashes ----------------------------------------------------------------
    async def doc_raw(self, space: str, target: str) -> dict[bytes, tuple[bytes, str]]:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT doc_id, raw_hash, manifest FROM doc_raw WHERE space=? AND target=?",
            [space, target],
        )
        return {bytes(r[0]): (bytes(r[1]), str(r[2])) for r in rows}

    async def set_doc_raw(
        self, space: str, target: str, items: dict[bytes, bytes], manifest: str
    ) -> None:
        rows = [(space, target, d, h, manifest) for d, h in items.items()]
        await asyncio.to_thread(
            self._many,
            "INSERT INTO doc_raw(space, target, doc_id, raw_hash, manifest) VALUES (?,?,?,?,?)"
            " ON CONFLICT(space, target, doc_id) DO UPDATE SET raw_hash=excluded.raw_hash,"
            " manifest=excluded.manifest",
            rows,
        )

    # -- rollback detection -------------------------------------------------------------------
    async def last_seen(self, space: str, target: str) -> tuple[int, bytes, str] | None:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT seq, hash, manifest FROM last_seen WHERE space=? AND target=?",
            [space, target],
        )
        return (int(rows[0][0]), bytes(rows[0][1]), str(rows[0][2])) if rows else None

    async def saw(self, space: str, target: str, seq: int, digest: bytes, manifest: str) -> None:
        """Remember a verified manifest if it is the highest seen so far."""
        await asyncio.to_thread(
            self._run,
            "INSERT INTO last_seen(space, target, seq, hash, manifest) VALUES (?,?,?,?,?)"
            " ON CONFLICT(space, target) DO UPDATE SET seq=excluded.seq, hash=excluded.hash,"
            " manifest=excluded.manifest WHERE excluded.seq > last_seen.seq",
            [space, target, seq, digest, manifest],
        )

    # -- status ---------------------------------------------------------------------------------
    async def status(self, space: str) -> dict[str, Any]:
        rows = await asyncio.to_thread(self._run, "SELECT info FROM status WHERE space=?", [space])
        if not rows:
            return {}
        try:
            raw = json.loads(rows[0][0])
        except ValueError:
            return {}
        return raw if isinstance(raw, dict) else {}

    async def set_status(self, space: str, info: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self._run,
            "INSERT INTO status(space, info) VALUES (?, ?)"
            " ON CONFLICT(space) DO UPDATE SET info=excluded.info",
            [space, json.dumps(info)],
        )
