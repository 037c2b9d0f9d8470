"""Garbage collection of a space's chunks on the relay.

The relay cannot tell which of its chunks are still needed (manifests are sealed), so a member
device decides: every chunk that no manifest in its index references — any device's latest
manifest of any live file, so concurrent versions and conflict copies keep theirs — and that nobody
has uploaded for ``min_age_s``, is dropped (frames ListChunks/ChunkList, DropChunks/ChunksDropped
on a connection of its own).

Why the age keeps this safe against devices this one has not heard from yet: an uploader skips
chunks the relay acknowledged within ``ACK_TRUST_S`` (agent/chunk_store.py) and uploads every
other chunk again, which refreshes the chunk's age on the relay; the relay re-checks the age at
deletion time. So any manifest published after this device's index was read references chunks
younger than ``ACK_TRUST_S`` on the relay, below ``min_age_s``. Devices run this only while
caught up with the relay, as an admin, at most once per ``GC_INTERVAL_S``, or on demand
(``qmoi-sync gc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, Field
from websockets.asyncio.client import ClientConnection, connect

from qmoi_sync.agent.blob_transfer import CONNECT_TIMEOUT_S, BlobLink
from qmoi_sync.agent.chunk_store import ACK_TRUST_S
from qmoi_sync.agent.control import EXTRA_REQUESTS
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.relay_link import RelayRefused, recv_frame
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.chunks import Manifest
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.membership import Role

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import Agent, SpaceRuntime
    from qmoi_sync.agent.index import IndexDoc

log = logging.getLogger("qmoi_sync.blob_gc")
T = TypeVar("T")

#: Default minimum age of a chunk before it may be dropped (well above ACK_TRUST_S).
GC_MIN_AGE_S = 7 * 24 * 3600
GC_INTERVAL_S = 24 * 3600
#: The first automatic run waits this long after the space starts (catch-up comes first).
GC_FIRST_DELAY_S = 3600
REPLY_TIMEOUT_S = 60.0


class GcError(Exception):
    pass


@dataclass
class GcResult:
    listed: int = 0
    referenced: int = 0
    unreferenced: int = 0
    dropped: int = 0
    freed_bytes: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def referenced_chunks(index: IndexDoc) -> set[bytes]:
    """Every chunk id that some device's latest manifest of some live file names. Deleted
    files need none (a concurrent edit that brings one back is uploaded by the device that made
    it); a manifest that does not parse names nothing anyone could download anyway."""
    out: set[bytes] = set()
    for fid, entry in index.entries().items():
        if not entry.alive:
            continue
        for key, value in index.fields(fid).items():
            if not key.startswith("m:") or not isinstance(value, dict):
                continue
            with contextlib.suppress(ProtocolError):
                out.update(c.id for c in Manifest.from_json(value).chunks)
    return out


async def collect(rt: SpaceRuntime, min_age_s: int = GC_MIN_AGE_S, force: bool = False) -> GcResult:
    """One collection for this space (see the module docstring). ``force`` allows a minimum age
    below the upload trust window (the user knows no other device is uploading)."""
    if min_age_s < 0:
        raise GcError("the minimum age cannot be negative")
    if min_age_s < ACK_TRUST_S and not force:
        raise GcError(
            f"a minimum age of {min_age_s} s is below the upload trust window of {ACK_TRUST_S} s: "
            "chunks another device is about to reference could be dropped (--force if no "
            "other device is uploading)"
        )
    url = rt.record.relay_url
    binary = rt.sync.binary
    if not url or binary is None or binary.link is None:
        raise GcError(f"space {rt.record.name} has no relay: nothing to collect")
    async with rt.sync.lock:
        referenced = referenced_chunks(rt.sync.index)
    result = GcResult(referenced=len(referenced))
    link: BlobLink = binary.link
    try:
        async with connect(
            url,
            compression=None,
            max_size=F.MAX_FRAME,
            open_timeout=CONNECT_TIMEOUT_S,
            close_timeout=2,
            proxy=None,
        ) as ws:
            await link.handshake(ws)
            doomed = await _list_unreferenced(ws, referenced, min_age_s, result)
            # This device's own acks of them are void from now on (its uploads re-send).
            await binary.chunks.forget_acked(doomed)
            for i in range(0, len(doomed), F.MAX_CHUNK_LIST):
                part = tuple(doomed[i : i + F.MAX_CHUNK_LIST])
                reply = await _request(ws, F.DropChunks(min_age_s, part), F.ChunksDropped)
                result.dropped += reply.dropped
                result.freed_bytes += reply.freed_bytes
    except (OSError, TimeoutError, ProtocolError) as exc:
        raise GcError(f"relay unreachable for garbage collection: {exc}") from exc
    except Exception as exc:  # websockets errors, a relay refusal (RelayRefused)
        raise GcError(f"garbage collection failed: {exc}") from exc
    log.info(
        "blob gc %s: %d chunks on the relay, %d referenced here, %d dropped (%d bytes)",
        rt.record.name,
        result.listed,
        result.referenced,
        result.dropped,
        result.freed_bytes,
    )
    return result


async def _list_unreferenced(
    ws: ClientConnection, referenced: set[bytes], min_age_s: int, result: GcResult
) -> list[bytes]:
    doomed: list[bytes] = []
    after = bytes(32)
    while True:
        page = await _request(ws, F.ListChunks(after), F.ChunkList)
        for chunk_id, age in page.entries:
            if chunk_id <= after:
                raise ProtocolError("malformed", "the relay listed chunks out of order")
            after = chunk_id
            result.listed += 1
            if chunk_id not in referenced:
                result.unreferenced += 1
                if age >= min_age_s:
                    doomed.append(chunk_id)
        if not page.more or not page.entries:
            return doomed


async def _request(ws: ClientConnection, frame: F.Frame, want: type[T]) -> T:
    await ws.send(F.encode_frame(frame))
    async with asyncio.timeout(REPLY_TIMEOUT_S):
        while True:
            try:
                reply = await recv_frame(ws, REPLY_TIMEOUT_S)
            except RelayRefused as exc:
                raise GcError(f"relay refused: {exc}") from exc
            if isinstance(reply, want):
                return reply
            # anything else (Presence, ...) is not for us


async def run_periodically(rt: SpaceRuntime, stop: asyncio.Event) -> None:
    """The automatic collection: admins only, caught up with the relay, once a day."""
    delay: float = GC_FIRST_DELAY_S
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        delay = GC_INTERVAL_S
        link = rt.link
        if (
            rt.record.paused
            or link is None
            or not link.caught_up.is_set()
            or rt.keyring.role_of(rt.agent.identity.public.sign_pk) is not Role.admin
        ):
            continue
        try:
            await collect(rt)
        except GcError as exc:
            log.info("blob gc %s skipped: %s", rt.record.name, exc)
            delay = GC_FIRST_DELAY_S


# -- control request (`qmoi-sync gc`) --------------------------------------------------------------
class GcRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["gc"] = "gc"
    space: str
    min_age_s: int | None = Field(default=None, ge=0, le=10 * 365 * 24 * 3600)
    force: bool = False


async def _handle_gc(agent: Agent, req: GcRequest) -> dict[str, int]:
    rt = agent.find_space(req.space)
    min_age = GC_MIN_AGE_S if req.min_age_s is None else req.min_age_s
    try:
        return (await collect(rt, min_age, req.force)).to_json()
    except GcError as exc:
        raise UserError(str(exc)) from None


EXTRA_REQUESTS["gc"] = (GcRequest, _handle_gc)
