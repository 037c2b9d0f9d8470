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
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pycrdt import Doc

from qmoi_sync.agent.chunker import (
    DOWNLOAD_PREFIX,
    TempFile,
    discard_download,
    install_download,
    open_download,
    write_all,
)
from qmoi_sync.agent.materialize import (
    TEMP_PREFIX,
    UnsafePathError,
    _open_parent,
    make_dir,
    write_file_atomic,
)
from qmoi_sync.agent.snapshot_format import (
    BinRef,
    ChunkRef,
    DocRef,
    FileRef,
    IntegrityError,
    Manifest,
    SnapshotError,
    SnapshotKeys,
    chunk_key,
    object_key,
    open_chunk,
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
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.agent.textdoc import text_of
from qmoi_sync.protocol.chunks import ChunkKeys
from qmoi_sync.protocol.chunks import ChunkRef as PChunkRef
from qmoi_sync.protocol.chunks import Manifest as ChunkManifest
from qmoi_sync.protocol.errors import PathError, ProtocolError
from qmoi_sync.protocol.paths import validate_relpath
from qmoi_sync.protocol.replay import ReplayWindow

log = logging.getLogger("qmoi_sync.restore")

#: Files restored at the same time (each holds one document's state and text, or a window
#: of chunks).
DOC_CONCURRENCY = 12
#: Chunks of one binary file fetched ahead of the one being written.
CHUNK_WINDOW = 8
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
        self.keyring = ctx.keyring
        self._chunk_keys: dict[int, ChunkKeys] = {}
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

    def chunk_keys(self, b: BinRef, what: str) -> ChunkKeys:
        """The chunk keys of a binary file's epoch, after checking that its whole-file hash
        binds the chunk list the manifest gives."""
        ck = self._chunk_keys.get(b.epoch)
        if ck is None:
            ek = self.keyring.epoch_keys.get(b.epoch)
            if ek is None:
                raise IntegrityError("unknown_epoch", f"{what}: no key for chunk epoch {b.epoch}")
            ck = self._chunk_keys[b.epoch] = ChunkKeys.for_epoch(b.epoch, ek)
        cm = ChunkManifest(
            b.epoch, b.size, b.hash, tuple(PChunkRef(c.chunk_id, c.size) for c in b.chunks)
        )
        if not cm.verify(ck):
            raise IntegrityError(
                "tampered", f"{what}: its chunk list does not match its whole-file hash", what
            )
        return ck

    async def chunk(self, ck: ChunkKeys, ref: ChunkRef, what: str) -> bytes:
        """One chunk of a binary file, verified (see ``snapshot_format.open_chunk``)."""
        key = chunk_key(self.bucket.prefix, ref.chunk_id)
        async with self.sem:
            body = await self.bucket.get(key)
        if body is None:
            raise IntegrityError(
                "missing",
                f"chunk {ref.chunk_id.hex()[:16]}… of {what} is missing from the bucket",
                key,
            )
        plain = await asyncio.to_thread(open_chunk, ck, ref, body, f"{key} ({what})")
        self.progress.done_objects += 1
        self.progress.done_bytes += len(plain)
        return plain

    async def write_binary(self, b: BinRef, fd: int, what: str) -> int:
        """Write a binary file's chunks in order to ``fd``: fetched and verified ahead in a
        bounded window, so at most that many chunks are in memory, never the whole file."""
        ck = self.chunk_keys(b, what)
        ahead: deque[asyncio.Task[bytes]] = deque()
        nxt = 0
        written = 0
        try:
            for _ in b.chunks:
                while nxt < len(b.chunks) and len(ahead) < CHUNK_WINDOW:
                    ahead.append(asyncio.create_task(self.chunk(ck, b.chunks[nxt], what)))
                    nxt += 1
                data = await ahead.popleft()
                await asyncio.to_thread(write_all, fd, data)
                written += len(data)
        finally:
            await cancel_and_wait(*ahead)
        return written

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


def _binref_of(m: Manifest, f: FileRef) -> BinRef:
    b = m.bin(f.fid)
    if b is None or b.size != f.size or b.hash != f.sha256:
        raise IntegrityError(
            "malformed", f"{f.path}: the snapshot lists it without a matching chunk list", f.path
        )
    return b


def _open_restore_temp(root: Path, relpath: str) -> TempFile:
    """A new temp file in ``relpath``'s folder under ``root`` (folders created, no symlink
    followed; the temp prefix keeps the agent's watcher away from it)."""
    with _open_parent(root, relpath, create=True) as (dfd, _name):
        own = os.dup(dfd)
    name = f"{TEMP_PREFIX}rs-{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=own)
    except BaseException:
        os.close(own)
        raise
    return TempFile(own, name, fd)


async def _write_binary_file(
    fetch: _Fetcher, m: Manifest, f: FileRef, root: Path, relpath: str
) -> int:
    """Stream a binary file into a temp file, verified chunk by chunk, then fsync it once and
    rename it over ``relpath``. On any error the temp file is removed: a file that does not
    verify is never put in place."""
    b = _binref_of(m, f)
    opening = asyncio.ensure_future(asyncio.to_thread(_open_restore_temp, root, relpath))
    try:
        tmp = await asyncio.shield(opening)
    except asyncio.CancelledError:
        # Cancelled while the worker thread was creating the file: remove it once it exists.
        with contextlib.suppress(BaseException):
            discard_download(await opening)
        raise
    mode = 0o755 if f.mode & 0o111 else 0o644
    try:
        n = await fetch.write_binary(b, tmp.fd, f.path)
        await asyncio.to_thread(install_download, tmp, relpath, mode)
    except BaseException:
        discard_download(tmp)  # an unlink: done here, so a second cancellation cannot skip it
        raise
    tmp.close()
    return n


async def _all_or_cancel(coros: list[Any]) -> None:
    """Run ``coros`` concurrently; on the first error, cancel the others and wait until they
    have cleaned up (temp files removed) before raising it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _check_and_write(f: FileRef, dest: Path, data: bytes, mode: int) -> None:
    """Worker thread: verify the content (hashing is CPU, off the event loop), then write."""
    _check_content(f, data)
    write_file_atomic(dest, f.path, data, mode)


def _prepare_dest(dest: Path) -> Path:
    dest = dest.expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SnapshotError(f"{dest} is not an empty folder; restore into a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _totals(progress: Progress, refs: list[DocRef], bins: list[BinRef] | None = None) -> None:
    progress.total_objects = sum(len(r.chain) for r in refs)
    progress.total_bytes = sum(r.size for r in refs)
    for b in bins or ():
        progress.total_objects += len(b.chunks)
        progress.total_bytes += b.size


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
    todo = [f for f in m.files if f.kind in ("text", "binary")]
    _totals(progress, [docs[f.fid] for f in todo if f.fid in docs], m.bins)
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
            if f.kind == "binary":
                n = await _write_binary_file(fetch, m, f, dest, f.path)
                written += n
                if on_file is not None:
                    on_file(f.path)
                return
            ref = docs.get(f.fid)
            if ref is None:
                data = b""
            else:
                state = await fetch.state(ref, f.path)
                data = await asyncio.to_thread(_text_bytes, state)
            mode = 0o755 if f.mode & 0o111 else 0o644
            await asyncio.to_thread(_check_and_write, f, dest, data, mode)
            written += len(data)
            if on_file is not None:
                on_file(f.path)

    await _all_or_cancel([one(f) for f in todo])
    # The documents no file needed (the index, settings, deleted files' histories) are checked
    # too: a restore that reports success has verified every object the manifest lists.
    used = {f.fid for f in todo}

    async def check(ref: DocRef) -> None:
        async with sem:
            await fetch.state(ref, f"document {ref.doc_id.hex()[:8]}")

    await _all_or_cancel([check(d) for d in m.docs if d.doc_id not in used])
    for folder in m.folders():
        try:
            validate_relpath(folder)
        except PathError as exc:
            raise IntegrityError("malformed", f"snapshot holds a refused path: {exc}") from None
        await asyncio.to_thread(make_dir, dest, folder)
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
    """Merge the snapshot into the space's own state and folder (see the module docstring).

    Binary files, when this runs without a running agent (``sync.binary`` is None: the CLI,
    possibly with the relay down), are first downloaded from the bucket and verified into the
    very temp files a binary download resumes from (``.qmoi-tmp-dl-<fid>``); once the index is
    merged, the binary component's normal download finds them complete and installs and
    records them without the relay. A running agent's binary component fetches them from the
    relay instead (staging would race its own download of the same file)."""
    t0 = time.monotonic()
    m = sel.manifest
    states = await fetch_states(ctx, bucket, sel, progress)
    staged: dict[bytes, str] = {}
    binary = None
    if sync.binary is None and m.bins:
        staged = await _stage_binaries(ctx, bucket, sel, sync, progress)
        from qmoi_sync.agent.binary_sync import BinarySync
        from qmoi_sync.agent.chunk_store import ChunkStore

        binary = BinarySync(sync, ChunkStore(sync.store, sync.space_id), None)
        await binary.start()
        sync.binary = binary
    progress.phase = "applying"
    try:
        await sync.apply_snapshot(
            states,
            cursor=m.cursor,
            epoch_fence=m.epoch_fence,
            windows=m.windows,
            own_seq=own_seq_floor(m, ctx.identity.public.sign_pk),
        )
        if binary is not None:
            await _install_staged(binary, staged, sel.warnings)
    finally:
        if binary is not None:
            sync.binary = None
    progress.phase = "done"
    return RestoreResult(
        f"{m.seq}-{sel.loaded.entry.tag}",
        sum(1 for f in m.files if f.kind != "dir"),
        sum(f.size for f in m.files),
        round(time.monotonic() - t0, 3),
        sel.warnings,
    )


async def _stage_binaries(
    ctx: SnapshotContext, bucket: Bucket, sel: Selected, sync: SpaceSync, progress: Progress
) -> dict[bytes, str]:
    """Download every binary file into its download temp file (fid -> path staged)."""
    m = sel.manifest
    fetch = _Fetcher(ctx, bucket, m, progress)
    todo = [f for f in m.files if f.kind == "binary"]
    bins = [_binref_of(m, f) for f in todo]
    progress.total_objects += sum(len(b.chunks) for b in bins)
    progress.total_bytes += sum(b.size for b in bins)
    sem = asyncio.Semaphore(DOC_CONCURRENCY)
    staged: dict[bytes, str] = {}

    async def one(f: FileRef) -> None:
        try:
            validate_relpath(f.path)
        except PathError as exc:
            raise IntegrityError("malformed", f"snapshot holds a refused path: {exc}") from None
        async with sem:
            tmp = await asyncio.to_thread(open_download, sync.root, f.path, f.fid.hex())
            try:
                await asyncio.to_thread(os.ftruncate, tmp.fd, 0)
                await fetch.write_binary(_binref_of(m, f), tmp.fd, f.path)
            except BaseException:
                discard_download(tmp)
                raise
            tmp.close()
            staged[f.fid] = f.path

    await _all_or_cancel([one(f) for f in todo])
    return staged


async def _install_staged(binary: Any, staged: dict[bytes, str], warnings: list[str]) -> None:
    """Let the binary component install what was staged (it re-verifies every chunk and the
    whole-file hash, renames the file into place and records it). A staged file the merged
    index does not want there (this device already had that version, or a newer one) is
    removed; one that could not be installed stays for the agent to finish."""
    for fid, path in staged.items():
        job = binary.down.get(fid)
        if job is not None and job.path == path:
            await binary._do_down(job)
            if fid in binary.down:
                warnings.append(
                    f"{path}: restored from the snapshot but not installed (the version this "
                    "device holds differs, or the file changed); the agent finishes it"
                )
            continue
        await asyncio.to_thread(_remove_staged, binary.sync.root, path, fid)


def _remove_staged(root: Path, path: str, fid: bytes) -> None:
    with (
        contextlib.suppress(OSError, UnsafePathError),
        _open_parent(root, path, False) as (
            dfd,
            _name,
        ),
    ):
        os.unlink(f"{DOWNLOAD_PREFIX}{fid.hex()}", dir_fd=dfd)


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
    ctx: SnapshotContext, bucket: Bucket, sel: Selected, f: FileRef, progress: Progress
) -> bytes:
    """A text file's verified content as of the snapshot."""
    m = sel.manifest
    ref = m.doc(f.fid)
    if ref is None:
        data = b""
    else:
        _totals(progress, [ref])
        state = await _Fetcher(ctx, bucket, m, progress).state(ref, f.path)
        data = await asyncio.to_thread(_text_bytes, state)
    _check_content(f, data)
    return data


async def restore_file(
    ctx: SnapshotContext,
    bucket: Bucket,
    sel: Selected,
    path: str,
    root: Path,
    relpath: str,
    progress: Progress,
) -> tuple[FileRef, int]:
    """Write the snapshot's version of ``path`` to ``root/relpath`` (atomically, verified
    first; binary files streamed chunk by chunk). Returns the file's record and its size."""
    m = sel.manifest
    f = m.file_at(path)
    if f is None:
        raise SnapshotError(f"{path} is not in snapshot {m.seq}-{sel.loaded.entry.tag}")
    mode = 0o755 if f.mode & 0o111 else 0o644
    if f.kind == "binary":
        fetch = _Fetcher(ctx, bucket, m, progress)
        _totals(progress, [], [_binref_of(m, f)])
        return f, await _write_binary_file(fetch, m, f, root, relpath)
    data = await file_content(ctx, bucket, sel, f, progress)
    await asyncio.to_thread(write_file_atomic, root, relpath, data, mode)
    return f, len(data)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
