"""Replay the regression corpus: every input that once broke a parser goes through its target
again (tests/fuzz/corpus/<target>/<file>; fuzzlib says how files get there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz.fuzzlib import corpus, corpus_targets
from fuzz.targets import TARGETS

_CASES = [(t, p) for t in corpus_targets() for p in corpus(t)]


def test_corpus_targets_exist() -> None:
    assert _CASES, "the regression corpus is empty"
    unknown = {t for t, _p in _CASES} - set(TARGETS)
    assert not unknown, f"corpus directories without a target: {unknown}"


@pytest.mark.parametrize(("target", "path"), _CASES, ids=[f"{t}/{p.name}" for t, p in _CASES])
def test_corpus_input(target: str, path: Path) -> None:
    TARGETS[target].check(path.read_bytes())
