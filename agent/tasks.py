"""Cancel background tasks and wait for them without losing the caller's own cancellation.

The idiom this replaces, ``task.cancel(); with suppress(BaseException): await task``, cannot
tell the task's CancelledError from the caller's: when the caller is itself cancelled (shutdown,
a timeout) while it waits, the suppress swallows that too and the caller runs on. Here the
tasks' outcomes are collected from the tasks themselves (never re-raised), and the only
exception ``await`` can raise is the caller's own CancelledError, which propagates.

relay/tasks.py is a copy (the relay imports nothing from the agent, and protocol/ has no event
loop); tests/unit/test_tasks.py runs the same tests against both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("qmoi_sync.tasks")


def _reap(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished task's outcome (so asyncio does not warn that it was never retrieved)
    and log an unexpected exception: the class and message only, at debug, as the code this
    replaces logged nothing."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.debug("background task %s ended with %s: %s", _name(task), type(exc).__name__, exc)


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else "future"


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` (``None`` entries are skipped) and wait until every one has finished.

    A task that already has a cancellation request pending is not cancelled again, so callers
    may cancel under a lock and wait here afterwards with the same effect as one cancel. A task
    that ignores its cancellation is still waited for. The tasks' results, exceptions and
    CancelledErrors are swallowed (exceptions logged at debug). If the caller is cancelled
    while waiting, its CancelledError propagates at once; the tasks, already cancelled, finish
    on their own and their outcomes are still retrieved and logged."""
    todo = [t for t in tasks if t is not None]
    if not todo:
        return
    for t in todo:
        if not (isinstance(t, asyncio.Task) and t.cancelling()):
            t.cancel()
    try:
        await asyncio.wait(todo)
    finally:
        for t in todo:
            if t.done():
                _reap(t)
            else:
                t.add_done_callback(_reap)
