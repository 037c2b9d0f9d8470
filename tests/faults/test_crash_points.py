"""Crash consistency: agents SIGKILLed at planned points (agent/crashpoint.py) inside SQLite
transactions, between materialize's write / fsync / rename, while staging a folder move, in
chunk downloads and their resume, and at random moments from outside while busy. After every
kill the agent restarts (often armed with the next point); at the end the state reopens cleanly
(SQLite integrity ok, no "database is locked"/corruption errors, no temp file left in sight)
and every file written before any kill is on both devices.

One cluster for all of it; each kill costs one agent start (the budget: dozens of kills, about
a minute on a loaded 2-core machine). bench/crash_soak.py runs the same cycles by the hundred."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from crashcycle import Cycles
from resource_env import resource_cluster

# Each kill costs an agent start: on a loaded 2-core machine that is many seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# (device killed, crash point spec, workload, device writing the workload)
PLAN = [
    ("b", "materialize.written:1", "text", "a"),
    ("b", "materialize.fsynced:1", "text", "a"),
    ("b", "materialize.renamed:2", "text", "a"),
    ("b", "sqlite.begin:4", "text", "a"),
    ("b", "sqlite.commit:3", "text", "a"),
    ("b", "sqlite.committed:3", "text", "a"),
    ("b", "move.staged:2", "move", "a"),
    ("b", "chunk.written:2", "binary", "a"),
    ("b", "chunk.resumed:1", "none", "a"),  # the download the last kill interrupted resumes
    ("b", "chunk.install:1", "binary", "a"),
    ("b", "chunk.installed:1", "binary", "a"),
    ("b", "sqlite.commit:2", "text", "b"),  # b's own edits being ingested
    ("a", "sqlite.commit:2", "text", "a"),
    ("a", "sqlite.begin:3", "text", "b"),
    ("a", "materialize.renamed:1", "text", "b"),
    ("b", "random:0.1:12", "text", "a"),
]
EXTERNAL_KILLS = 3


def test_crash_points_then_everything_converges(tmp_path: Path) -> None:
    # Readings pinned to an idle machine: the real load of a busy CI machine would defer the
    # binary downloads (bulk work) whose chunk points the plan needs.
    with resource_cluster(tmp_path, {"a": {}, "b": {}}) as (relay, (a, b), _r):
        c = Cycles(relay, a, b, random.Random(1))
        c.text(a)
        for target, spec, kind, writer in PLAN:
            c.planned(target, spec, kind, writer)
        for _ in range(EXTERNAL_KILLS):
            c.external("b", files=30, rng_delay=lambda: c.rng.uniform(0.0, 1.0))
        c.settle_and_check()
        # every planned point was reached and killed the agent
        assert len(c.kills) == len(PLAN), c.kills
        hit = {k.split(":", 1)[1].split(" #")[0] for k in c.kills}
        for point in (
            "materialize.written",
            "materialize.fsynced",
            "materialize.renamed",
            "move.staged",
            "chunk.written",
            "chunk.resumed",
            "chunk.install",
            "chunk.installed",
            "sqlite.begin",
            "sqlite.commit",
            "sqlite.committed",
        ):
            assert point in hit, (point, c.kills)
