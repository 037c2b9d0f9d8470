"""File-system watching for one space folder (watchfiles, inotify on Linux).

watchfiles groups events: it yields once no new event arrived for `step` ms (or after `debounce`
ms at most). A small step keeps a single save's latency in single-digit milliseconds while a burst
(a `git checkout`, an unzip) still arrives as a few large batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import Change, awatch

from qmoi_sync.agent.materialize import is_temp_name

log = logging.getLogger("qmoi_sync.watcher")

STEP_MS = 5
DEBOUNCE_MS = 200


PROBE_PREFIX = ".qmoi-tmp-probe-"


async def watch_folder(
    folder: Path,
    on_paths: Callable[[set[str]], Awaitable[None]],
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Call `on_paths` with absolute paths that changed, until `stop` is set.

    `ready` is set once the watch is provably live: we touch a probe file until the watcher
    reports it, so a caller can rescan afterwards knowing no change falls in between.
    """
    probe = folder / f"{PROBE_PREFIX}{secrets.token_hex(4)}"

    def keep(_change: Change, path: str) -> bool:
        name = Path(path).name
        return name == probe.name or not is_temp_name(name)

    prober = asyncio.create_task(_touch_until(probe, ready)) if ready is not None else None
    try:
        async for changes in awatch(
            folder,
            watch_filter=keep,
            step=STEP_MS,
            debounce=DEBOUNCE_MS,
            stop_event=stop,
            recursive=True,
            ignore_permission_denied=True,
        ):
            paths = {p for _c, p in changes}
            if str(probe) in paths:
                paths.discard(str(probe))
                if ready is not None and not ready.is_set():
                    ready.set()
                    with contextlib.suppress(OSError):
                        probe.unlink()
            if not paths:
                continue
            try:
                await on_paths(paths)
            except Exception:
                log.exception(
                    "handling %d changed path(s) failed; they are retried at the next rescan",
                    len(paths),
                )
    finally:
        if prober is not None:
            prober.cancel()
        with contextlib.suppress(OSError):
            probe.unlink()


async def _touch_until(probe: Path, ready: asyncio.Event | None) -> None:
    assert ready is not None
    while not ready.is_set():
        with contextlib.suppress(OSError):
            probe.write_bytes(b"")  # noqa: ASYNC240 - an empty file, once per 50 ms at start
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), timeout=0.05)
