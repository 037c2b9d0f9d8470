"""Binary and large files of one space: ingest, upload, download, materialize, conflicts.

`SpaceSync` stays the single owner of the index. This component does the heavy work *outside*
its lock — reading, cutting, hashing, encrypting and uploading chunks; downloading, verifying and
writing them to a temp file — and takes the lock only for the short steps that read or change
shared state: publishing a manifest, installing a finished download, resolving conflicts.

Order of an upload (design brief §4; docs/architecture.md "Binary files"):

1. the file must be quiet: not modified for ``MIN_QUIET_S`` before a pass starts;
2. one pass reads it chunk by chunk (never whole), computes the ids, and uploads every chunk the
   relay has not acknowledged yet (``chunk_acked``), at most ``UPLOAD_WINDOW_BYTES`` in flight;
3. *stable-read rule*: the file must show the same size/mtime/inode before and after the pass,
   and must have been left alone for ``STABLE_WINDOW_S`` (longer if it kept changing), else the
   pass is repeated (already-uploaded chunks are skipped);
4. only then, under the owner's lock, the manifest is written into the index and sealed: a
   receiver never learns of a manifest whose chunks the relay does not hold.

A download fetches what is missing (chunks found in local files are read from them and
re-verified), verifies every chunk (AEAD + recomputed keyed id) and the manifest's whole-file
hash, writes a temp file next to the target, fsyncs it and renames it into place under the lock
— unless the file on disk changed meanwhile (then that change is ingested as a version of its
own and nothing is overwritten). A refused (tampered/corrupt) chunk is counted, logged and
fetched again later; the file is not materialized until a good copy arrives.

Versions: each device writes its manifest under ``<fid>/m:<dev>`` with a version vector (the
version its disk bytes came from, plus its own new edit counter). Manifests that no other
manifest has seen are the *heads*. Several heads with different content are concurrent edits:
the latest write (by its timestamp, then device) keeps the file, each other version is split off
into a conflict entry. The split is a deterministic function of the converged index (same fid,
same values, written by whichever device notices first — identical concurrent writes converge),
so every device ends with the same layout and exactly one conflict copy per concurrent pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qmoi_sync.agent.blob_transfer import BlobError, BlobLink, BlobQuotaExceeded, BlobUnavailable
from qmoi_sync.agent.chunk_sources import RelayChunks, RemoteChunks
from qmoi_sync.agent.chunk_store import ChunkStore
from qmoi_sync.agent.chunker import (
    ChunkProducer,
    Identified,
    TempFile,
    discard_download,
    open_download,
    open_regular,
    pwrite_in_thread,
    read_range,
    verified_prefix,
)
from qmoi_sync.agent.crashpoint import crashpoint
from qmoi_sync.agent.index import FileEntry, creation_fields, derive_file_id
from qmoi_sync.agent.layout import compute_layout, strip_conflict_marker
from qmoi_sync.agent.materialize import DiskStat, UnsafePathError, delete_file, stat_file
from qmoi_sync.agent.peer_chunks import LanChunks
from qmoi_sync.agent.prefetch import HINT_MIN_FILE_BYTES, HintSender, Prefetcher
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol.chunks import ChunkKeys, ChunkRef, Manifest
from qmoi_sync.protocol.errors import DecryptError, ProtocolError
from qmoi_sync.protocol.hints import HintEntry
from qmoi_sync.protocol.paths import conflict_name

if TYPE_CHECKING:
    from qmoi_sync.agent.space import SpaceSync, _Batch

log = logging.getLogger("qmoi_sync.binary")

INDEX_DOC_ID = bytes(16)
#: A file must have been left alone this long (after its last change) before it is shipped.
STABLE_WINDOW_S = 0.25
#: ... and this long before a pass over it starts.
MIN_QUIET_S = 0.05
#: Encrypted chunk bytes uploaded and not yet acknowledged, per file.
UPLOAD_WINDOW_BYTES = 16 * 1024 * 1024
#: Chunks fetched (and written) at once.
DOWNLOAD_WINDOW = 12
RETRY_MIN_S = 0.5
RETRY_MAX_S = 8.0
#: Retry delay when the relay is unreachable (the blob link has its own reconnect backoff).
RETRY_OFFLINE_S = 1.0
#: How long an upload waits for the relay to connect before publishing for LAN peers only
#: (RELAY_RECHECK_S once the link's last attempt failed).
RELAY_PROBE_S = 3.0
RELAY_RECHECK_S = 0.5
_ACK_FLUSH = 8
#: A transfer deferred by the resource policy is tried again after this (or as soon as bulk
#: work is allowed again).
BULK_RECHECK_S = 5.0
#: Chunks the upload's producer thread reads and seals ahead of the socket.
_PRODUCER_DEPTH = 4
#: A file still being written (never quiet for MIN_QUIET_S) is uploaded as it grows once it is
#: this large, by *follow* passes that each read only what the previous one had not (chunk
#: boundaries depend only on the bytes since the previous boundary) and publish nothing; the
#: manifest still comes from a full pass once the file is quiet (the stable-read rule).
FOLLOW_MIN_BYTES = 16 * 1024 * 1024
#: ... each follow pass starting once this much was added since the last one.
FOLLOW_STEP_BYTES = 16 * 1024 * 1024


class TamperedChunk(Exception):
    pass


# -- versions (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    dev: str
    manifest: Manifest
    ts: float
    vv: Mapping[str, int]
    raw: Mapping[str, Any]


def manifest_heads(fields: Mapping[str, Any]) -> list[Head]:
    """The manifests of one fid that no other manifest has seen (split-off ones excluded),
    oldest first. Invalid manifests (a buggy or hostile peer) are ignored."""
    found: dict[str, Head] = {}
    for key, value in fields.items():
        if not key.startswith("m:") or not isinstance(value, dict):
            continue
        dev = key[2:]
        try:
            manifest = Manifest.from_json(value)
        except ProtocolError:
            continue
        raw_vv = value.get("vv")
        if not isinstance(raw_vv, dict):
            continue
        vv = {
            str(k): v for k, v in raw_vv.items() if isinstance(v, int) and not isinstance(v, bool)
        }
        own = vv.get(dev)
        if own is None:
            continue
        split = fields.get(f"x:{dev}")
        if isinstance(split, int) and split >= own:
            continue
        ts = value.get("ts")
        ts_f = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else 0.0
        found[dev] = Head(dev, manifest, ts_f, vv, value)
    heads = [
        h
        for h in found.values()
        if not any(o.dev != h.dev and o.vv.get(h.dev, 0) >= h.vv[h.dev] for o in found.values())
    ]
    return sorted(heads, key=lambda h: (h.ts, h.dev))


def choose(heads: list[Head]) -> tuple[Head, dict[bytes, list[Head]]]:
    """The winner (latest write, then highest device id) and the losing versions by content."""
    winner = max(heads, key=lambda h: (h.ts, h.dev))
    losers: dict[bytes, list[Head]] = {}
    for h in heads:
        if h.manifest.hash != winner.manifest.hash:
            losers.setdefault(h.manifest.hash, []).append(h)
    return winner, losers


def conflict_fid(key: bytes, fid: bytes, content_hash: bytes) -> bytes:
    h = hashlib.blake2b(key=key[:64], digest_size=16, person=b"qmoi-cfid-v1")
    h.update(fid)
    h.update(content_hash)
    return h.digest()


# -- jobs --------------------------------------------------------------------------------------


@dataclass
class UpJob:
    path: str
    size: int
    changed_at: float
    not_before: float = 0.0
    attempts: int = 0
    # Chunks the relay acknowledged during this job's earlier passes: a repeat pass (the file
    # changed while it was read) does not seal them again.
    acked: set[bytes] = field(default_factory=set)
    # Published for LAN peers while the relay was unreachable: only the relay's copy of the
    # chunks is still owed (the next pass uploads what it lacks and publishes nothing new).
    relay_owed: bool = False
    # Uploads a pass started and left running when it found the file changed under it (a file
    # still being written): the next pass re-reads the file meanwhile and waits for the ones
    # whose chunks it still has instead of sending them again.
    puts: dict[bytes, tuple[asyncio.Task[bool], int]] = field(default_factory=dict)
    bulk_deferred: bool = False  # set aside by the resource policy
    # Prefetch hints (agent/prefetch.py): this job's random transfer id, and the (offset, chunk
    # id) pairs already announced (a repeat pass announces only what is new).
    transfer: bytes = field(default_factory=lambda: os.urandom(16))
    hinted: set[tuple[int, bytes]] = field(default_factory=set)
    # Where a pass over a file still being written resumes (the start of the last chunk the
    # previous pass read: cut at what was then the end of the file).
    follow_offset: int = 0
    followed: bool = False


@dataclass
class DownJob:
    fid: bytes
    path: str
    head: Head
    mode: int
    not_before: float = 0.0
    attempts: int = 0
    done_bytes: int = 0
    bad: str | None = None  # permanent problem with this manifest (until it changes)
    bulk_deferred: bool = False  # set aside by the resource policy

    @property
    def remaining(self) -> int:
        return max(0, self.head.manifest.size - self.done_bytes)


@dataclass
class BinaryStats:
    uploaded_files: int = 0
    downloaded_files: int = 0
    chunks_fetched: int = 0
    chunks_local: int = 0
    chunks_refused: int = 0
    # chunks fetched (and verified) per path: "lan" / "relay" -> [chunks, sealed bytes]
    by_path: dict[str, list[int]] = field(default_factory=dict)

    def fetched(self, path: str, nbytes: int) -> None:
        self.chunks_fetched += 1
        row = self.by_path.setdefault(path, [0, 0])
        row[0] += 1
        row[1] += nbytes


@dataclass
class BinarySync:
    sync: SpaceSync
    chunks: ChunkStore
    link: BlobLink | None
    #: Where missing chunks are fetched from, in order of preference (LAN peers, then relay).
    remote: list[RemoteChunks] = field(default_factory=list)
    #: True while LAN peers may fetch chunks from this device's files (LAN sync on for the
    #: space): a file is then published even while the relay is unreachable.
    lan_enabled: Callable[[], bool] = field(default=lambda: False)
    up: dict[str, UpJob] = field(default_factory=dict)
    down: dict[bytes, DownJob] = field(default_factory=dict)
    stats: BinaryStats = field(default_factory=BinaryStats)
    bases: dict[bytes, dict[str, int]] = field(default_factory=dict)
    _keys: dict[int, ChunkKeys] = field(default_factory=dict)
    _up_wake: asyncio.Event = field(default_factory=asyncio.Event)
    _down_wake: asyncio.Event = field(default_factory=asyncio.Event)
    _quota_paths: set[str] = field(default_factory=set)
    _bulk_waiter: asyncio.Future[Any] | None = None
    _publishing: int = 0  # versions out of ``up`` whose index batch is still being committed
    #: Sends prefetch hints while large files upload (None: no relay).
    hints: HintSender | None = None
    #: Stages chunks other devices hinted (None: no relay).
    prefetch: Prefetcher | None = None

    async def start(self) -> None:
        await self.chunks.ensure_schema()
        self.bases = await self.chunks.bases()
        if self.prefetch is not None:
            await self.prefetch.start()

    def on_hint(self, sealed: bytes) -> None:
        """A prefetch hint from the relay (agent/relay_link.py)."""
        if self.prefetch is not None:
            self.prefetch.on_hint(sealed)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._loop(stop, self._up_wake, self._next_up, self._do_up)),
            asyncio.create_task(self._loop(stop, self._down_wake, self._next_down, self._do_down)),
        ]
        if self.prefetch is not None:
            tasks.append(asyncio.create_task(self.prefetch.run(stop)))
        try:
            await stop.wait()
        finally:
            await cancel_and_wait(*tasks)

    # -- hooks called by SpaceSync (its lock held) -----------------------------------------
    def local_changed(self, path: str, size: int = 0) -> None:
        """A binary/large file changed on disk (or appeared): ingest it once it is stable."""
        now = time.time()
        job = self.up.get(path)
        if job is None:
            self.up[path] = UpJob(path, size, now)
        else:
            job.changed_at = now
            job.relay_owed = False
            job.size = size or job.size
            job.not_before = min(job.not_before, now)
        self._up_wake.set()

    def binary_paths(
        self, entries: Mapping[str, FileEntry], paths: Mapping[str, str]
    ) -> dict[str, bytes]:
        """path -> fid of the binary entries of a layout (``paths``: path -> fid hex)."""
        out: dict[str, bytes] = {}
        for path, fid_hex in paths.items():
            e = entries.get(fid_hex)
            if e is not None and e.kind == "binary":
                out[path] = bytes.fromhex(fid_hex)
        return out

    def reconcile(
        self,
        desired: Mapping[bytes, str],
        entries: Mapping[str, FileEntry],
        batch: _Batch,
        scope: AbstractSet[bytes] | None = None,
    ) -> None:
        """Bring binary files towards the converged index: split concurrent versions into
        conflict entries (written into ``batch``), schedule downloads of versions not on disk,
        and ingest untracked local files that stand where a remote file belongs. ``scope``:
        ``desired`` holds only these fids (a batch's scoped reconcile); downloads of others
        are kept."""
        sync = self.sync
        wanted: dict[bytes, tuple[str, Head]] = {}
        split: set[bytes] = set()
        for fid, path in desired.items():
            heads = manifest_heads(sync.index.fields(fid.hex()))
            if not heads:
                continue  # created but its manifest not here yet (or invalid)
            winner, losers = choose(heads)
            if (
                losers
                and sync.send_block is None
                and self._split(fid, entries[fid.hex()], losers, batch)
            ):
                # SpaceSync commits the split and reconciles this fid again (the split marks
                # it changed). Only this one waits: returning here for every file, as before,
                # left the other files of the batch unscheduled — and since reconciles are
                # scoped to what a batch touched, a new binary file that arrived together with
                # a conflicting version of another was never downloaded. A split that wrote
                # nothing (no valid conflict name: a garbage device id) changes nothing to
                # wait for: the winner is scheduled now.
                split.add(fid)
                continue
            wanted[fid] = (path, winner)
        for fid, (path, head) in wanted.items():
            rec = sync.files.get(path)
            if rec is not None and rec.fid == fid and rec.hash == head.manifest.hash:
                if self.down.pop(fid, None) is not None:
                    self._note_pending()
                continue
            if rec is None:
                st = stat_file(sync.root, path)
                if st is not None:
                    # An untracked local file where a remote one belongs: it is ingested (the
                    # same content is adopted, other content becomes a version of its own).
                    self.local_changed(path, st.size)
                    continue
            elif rec.fid != fid:
                continue  # another file still sits there (a move in progress)
            job = self.down.get(fid)
            if job is None or job.head.manifest.hash != head.manifest.hash or job.path != path:
                mode = 0o755 if entries[fid.hex()].mode & 0o111 else 0o644
                self.down[fid] = DownJob(fid, path, head, mode)
                self._down_wake.set()
        for fid in [
            f
            for f in self.down
            if f not in wanted and f not in split and (scope is None or f in scope)
        ]:
            del self.down[fid]
        self._note_pending()

    def _split(
        self, fid: bytes, entry: FileEntry, losers: dict[bytes, list[Head]], batch: _Batch
    ) -> bool:
        """Write a conflict entry for each losing version and mark it split off ``fid``.
        False if none could be split (nothing written)."""
        index = self.sync.index
        base_path = strip_conflict_marker(entry.path or "")
        key = self.sync.keyring.file_id_key
        wrote = False
        for content_hash, group in sorted(losers.items()):
            first = min(group, key=lambda h: (h.ts, h.dev))
            cfid = conflict_fid(key, fid, content_hash).hex()
            try:
                name = conflict_name(base_path, first.ts, first.dev)
            except ProtocolError:
                continue
            raw = {k: v for k, v in first.raw.items() if k != "vv"}
            batch.add(
                INDEX_DOC_ID,
                index.put_fields(
                    cfid,
                    {
                        # c:<dev> also counts as first.dev's edit 1 (index schema 4)
                        **creation_fields("binary", entry.mode, first.ts, first.dev, name),
                        f"m:{first.dev}": {**raw, "vv": {first.dev: 1}},
                    },
                ),
            )
            marks = {f"x:{h.dev}": h.vv[h.dev] for h in group}
            batch.add(INDEX_DOC_ID, index.put_fields(fid.hex(), marks))
            wrote = True
            log.info("binary conflict: %s split off as %s", entry.path, name)
        return wrote

    def delete_seen(self, fid: bytes, edits: Mapping[str, int], disk_hash: bytes) -> dict[str, int]:
        """The edit counters a delete of this binary file by this device may claim to have
        seen. The index can hold a version that never reached this device's disk: a download
        not done yet, or one refused because the user had changed the file here meanwhile.
        Whoever deleted the file here never saw that version, so the delete must not beat it
        (an edit beats a concurrent delete): for such a head the writer's counter is claimed
        only up to just below that version. ``disk_hash``: the content last synced at that
        path (the record's hash); this device's own versions were on its disk when written."""
        seen = dict(edits)
        base = self.bases.get(fid, {})
        for h in manifest_heads(self.sync.index.fields(fid.hex())):
            own = h.vv[h.dev]
            if h.dev == self.sync.device or h.manifest.hash == disk_hash:
                continue
            if base.get(h.dev, 0) >= own:
                continue  # the version on this disk descends from it
            seen[h.dev] = min(seen.get(h.dev, 0), own - 1)
        return seen

    # -- status ------------------------------------------------------------------------------
    def pending(self) -> tuple[int, int, int, int]:
        """(files to upload, their bytes, files to download, bytes still to fetch)."""
        up = list(self.up.values())
        down = list(self.down.values())
        return (
            len(up) + self._publishing,
            sum(j.size for j in up),
            len(down),
            sum(j.remaining for j in down),
        )

    def _note_pending(self) -> None:
        warnings = self.sync.warnings
        bad = [j for j in self.down.values() if j.bad]
        if bad:
            warnings["binary:bad"] = f"{len(bad)} file(s) cannot be materialized: {bad[0].bad}"
        else:
            warnings.pop("binary:bad", None)

    def set_paused(self, paused: bool) -> None:
        if self.link is not None:
            self.link.paused = paused
        if not paused:
            for job in [*self.up.values(), *self.down.values()]:
                job.not_before = 0.0
                job.attempts = 0
            self._up_wake.set()
            self._down_wake.set()

    # -- worker loops ------------------------------------------------------------------------
    async def _loop(self, stop: asyncio.Event, wake: asyncio.Event, pick: Any, do: Any) -> None:
        while not stop.is_set():
            wake.clear()
            job, wait = pick()
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            try:
                await do(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("binary transfer failed; retrying later")
                self._retry(job, "internal error")

    @staticmethod
    def _pick(jobs: list[Any]) -> tuple[Any, float]:
        now = time.time()
        ready = [j for j in jobs if j.not_before <= now]
        if ready:
            return ready[0], 0.0
        later = [j.not_before - now for j in jobs if j.not_before != float("inf")]
        return None, min(later) if later else 3600.0

    def _next_up(self) -> tuple[UpJob | None, float]:
        return self._pick(list(self.up.values()))  # type: ignore[no-any-return]

    def _next_down(self) -> tuple[DownJob | None, float]:
        return self._pick([j for j in self.down.values() if not j.bad])  # type: ignore[no-any-return]

    def _retry(self, job: UpJob | DownJob, why: str, offline: bool = False) -> None:
        job.attempts += 1
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(job.attempts, 6))
        job.not_before = time.time() + (RETRY_OFFLINE_S if offline else delay)
        log.info("binary %s: retry in %.1fs (%s)", job.path, job.not_before - time.time(), why)

    def chunk_keys(self, epoch: int) -> ChunkKeys | None:
        keys = self._keys.get(epoch)
        if keys is None:
            ek = self.sync.keyring.epoch_keys.get(epoch)
            if ek is None:
                return None
            keys = self._keys[epoch] = ChunkKeys.for_epoch(epoch, ek)
        return keys

    async def _bulk_allowed(self, job: UpJob | DownJob, size: int, what: str) -> bool:
        """The resource policy: large transfers wait while bulk work is deferred. A deferred
        job is set aside for ``BULK_RECHECK_S`` (not waited for here): the worker goes on with
        the small files behind it. Waiting in the worker held every other transfer back for
        as long as the deferral lasted (chaos soak with > 4 MiB files on a loaded machine: a
        2 KB file never downloaded behind a deferred 5 MiB one)."""
        gate = self.sync.gate
        if gate is None:
            return True
        reason = gate.defer_bulk(size)
        if reason is None:
            self.sync.warnings.pop(f"binary:defer:{what}", None)
            job.bulk_deferred = False
            return True
        self.sync.warnings[f"binary:defer:{what}"] = (
            f"large file transfers ({what}) wait until bulk work is allowed: {reason}"
        )
        job.not_before = time.time() + BULK_RECHECK_S
        job.bulk_deferred = True
        ok = getattr(gate, "bulk_ok", None)
        if isinstance(ok, asyncio.Event) and not ok.is_set() and self._bulk_waiter is None:
            self._bulk_waiter = asyncio.ensure_future(ok.wait())
            self._bulk_waiter.add_done_callback(self._bulk_released)
        return False

    def _bulk_released(self, _waiter: asyncio.Future[Any]) -> None:
        """Bulk work is allowed again: the jobs set aside for it go now."""
        self._bulk_waiter = None
        now = time.time()
        for job in [*self.up.values(), *self.down.values()]:
            if job.bulk_deferred:
                job.bulk_deferred = False
                job.not_before = min(job.not_before, now)
        self._up_wake.set()
        self._down_wake.set()

    # -- upload --------------------------------------------------------------------------------
    async def _do_up(self, job: UpJob) -> None:
        sync = self.sync
        st = stat_file(sync.root, job.path)
        if st is None or sync.send_block is not None:
            self.up.pop(job.path, None)
            return
        job.size = st.size
        now = time.time()
        quiet = now - max(st.mtime_ns / 1e9, job.changed_at)
        follow = (
            quiet < MIN_QUIET_S
            and self.link is not None
            and not self.link.paused
            # connects on demand; not while its last attempt failed (the relay is down)
            and (self.link.state.connected or self.link.state.last_error is None)
            and not job.relay_owed
            and st.size >= FOLLOW_MIN_BYTES
            and st.size - job.follow_offset >= FOLLOW_STEP_BYTES
        )
        if quiet < MIN_QUIET_S and not follow:
            await asyncio.sleep(MIN_QUIET_S - quiet)
            return
        if not await self._bulk_allowed(job, st.size, "upload"):
            return
        keys = self.chunk_keys(sync.keyring.current_epoch)
        if keys is None:
            self._retry(job, "no key for the current epoch")
            return
        upload = await self._relay_reachable()
        if job.relay_owed and not upload:
            self._retry(job, "chunks owed to the relay, which is unreachable")
            return
        started = time.time()
        if follow and not job.followed:
            job.followed = True
            log.info(
                "binary up %s: uploading as it is written (%d bytes so far)", job.path, st.size
            )
        log.debug(
            "binary up %s: %s pass starts at %d bytes",
            job.path,
            f"follow (from {job.follow_offset})" if follow else "full",
            st.size,
        )
        try:
            result = await self._pass(job, st, keys, upload, follow=follow)
            log.debug("binary up %s: pass ends, changed meanwhile: %s", job.path, result is None)
        except BlobQuotaExceeded as exc:
            self._quota_paths.add(job.path)
            sync.warnings["binary:quota"] = (
                f"relay blob quota exceeded: {len(self._quota_paths)} file(s) wait to upload "
                f"until the relay has room ({exc})"
            )
            self._retry(job, "relay blob quota exceeded")
            return
        except BlobError as exc:
            sync.warnings["binary:upload"] = f"uploads wait for the relay: {exc}"
            self._retry(job, str(exc), offline=isinstance(exc, BlobUnavailable))
            return
        except (OSError, UnsafePathError) as exc:
            # Unreadable or locked: tried again with backoff (a lock's end makes no event).
            self._retry(job, f"cannot read: {exc}")
            sync.warnings[f"read:{job.path}"] = (
                f"{job.path}: cannot read ({getattr(exc, 'strerror', None) or exc}); "
                f"retrying in {max(0.0, job.not_before - time.time()):.0f} s"
            )
            return
        sync.warnings.pop(f"read:{job.path}", None)
        if result is None:  # changed while we read it
            job.changed_at = time.time()
            return
        manifest = result
        # Stable-read rule: left alone for the window (after the pass, if the pass was short).
        settle = max(st.mtime_ns / 1e9, job.changed_at) + STABLE_WINDOW_S - time.time()
        if settle > 0:
            await asyncio.sleep(settle)
        if stat_file(sync.root, job.path) != st or job.changed_at > started:
            job.changed_at = max(job.changed_at, time.time())
            return
        self._quota_paths.discard(job.path)
        if not self._quota_paths:
            sync.warnings.pop("binary:quota", None)
        sync.warnings.pop("binary:upload", None)
        if await self._commit_local(job, st, manifest):
            if not upload and job.path not in self.up:
                # Published for LAN peers (they fetch the chunks from this device); the relay
                # still gets its copy once it is back, for devices off this LAN.
                owed = UpJob(job.path, st.size, time.time(), relay_owed=True)
                self.up[job.path] = owed
                self._retry(owed, "chunks owed to the relay, which is unreachable")
                sync.warnings["binary:upload"] = (
                    "the relay is unreachable: new binary files are served to LAN peers and "
                    "uploaded to the relay when it is back"
                )
            if job.relay_owed:
                log.info("binary %s: the relay now holds its chunks too", job.path)
                return
            self.stats.uploaded_files += 1
            log.info(
                "binary up %s: %d bytes, %d chunks, published %.3f s after the pass began",
                job.path,
                manifest.size,
                len(manifest.chunks),
                time.time() - started,
            )

    async def _relay_reachable(self) -> bool:
        """Whether this pass uploads to the relay. A manifest is published only once the relay
        holds its chunks — unless the relay cannot be reached and LAN sync is on: LAN peers then
        fetch the chunks from this device, and the relay's copy is owed until it is back."""
        link = self.link
        if link is None or link.state.connected or not self.lan_enabled():
            return True
        # A link that failed its last attempt is asked only briefly (it keeps retrying with its
        # backoff; this demand keeps it trying); one that has not tried yet gets a connect.
        probe = RELAY_RECHECK_S if link.state.last_error else RELAY_PROBE_S
        return await link.wait_up(probe)

    async def _pass(
        self, job: UpJob, st: DiskStat, keys: ChunkKeys, upload: bool = True, follow: bool = False
    ) -> Manifest | None:
        """Read, cut, identify and (if ``upload``) upload the file once. None if it changed
        meanwhile. ``follow``: a file still being written, read from ``job.follow_offset`` to
        its current end only to upload ahead (always None).

        A producer thread reads, identifies and seals chunks ahead (chunker.ChunkProducer);
        this loop checks which ones the relay already holds (one query per batch of ready
        chunks) and keeps up to ``UPLOAD_WINDOW_BYTES`` of the rest in flight."""
        opened = await asyncio.to_thread(open_regular, self.sync.root, job.path)
        if opened is None:
            return None
        fd, st_open = opened
        if st_open != st and not follow:
            os.close(fd)
            return None
        start = job.follow_offset if follow else 0
        link = self.link if upload else None
        # Chunks acknowledged in this job's earlier passes are not sealed again; others the relay
        # may have are sealed anyway (AES-GCM ~1 ms/MiB in the producer thread) rather than
        # asking the database before each one: only their upload is skipped.
        producer = ChunkProducer(
            fd,
            keys,
            seal=link is not None,
            skip_seal=frozenset(job.acked),
            start=start,
        )
        unsealed = False
        known_all: set[bytes] = set()
        refs: list[ChunkRef] = []
        inflight: deque[tuple[asyncio.Task[bool], int, bytes]] = deque()
        inflight_bytes = 0
        acked: list[bytes] = []
        sent: set[bytes] = set()
        # Prefetch hints: the put of each chunk id, to announce it once the relay acknowledged
        # it (receivers then fetch it while the rest is uploaded); only for large files.
        hinting = (
            link is not None
            and self.hints is not None
            and not job.relay_owed
            and st.size >= HINT_MIN_FILE_BYTES
        )
        puts: dict[bytes, asyncio.Task[bool]] = {}
        pos = last = start
        if follow:
            # The uploads the previous pass left running are for chunks before where this one
            # starts: it will not meet them, so they count against this pass's window (else
            # each follow pass would add another window of frames to the socket's buffer).
            for cid, (task, n) in job.puts.items():
                inflight.append((task, n, cid))
                inflight_bytes += n
                sent.add(cid)
            job.puts.clear()
        try:
            producer.start()
            while items := await producer.batch(_PRODUCER_DEPTH):
                refs.extend(ChunkRef(it.chunk_id, it.size) for it in items)
                offsets = []
                for it in items:
                    offsets.append(pos)
                    last = pos
                    pos += it.size
                if link is None:
                    continue
                fresh = [it for it in items if it.chunk_id not in sent]
                known = await self.chunks.acked(it.chunk_id for it in fresh)
                known_all |= known
                for it in fresh:
                    if it.chunk_id in known or it.chunk_id in sent:
                        continue
                    earlier = job.puts.pop(it.chunk_id, None)
                    if earlier is not None:  # on its way already: waited for, not sent again
                        sent.add(it.chunk_id)
                        puts[it.chunk_id] = earlier[0]
                        inflight.append((earlier[0], earlier[1], it.chunk_id))
                        inflight_bytes += earlier[1]
                        continue
                    if it.ciphertext is None:
                        unsealed = True  # acked in an earlier pass, not any more: seal all again
                        continue
                    sent.add(it.chunk_id)
                    n = len(it.ciphertext)
                    while inflight and inflight_bytes + n > UPLOAD_WINDOW_BYTES:
                        inflight_bytes -= await self._finish_put(inflight, acked)
                    put = asyncio.create_task(link.put(it.chunk_id, it.ciphertext))
                    put.add_done_callback(_consume)
                    puts[it.chunk_id] = put
                    inflight.append((put, n, it.chunk_id))
                    inflight_bytes += n
                if hinting:
                    # Only chunks this job uploads: those the relay had before are mostly an
                    # earlier version's, which the other devices hold already.
                    for it, off in zip(items, offsets, strict=True):
                        put = puts.get(it.chunk_id)
                        if put is not None:
                            self._hint(job, keys.epoch, off, it, put)
                del items, fresh
                if len(acked) >= _ACK_FLUSH:
                    await self.chunks.add_acked(acked)
                    job.acked.update(acked)
                    acked.clear()
            end = producer.final_stat
            changed = end is None or end.st_size != st.size or end.st_mtime_ns != st.mtime_ns
            if changed or follow or unsealed:
                # Changed while read (or must be sealed again): the next pass starts now and
                # re-reads the file while these uploads finish (a file written while it was
                # read had its re-read wait for the upload's tail, ~0.3 s per 200 MiB).
                for task, n, cid in inflight:
                    job.puts[cid] = (task, n)
                inflight.clear()
                if unsealed:
                    job.acked.clear()
                # A follow pass resumes at the last chunk read: it was cut at the end of the
                # file as it was then (the chunks before it end where they always will).
                job.follow_offset = 0 if unsealed else last
                return None
            while inflight:
                await self._finish_put(inflight, acked)
        finally:
            await producer.close()
            for task, _n, _cid in inflight:
                task.cancel()
            if acked:
                await self.chunks.add_acked(acked)
            job.acked.update(acked)
            if link is not None:
                job.acked.update(known_all)
        return Manifest.build(keys, refs)

    def _hint(
        self, job: UpJob, epoch: int, offset: int, it: Identified, put: asyncio.Task[bool]
    ) -> None:
        """Announce a chunk of ``job`` at ``offset`` once the relay holds it (``put`` done)."""
        hints = self.hints
        key = (offset, it.chunk_id)
        if hints is None or key in job.hinted:
            return
        entry = HintEntry(offset, it.chunk_id, it.size)

        def acked(task: asyncio.Task[bool]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            if key not in job.hinted:
                job.hinted.add(key)
                hints.add(job.transfer, epoch, entry)

        if put.done():
            acked(put)
        else:
            put.add_done_callback(acked)

    @staticmethod
    async def _finish_put(
        inflight: deque[tuple[asyncio.Task[bool], int, bytes]], acked: list[bytes]
    ) -> int:
        task, n, cid = inflight[0]
        await task  # raises BlobError: the pass fails, the job is retried (acked ones skipped)
        inflight.popleft()
        acked.append(cid)
        return n

    async def _commit_local(self, job: UpJob, st: DiskStat, manifest: Manifest) -> bool:
        """Publish a new version (the chunks are at the relay already). False: try again."""
        from qmoi_sync.agent.space import _Batch

        sync = self.sync
        path = job.path
        async with sync.lock:
            if stat_file(sync.root, path) != st or sync.send_block is not None:
                return False
            if job.changed_at > time.time():
                return False
            sync._begin_batch()
            batch = _Batch()
            entries = sync.index.entries()
            rec = sync.files.get(path)
            entry = entries.get(rec.fid.hex()) if rec is not None else None
            mode = _mode(sync.root / path)
            now = sync.clock()
            mj = {**manifest.to_json(), "ts": now}
            dev = sync.device
            fid: bytes
            if rec is not None and entry is not None and entry.kind == "binary":
                fid = rec.fid
                heads = manifest_heads(sync.index.fields(fid.hex()))
                current = choose(heads)[0] if heads else None
                same = current is not None and current.manifest.hash == manifest.hash
                if same and not entry.alive and rec.hash == manifest.hash:
                    # deleted elsewhere and only touched here: the delete wins
                    delete_file(sync.root, path)
                    await sync._forget(path)
                    self.up.pop(path, None)
                    await sync._finish(batch, dirty=set(), delivered=[])
                    return False
                if not (same and entry.alive and entry.path == path):
                    if not entry.alive or entry.path != path:
                        batch.add(
                            INDEX_DOC_ID,
                            sync.index.create(fid.hex(), path, "binary", mode, dev, now),
                        )
                    if not same:
                        base = self.bases.get(fid, {})
                        batch.add(INDEX_DOC_ID, sync.index.put_manifest(fid.hex(), dev, mj, base))
                if entry.mode != mode and entry.alive:
                    batch.add(INDEX_DOC_ID, sync.index.set_mode(fid.hex(), mode, dev))
            else:
                if rec is not None and entry is not None and entry.alive:
                    # text -> binary: a new entry; the text one is deleted (a concurrent text
                    # edit elsewhere beats that delete, and the layout keeps both)
                    batch.add(INDEX_DOC_ID, sync.index.delete(rec.fid.hex(), dev, now))
                fid = derive_file_id(sync.keyring.file_id_key, path, manifest.hash, kind="binary")
                existing = entries.get(fid.hex())
                adopt = False
                if existing is not None and existing.alive and existing.path == path:
                    heads = manifest_heads(sync.index.fields(fid.hex()))
                    adopt = any(h.manifest.hash == manifest.hash for h in heads)
                if not adopt:
                    if existing is not None and not (existing.alive and existing.path == path):
                        fid = os.urandom(16)
                    batch.add(
                        INDEX_DOC_ID, sync.index.create(fid.hex(), path, "binary", mode, dev, now)
                    )
                    batch.add(INDEX_DOC_ID, sync.index.put_manifest(fid.hex(), dev, mj, {}))
            vv = _vv_of(sync.index.fields(fid.hex()), manifest.hash)
            await sync._record_stat(path, fid, manifest.hash, st)
            sync.warnings.pop(f"held:{path}", None)
            # The job leaves ``up`` before the batch commits (a change noticed while it commits
            # starts a new job), but it still counts as pending until the commit: status read
            # in between said "nothing to upload" while the stored index still held the old
            # version (a snapshot taken then asked for the old version's chunks).
            self.up.pop(path, None)
            self._publishing += 1
            try:
                await sync._finish(batch, dirty=set(), delivered=[])
            finally:
                self._publishing -= 1
        self.bases[fid] = vv
        await self.chunks.set_base(fid, vv)
        await self.chunks.set_file_chunks(
            path, st.size, st.mtime_ns, [(c.id, c.size) for c in manifest.chunks]
        )
        return True

    # -- download ------------------------------------------------------------------------------
    async def _do_down(self, job: DownJob) -> None:
        manifest = job.head.manifest
        keys = self.chunk_keys(manifest.epoch)
        if keys is None:
            job.not_before = time.time() + 5.0
            return
        if not manifest.verify(keys):
            job.bad = f"the manifest of {job.path} does not verify (whole-file hash)"
            log.warning("%s", job.bad)
            self._note_pending()
            return
        gate = self.sync.gate
        note = gate.disk_blocked(self.sync.root) if gate is not None else None
        if note is not None:
            self.sync.warnings["disk"] = note
            job.not_before = time.time() + 5.0
            return
        if not await self._bulk_allowed(job, manifest.size, "download"):
            return
        # Chunks prefetched while the sender was still uploading (agent/prefetch.py): their
        # stage becomes this download's temp file.
        have: set[int] = set()
        claimed = await self.prefetch.claim(manifest) if self.prefetch is not None else None
        if claimed is not None and await self.prefetch.adopt(claimed, job.path, job.fid.hex()):  # type: ignore[union-attr]
            have = claimed.have
        try:
            tmp = await asyncio.to_thread(open_download, self.sync.root, job.path, job.fid.hex())
        except (OSError, UnsafePathError) as exc:
            self.sync.warnings[f"write:{job.path}"] = f"cannot write {job.path}: {exc}"
            self._retry(job, str(exc))
            return
        installed = False
        began = fetched_at = time.time()
        fetched, local = self.stats.chunks_fetched, self.stats.chunks_local
        try:
            refs = [(c.id, c.size) for c in manifest.chunks]
            if have:
                # The stage is the temp file now: its chunks were verified as they were written
                # (by this process), so no re-read; bytes past the file's end are cut off.
                await asyncio.to_thread(os.ftruncate, tmp.fd, manifest.size)
                done = 0
                job.done_bytes = sum(refs[i][1] for i in have)
            else:
                done = await asyncio.to_thread(verified_prefix, tmp, keys, refs)
                job.done_bytes = sum(size for _cid, size in refs[:done])
            await self._fetch_into(job, keys, tmp, done, skip=have)
            if os.fstat(tmp.fd).st_size != manifest.size:
                raise OSError(f"{job.path}: assembled {os.fstat(tmp.fd).st_size} bytes")
            fetched_at = time.time()
            await asyncio.to_thread(_prepare, tmp, job.mode)
            installed = await self._install(job, tmp)
        except TamperedChunk as exc:
            self.sync.warnings["binary:tampered"] = (
                f"{self.stats.chunks_refused} chunk(s) refused (failed verification: tampered "
                f"or corrupt); {job.path} is not materialized until a good copy arrives"
            )
            self._retry(job, str(exc))
        except BlobError as exc:
            self._retry(job, str(exc), offline=isinstance(exc, BlobUnavailable))
        finally:
            if not installed:
                tmp.close()
        if installed:
            log.info(
                "binary down %s: %d bytes, %d chunks fetched, %d read locally, %d prefetched, "
                "%.3f s (fetch %.3f s, fsync + install %.3f s)",
                job.path,
                manifest.size,
                self.stats.chunks_fetched - fetched,
                self.stats.chunks_local - local,
                len(have),
                time.time() - began,
                fetched_at - began,
                time.time() - fetched_at,
            )
            self.sync.warnings.pop("binary:tampered", None)
            self.sync.warnings.pop(f"write:{job.path}", None)

    async def _fetch_into(
        self,
        job: DownJob,
        keys: ChunkKeys,
        tmp: TempFile,
        start: int,
        skip: AbstractSet[int] = frozenset(),
    ) -> None:
        """Fetch chunks ``start..`` (but those in ``skip``: the temp file holds them) with up to
        ``DOWNLOAD_WINDOW`` in flight; each is written at its offset as soon as it is verified
        (in any order: a crash leaves holes, and the resume keeps only the verified prefix)."""
        chunks = job.head.manifest.chunks
        offset = sum(c.size for c in chunks[:start])
        local = await self.chunks.with_sources(
            c.id for i, c in enumerate(chunks) if i >= start and i not in skip
        )
        running: set[asyncio.Task[int]] = set()
        nxt = start
        try:
            while nxt < len(chunks) or running:
                while nxt < len(chunks) and len(running) < DOWNLOAD_WINDOW:
                    ref = chunks[nxt]
                    if nxt in skip:
                        offset += ref.size
                        nxt += 1
                        continue
                    fetch = self._fetch_at(keys, ref, tmp.fd, offset, ref.id in local)
                    running.add(asyncio.create_task(fetch))
                    offset += ref.size
                    nxt += 1
                if not running:
                    continue  # the rest was skipped (the temp file holds it)
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    job.done_bytes += t.result()  # a failure ends the pass (finally: cancel)
        finally:
            await cancel_and_wait(*running)

    async def _fetch_at(
        self, keys: ChunkKeys, ref: ChunkRef, fd: int, offset: int, local: bool
    ) -> int:
        await pwrite_in_thread(fd, await self._fetch(keys, ref, local), offset)
        return ref.size

    async def _fetch(self, keys: ChunkKeys, ref: ChunkRef, local: bool = True) -> bytes:
        """A chunk's verified plaintext: from a local file if one holds it (``local``: worth
        looking), else from the remote sources in order."""
        data = await self._read_local(keys, ref.id) if local else None
        if data is not None:
            self.stats.chunks_local += 1
            return data
        refused = relay_missing = False
        failure: BlobError | None = None
        for source in self.remote:
            if not source.ready():
                continue
            try:
                sealed = await source.get(keys.epoch, ref.id)
            except BlobError as exc:
                failure = exc
                continue
            if sealed is None:
                relay_missing = relay_missing or source.path == "relay"
                continue
            try:
                data = await asyncio.to_thread(keys.decrypt, ref.id, sealed)
                if len(data) != ref.size:
                    raise DecryptError("chunk has the wrong size")
            except DecryptError as exc:
                # Refused whatever the path; the next source is asked.
                self.stats.chunks_refused += 1
                source.refused(ref.id)
                refused = True
                log.warning("refused chunk %s (%s): %s", ref.id.hex()[:16], source.path, exc)
                continue
            self.stats.fetched(source.path, len(sealed))
            return data
        if refused:
            raise TamperedChunk(f"chunk {ref.id.hex()[:16]} failed verification")
        if relay_missing:
            # The relay lost it (or never got it): whoever holds it uploads it again.
            await self.chunks.forget_acked([ref.id])
            raise BlobUnavailable("missing", f"the relay does not have chunk {ref.id.hex()[:16]}")
        if failure is not None:
            raise failure
        if not self.remote:
            raise BlobUnavailable("no_relay", "this space has no relay to fetch chunks from")
        raise BlobUnavailable("missing", f"no source has chunk {ref.id.hex()[:16]} yet")

    async def _read_local(self, keys: ChunkKeys, cid: bytes) -> bytes | None:
        """A chunk read (and re-verified) from a file of this space on this device."""
        root = self.sync.root
        for src in await self.chunks.sources(cid):
            data = await asyncio.to_thread(
                _read_verified, root, src.path, src.offset, src.length, src.file_size,
                src.mtime_ns, keys, cid,
            )  # fmt: skip
            if data is not None:
                return data
        return None

    async def sealed_local(self, epoch: int, chunk_id: bytes) -> bytes | None:
        """A chunk of this device's files, sealed for a LAN peer (the same ciphertext the relay
        would hold); None if not here (or the epoch is unknown)."""
        keys = self.chunk_keys(epoch)
        if keys is None:
            return None
        data = await self._read_local(keys, chunk_id)
        if data is None:
            return None
        return await asyncio.to_thread(keys.encrypt, chunk_id, data)

    async def _install(self, job: DownJob, tmp: TempFile) -> bool:
        sync = self.sync
        fid_hex = job.fid.hex()
        async with sync.lock:
            entries = sync.index.entries()
            fold = bool(getattr(sync, "case_insensitive", False))
            path = compute_layout(entries, fold_case=fold).path_of(fid_hex)
            heads = manifest_heads(sync.index.fields(fid_hex))
            head = choose(heads)[0] if heads else None
            if path != job.path or head is None or head.manifest.hash != job.head.manifest.hash:
                if path != job.path:
                    await asyncio.to_thread(discard_download, tmp)
                    return True  # consumed; reconcile schedules the current version
                return False
            rec = sync.files.get(path)
            st = stat_file(sync.root, path)
            if st is not None and (
                rec is None
                or rec.fid != job.fid
                or (st.size, st.mtime_ns, st.inode) != rec.stat_key()
            ):
                # The user changed (or created) this file meanwhile: never overwrite it; it is
                # ingested as a version of its own (a conflict if concurrent).
                self.local_changed(path, st.size)
                self.down.pop(job.fid, None)
                return False
            try:
                final = await asyncio.to_thread(_rename_into_place, tmp, path)
            except (OSError, UnsafePathError) as exc:
                sync.warnings[f"write:{path}"] = f"cannot write {path}: {exc}"
                self._retry(job, str(exc))
                return False
            await sync._record_stat(path, job.fid, job.head.manifest.hash, final)
            async with sync.store.transaction():
                await sync._write_file_records()
            self.down.pop(job.fid, None)
            self._note_pending()
        vv = dict(job.head.vv)
        self.bases[job.fid] = vv
        self.stats.downloaded_files += 1
        await self.chunks.set_base(job.fid, vv)
        await self.chunks.set_file_chunks(
            path, final.size, final.mtime_ns, [(c.id, c.size) for c in job.head.manifest.chunks]
        )
        tmp.close()
        return True


# -- helpers (worker threads) --------------------------------------------------------------------


def _consume(task: asyncio.Task[bool]) -> None:
    """An upload task's failure is raised to the pass that awaits it; one nobody awaits any
    more (its file changed, its job ended) must not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def _read_verified(
    root: Any,
    path: str,
    offset: int,
    length: int,
    size: int,
    mtime_ns: int,
    keys: ChunkKeys,
    cid: bytes,
) -> bytes | None:
    try:
        data = read_range(root, path, offset, length, size, mtime_ns)
    except OSError:
        return None
    if data is None or not keys.verify_plain(cid, data):
        return None
    return data


def _prepare(tmp: TempFile, mode: int) -> None:
    os.fchmod(tmp.fd, mode)
    os.fsync(tmp.fd)
    crashpoint("chunk.install")


def _rename_into_place(tmp: TempFile, path: str) -> DiskStat:
    import stat as stat_mod

    final = path.rsplit("/", 1)[-1]
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(final, dir_fd=tmp.dfd, follow_symlinks=False)
        if not stat_mod.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path!r} exists and is not a regular file")
    os.rename(tmp.name, final, src_dir_fd=tmp.dfd, dst_dir_fd=tmp.dfd)
    crashpoint("chunk.installed")
    st = os.stat(final, dir_fd=tmp.dfd, follow_symlinks=False)
    return DiskStat(st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode & 0o7777)


def _mode(full: Any) -> int:
    try:
        return 0o755 if os.stat(full, follow_symlinks=False).st_mode & 0o111 else 0o644
    except OSError:
        return 0o644


def _vv_of(fields: Mapping[str, Any], content_hash: bytes) -> dict[str, int]:
    """The version vector of the head with this content (the base of the next local edit)."""
    for h in manifest_heads(fields):
        if h.manifest.hash == content_hash:
            return dict(h.vv)
    return {}


__all__ = [
    "BinarySync",
    "Head",
    "choose",
    "conflict_fid",
    "manifest_heads",
]


# -- wiring (agent/daemon.py) --------------------------------------------------------------------


def tune_malloc() -> None:
    """glibc only: keep chunk-sized buffers out of the heap arenas.

    Chunks are ~1 MiB buffers allocated and freed by the event loop and worker threads. glibc's
    *dynamic* mmap threshold rises to the size of the largest freed mmapped block, after which
    such buffers come from the (per-thread) arenas and freed ones stay resident: the agent's RSS
    grew to ~160 MB while sending a 512 MiB file. A fixed 256 KiB threshold (always mmap, freed
    memory goes back to the OS) and two arenas keep it flat. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (setting it disables the dynamic one)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


async def attach(runtime: Any) -> BinarySync:
    """Create the binary-file component of a running space (a ``SpaceRuntime``): its blob link
    to the relay (a second websocket), its chunk store, its worker tasks."""
    tune_malloc()
    sync = runtime.sync
    link = None
    if runtime.record.relay_url:
        link = BlobLink(
            sync.identity,
            sync.space_bytes,
            runtime.record.relay_url,
            membership_log=lambda: runtime.keyring.log.to_bytes(),
        )
        link.paused = runtime.record.paused
        link.rates = sync.rates
        runtime.tasks.append(asyncio.create_task(link.run(runtime.stop)))
    # LAN peers first: bulk chunks prefer the LAN path when both exist.
    remote: list[RemoteChunks] = [LanChunks(runtime)]
    if link is not None:
        remote.append(RelayChunks(link))
    binary = BinarySync(
        sync,
        ChunkStore(sync.store, sync.space_id),
        link,
        remote=remote,
        lan_enabled=lambda: runtime.lan is not None and runtime.lan.active,
    )
    if link is not None:
        # Hints go over the envelope link (always connected, unlike the blob link); it is
        # created after this component, hence looked up when a hint is sent.
        def send_hint(sealed: bytes) -> bool:
            rl = runtime.link
            return rl is not None and bool(rl.send_hint(sealed))

        binary.hints = HintSender(sync, send_hint)
        binary.prefetch = Prefetcher(binary)
    await binary.start()
    sync.binary = binary
    runtime.tasks.append(asyncio.create_task(binary.run(runtime.stop)))
    return binary


def status_fields(binary: BinarySync | None) -> dict[str, int]:
    """The binary-transfer fields of a space's status (``SpaceStatus``)."""
    if binary is None:
        return {}
    up, up_bytes, down, down_bytes = binary.pending()
    lan = binary.stats.by_path.get("lan", [0, 0])
    relay = binary.stats.by_path.get("relay", [0, 0])
    return {
        "pending_up_files": up,
        "pending_up_bytes": up_bytes,
        "pending_down_files": down,
        "pending_down_bytes": down_bytes,
        "chunks_refused": binary.stats.chunks_refused,
        "chunks_lan": lan[0],
        "chunk_bytes_lan": lan[1],
        "chunks_relay": relay[0],
        "chunk_bytes_relay": relay[1],
        "chunks_prefetched": binary.prefetch.chunks_staged if binary.prefetch else 0,
        "chunks_prefetch_used": binary.prefetch.chunks_used if binary.prefetch else 0,
        "hints_refused": binary.prefetch.refused if binary.prefetch else 0,
    }
