"""The local control endpoint: a Unix socket (0600) speaking versioned JSON lines.

The CLI talks to a running agent only through this socket. One request line, one reply line:
`{"v": 1, "cmd": "status"}` → `{"ok": true, "result": {...}}` or
`{"ok": false, "error": "readable message"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from qmoi_sync.agent.home import UserError

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import Agent

CONTROL_VERSION = 1
MAX_REQUEST = 64 * 1024


class StatusRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["status"] = "status"


class InviteRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["invite"] = "invite"
    space: str
    role: Literal["admin", "member", "reader"] = "member"
    expires_s: int = Field(default=3600, gt=0, le=30 * 24 * 3600)


class AddSpaceRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["add_space"] = "add_space"
    space_id: str


class StopRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["stop"] = "stop"


class DevicesRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["devices"] = "devices"
    space: str | None = None  # None: every space


class RevokeRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["revoke"] = "revoke"
    space: str
    device: str = Field(min_length=1, max_length=256)  # name, short id or id


class PauseRequest(BaseModel):
    """Pause (`cmd` "pause") or resume (`cmd` "resume") one space, or all when space is None."""

    v: Literal[1] = 1
    cmd: Literal["pause", "resume"]
    space: str | None = None


_REQUESTS: dict[str, type[BaseModel]] = {
    "status": StatusRequest,
    "invite": InviteRequest,
    "add_space": AddSpaceRequest,
    "stop": StopRequest,
    "devices": DevicesRequest,
    "revoke": RevokeRequest,
    "pause": PauseRequest,
    "resume": PauseRequest,
}

# Requests other modules add (agent/settings_control.py): cmd -> (model, handler(agent, req)).
EXTRA_REQUESTS: dict[str, tuple[type[BaseModel], Callable[[Agent, Any], Awaitable[Any]]]] = {}


class RequestError(ValueError):
    """A request line that is not a valid request (the message is the reply's ``error``)."""


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_request(line: bytes) -> BaseModel:
    """Parse one request line (any bytes a local client sent) into its request model.

    Raises :class:`RequestError` with a readable message on anything else, never another
    exception: the line is size-checked, must be UTF-8 JSON (nesting depth included: the json
    module raises RecursionError, not ValueError, on deeply nested arrays), an object with
    ``"v": 1`` and a known ``cmd`` whose model validates it.
    """
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request too large (limit {MAX_REQUEST} bytes)")
    try:
        raw = json.loads(line)
    except RecursionError:
        raise RequestError("bad request: JSON nested too deeply") from None
    except ValueError as exc:
        raise RequestError(f"bad request: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise RequestError("bad request: request must be a JSON object")
    version = raw.get("v")
    # `True == 1` in Python: a boolean is not a version number
    if isinstance(version, bool) or version != CONTROL_VERSION:
        raise RequestError(f"unsupported control version {_brief(version)}")
    cmd = raw.get("cmd")
    model = None
    if isinstance(cmd, str):
        model = _REQUESTS.get(cmd) or EXTRA_REQUESTS.get(cmd, (None, None))[0]
    if model is None:
        raise RequestError(f"unknown command {_brief(cmd)}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RequestError(f"bad request: {exc}") from None


class ControlServer:
    def __init__(self, path: Path, agent: Agent) -> None:
        self.path = path
        self.agent = agent
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            reply = await self._dispatch(line)
        except TimeoutError:
            reply = {"ok": False, "error": "request timed out"}
        except ValueError:
            # readline() past the stream's limit (a line of more than MAX_REQUEST bytes): the
            # client gets an answer instead of a dropped connection.
            reply = {"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = parse_request(line)
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            return {"ok": True, "result": await self._handle(req)}
        except UserError as exc:
            return {"ok": False, "error": str(exc)}

    async def _handle(self, req: BaseModel) -> Any:
        from qmoi_sync.agent import membership_ops

        agent = self.agent
        extra = EXTRA_REQUESTS.get(str(getattr(req, "cmd", "")))
        if extra is not None and isinstance(req, extra[0]):
            return await extra[1](agent, req)
        if isinstance(req, StatusRequest):
            return (await agent.status()).model_dump(mode="json")
        if isinstance(req, InviteRequest):
            rt = agent.find_space(req.space)
            token = await membership_ops.create_invite(
                agent.store, agent.identity, rt.keyring.log, rt.record, req.role, req.expires_s
            )
            if agent.lan is not None:
                agent.lan.request_invite_refresh()  # advertise it on the LAN at once
            return {"token": token}
        if isinstance(req, AddSpaceRequest):
            for record in await agent.store.spaces():
                if record.space_id == req.space_id and record.space_id not in agent.spaces:
                    await agent.start_space(record)
                    return {"started": record.space_id}
            raise UserError(f"no new space {req.space_id} to start")
        if isinstance(req, StopRequest):
            agent.stop.set()
            return {"stopping": True}
        if isinstance(req, DevicesRequest):
            runtimes = [agent.find_space(req.space)] if req.space else list(agent.spaces.values())
            listings = [
                await membership_ops.list_devices(
                    agent.store, agent.identity, agent.device_name, rt.keyring.log, rt.record
                )
                for rt in runtimes
            ]
            return {"spaces": [x.model_dump(mode="json") for x in listings]}
        if isinstance(req, RevokeRequest):
            return await agent.find_space(req.space).revoke(req.device)
        if isinstance(req, PauseRequest):
            paused = req.cmd == "pause"
            changed = await agent.set_paused(req.space, paused)
            return {"paused" if paused else "resumed": changed}
        raise UserError("unhandled request")


class AgentNotRunning(Exception):
    pass


async def request(path: Path, payload: dict[str, Any], timeout: float = 30) -> Any:
    """Send one request to the running agent; raises AgentNotRunning if nobody listens."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise AgentNotRunning(str(exc)) from exc
    try:
        writer.write(_request_line(payload))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout=timeout)
    finally:
        writer.close()
    return _result(line)


def request_blocking(path: Path, payload: dict[str, Any], timeout: float = 30) -> Any:
    """`request` for callers without an event loop (test and benchmark drivers polling status
    many times a second, where a CLI process per poll would cost ~0.4 s of CPU each)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(_request_line(payload))
            with s.makefile("rb") as f:
                line = f.readline()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise AgentNotRunning(str(exc)) from exc
    return _result(line)


def _request_line(payload: dict[str, Any]) -> bytes:
    return json.dumps({"v": CONTROL_VERSION, **payload}).encode() + b"\n"


def _result(line: bytes) -> Any:
    if not line:
        raise AgentNotRunning("agent closed the control connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise UserError(str(reply.get("error", "agent refused the request")))
    return reply["result"]
