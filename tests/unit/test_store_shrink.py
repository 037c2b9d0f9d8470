"""Store.shrink_memory gives SQLite's page cache back. The agent calls it when it goes quiet
after a large batch (daemon: memtrim on_quiet): after a first index of 10,000 files the cache
held ~2 MB an idle agent never needed (bench/run.py idle_rss: 80.2-80.9 MB -> 78.5-78.7 MB).

SQLite's own allocation counter (``sqlite3_memory_used``, read through ctypes from the same
libsqlite3 the sqlite3 module uses) measures it; process RSS would be too noisy."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from pathlib import Path

import pytest

from qmoi_sync.agent.store import Store


def _sqlite_memory_used() -> int:
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        pytest.skip("no shared libsqlite3 to read the allocation counter from")
    lib = ctypes.CDLL(name)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


def test_shrink_memory_returns_the_page_cache(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        store = await Store.open(tmp_path / "state.db")
        try:
            await store.apply_schema("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);")
            async with store.transaction():
                await store.db.executemany(
                    "INSERT INTO t VALUES (?, ?)", ((i, bytes(400)) for i in range(6000))
                )
            async with store.db.execute("SELECT sum(length(v)) FROM t") as cur:
                row = await cur.fetchone()
            assert row is not None and row[0] == 6000 * 400
            full = _sqlite_memory_used()
            await store.shrink_memory()
            shrunk = _sqlite_memory_used()
            # the data is still all there (the cache refills from disk)
            async with store.db.execute("SELECT count(*) FROM t") as cur:
                count = await cur.fetchone()
            assert count == (6000,)
            return full, shrunk
        finally:
            await store.close()

    full, shrunk = asyncio.run(main())
    assert full - shrunk > 1_000_000, (full, shrunk)  # ~2.4 MB of pages read: most given back
