"""Security suite fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from security.sec_helpers import Wire


@pytest.fixture(autouse=True)
async def _close_raw_connections() -> AsyncIterator[None]:
    """Raw relay connections a test left open are closed while its event loop still runs (a
    dangling socket would make the relay wait out its close timeout at shutdown)."""
    yield
    await Wire.close_all()
