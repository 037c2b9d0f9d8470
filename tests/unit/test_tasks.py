"""agent/tasks.py and its relay copy relay/tasks.py: cancel_and_wait cancels tasks, waits for
them, swallows their outcomes, and never swallows the caller's own cancellation. Real asyncio
tasks, no mocks; every wait has a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from qmoi_sync.agent import tasks as agent_tasks
from qmoi_sync.relay import tasks as relay_tasks

DEADLINE_S = 30.0  # generous: only a hang (the bug) comes near it

CancelAndWait = Callable[..., Awaitable[None]]


@pytest.fixture(params=[agent_tasks, relay_tasks], ids=["agent", "relay"])
def mod(request: pytest.FixtureRequest) -> ModuleType:
    m: ModuleType = request.param
    return m


async def _ignores_cancel_once(
    caught: asyncio.Event, release: asyncio.Event, started: asyncio.Event | None = None
) -> str:
    """Swallows its first cancellation (as a task finishing a write would), then waits."""
    try:
        if started is not None:
            started.set()
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        caught.set()
    await release.wait()
    return "finished"


async def test_tasks_are_cancelled_and_awaited(mod: ModuleType) -> None:
    started = [asyncio.Event() for _ in range(3)]

    async def forever(ev: asyncio.Event) -> None:
        ev.set()
        await asyncio.Event().wait()

    ts = [asyncio.create_task(forever(ev)) for ev in started]
    async with asyncio.timeout(DEADLINE_S):
        for ev in started:
            await ev.wait()
        await mod.cancel_and_wait(*ts, None)  # None entries are skipped
    assert all(t.cancelled() for t in ts)


async def test_a_task_exception_is_swallowed_and_logged(
    mod: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def fails_on_cancel() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup broke") from None

    async def failed_already() -> None:
        raise ValueError("bad frame")

    a = asyncio.create_task(fails_on_cancel())
    b = asyncio.create_task(failed_already())
    caplog.set_level(logging.DEBUG, logger=mod.log.name)
    async with asyncio.timeout(DEADLINE_S):
        await started.wait()
        await mod.cancel_and_wait(a, b)
    assert isinstance(a.exception(), RuntimeError)
    assert isinstance(b.exception(), ValueError)
    text = caplog.text
    assert "RuntimeError: cleanup broke" in text
    assert "ValueError: bad frame" in text


async def test_a_task_that_ignores_cancellation_once_is_still_awaited(mod: ModuleType) -> None:
    caught, release = asyncio.Event(), asyncio.Event()
    t = asyncio.create_task(_ignores_cancel_once(caught, release))
    waiter = asyncio.create_task(mod.cancel_and_wait(t))
    async with asyncio.timeout(DEADLINE_S):
        await caught.wait()
        # The task swallowed its cancel and is still running: the helper must still be waiting.
        assert not waiter.done()
        release.set()
        await waiter
    assert t.result() == "finished"


async def test_a_task_cancelled_beforehand_is_not_cancelled_again(mod: ModuleType) -> None:
    """Callers cancel under a lock and wait afterwards: one cancel, not two."""
    caught, release, started = asyncio.Event(), asyncio.Event(), asyncio.Event()
    t = asyncio.create_task(_ignores_cancel_once(caught, release, started))
    async with asyncio.timeout(DEADLINE_S):
        await started.wait()
        t.cancel()
        waiter = asyncio.create_task(mod.cancel_and_wait(t))
        await caught.wait()
        release.set()
        await waiter
    assert t.result() == "finished"  # a second cancel would have ended it cancelled


async def _callers_cancellation_propagates(cancel_and_wait: CancelAndWait) -> bool:
    """Run a caller that waits inside ``cancel_and_wait`` for a task that ignores its cancel,
    cancel the caller, and report whether the caller ended cancelled."""
    caught, release = asyncio.Event(), asyncio.Event()
    t = asyncio.create_task(_ignores_cancel_once(caught, release))
    after_wait = asyncio.Event()

    async def caller() -> None:
        await cancel_and_wait(t)
        after_wait.set()  # shutdown "continues" as if nothing had cancelled us

    c = asyncio.create_task(caller())
    async with asyncio.timeout(DEADLINE_S):
        await caught.wait()
        assert not c.done()
        c.cancel()  # the caller itself is cancelled (shutdown, a timeout) while it waits
        await asyncio.wait([c])
        propagated = c.cancelled() and not after_wait.is_set()
        release.set()
        await asyncio.wait([t])  # the task still finishes on its own; no task left behind
    return propagated


async def test_the_callers_cancellation_propagates(mod: ModuleType) -> None:
    assert await _callers_cancellation_propagates(mod.cancel_and_wait)


async def test_the_old_idiom_loses_the_callers_cancellation() -> None:
    """The check above fails for the idiom cancel_and_wait replaced (kept here so the test is
    known to tell the two apart)."""

    async def old_idiom(*ts: asyncio.Task[Any]) -> None:
        for t in ts:
            t.cancel()
        for t in ts:
            with contextlib.suppress(BaseException):  # the idiom, as it was written
                await t

    assert not await _callers_cancellation_propagates(old_idiom)
