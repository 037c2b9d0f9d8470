"""Security suite fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from security.sec_helpers import Wire, World, world_of


@pytest.fixture(autouse=True)
async def _close_raw_connections() -> AsyncIterator[None]:
    """Raw relay connections a test left open are closed while its event loop still runs (a
    dangling socket would make the relay wait out its close timeout at shutdown)."""
    yield
    await Wire.close_all()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One relay + agents a, b + never-started member m, shared by the agent-level tests
    (any order: tests only add state, and the revocation test revokes a device of its own)."""
    with world_of(tmp_path_factory.mktemp("world")) as w:
        yield w
