"""Fixtures: in-process relays on 127.0.0.1 with an OS-chosen port and a temp data dir."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# The suite runs with --import-mode=importlib (test dirs are not put on sys.path); make this
# directory's helper module importable by its unique name ``relay_helpers``.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from relay_helpers import RelayFactory, url_of  # noqa: E402

from qmoi_sync.relay import RelayConfig, RelayServer  # noqa: E402


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[RelayFactory]:
    started: list[RelayServer] = []

    async def start(data_dir: Path | None = None, **overrides: Any) -> RelayServer:
        cfg = RelayConfig(
            host="127.0.0.1", port=0, data_dir=data_dir or tmp_path / "relay-data", **overrides
        )
        server = RelayServer(cfg)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.close()


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> RelayServer:
    return await relay_factory()


@pytest.fixture
def relay_url(relay: RelayServer) -> str:
    return url_of(relay)
