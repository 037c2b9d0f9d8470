"""Store.load_doc's known-document set: a brand-new document costs no query, and the set never
says "nothing stored" for a document that has state (that would hand out an empty document
whose next compaction overwrites the real state)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qmoi_sync.agent.store import COMPACT_AFTER, Store

SPACE = "aa" * 16


async def test_new_document_needs_no_query(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        assert await store.load_doc(SPACE, b"\x01" * 16) == (None, [])
        calls = 0
        real = store.db.execute_fetchall

        async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return await real(*args, **kwargs)

        store.db.execute_fetchall = counting  # type: ignore[method-assign]
        assert await store.load_doc(SPACE, b"\x02" * 16) == (None, [])
        assert calls == 0
        async with store.transaction():
            await store.append_doc_updates(SPACE, [(b"\x02" * 16, b"u1")])
        assert await store.load_doc(SPACE, b"\x02" * 16) == (None, [b"u1"])
    finally:
        await store.close()


async def test_documents_stored_before_open_are_known(tmp_path: Path) -> None:
    first = await Store.open(tmp_path / "s.db")
    async with first.transaction():
        await first.append_doc_updates(SPACE, [(b"\x03" * 16, b"u")])
        await first.compact_doc(SPACE, b"\x04" * 16, b"state")
    await first.close()
    store = await Store.open(tmp_path / "s.db")
    try:
        assert await store.load_doc(SPACE, b"\x03" * 16) == (None, [b"u"])
        assert await store.load_doc(SPACE, b"\x04" * 16) == (b"state", [])
        assert await store.load_doc("bb" * 16, b"\x03" * 16) == (None, [])
    finally:
        await store.close()


async def test_writes_racing_the_first_load_are_not_missed(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        docs = [bytes([i]) * 16 for i in range(1, 41)]

        async def write(doc: bytes) -> None:
            async with store.transaction():
                await store.append_doc_updates(SPACE, [(doc, b"x")])

        # The first load_doc populates the set while appends are in flight on the same
        # connection: every appended document must be known afterwards.
        await asyncio.gather(store.load_doc(SPACE, b"\xff" * 16), *(write(d) for d in docs))
        for d in docs:
            assert await store.load_doc(SPACE, d) == (None, [b"x"])
    finally:
        await store.close()


async def test_compaction_keeps_document_known(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        doc = b"\x05" * 16
        async with store.transaction():
            due = await store.append_doc_updates(SPACE, [(doc, b"u")] * COMPACT_AFTER)
        assert due == [doc]
        async with store.transaction():
            await store.compact_doc(SPACE, doc, b"compacted")
        assert await store.load_doc(SPACE, doc) == (b"compacted", [])
    finally:
        await store.close()
