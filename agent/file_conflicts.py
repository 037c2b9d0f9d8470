"""File conflict copies in `qmoi-sync conflicts`, and `qmoi-sync conflicts resolve`.

A *file conflict copy* is a file the converged index places under a conflict name
(``name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext``): the loser of a concurrent creation of one
path (agent/layout.py), or a version split off by concurrent binary edits
(agent/binary_sync.py). Listed as items of kind ``file`` (agent/conflicts.py providers)::

    {"kind": "file", "path": str, "original": str, "device": str (short id), "at": float,
     "type": "text" | "binary"}

Resolving one works through the folder, exactly as a user would, and lets the normal sync
machinery carry it to every device:

* ``mine``   — the conflict copy's content becomes the file at the original path; the copy goes;
* ``theirs`` — the conflict copy is deleted (the file at the original path stays);
* ``both``   — the copy is renamed to a normal name (``stem-DEVICE.ext``, numbered if taken).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from qmoi_sync.agent.chunker import open_regular
from qmoi_sync.agent.conflicts import register_provider
from qmoi_sync.agent.control import EXTRA_REQUESTS
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.layout import compute_layout, strip_conflict_marker
from qmoi_sync.agent.materialize import (
    TEMP_PREFIX,
    UnsafePathError,
    _open_parent,
    delete_file,
    rename_file,
    stat_file,
)
from qmoi_sync.protocol.paths import is_conflict_name

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import Agent, SpaceRuntime


def file_conflicts(rt: SpaceRuntime) -> list[dict[str, Any]]:
    entries = rt.sync.index.entries()
    layout = compute_layout(entries, fold_case=bool(getattr(rt.sync, "case_insensitive", False)))
    items = []
    for fid, path in sorted(layout.by_fid.items(), key=lambda kv: kv[1]):
        e = entries[fid]
        if e.kind not in ("text", "binary"):
            continue
        if fid in layout.conflicts:
            original = strip_conflict_marker(e.path or path)
        elif is_conflict_name(path):
            original = strip_conflict_marker(path)
        else:
            continue
        items.append(
            {
                "kind": "file",
                "path": path,
                "original": original,
                "device": e.created_dev,
                "at": e.created_ts,
                "type": e.kind,
            }
        )
    return items


async def _provider(rt: SpaceRuntime) -> list[dict[str, Any]]:
    return file_conflicts(rt)


register_provider(_provider)


class ResolveRequest(BaseModel):
    v: Literal[1] = 1
    cmd: Literal["conflict_resolve"] = "conflict_resolve"
    space: str | None = None
    path: str = Field(min_length=1, max_length=4096)
    keep: Literal["mine", "theirs", "both"]


def _relative(rt: SpaceRuntime, path: str) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(rt.record.folder.resolve()).as_posix()
        except ValueError:
            return path
    return path.strip("/")


def _copy_over(root: Path, src: str, dst: str) -> None:
    """Stream ``src`` onto ``dst`` (temp + fsync + rename), both inside the root."""
    opened = open_regular(root, src)
    if opened is None:
        raise UserError(f"{src} is gone")
    fd, st = opened
    try:
        with _open_parent(root, dst, create=True) as (dfd, name):
            tmp = f"{TEMP_PREFIX}resolve-{os.getpid()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            out = os.open(tmp, flags, 0o600, dir_fd=dfd)
            try:
                while block := os.read(fd, 1 << 20):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(out, view) :]
                os.fchmod(out, st.mode or 0o644)
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(fd)


def _free_name(root: Path, original: str, device: str, taken: set[str]) -> str:
    head, base = posixpath.split(original)
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if dot > 0 else (base, "")
    n = 1
    while True:
        name = f"{stem}-{device}{ext}" if n == 1 else f"{stem}-{device}-{n}{ext}"
        candidate = posixpath.join(head, name)
        if candidate not in taken and stat_file(root, candidate) is None:
            return candidate
        n += 1


async def resolve(agent: Agent, req: ResolveRequest) -> dict[str, Any]:
    runtimes = [agent.find_space(req.space)] if req.space else list(agent.spaces.values())
    for rt in runtimes:
        rel = _relative(rt, req.path)
        for item in file_conflicts(rt):
            if item["path"] == rel:
                return await _resolve(rt, item, req.keep)
    raise UserError(f"{req.path} is not a conflict copy (see `qmoi-sync conflicts`)")


async def _resolve(rt: SpaceRuntime, item: dict[str, Any], keep: str) -> dict[str, Any]:
    root = rt.record.folder
    path, original = str(item["path"]), str(item["original"])
    touched = {path}
    result: dict[str, Any] = {"space": rt.record.name, "path": path, "keep": keep}
    try:
        if keep == "theirs":
            await asyncio.to_thread(delete_file, root, path)
        elif keep == "mine":
            await asyncio.to_thread(_copy_over, root, path, original)
            await asyncio.to_thread(delete_file, root, path)
            touched.add(original)
            result["file"] = original
        else:
            taken = set(rt.sync.files)
            new = _free_name(root, original, str(item["device"]) or "copy", taken)
            await asyncio.to_thread(rename_file, root, path, new)
            touched.add(new)
            result["file"] = new
    except (OSError, UnsafePathError) as exc:
        raise UserError(f"cannot resolve {path}: {exc}") from exc
    await rt.sync.handle_local(touched)
    return result


async def _handle(agent: Agent, req: ResolveRequest) -> Any:
    return await resolve(agent, req)


EXTRA_REQUESTS["conflict_resolve"] = (ResolveRequest, _handle)


def render_file(item: dict[str, Any]) -> list[str]:
    """`qmoi-sync conflicts` lines for one file conflict copy."""
    from datetime import UTC, datetime

    at = item.get("at")
    when = (
        datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(at, int | float) and at > 0
        else "?"
    )
    return [
        f"  file {item.get('path')}",
        f"    conflict copy of {item.get('original')} ({item.get('type')}), from "
        f"{item.get('device')} at {when}",
        f"    resolve: qmoi-sync conflicts resolve {item.get('path')} --keep mine|theirs|both",
    ]
