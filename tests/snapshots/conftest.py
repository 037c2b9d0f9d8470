"""Snapshot tests: a moto S3 server per test module, dummy credentials for every agent."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from s3env import CREDS, MotoServer  # noqa: E402


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    pytest.importorskip("moto", reason="moto[server] is needed for the S3 snapshot tests")
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents and CLI processes inherit the environment: dummy credentials, no real config."""
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
