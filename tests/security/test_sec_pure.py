"""Fast, in-process regressions for bugs the real-process security tests found."""

from __future__ import annotations

import os

import pytest

from qmoi_sync.agent.index import IndexDoc
from qmoi_sync.agent.layout import compute_layout


@pytest.mark.timeout(5)
@pytest.mark.parametrize("path", ["/etc/evil", "//host/share/x", "/", "//"])
def test_layout_terminates_on_absolute_remote_paths(path: str) -> None:
    # Used to loop forever (dirname("/") == "/"), hanging every agent that received the entry.
    idx = IndexDoc()
    idx.create(os.urandom(16).hex(), path, "text", 0o644, "M", 1.0)
    idx.create(os.urandom(16).hex(), "ok.txt", "text", 0o644, "M", 1.0)
    layout = compute_layout(idx.entries())
    assert path in layout.paths and "ok.txt" in layout.paths
