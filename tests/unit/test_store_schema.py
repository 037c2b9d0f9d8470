"""Store.apply_schema on the agent's one shared SQLite connection: a module creating its tables
(a space starting, e.g. by a SIGHUP reload) must not commit another coroutine's transaction
half-way. sqlite3's executescript COMMITs an open transaction first; before apply_schema it
did, the other transaction's own COMMIT then failed ("no transaction is active") and killed
that space's relay link (the SIGHUP reload flake)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qmoi_sync.agent.store import Store

SCHEMA = "CREATE TABLE IF NOT EXISTS extra (k TEXT PRIMARY KEY, v TEXT NOT NULL);"


def test_apply_schema_waits_for_an_open_transaction(tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "state.db")
        try:
            await store.apply_schema("CREATE TABLE t (x INTEGER);")
            inside = asyncio.Event()
            release = asyncio.Event()

            async def writer() -> None:
                async with store.transaction():
                    await store.db.execute("INSERT INTO t VALUES (1)")
                    inside.set()
                    await release.wait()
                    await store.db.execute("INSERT INTO t VALUES (2)")

            task = asyncio.create_task(writer())
            await inside.wait()
            schema = asyncio.create_task(store.apply_schema(SCHEMA))
            await asyncio.sleep(0.05)  # give it every chance to run inside the transaction
            assert not schema.done()  # it waits for the transaction
            assert store.db.in_transaction
            release.set()
            await task  # its COMMIT succeeds: nobody committed it behind its back
            await schema
            rows = await store.db.execute_fetchall("SELECT x FROM t ORDER BY x")
            assert [r[0] for r in rows] == [1, 2]
            await store.db.execute("INSERT INTO extra VALUES ('a', 'b')")
        finally:
            await store.close()

    asyncio.run(main())
