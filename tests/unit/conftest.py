"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmoi_sync.agent.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh agent database (state.db) in the test's temporary folder."""
    st = await Store.open(tmp_path / "state.db")
    try:
        yield st
    finally:
        await st.close()
