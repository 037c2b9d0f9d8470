"""Restoring from snapshots: a whole space, one file's history, one file as of a snapshot.

Everything read from the bucket is verified before it is used: the manifest's signature, that
its signer was a writing member of the space in that key epoch, that it is the manifest its
name says (seq and signer tag), and every object's authenticated decryption plus its keyed name
recomputed from the plaintext. Problems are raised as :class:`IntegrityError` naming the object
and what is wrong with it (missing, tampered, swapped, unknown signer); nothing unverified is
ever written. Rollback: a restore of the latest snapshot that finds an older manifest than the
newest this device ever saw (or the space's shared config says was written) warns.

Two ways to restore a whole space:

- **export** (``restore SPACE --to DIR`` with DIR outside the space): the files as they were,
  written to DIR; this device's sync state is untouched.
- **install** (DIR is the space's own folder): the snapshot's CRDT states are merged into this
  device's store through ``SpaceSync.apply_snapshot`` — on a new device this is the snapshot's
  state — files are written and recorded (so the agent does not re-ingest them), and the relay
  cursor moves to the one the snapshot covers, from where the agent follows the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pycrdt import Doc

from qmoi_sync.agent.materialize import write_file_atomic
from qmoi_sync.agent.snapshot_format import (
    DocRef,
    FileRef,
    IntegrityError,
    Manifest,
    SnapshotError,
    SnapshotKeys,
    object_key,
    open_object,
)
from qmoi_sync.agent.snapshot_s3 import Bucket
from qmoi_sync.agent.snapshotter import (
    LoadedManifest,
    ManifestEntry,
    Progress,
    SnapshotContext,
    list_manifests,
    load_manifest,
)
from qmoi_sync.agent.space import INDEX_DOC_ID, SpaceSync
from qmoi_sync.agent.textdoc import text_of
from qmoi_sync.protocol.errors import PathError, ProtocolError
from qmoi_sync.protocol.paths import validate_relpath
from qmoi_sync.protocol.replay import ReplayWindow

log = logging.getLogger("qmoi_sync.restore")

DOC_CONCURRENCY = 8
#: Sequence numbers skipped by a device restored under an identity the snapshot knows: it may
#: have sent envelopes after the snapshot, and reusing their numbers would make the relay drop
#: new ones as duplicates.
SEQ_GAP = 1 << 20


@dataclass
class Selected:
    loaded: LoadedManifest
    warnings: list[str] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest:
        return self.loaded.manifest


@dataclass(frozen=True)
class RestoreResult:
    snapshot: str
    files: int
    bytes: int
    duration_s: float
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_at(text: str) -> tuple[str, Any]:
    """("latest", None) | ("id", "seq-tag") | ("seq", int) | ("time", unix seconds)."""
    t = text.strip()
    if t in ("", "latest"):
        return "latest", None
    if re.fullmatch(r"\d+-[0-9a-f]{8}", t):
        return "id", t
    if re.fullmatch(r"\d+", t):
        return "seq", int(t)
    try:
        when = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise SnapshotError(
            f"--at {text!r}: expected 'latest', a snapshot id (see `snapshot list`) or an ISO "
            "time like 2026-11-24T10:15"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is the user's local time
    return "time", when.timestamp()


async def select_manifest(
    ctx: SnapshotContext,
    bucket: Bucket,
    at: str | None,
    shared_last_seq: int | None = None,
    entries: list[ManifestEntry] | None = None,
) -> Selected:
    entries = await list_manifests(bucket) if entries is None else entries
    if not entries:
        raise SnapshotError(f"no snapshot in s3://{ctx.target.bucket}/{ctx.target.prefix}")
    kind, value = parse_at(at or "latest")
    warnings: list[str] = []
    if kind == "latest":
        chosen = entries[-1]
    elif kind == "id":
        found = [e for e in entries if e.id == value]
        if not found:
            raise SnapshotError(f"no snapshot {value} (see `qmoi-sync snapshot list`)")
        chosen = found[0]
    elif kind == "seq":
        found = [e for e in entries if e.seq == value]
        if not found:
            raise SnapshotError(f"no snapshot {value} (see `qmoi-sync snapshot list`)")
        if len(found) > 1:
            ids = ", ".join(e.id for e in found)
            raise SnapshotError(f"several snapshots have number {value}: {ids}; pass the id")
        chosen = found[0]
    else:
        # Newest snapshot taken at or before the time (created_at is inside the manifest).
        for e in reversed(entries):
            lm = await load_manifest(ctx, bucket, e)
            if lm.manifest.created_at <= value:
                chosen = e
                break
        else:
            raise SnapshotError(f"no snapshot as old as {at}")
    lm = await load_manifest(ctx, bucket, chosen)
    m = lm.manifest
    seen = await ctx.local.last_seen(ctx.space_id, ctx.target.key)
    if kind == "latest":
        if seen is not None and seen[0] > m.seq:
            warnings.append(
                f"the newest snapshot in the bucket is {m.seq}, older than snapshot {seen[0]} "
                "this device saw before: newer manifests were deleted or the bucket was rolled "
                "back"
            )
        if shared_last_seq is not None and shared_last_seq > m.seq:
            warnings.append(
                f"the space's configuration records snapshot {shared_last_seq}, but the newest "
                f"in the bucket is {m.seq}: newer manifests were deleted or rolled back"
            )
    if seen is not None and seen[2] == chosen.key and seen[1] != lm.hash:
        raise IntegrityError(
            "swapped",
            f"manifest {chosen.id} is not the one this device saw under that name",
            chosen.id,
        )
    if m.prev_seq is not None and m.prev_hash is not None:
        prevs = [e for e in entries if e.seq == m.prev_seq]
        if prevs:
            ok = False
            for e in prevs:
                try:
                    if (await load_manifest(ctx, bucket, e)).hash == m.prev_hash:
                        ok = True
                except IntegrityError as exc:
                    warnings.append(str(exc))
            if not ok:
                warnings.append(
                    f"snapshot {chosen.id} follows a snapshot {m.prev_seq} that is not in the "
                    "bucket any more as it was (replaced)"
                )
    await ctx.local.saw(ctx.space_id, ctx.target.key, m.seq, lm.hash, chosen.key)
    return Selected(lm, warnings)


# -- documents -----------------------------------------------------------------------------------
class _Fetcher:
    def __init__(self, ctx: SnapshotContext, bucket: Bucket, m: Manifest, progress: Progress):
        keys = ctx.keys_for(m.epoch)
        if keys is None:
            raise IntegrityError("unknown_epoch", f"no key for epoch {m.epoch}")
        self.keys: SnapshotKeys = keys
        self.bucket = bucket
        self.progress = progress
        self.sem = asyncio.Semaphore(bucket.concurrency)

    async def _object(self, name: bytes, what: str) -> bytes:
        key = object_key(self.bucket.prefix, name)
        async with self.sem:
            body = await self.bucket.get(key)
        if body is None:
            raise IntegrityError(
                "missing", f"object {name.hex()[:16]}… of {what} is missing from the bucket", key
            )
        plain = await asyncio.to_thread(open_object, self.keys, name, body, f"{key} ({what})")
        self.progress.done_objects += 1
        self.progress.done_bytes += len(plain)
        return plain

    async def state(self, ref: DocRef, what: str) -> bytes:
        """The document's full state (chain applied in order, verified)."""
        pieces = await asyncio.gather(*(self._object(o.name, what) for o in ref.chain))
        if len(pieces) == 1:
            return pieces[0]
        return await asyncio.to_thread(_merge_chain, pieces)


def _merge_chain(pieces: list[bytes]) -> bytes:
    doc: Doc[Any] = Doc()
    for p in pieces:
        doc.apply_update(p)
    return doc.get_update()


def _text_bytes(state: bytes) -> bytes:
    doc: Doc[Any] = Doc()
    doc.apply_update(state)
    return text_of(doc).encode("utf-8")


def _check_content(f: FileRef, data: bytes) -> None:
    if hashlib.sha256(data).digest() != f.sha256 or len(data) != f.size:
        raise IntegrityError(
            "tampered", f"{f.path}: restored content does not match the snapshot's record", f.path
        )


def _prepare_dest(dest: Path) -> Path:
    dest = dest.expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SnapshotError(f"{dest} is not an empty folder; restore into a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _totals(progress: Progress, refs: list[DocRef]) -> None:
    progress.total_objects = sum(len(r.chain) for r in refs)
    progress.total_bytes = sum(r.size for r in refs)


async def restore_export(
    ctx: SnapshotContext,
    bucket: Bucket,
    sel: Selected,
    dest: Path,
    progress: Progress,
    on_file: Callable[[str], None] | None = None,
) -> RestoreResult:
    """Write every file of the snapshot into ``dest`` (which must be empty or not exist)."""
    t0 = time.monotonic()
    m = sel.manifest
    dest = await asyncio.to_thread(_prepare_dest, dest)
    fetch = _Fetcher(ctx, bucket, m, progress)
    docs = {d.doc_id: d for d in m.docs}
    todo = [f for f in m.files if f.kind == "text"]
    _totals(progress, [docs[f.fid] for f in todo if f.fid in docs])
    progress.phase = "restoring"
    sem = asyncio.Semaphore(DOC_CONCURRENCY)
    written = 0

    async def one(f: FileRef) -> None:
        nonlocal written
        try:
            validate_relpath(f.path)
        except PathError as exc:
            raise IntegrityError("malformed", f"snapshot holds a refused path: {exc}") from None
        async with sem:
            ref = docs.get(f.fid)
            if ref is None:
                data = b""
            else:
                state = await fetch.state(ref, f.path)
                data = await asyncio.to_thread(_text_bytes, state)
            _check_content(f, data)
            mode = 0o755 if f.mode & 0o111 else 0o644
            await asyncio.to_thread(write_file_atomic, dest, f.path, data, mode)
            written += len(data)
            if on_file is not None:
                on_file(f.path)

    await asyncio.gather(*(one(f) for f in todo))
    progress.phase = "done"
    return RestoreResult(
        f"{m.seq}-{sel.loaded.entry.tag}",
        len(todo),
        written,
        round(time.monotonic() - t0, 3),
        sel.warnings,
    )


async def fetch_states(
    ctx: SnapshotContext, bucket: Bucket, sel: Selected, progress: Progress
) -> list[tuple[bytes, bytes]]:
    """Every document's verified full state (index last). Nothing is applied until all of them
    verified."""
    m = sel.manifest
    fetch = _Fetcher(ctx, bucket, m, progress)
    refs = m.all_docs()
    _totals(progress, refs)
    progress.phase = "downloading"
    sem = asyncio.Semaphore(DOC_CONCURRENCY)

    async def one(ref: DocRef) -> tuple[bytes, bytes]:
        async with sem:
            what = "the index" if ref.doc_id == INDEX_DOC_ID else f"document {ref.doc_id.hex()}"
            return ref.doc_id, await fetch.state(ref, what)

    states = list(await asyncio.gather(*(one(r) for r in m.docs)))
    states.append(await one(m.index))
    return states


def own_seq_floor(m: Manifest, sign_pk: bytes) -> int:
    """The sequence number a device restored under ``sign_pk`` must start above (0: unknown)."""
    seen = 0
    if m.signer == sign_pk:
        seen = m.sender_seq
    raw = m.windows.get(sign_pk)
    if raw is not None:
        # A window that does not decode only loses this hint; the manifest's own seq still counts.
        with contextlib.suppress(ProtocolError):
            seen = max(seen, ReplayWindow.from_bytes(raw).highest)
    return seen + SEQ_GAP if seen else 0


async def restore_into(
    ctx: SnapshotContext, bucket: Bucket, sel: Selected, sync: SpaceSync, progress: Progress
) -> RestoreResult:
    """Merge the snapshot into the space's own state and folder (see the module docstring)."""
    t0 = time.monotonic()
    m = sel.manifest
    states = await fetch_states(ctx, bucket, sel, progress)
    progress.phase = "applying"
    await sync.apply_snapshot(
        states,
        cursor=m.cursor,
        epoch_fence=m.epoch_fence,
        windows=m.windows,
        own_seq=own_seq_floor(m, ctx.identity.public.sign_pk),
    )
    progress.phase = "done"
    return RestoreResult(
        f"{m.seq}-{sel.loaded.entry.tag}",
        len(m.files),
        sum(f.size for f in m.files),
        round(time.monotonic() - t0, 3),
        sel.warnings,
    )


# -- one file ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    snapshot: str
    created_at: float
    size: int
    sha256: str
    changed: bool  # differs from the previous snapshot's version (or first appearance)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def history(
    ctx: SnapshotContext, bucket: Bucket, path: str
) -> tuple[list[Version], list[str]]:
    """Every retained snapshot's version of ``path``, oldest first, and problems met."""
    out: list[Version] = []
    problems: list[str] = []
    prev: bytes | None = None
    for e in await list_manifests(bucket):
        try:
            lm = await load_manifest(ctx, bucket, e)
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        f = lm.manifest.file_at(path)
        if f is None:
            prev = None
            continue
        out.append(Version(e.id, lm.manifest.created_at, f.size, f.sha256.hex(), f.sha256 != prev))
        prev = f.sha256
    return out, problems


async def file_content(
    ctx: SnapshotContext, bucket: Bucket, sel: Selected, path: str, progress: Progress
) -> tuple[FileRef, bytes]:
    m = sel.manifest
    f = m.file_at(path)
    if f is None:
        raise SnapshotError(f"{path} is not in snapshot {m.seq}-{sel.loaded.entry.tag}")
    ref = m.doc(f.fid)
    if ref is None:
        data = b""
    else:
        _totals(progress, [ref])
        state = await _Fetcher(ctx, bucket, m, progress).state(ref, path)
        data = await asyncio.to_thread(_text_bytes, state)
    _check_content(f, data)
    return f, data


def write_plain_file(target: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to an arbitrary path atomically (temp + fsync + rename)."""
    target = target.expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.qmoi-restore-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o755 if mode & 0o111 else 0o644)
    os.replace(tmp, target)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
