"""Shared pieces of the fuzz suite: example budgets, byte mutations, the error contract, and
the regression corpus.

Budgets: every fuzz test takes ``examples(n)`` examples, ``n`` sized so that the whole of
tests/fuzz stays near a minute on a loaded 2-core machine. ``QMOI_FUZZ_EXAMPLES=N`` gives every
test N examples instead (a long session: ``QMOI_FUZZ_EXAMPLES=20000 pytest tests/fuzz``).

Mutations (`mutated`) start from a *valid* encoding and break it the way a buggy or hostile
peer would: truncation, bit flips, overwritten bytes, inserted / deleted runs, duplicated runs,
length or count fields that lie (0, 1, just-too-big, 0xFFFF, 0xFFFFFFFF written at any
offset), and appended garbage. Random bytes find the first check of a decoder; mutated valid
inputs get past it into the deep fields.

Corpus: ``tests/fuzz/corpus/<target>/*`` are inputs that once crashed a parser (or were hand
picked as nasty); test_corpus.py replays every one of them through its target.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent / "corpus"

#: Long runs: every fuzz test takes this many examples (0 = each test's own small budget).
_ENV_EXAMPLES = int(os.environ.get("QMOI_FUZZ_EXAMPLES", "0") or 0)


def examples(n: int) -> settings:
    """Hypothesis settings for one fuzz test: `n` examples, or QMOI_FUZZ_EXAMPLES if set.

    No per-example deadline (timing asserts fail correct tests under load) and no example
    database writes into the repository (derandomize=False keeps exploring new inputs on every
    run; failures print the reproducing input).
    """
    return settings(
        max_examples=_ENV_EXAMPLES or n,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


# ----------------------------------------------------------------------------- mutations

_LIES = (
    b"\x00",
    b"\x01",
    b"\xff",
    b"\x00\x00",
    b"\xff\xff",
    b"\x7f\xff",
    b"\x00\x00\x00\x00",
    b"\x00\x00\x00\x01",
    b"\x00\x00\x10\x00",
    b"\x00\x10\x00\x00",
    b"\x7f\xff\xff\xff",
    b"\xff\xff\xff\xff",
    b"\xff" * 8,
    b"\x80",  # an unterminated varuint (lib0)
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varuint too long
)


@st.composite
def _mutation(draw: st.DrawFn, size: int) -> tuple[str, int, bytes | int]:
    kind = draw(
        st.sampled_from(
            ["truncate", "flip", "set", "insert", "delete", "dup", "lie", "append", "u32len"]
        )
    )
    pos = draw(st.integers(0, max(0, size)))
    if kind == "flip":
        return kind, pos, draw(st.integers(0, 7))
    if kind in ("set",):
        return kind, pos, draw(st.integers(0, 255))
    if kind in ("insert", "append"):
        return kind, pos, draw(st.binary(min_size=1, max_size=16))
    if kind in ("delete", "dup"):
        return kind, pos, draw(st.integers(1, 64))
    if kind == "lie":
        return kind, pos, draw(st.sampled_from(_LIES))
    if kind == "u32len":
        return kind, pos, draw(st.sampled_from([0, 1, 2, 15, 16, 31, 32, 64, 65535, 65536, 2**31]))
    return kind, pos, 0


def apply_mutations(data: bytes, muts: list[tuple[str, int, bytes | int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in muts:
        n = len(buf)
        p = pos % (n + 1) if n else 0
        if kind == "truncate":
            del buf[p:]
        elif kind == "flip" and n:
            assert isinstance(arg, int)
            buf[p % n] ^= 1 << arg
        elif kind == "set" and n:
            assert isinstance(arg, int)
            buf[p % n] = arg
        elif kind == "insert":
            assert isinstance(arg, bytes)
            buf[p:p] = arg
        elif kind == "append":
            assert isinstance(arg, bytes)
            buf += arg
        elif kind == "delete":
            assert isinstance(arg, int)
            del buf[p : p + arg]
        elif kind == "dup":
            assert isinstance(arg, int)
            buf[p:p] = buf[p : p + arg]
        elif kind == "lie":
            assert isinstance(arg, bytes)
            buf[p : p + len(arg)] = arg
        elif kind == "u32len":
            assert isinstance(arg, int)
            buf[p : p + 4] = struct.pack(">I", arg)
    return bytes(buf)


def mutated(samples: list[bytes], max_mutations: int = 4) -> st.SearchStrategy[bytes]:
    """Valid encodings from `samples`, each broken by 1..max_mutations mutations."""

    @st.composite
    def strat(draw: st.DrawFn) -> bytes:
        base = draw(st.sampled_from(samples))
        muts = draw(st.lists(_mutation(len(base)), min_size=1, max_size=max_mutations))
        return apply_mutations(base, muts)

    return strat()


def bytes_inputs(samples: list[bytes], max_random: int = 512) -> st.SearchStrategy[bytes]:
    """Random bytes, mutated valid encodings, and the valid encodings themselves."""
    return st.one_of(
        st.binary(max_size=max_random),
        mutated(samples),
        mutated(samples),  # twice as likely: the deep fields are where bugs hide
        st.sampled_from(samples),
    )


# ----------------------------------------------------------------------------- the contract

#: A readable error message is short text (no dumps of the input).
MAX_MESSAGE = 2_000


def readable(exc: BaseException) -> str:
    text = str(exc)
    assert text.strip(), f"{type(exc).__name__} without a message"
    assert len(text) <= MAX_MESSAGE, f"{type(exc).__name__} message of {len(text)} chars"
    return text


def only(
    fn: Callable[[Any], Any],
    data: Any,
    errors: type[BaseException] | tuple[type[BaseException], ...],
) -> tuple[Any, BaseException | None]:
    """Call fn(data): it returns, or raises one of `errors` with a readable message. Any other
    exception propagates (and fails the test with the input that caused it)."""
    try:
        return fn(data), None
    except errors as exc:
        readable(exc)
        return None, exc


# ----------------------------------------------------------------------------- the corpus


def corpus(target: str) -> list[Path]:
    d = CORPUS / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def corpus_targets() -> list[str]:
    return sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.is_dir() else []
