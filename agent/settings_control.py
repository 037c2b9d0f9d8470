"""Control requests for settings sync and conflicts (registered into agent/control.py).

``settings_add``, ``settings_list``, ``settings_remove``, ``settings_local``, ``settings_get``,
``settings_set`` and ``conflicts``; each answers JSON (see the handlers) or a readable
UserError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from qmoi_sync.agent.conflicts import space_conflicts
from qmoi_sync.agent.control import EXTRA_REQUESTS

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import Agent

_NAME = Field(min_length=1, max_length=64)


class SettingsAddRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["settings_add"] = "settings_add"
    space: str
    path: str = Field(min_length=1, max_length=4096)
    name: str = _NAME
    format: str | None = None
    prefer: Literal["shared", "local"] = "shared"


class SettingsListRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["settings_list"] = "settings_list"
    space: str | None = None


class SettingsRemoveRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["settings_remove"] = "settings_remove"
    space: str
    name: str = _NAME
    everywhere: bool = False


class SettingsLocalRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["settings_local"] = "settings_local"
    space: str
    name: str = _NAME
    add: list[str] = Field(default_factory=list, max_length=256)
    remove: list[str] = Field(default_factory=list, max_length=256)
    allow: list[str] = Field(default_factory=list, max_length=256)
    disallow: list[str] = Field(default_factory=list, max_length=256)


class SettingsGetRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["settings_get"] = "settings_get"
    space: str
    name: str = _NAME


class SettingsSetRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["settings_set"] = "settings_set"
    space: str
    name: str = _NAME
    key: str = Field(min_length=1, max_length=1024)
    value: Any = None
    delete: bool = False


class ConflictsRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["conflicts"] = "conflicts"
    space: str | None = None


async def _add(agent: Agent, req: SettingsAddRequest) -> Any:
    rt = agent.find_space(req.space)
    return await rt.settings.add(req.path, req.name, req.format, req.prefer)


async def _list(agent: Agent, req: SettingsListRequest) -> Any:
    runtimes = [agent.find_space(req.space)] if req.space else list(agent.spaces.values())
    out = []
    for rt in runtimes:
        docs = []
        for item in rt.settings.status_items():
            info = rt.settings.info(item.name)
            doc = item.model_dump(mode="json")
            doc["local_patterns"] = list(info.local) if info else []
            doc["allow_patterns"] = list(info.allow) if info else []
            docs.append(doc)
        out.append({"space": rt.record.name, "space_id": rt.record.space_id, "settings": docs})
    return {"spaces": out}


async def _remove(agent: Agent, req: SettingsRemoveRequest) -> Any:
    return await agent.find_space(req.space).settings.remove(req.name, req.everywhere)


async def _local(agent: Agent, req: SettingsLocalRequest) -> Any:
    return await agent.find_space(req.space).settings.patterns(
        req.name, req.add, req.remove, req.allow, req.disallow
    )


async def _get(agent: Agent, req: SettingsGetRequest) -> Any:
    return await agent.find_space(req.space).settings.read(req.name)


async def _set(agent: Agent, req: SettingsSetRequest) -> Any:
    return await agent.find_space(req.space).settings.set_value(
        req.name, req.key, req.value, req.delete
    )


async def _conflicts(agent: Agent, req: ConflictsRequest) -> Any:
    runtimes = [agent.find_space(req.space)] if req.space else list(agent.spaces.values())
    return {"spaces": [(await space_conflicts(rt)).model_dump(mode="json") for rt in runtimes]}


CONTROL_REQUESTS: dict[str, tuple[type[BaseModel], Any]] = {
    "settings_add": (SettingsAddRequest, _add),
    "settings_list": (SettingsListRequest, _list),
    "settings_remove": (SettingsRemoveRequest, _remove),
    "settings_local": (SettingsLocalRequest, _local),
    "settings_get": (SettingsGetRequest, _get),
    "settings_set": (SettingsSetRequest, _set),
    "conflicts": (ConflictsRequest, _conflicts),
}
EXTRA_REQUESTS.update(CONTROL_REQUESTS)
