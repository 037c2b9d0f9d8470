"""Control requests for snapshots (registered into agent/control.py's EXTRA_REQUESTS).

``snapshot_configure`` (write the shared target/policy), ``snapshot_now`` (start one, returns at
once), ``snapshot_progress`` (poll it; the CLI draws the progress bar from this).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from qmoi_sync.agent.control import EXTRA_REQUESTS
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.snapshot_format import SnapshotError

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import Agent


class SnapshotConfigureRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["snapshot_configure"] = "snapshot_configure"
    space: str
    fields: dict[str, Any]


class SnapshotNowRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["snapshot_now"] = "snapshot_now"
    space: str


class SnapshotProgressRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["snapshot_progress"] = "snapshot_progress"
    space: str


async def _configure(agent: Agent, req: SnapshotConfigureRequest) -> Any:
    rt = agent.find_space(req.space)
    unknown = set(req.fields) - {"target", "policy"}
    if unknown:
        raise UserError(f"unknown snapshot settings: {', '.join(sorted(unknown))}")
    if not await rt.snapshots.configure(req.fields):
        raise UserError(f"this device may not change space {rt.record.name} ({rt.sync.send_block})")
    return {"configured": rt.record.name}


async def _now(agent: Agent, req: SnapshotNowRequest) -> Any:
    rt = agent.find_space(req.space)
    try:
        return rt.snapshots.snapshot_now().to_json()
    except SnapshotError as exc:
        raise UserError(str(exc)) from None


async def _progress(agent: Agent, req: SnapshotProgressRequest) -> Any:
    rt = agent.find_space(req.space)
    p = rt.snapshots.progress
    return None if p is None else p.to_json()


EXTRA_REQUESTS["snapshot_configure"] = (SnapshotConfigureRequest, _configure)
EXTRA_REQUESTS["snapshot_now"] = (SnapshotNowRequest, _now)
EXTRA_REQUESTS["snapshot_progress"] = (SnapshotProgressRequest, _progress)
