"""agent/memtrim.py: trims once, after a quiet period following enough work; never otherwise."""

from __future__ import annotations

import asyncio
import sys

from qmoi_sync.agent.memtrim import Trimmer, malloc_trim


async def test_small_batches_never_schedule_a_trim() -> None:
    t = Trimmer(min_work=100, quiet_s=0.01)
    ran: list[int] = []
    t.on_quiet(lambda: ran.append(1))
    for _ in range(99):
        t.note(1)
    t.note(0)
    t.note(-5)  # nonsense sizes are ignored
    assert t.work == 99
    assert t._timer is None
    assert ran == [] and t.trims == 0


async def test_trim_runs_once_after_the_last_large_batch() -> None:
    t = Trimmer(min_work=10, quiet_s=0.05)
    quiet = asyncio.Event()
    calls: list[int] = []

    def on_quiet() -> None:
        calls.append(t.work)
        quiet.set()

    unregister = t.on_quiet(on_quiet)
    t.note(6)
    t.note(6)  # threshold crossed: armed
    first = t._timer
    t.note(6)  # more work postpones the trim (one trim at the end of a burst)
    assert first is not None and first.cancelled()
    await asyncio.wait_for(quiet.wait(), timeout=10)
    assert calls == [0]  # work counter reset before the callbacks
    assert t._timer is None
    if sys.platform.startswith("linux"):
        assert t.trims == 1  # glibc: malloc_trim exists and ran
    unregister()
    unregister()  # idempotent
    t.note(100)
    t.close()
    assert t._timer is None and calls == [0]


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    t = Trimmer(min_work=1, quiet_s=0.01)
    done = asyncio.Event()

    def boom() -> None:
        raise RuntimeError("cache gone")

    t.on_quiet(boom)
    t.on_quiet(done.set)
    t.note(1)
    await asyncio.wait_for(done.wait(), timeout=10)


def test_malloc_trim_is_callable_repeatedly() -> None:
    first = malloc_trim()
    assert malloc_trim() == first
    if sys.platform.startswith("linux"):
        assert first is True
