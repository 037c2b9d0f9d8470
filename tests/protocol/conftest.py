"""Shared fixtures for the protocol unit tests.

Helpers are handed out as fixtures (not imported) so the tests work in any pytest import mode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from qmoi_sync.protocol.identity import DeviceIdentity


class DetRng:
    """Deterministic randomness: SHA-256 in counter mode over a seed."""

    def __init__(self, seed: bytes = b"seed") -> None:
        self.seed = seed
        self.counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return out[:n]


def sign_op(author, op):  # type: ignore[no-untyped-def]
    """Re-sign a (possibly hand-crafted) MemberOp with ``author``."""
    import dataclasses

    from qmoi_sync.protocol.membership import SIGN_CONTEXT

    sig = author.sign(SIGN_CONTEXT + op.signed_bytes())
    return dataclasses.replace(op, signature=sig)


def craft_op(log, author, **fields):  # type: ignore[no-untyped-def]
    """A correctly chained and signed op for ``log`` with the given fields."""
    from qmoi_sync.protocol.membership import MemberOp, OpKind, Role

    base = {
        "index": len(log),
        "prev": log.head_hash,
        "space_id": log.space_id,
        "kind": OpKind.role,
        "author": author.public.sign_pk,
        "subject": None,
        "subject_key": author.public.sign_pk,
        "role": Role.member,
        "epoch": log.current_epoch,
        "wraps": (),
        "created_at": 1000,
        "signature": bytes(64),
    }
    base.update(fields)
    return sign_op(author, MemberOp(**base))


@pytest.fixture
def make_rng() -> type[DetRng]:
    return DetRng


@pytest.fixture
def craft() -> Callable[..., Any]:
    return craft_op


@pytest.fixture
def resign() -> Callable[..., Any]:
    return sign_op


@pytest.fixture
def rng() -> Callable[[int], bytes]:
    return DetRng()


@pytest.fixture
def alice() -> DeviceIdentity:
    return DeviceIdentity.generate(DetRng(b"alice"))


@pytest.fixture
def bob() -> DeviceIdentity:
    return DeviceIdentity.generate(DetRng(b"bob"))


@pytest.fixture
def carol() -> DeviceIdentity:
    return DeviceIdentity.generate(DetRng(b"carol"))
