"""Taking snapshots of a space, reading the bucket's manifests back, and retention.

A snapshot is built like this (objects first, manifest last — an interrupted snapshot leaves at
most unreferenced objects, never a manifest that points at missing ones):

1. ``SpaceSync.snapshot_view`` gives, between two batches, the index state, the relay cursor it
   covers, the replay windows and every document id.
2. The manifest this snapshot builds on is the newest one in the bucket that verifies (same key
   epoch). For each document the stored bytes are read from ``state.db`` through a read-only
   connection (committed data only, never blocking the agent's writer) and hashed; a document
   whose bytes did not change since this device's last snapshot keeps its chain without being
   loaded. Otherwise it is loaded (worker thread) and its *logical* state (state vector + delete
   set) compared with the base's: unchanged → same chain; changed → the chain gets one delta
   (``get_update(base state vector)``), or is rebased on a full state when the chain is long or
   the deltas are large.
3. New objects are sealed (agent/snapshot_format.py) and uploaded with bounded concurrency.
   Objects named by the base manifest are trusted to exist; other names this device remembers
   uploading are checked with HEAD before being reused.
4. Binary files: the version the index chose for each (its chunk manifest) is recorded, and
   every chunk not yet in the bucket is uploaded under ``c/<chunk id>`` (sealed exactly as the
   relay holds it, see snapshot_format), read from a local file or else fetched from the relay.
   A chunk that cannot be had fails the snapshot before any manifest is written.
5. The manifest (file list, document chains, binary chunk lists, cursor, the previous
   manifest's seq and hash) is sealed, signed and uploaded last.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pycrdt import Doc, Snapshot

from qmoi_sync.agent.binary_sync import choose, manifest_heads
from qmoi_sync.agent.causal import decode_snapshot
from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.crashpoint import crashpoint
from qmoi_sync.agent.index import IndexDoc
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.layout import compute_layout
from qmoi_sync.agent.snapshot_format import (
    CHUNK_DIR,
    MANIFEST_DIR,
    OBJECT_DIR,
    BinRef,
    ChunkRef,
    DocRef,
    FileRef,
    IntegrityError,
    Manifest,
    ObjRef,
    SnapshotError,
    SnapshotKeys,
    chunk_key,
    manifest_hash,
    manifest_key,
    object_key,
    open_manifest,
    parse_manifest_key,
    seal_chunk,
    seal_manifest,
    seal_object,
)
from qmoi_sync.agent.snapshot_local import LocalRecords
from qmoi_sync.agent.snapshot_s3 import Bucket, TargetConfig
from qmoi_sync.agent.space import INDEX_DOC_ID, SpaceSync
from qmoi_sync.agent.textdoc import text_of
from qmoi_sync.protocol.chunks import ChunkKeys
from qmoi_sync.protocol.chunks import ChunkRef as PChunkRef
from qmoi_sync.protocol.chunks import Manifest as ChunkManifest
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import Role

log = logging.getLogger("qmoi_sync.snapshot")

#: Deltas per chain before a document is rebased on a full state.
MAX_CHAIN = 8
#: Documents processed at the same time (each holds its new objects until they are uploaded).
DOC_CONCURRENCY = 4
EMPTY_SHA256 = hashlib.sha256(b"").digest()


@dataclass
class Progress:
    """Shared between the worker and whoever renders it (CLI, control socket)."""

    op: str = "snapshot"
    phase: str = "starting"
    total_bytes: int = 0
    done_bytes: int = 0
    total_objects: int = 0
    done_objects: int = 0
    uploaded_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    error: str | None = None
    result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.started)
        return {
            "op": self.op,
            "phase": self.phase,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "total_objects": self.total_objects,
            "done_objects": self.done_objects,
            "uploaded_bytes": self.uploaded_bytes,
            "elapsed_s": round(elapsed, 3),
            "finished": self.finished,
            "error": self.error,
            "result": self.result,
        }


@dataclass
class SnapshotContext:
    """One space as the snapshot code sees it on this device."""

    space_id: str
    identity: DeviceIdentity
    keyring: Keyring
    target: TargetConfig
    local: LocalRecords
    db_path: Path | None = None  # state.db, read-only; None when only restoring

    @property
    def space_bytes(self) -> bytes:
        return bytes.fromhex(self.space_id)

    def keys_for(self, epoch: int) -> SnapshotKeys | None:
        ek = self.keyring.epoch_keys.get(epoch)
        return None if ek is None else SnapshotKeys.derive(ek.snapshot, self.space_bytes, epoch)

    def current_keys(self) -> SnapshotKeys:
        keys = self.keys_for(self.keyring.current_epoch)
        if keys is None:
            raise SnapshotError(f"this device holds no key for epoch {self.keyring.current_epoch}")
        return keys

    def check_signer(self, m: Manifest, label: str) -> None:
        """The signer must have been an admin or member device in the manifest's epoch."""
        role = self.keyring.sender_role(m.signer, m.epoch, 0)
        if role is None or role is Role.reader:
            raise IntegrityError(
                "unknown_signer",
                f"{label} is not signed by a device allowed to write this space"
                + (" (a read-only member)" if role is Role.reader else ""),
                label,
            )


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    seq: int
    tag: str
    size: int
    modified: float

    @property
    def id(self) -> str:
        return f"{self.seq}-{self.tag}"


@dataclass(frozen=True)
class LoadedManifest:
    entry: ManifestEntry
    manifest: Manifest
    hash: bytes


@dataclass(frozen=True)
class SnapshotResult:
    id: str
    seq: int
    key: str
    created_at: float
    uploaded_bytes: int
    uploaded_objects: int
    reused_objects: int
    total_bytes: int
    files: int
    cursor: int
    duration_s: float
    hash: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- reading the bucket ---------------------------------------------------------------------------
async def list_manifests(bucket: Bucket) -> list[ManifestEntry]:
    out = []
    for obj in await bucket.list(bucket.prefix + MANIFEST_DIR):
        parsed = parse_manifest_key(bucket.prefix, obj.key)
        if parsed is not None:
            out.append(ManifestEntry(obj.key, parsed[0], parsed[1], obj.size, obj.modified))
    out.sort(key=lambda e: (e.seq, e.tag))
    return out


async def load_manifest(ctx: SnapshotContext, bucket: Bucket, e: ManifestEntry) -> LoadedManifest:
    """Download and fully verify one manifest: signature, membership of the signer, AEAD, and
    that it is the manifest its name says (seq and signer tag)."""
    label = f"manifest {e.id}"
    body = await bucket.get(e.key)
    if body is None:
        raise IntegrityError("missing", f"{label} disappeared from the bucket", label)
    m = open_manifest(body, ctx.space_bytes, ctx.keys_for, label)
    ctx.check_signer(m, label)
    keys = ctx.keys_for(m.epoch)
    assert keys is not None  # open_manifest checked it
    if m.seq != e.seq or keys.signer_tag(m.signer) != e.tag:
        raise IntegrityError(
            "swapped",
            f"{label} holds snapshot {m.seq}-{keys.signer_tag(m.signer)}: a manifest was "
            "replaced by another one (swapped or rolled back)",
            label,
        )
    return LoadedManifest(e, m, manifest_hash(body))


async def latest_manifest(
    ctx: SnapshotContext, bucket: Bucket, entries: list[ManifestEntry]
) -> LoadedManifest | None:
    """The newest manifest that verifies (for building on); broken ones are skipped with a
    warning here — restore is where they are reported as errors."""
    for e in reversed(entries):
        try:
            return await load_manifest(ctx, bucket, e)
        except IntegrityError as exc:
            log.warning("snapshot base: skipping %s: %s", e.key, exc)
    return None


# -- documents ------------------------------------------------------------------------------------
def logical_digest(doc: Doc[Any]) -> bytes:
    """Replica-independent hash of a document's logical state (state vector + delete set)."""
    sv, ds = decode_snapshot(Snapshot.from_doc(doc).encode())
    h = hashlib.sha256(b"qmoi-sync doc state v1")
    for client in sorted(sv):
        h.update(b"%d:%d," % (client, sv[client]))
    h.update(b"|")
    for client in sorted(ds):
        h.update(b"%d:" % client)
        for start, length in ds[client]:
            h.update(b"%d+%d," % (start, length))
    return h.digest()


@dataclass
class _DocOut:
    ref: DocRef
    new: list[tuple[bytes, bytes]]  # (name, sealed object) not yet known to be in the bucket
    size: int | None = None  # text size / hash (text documents, when loaded)
    sha256: bytes | None = None


def _build_doc(
    doc_id: bytes,
    blobs: list[bytes],
    base: DocRef | None,
    keys: SnapshotKeys,
    text: bool,
) -> _DocOut:
    """Worker thread: load a document from its stored blobs and decide its chain."""
    doc: Doc[Any] = Doc()
    for b in blobs:
        doc.apply_update(b)
    digest = logical_digest(doc)
    size = sha = None
    if text:
        data = text_of(doc).encode("utf-8")
        size, sha = len(data), hashlib.sha256(data).digest()
    sv = doc.get_state()
    if base is not None and base.digest == digest:
        return _DocOut(DocRef(doc_id, base.sv, digest, base.chain), [], size, sha)
    pieces: list[bytes]
    chain: tuple[ObjRef, ...] = ()
    if base is not None and len(base.chain) <= MAX_CHAIN:
        delta = doc.get_update(base.sv)
        deltas = sum(o.size for o in base.chain[1:]) + len(delta)
        if deltas <= max(4096, base.chain[0].size // 2):
            chain, pieces = base.chain, [delta]
        else:
            pieces = [doc.get_update()]
    else:
        pieces = [doc.get_update()]
    new = []
    for p in pieces:
        name, body = seal_object(keys, p)
        chain = (*chain, ObjRef(name, len(p)))
        new.append((name, body))
    return _DocOut(DocRef(doc_id, sv, digest, chain), new, size, sha)


class _DocReader:
    """Read-only access to the agent's state.db: committed data only, never a writer lock."""

    def __init__(self, db_path: Path, space_id: str) -> None:
        self.space_id = space_id
        self._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def sizes(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        q1 = "SELECT doc_id, length(state) FROM docs WHERE space_id=?"
        q2 = "SELECT doc_id, SUM(length(data)) FROM doc_updates WHERE space_id=? GROUP BY doc_id"
        for q in (q1, q2):
            for d, n in self._db.execute(q, (self.space_id,)):
                out[bytes(d)] = out.get(bytes(d), 0) + int(n or 0)
        return out

    def blobs(self, doc_id: bytes) -> tuple[list[bytes], bytes]:
        """(state then updates, hash of them all)."""
        out: list[bytes] = []
        h = hashlib.blake2b(digest_size=32)
        with self._lock:
            out = self._read(doc_id)
        for b in out:
            h.update(len(b).to_bytes(8, "big"))
            h.update(b)
        return out, h.digest()

    def _read(self, doc_id: bytes) -> list[bytes]:
        out: list[bytes] = []
        for (state,) in self._db.execute(
            "SELECT state FROM docs WHERE space_id=? AND doc_id=?", (self.space_id, doc_id)
        ):
            out.append(bytes(state))
        for (data,) in self._db.execute(
            "SELECT data FROM doc_updates WHERE space_id=? AND doc_id=? ORDER BY id",
            (self.space_id, doc_id),
        ):
            out.append(bytes(data))
        return out


# -- binary files ---------------------------------------------------------------------------------
def binary_versions(index: IndexDoc, layout_paths: dict[str, str]) -> dict[bytes, ChunkManifest]:
    """fid -> the chunk manifest of the version the index chose, for every binary file laid
    out. A binary entry with no manifest yet (its first version is still uploading) is not
    part of the space's content yet, so it is not part of the snapshot either."""
    out: dict[bytes, ChunkManifest] = {}
    for fid_hex in layout_paths.values():
        heads = manifest_heads(index.fields(fid_hex))
        if heads:
            out[bytes.fromhex(fid_hex)] = choose(heads)[0].manifest
    return out


async def _sealed_chunk(sync: SpaceSync, keys: ChunkKeys, ref: ChunkRef, path: str) -> bytes:
    """The bucket object of one chunk. Its plaintext comes from a local file that still holds
    it (``chunk_index``, re-verified) or else from the relay's blob channel (authenticated, id
    recomputed) — the binary component's own fetch; sealing is deterministic, so the object is
    the same whichever device writes it. A chunk found nowhere fails the snapshot: a manifest
    is never written for a file it could not restore."""
    from qmoi_sync.agent.binary_sync import TamperedChunk
    from qmoi_sync.agent.blob_transfer import BlobError

    binary = sync.binary
    if binary is None:
        raise SnapshotError(f"{path}: binary files are not handled by this agent")
    try:
        plain = await binary._fetch(keys, PChunkRef(ref.chunk_id, ref.size))
    except (BlobError, TamperedChunk) as exc:
        raise SnapshotError(
            f"snapshot not written: a chunk of {path} is neither in a local file (changed or "
            f"not downloaded yet) nor available from the relay ({exc}); retried at the next "
            "interval"
        ) from None
    return await asyncio.to_thread(lambda: seal_chunk(keys.encrypt(ref.chunk_id, plain)))


async def _store_binaries(
    sync: SpaceSync,
    bucket: Bucket,
    versions: dict[bytes, ChunkManifest],
    path_of: dict[str, str],
    trusted: set[bytes],
    known: set[bytes],
    uploaded: set[bytes],
    stats: dict[str, int],
    progress: Progress,
) -> list[BinRef]:
    """Make sure every chunk of every binary file is in the bucket (each distinct chunk once,
    ``bucket.concurrency`` at a time, one chunk in memory per worker) and return the files'
    chunk lists for the manifest."""
    bins: list[BinRef] = []
    todo: dict[bytes, tuple[ChunkKeys, ChunkRef, str]] = {}
    keys_of: dict[int, ChunkKeys] = {}
    for fid, cm in sorted(versions.items()):
        path = path_of[fid.hex()]
        ek = sync.keyring.epoch_keys.get(cm.epoch)
        if ek is None:
            raise SnapshotError(f"{path}: this device holds no key for chunk epoch {cm.epoch}")
        ckeys = keys_of.setdefault(cm.epoch, ChunkKeys.for_epoch(cm.epoch, ek))
        if not cm.verify(ckeys):
            # No device can materialize this version either (binary_sync refuses it too).
            log.warning("snapshot: %s left out: its chunk manifest does not verify", path)
            continue
        refs = tuple(ChunkRef(c.id, c.size) for c in cm.chunks)
        bins.append(BinRef(fid, cm.epoch, cm.hash, refs))
        for r in refs:
            if r.chunk_id not in trusted and r.chunk_id not in uploaded:
                todo.setdefault(r.chunk_id, (ckeys, r, path))
    progress.total_bytes += sum(r.size for _k, r, _p in todo.values())
    progress.total_objects += len(todo)
    sem = asyncio.Semaphore(bucket.concurrency)

    async def one(ckeys: ChunkKeys, ref: ChunkRef, path: str) -> None:
        key = chunk_key(bucket.prefix, ref.chunk_id)
        async with sem:
            if ref.chunk_id in known and await bucket.head(key) is not None:
                stats["reused"] += 1
            else:
                body = await _sealed_chunk(sync, ckeys, ref, path)
                await bucket.put(key, body)
                crashpoint("snapshot.object")
                stats["up_bytes"] += len(body)
                stats["up_objects"] += 1
                progress.uploaded_bytes += len(body)
            uploaded.add(ref.chunk_id)
            progress.done_bytes += ref.size
            progress.done_objects += 1

    async with asyncio.TaskGroup() as tg:
        for ckeys, ref, path in todo.values():
            tg.create_task(one(ckeys, ref, path))
    stats["reused"] += sum(len(b.chunks) for b in bins) - len(todo)
    return bins


# -- taking a snapshot --------------------------------------------------------------------------
async def take_snapshot(
    ctx: SnapshotContext,
    sync: SpaceSync,
    bucket: Bucket,
    progress: Progress | None = None,
    interval: int | None = None,
    min_seq: int = 0,
    clock: Callable[[], float] = time.time,
) -> SnapshotResult:
    """Snapshot the space into the bucket; see the module docstring for the steps."""
    progress = progress or Progress()
    t0 = time.monotonic()
    if ctx.db_path is None:
        raise SnapshotError("no database to snapshot from")
    keys = ctx.current_keys()
    target = ctx.target.key
    progress.phase = "checking bucket"
    await bucket.check()
    entries = await list_manifests(bucket)
    base = await latest_manifest(ctx, bucket, entries)
    base_docs: dict[bytes, DocRef] = {}
    base_files: dict[bytes, FileRef] = {}
    trusted: set[bytes] = set()
    # Chunks a verified manifest references exist (retention never deletes those).
    trusted_chunks = set(base.manifest.chunk_sizes()) if base is not None else set()
    if base is not None and base.manifest.epoch == keys.epoch:
        base_docs = {d.doc_id: d for d in base.manifest.all_docs()}
        base_files = {f.fid: f for f in base.manifest.files}
        trusted = base.manifest.object_names()
    if base is not None:
        await ctx.local.saw(ctx.space_id, target, base.entry.seq, base.hash, base.entry.key)
    known = await ctx.local.known(target)
    raw_prev = await ctx.local.doc_raw(ctx.space_id, target)
    base_key = base.entry.key if base is not None else ""

    view = await sync.snapshot_view()
    index = IndexDoc()
    index.apply_update(view.index_state)
    entries_now = index.entries()
    layout = compute_layout(entries_now)
    alive_text = {
        bytes.fromhex(fid) for path, fid in layout.paths.items() if entries_now[fid].kind == "text"
    }
    binary_paths = {p: f for p, f in layout.paths.items() if entries_now[f].kind == "binary"}
    versions = binary_versions(index, binary_paths)
    path_of = {f: p for p, f in binary_paths.items()}

    reader = _DocReader(ctx.db_path, ctx.space_id)
    uploaded_names: set[bytes] = set()
    stats = {"up_bytes": 0, "up_objects": 0, "reused": 0}
    up_sem = asyncio.Semaphore(bucket.concurrency)

    async def ensure(name: bytes, body: bytes) -> None:
        if name in uploaded_names or name in trusted:
            stats["reused"] += 1
            return
        key = object_key(bucket.prefix, name)
        if name in known:
            async with up_sem:
                if await bucket.head(key) is not None:
                    stats["reused"] += 1
                    uploaded_names.add(name)
                    return
        async with up_sem:
            await bucket.put(key, body)
        crashpoint("snapshot.object")
        uploaded_names.add(name)
        stats["up_bytes"] += len(body)
        stats["up_objects"] += 1
        progress.uploaded_bytes += len(body)
        progress.done_objects += 1

    docs_out: dict[bytes, _DocOut] = {}
    raw_now: dict[bytes, bytes] = {}
    try:
        sizes = await asyncio.to_thread(reader.sizes)
        doc_ids = [d for d in view.doc_ids if d != INDEX_DOC_ID]
        progress.phase = "uploading"
        progress.total_bytes = sum(sizes.get(d, 0) for d in doc_ids) + len(view.index_state)
        progress.total_objects = len(doc_ids) + 1
        sem = asyncio.Semaphore(DOC_CONCURRENCY)

        async def one(doc_id: bytes) -> None:
            async with sem:
                blobs, raw = await asyncio.to_thread(reader.blobs, doc_id)
                raw_now[doc_id] = raw
                prev = base_docs.get(doc_id)
                need_info = doc_id in alive_text and doc_id not in base_files
                if prev is not None and not need_info and raw_prev.get(doc_id) == (raw, base_key):
                    docs_out[doc_id] = _DocOut(prev, [])
                else:
                    out = await asyncio.to_thread(_build_doc, doc_id, blobs, prev, keys, True)
                    del blobs
                    await asyncio.gather(*(ensure(n, b) for n, b in out.new))
                    out.new = []
                    docs_out[doc_id] = out
                progress.done_bytes += sizes.get(doc_id, 0)

        await asyncio.gather(*(one(d) for d in doc_ids))
        # The index last, from the view (the documents above are at least as new as it).
        idx = await asyncio.to_thread(
            _build_doc, INDEX_DOC_ID, [view.index_state], base_docs.get(INDEX_DOC_ID), keys, False
        )
        await asyncio.gather(*(ensure(n, b) for n, b in idx.new))
        progress.done_bytes += len(view.index_state)

        bins = await _store_binaries(
            sync, bucket, versions, path_of, trusted_chunks, known, uploaded_names, stats, progress
        )
    finally:
        reader.close()

    files: list[FileRef] = []
    bin_by_fid = {b.fid: b for b in bins}
    for path, fid_hex in sorted(layout.paths.items()):
        entry = entries_now[fid_hex]
        fid = bytes.fromhex(fid_hex)
        if entry.kind == "binary":
            b = bin_by_fid.get(fid)
            if b is not None:
                files.append(FileRef(path, fid, entry.kind, entry.mode, b.size, b.hash))
            continue
        if entry.kind == "dir":
            # Folders are part of the tree (empty ones too): restore makes them.
            files.append(FileRef(path, fid, "dir", entry.mode, 0, EMPTY_SHA256))
            continue
        if entry.kind != "text":
            continue
        out = docs_out.get(fid)
        if out is not None and out.sha256 is not None and out.size is not None:
            size, sha = out.size, out.sha256
        elif fid in base_files:
            size, sha = base_files[fid].size, base_files[fid].sha256
        else:
            size, sha = 0, EMPTY_SHA256
        files.append(FileRef(path, fid, entry.kind, entry.mode, size, sha))

    progress.phase = "writing manifest"
    last = await ctx.local.last_seen(ctx.space_id, target)
    seq = (
        max(
            min_seq,
            (base.entry.seq if base is not None else 0),
            (entries[-1].seq if entries else 0),
            (last[0] if last else 0),
        )
        + 1
    )
    now = clock()
    manifest = Manifest(
        space_id=ctx.space_bytes,
        epoch=keys.epoch,
        signer=ctx.identity.public.sign_pk,
        seq=seq,
        created_ms=int(now * 1000),
        index=idx.ref,
        docs=[docs_out[d].ref for d in sorted(docs_out)],
        files=files,
        bins=bins,
        prev_seq=base.entry.seq if base is not None else None,
        prev_hash=base.hash if base is not None else None,
        cursor=view.cursor,
        epoch_fence=view.epoch_fence,
        interval=interval,
        windows=view.windows,
        sender_seq=view.seq,
    )
    body = seal_manifest(ctx.identity, keys, manifest)
    mkey = manifest_key(bucket.prefix, seq, keys.signer_tag(ctx.identity.public.sign_pk))
    crashpoint("snapshot.manifest")
    await bucket.put(mkey, body)
    crashpoint("snapshot.manifest_stored")
    digest = manifest_hash(body)
    await ctx.local.add_known(target, uploaded_names | manifest.object_names())
    await ctx.local.set_doc_raw(ctx.space_id, target, raw_now, mkey)
    await ctx.local.saw(ctx.space_id, target, seq, digest, mkey)
    total = manifest.total_bytes()
    result = SnapshotResult(
        id=f"{seq}-{keys.signer_tag(ctx.identity.public.sign_pk)}",
        seq=seq,
        key=mkey,
        created_at=now,
        uploaded_bytes=stats["up_bytes"] + len(body),
        uploaded_objects=stats["up_objects"] + 1,
        reused_objects=stats["reused"],
        total_bytes=total,
        files=sum(1 for f in files if f.kind != "dir"),
        cursor=view.cursor,
        duration_s=round(time.monotonic() - t0, 3),
        hash=digest.hex(),
    )
    progress.phase = "done"
    progress.result = result.to_json()
    log.info(
        "snapshot %s of space %s: %d file(s), %d object(s) / %d bytes uploaded, %d reused",
        result.id,
        ctx.space_id[:8],
        result.files,
        result.uploaded_objects,
        result.uploaded_bytes,
        result.reused_objects,
    )
    return result


# -- retention ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetentionResult:
    kept: int
    deleted_manifests: int
    deleted_objects: int
    note: str | None = None


def choose_kept(
    entries: list[tuple[ManifestEntry, float]], keep_last: int, keep_daily: int, now: float
) -> set[str]:
    """Keys of the manifests to keep: the ``keep_last`` newest, plus the newest of each of the
    last ``keep_daily`` days (UTC) that has one. ``entries``: (entry, created_at)."""
    ordered = sorted(entries, key=lambda x: (x[0].seq, x[1], x[0].tag))
    keep = {e.key for e, _ in ordered[-keep_last:]} if keep_last > 0 else set()
    if keep_daily > 0:
        today = datetime.fromtimestamp(now, UTC).date()
        newest_of_day: dict[Any, str] = {}
        for e, created in ordered:
            day = datetime.fromtimestamp(created, UTC).date()
            if (today - day).days < keep_daily:
                newest_of_day[day] = e.key
        keep.update(newest_of_day.values())
    return keep


async def apply_retention(
    ctx: SnapshotContext,
    bucket: Bucket,
    keep_last: int,
    keep_daily: int,
    gc_grace_s: float,
    now: float | None = None,
) -> RetentionResult:
    """Delete manifests beyond the policy, then every object no kept manifest references and
    older than ``gc_grace_s`` (an object that young may belong to a snapshot still uploading
    on another device: objects are written before their manifest). Nothing is deleted while
    any manifest cannot be read (its references are unknown)."""
    now = wall() if now is None else now
    entries = await list_manifests(bucket)
    loaded: list[LoadedManifest] = []
    unreadable = 0
    for e in entries:
        try:
            loaded.append(await load_manifest(ctx, bucket, e))
        except IntegrityError as exc:
            unreadable += 1
            log.warning("retention: %s", exc)
    if unreadable:
        return RetentionResult(
            len(entries), 0, 0, f"{unreadable} manifest(s) cannot be verified; nothing deleted"
        )
    keep = choose_kept(
        [(x.entry, x.manifest.created_at) for x in loaded], keep_last, keep_daily, now
    )
    doomed = [x.entry.key for x in loaded if x.entry.key not in keep]
    if doomed:
        await bucket.delete(doomed)
    reachable: set[str] = set()
    for x in loaded:
        if x.entry.key in keep:
            reachable.update(object_key(bucket.prefix, n) for n in x.manifest.object_names())
            reachable.update(chunk_key(bucket.prefix, c) for c in x.manifest.chunk_sizes())
    garbage: list[str] = []
    for d in (OBJECT_DIR, CHUNK_DIR):
        for obj in await bucket.list(bucket.prefix + d):
            if obj.key not in reachable and obj.modified <= now - gc_grace_s:
                garbage.append(obj.key)
    if garbage:
        await bucket.delete(garbage)
        names = []
        for k in garbage:
            tail = k.rsplit("/", 1)[-1]
            try:
                names.append(bytes.fromhex(tail))
            except ValueError:
                continue
        await ctx.local.forget_known(ctx.target.key, names)
    return RetentionResult(len(keep), len(doomed), len(garbage))
