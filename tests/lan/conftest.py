"""Fixtures of the LAN suite: a private network of namespaces (tests/lan/netns.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lan.netns import LanNet, NetnsUnavailable, lan_net


@pytest.fixture(scope="module")
def net() -> Iterator[LanNet]:
    """Namespaces a, b, c, f (+ the hub): removed at the end of the module, even on failure."""
    try:
        with lan_net(["a", "b", "c", "f"]) as n:
            yield n
    except NetnsUnavailable as exc:
        pytest.skip(f"LAN tests need network namespaces: {exc}")
