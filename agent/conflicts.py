"""`qmoi-sync conflicts`: what concurrent changes lost, per space, from every kind of source.

Each source registers a *provider* (`register_provider`): an async function of a space's runtime
returning conflict items, JSON-ready dicts tagged with a ``kind``. Built in: ``setting`` (a
settings key written concurrently on several devices; agent/settings_sync.py). File conflict
copies (``file``) are meant to be added the same way; the CLI renders each kind with its own
renderer (agent/settings_cli.py, `RENDERERS`) and prints unknown kinds as JSON.

Item schema of kind ``setting``::

    {"kind": "setting", "document": str, "key": str, "pointer": str,
     "winner": Side, "losers": [Side]}
    Side = {"device": str (short id), "device_name": str | null, "value": any,
            "deleted": bool, "at": float (the writer's clock, unix seconds)}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime

Provider = Callable[["SpaceRuntime"], Awaitable[list[dict[str, Any]]]]
PROVIDERS: list[Provider] = []


def register_provider(provider: Provider) -> None:
    PROVIDERS.append(provider)


class SpaceConflicts(BaseModel):
    space: str
    space_id: str
    conflicts: list[dict[str, Any]]  # each has a "kind"


async def space_conflicts(rt: SpaceRuntime) -> SpaceConflicts:
    items: list[dict[str, Any]] = []
    for provider in PROVIDERS:
        items.extend(await provider(rt))
    return SpaceConflicts(space=rt.record.name, space_id=rt.record.space_id, conflicts=items)


async def _settings_provider(rt: SpaceRuntime) -> list[dict[str, Any]]:
    return await rt.settings.conflicts()


register_provider(_settings_provider)
