"""Prefetching the chunks of a file another device is still uploading (protocol/hints.py).

Without this, a receiver learns a new file's chunk ids only from its manifest, which the sender
publishes after the whole upload *and* its verifying re-read (the stable-read rule): the
download then starts from zero, serially after everything else. Here the two overlap:

* sender (:class:`HintSender`): as the relay durably acknowledges chunks of a large file being
  uploaded (``BinarySync._pass``), their (offset, id, size) are gathered for ``HINT_COALESCE_S``
  and sent as one sealed hint per upload job (``transfer``, a random id) over the envelope link;
  the relay forwards it to the devices connected now and stores nothing;
* receiver (:class:`Prefetcher`): a hint from a current member (not a reader) is opened and
  checked, and its chunks are fetched from the relay into a *stage*: ``.qmoi-tmp-pf-<transfer>``
  at the root of the space (ignored by the watcher), each written at its offset only after it
  decrypted and its keyed id was recomputed. Nothing is materialized from a stage: when a
  manifest arrives (signed, in the index, as before), ``BinarySync._do_down`` claims the stage
  holding the most of its chunks at their offsets, moves the file into the target's folder as
  the download temp file (a rename: no second copy) and fetches only what the stage lacks.

Bounds for hostile or useless hints (each refusal logs one clear line, rate-limited): at most
``MAX_STAGES`` staged transfers per space, ``STAGE_MAX_BYTES`` of file extent and
``MAX_STAGE_ENTRIES`` chunks each, nothing while the disk is low; a stage no manifest claimed
``STAGE_TTL_S`` after its last hint is deleted, and stages left by a crash are swept at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qmoi_sync.agent.blob_transfer import BlobError
from qmoi_sync.agent.chunker import (
    TempFile,
    adopt_stage,
    discard_download,
    open_stage,
    pwrite_in_thread,
    sweep_stages,
)
from qmoi_sync.agent.materialize import UnsafePathError
from qmoi_sync.agent.peer_chunks import LanChunks
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol.chunks import ChunkKeys, Manifest
from qmoi_sync.protocol.errors import DecryptError, ProtocolError
from qmoi_sync.protocol.hints import (
    HINT_MAX_AGE_S,
    MAX_HINT_ENTRIES,
    HintEntry,
    PrefetchHint,
    open_hint,
    seal_hint,
)
from qmoi_sync.protocol.membership import Role

if TYPE_CHECKING:
    from qmoi_sync.agent.binary_sync import BinarySync
    from qmoi_sync.agent.space import SpaceSync

log = logging.getLogger("qmoi_sync.prefetch")

MiB = 1024 * 1024
#: Files smaller than this are not hinted: their download after the manifest is short anyway.
HINT_MIN_FILE_BYTES = 8 * MiB
#: Acknowledged chunks are gathered this long into one hint (or until a hint is full).
HINT_COALESCE_S = 0.02
#: Staged transfers per space at once (a hint for one more is refused).
MAX_STAGES = 4
#: File extent staged per transfer: chunks beyond it are fetched after the manifest.
STAGE_MAX_BYTES = 1024 * MiB
#: Chunks one stage may be told about (distinct offset/id pairs).
MAX_STAGE_ENTRIES = 4096
#: A stage no manifest claimed this long after its last hint is deleted.
STAGE_TTL_S = 60.0
#: Chunk fetches in flight for stages, per space.
PREFETCH_WINDOW = 8
#: How long one prefetch fetch waits for the relay.
FETCH_TIMEOUT_S = 30.0
#: Refusals are logged at most this often (a flood of bad hints makes one line per interval).
REFUSAL_LOG_S = 10.0
_SWEEP_S = 5.0


# -- sending ---------------------------------------------------------------------------------


class HintSender:
    """Gathers the acknowledged chunks of uploads in progress and sends them as sealed hints."""

    def __init__(self, sync: SpaceSync, send: Callable[[bytes], bool]) -> None:
        self.sync = sync
        self._send = send
        self._pending: dict[bytes, tuple[int, list[HintEntry]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._last_seq = 0
        self.sent = 0

    def add(self, transfer: bytes, epoch: int, entry: HintEntry) -> None:
        _epoch, entries = self._pending.setdefault(transfer, (epoch, []))
        entries.append(entry)
        if len(entries) >= MAX_HINT_ENTRIES:
            self._flush(transfer)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(HINT_COALESCE_S, self.flush)

    def flush(self) -> None:
        self._timer = None
        for transfer in list(self._pending):
            self._flush(transfer)

    def _flush(self, transfer: bytes) -> None:
        epoch, entries = self._pending.pop(transfer)
        ring = self.sync.keyring
        if not ring.can_write():
            return
        # The sender's clock in microseconds, strictly increasing: receivers refuse stale or
        # replayed hints by it (protocol/hints.py).
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        sealed = seal_hint(
            self.sync.identity,
            self.sync.space_bytes,
            ring.current_epoch,
            ring.msg_key,
            self._last_seq,
            PrefetchHint(transfer, epoch, tuple(entries)),
        )
        if self._send(sealed):
            self.sent += 1


# -- receiving -------------------------------------------------------------------------------


@dataclass(eq=False)
class Stage:
    transfer: bytes
    sender: bytes
    keys: ChunkKeys
    file: TempFile | None = None
    #: offset -> (chunk id, size) of the chunks verified and written at that offset
    chunks: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    queue: deque[HintEntry] = field(default_factory=deque)
    seen: set[tuple[int, bytes]] = field(default_factory=set)
    last_hint: float = 0.0
    task: asyncio.Task[None] | None = None
    # Writes and the record of what is where change together (overlapping chunks of an earlier
    # pass of a file still being written: the last one written is the one recorded).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Claimed:
    """A stage taken over by a download: ``have`` = indexes of the manifest's chunks it holds."""

    stage: Stage
    have: set[int]


class Prefetcher:
    def __init__(self, binary: BinarySync) -> None:
        self.binary = binary
        self.stages: dict[bytes, Stage] = {}
        # Transfers claimed or dropped: later hints for them are ignored (pruned after a TTL).
        self._closed: dict[bytes, float] = {}
        self._last_seq: dict[bytes, int] = {}
        self._window = asyncio.Semaphore(PREFETCH_WINDOW)
        self._refusal_logged = 0.0
        self.refused = 0
        self.chunks_staged = 0
        self.chunks_used = 0

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        root = self.binary.sync.root
        with contextlib.suppress(OSError):
            n = await asyncio.to_thread(sweep_stages, root)
            if n:
                log.info("prefetch: removed %d stage file(s) left from before", n)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _SWEEP_S)
                await self._expire(time.monotonic())
        finally:
            for stage in list(self.stages.values()):
                await self._drop(stage, "agent stopping", quiet=True)

    async def _expire(self, now: float) -> None:
        for stage in list(self.stages.values()):
            if now - stage.last_hint > STAGE_TTL_S:
                await self._drop(stage, f"no manifest claimed it within {STAGE_TTL_S:.0f} s")
        for transfer, at in list(self._closed.items()):
            if now - at > 2 * STAGE_TTL_S:
                del self._closed[transfer]

    # -- hints -----------------------------------------------------------------------------
    def _refuse(self, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_S:
            self._refusal_logged = now
            log.warning("prefetch hint refused (%d so far): %s", self.refused, why)

    def on_hint(self, sealed: bytes) -> None:
        """A hint the relay forwarded (from the envelope link's reader: quick, no I/O)."""
        binary = self.binary
        sync = binary.sync
        ring = sync.keyring
        me = sync.identity.public.sign_pk

        def writer(pk: bytes) -> bool:
            return pk != me and ring.role_of(pk) not in (None, Role.reader)

        try:
            opened = open_hint(sealed, sync.space_bytes, ring.msg_keys(), writer)
        except ProtocolError as exc:
            self._refuse(f"{exc.code}: {exc}")
            return
        sender, seq, hint = opened.sender, opened.seq, opened.hint
        if abs(time.time() - seq / 1e6) > HINT_MAX_AGE_S:
            self._refuse("stale (sent long ago, or by a device whose clock is far off)")
            return
        if seq <= self._last_seq.get(sender, 0):
            self._refuse("replayed (not newer than the last hint of its sender)")
            return
        self._last_seq[sender] = seq
        if hint.transfer in self._closed or binary.link is None:
            return
        if any(isinstance(src, LanChunks) and src.serves(sender) for src in binary.remote):
            # The sender is a LAN peer: bulk chunks come from it over the LAN once the manifest
            # is here (preferred to the relay's bandwidth), not from the relay ahead of it.
            return
        stage = self.stages.get(hint.transfer)
        if stage is None:
            keys = binary.chunk_keys(hint.epoch)
            if keys is None:
                self._refuse(f"no chunk keys for epoch {hint.epoch}")
                return
            if len(self.stages) >= MAX_STAGES:
                self._refuse(f"{MAX_STAGES} transfers are staged already")
                return
            gate = sync.gate
            if gate is not None and gate.disk_blocked(sync.root) is not None:
                self._refuse("the disk is low")
                return
            stage = self.stages[hint.transfer] = Stage(hint.transfer, sender, keys)
        elif stage.sender != sender:
            self._refuse("another device's transfer id")
            return
        elif stage.keys.epoch != hint.epoch:
            self._refuse("the epoch of a transfer changed")
            return
        stage.last_hint = time.monotonic()
        skipped = 0
        for e in hint.entries:
            key = (e.offset, e.chunk_id)
            if key in stage.seen:
                continue
            if e.offset + e.size > STAGE_MAX_BYTES or len(stage.seen) >= MAX_STAGE_ENTRIES:
                skipped += 1
                continue
            stage.seen.add(key)
            stage.queue.append(e)
        if skipped:
            # Not hostile by itself (a file over the staged extent): logged at debug only.
            log.debug("prefetch %s: %d chunk(s) beyond the stage's bounds", _short(stage), skipped)
        if stage.queue and (stage.task is None or stage.task.done()):
            stage.task = asyncio.create_task(self._fill(stage))

    # -- staging ---------------------------------------------------------------------------
    async def _fill(self, stage: Stage) -> None:
        if stage.file is None:
            try:
                stage.file = await asyncio.to_thread(
                    open_stage, self.binary.sync.root, stage.transfer.hex()
                )
            except (OSError, UnsafePathError) as exc:
                await self._drop(stage, f"cannot create the stage file: {exc}")
                return
            log.info("prefetch %s: staging chunks of a file still being uploaded", _short(stage))
        running: set[asyncio.Task[None]] = set()
        ready: deque[HintEntry] = deque()
        try:
            while stage.queue or ready or running:
                if not ready and stage.queue:
                    # Chunks a local file holds are not fetched (a new version of a file this
                    # device has: the download reads them locally): one query per batch.
                    batch = [stage.queue.popleft() for _ in range(min(64, len(stage.queue)))]
                    local = await self.binary.chunks.with_sources(e.chunk_id for e in batch)
                    ready.extend(e for e in batch if e.chunk_id not in local)
                while ready and len(running) < PREFETCH_WINDOW:
                    await self._window.acquire()
                    task = asyncio.create_task(self._fetch(stage, ready.popleft()))
                    task.add_done_callback(lambda _t: self._window.release())
                    running.add(task)
                if not running:
                    continue
                _done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*running)

    async def _fetch(self, stage: Stage, e: HintEntry) -> None:
        link = self.binary.link
        if link is None:
            return
        try:
            sealed = await link.get(e.chunk_id, timeout=FETCH_TIMEOUT_S)
        except BlobError as exc:
            log.debug("prefetch %s: chunk not fetched: %s", _short(stage), exc)
            return
        if sealed is None:
            # Hinted but not at the relay (a hostile or confused sender): the download after
            # the manifest fetches (or reports) it.
            log.debug("prefetch %s: the relay does not have a hinted chunk", _short(stage))
            return
        try:
            data = await asyncio.to_thread(stage.keys.decrypt, e.chunk_id, sealed)
            if len(data) != e.size:
                raise DecryptError("chunk has the wrong size")
        except DecryptError as exc:
            self.binary.stats.chunks_refused += 1
            log.warning(
                "prefetch %s: refused chunk %s: %s", _short(stage), e.chunk_id.hex()[:16], exc
            )
            return
        self.binary.stats.fetched("relay", len(sealed))
        del sealed
        f = stage.file
        assert f is not None
        async with stage.lock:
            await pwrite_in_thread(f.fd, data, e.offset)
            end = e.offset + e.size
            for off in [o for o, (_c, n) in stage.chunks.items() if o < end and o + n > e.offset]:
                del stage.chunks[off]
            stage.chunks[e.offset] = (e.chunk_id, e.size)
        self.chunks_staged += 1

    async def _stop(self, stage: Stage) -> None:
        task, stage.task = stage.task, None
        await cancel_and_wait(task)

    async def _drop(self, stage: Stage, why: str, quiet: bool = False) -> None:
        self.stages.pop(stage.transfer, None)
        self._closed[stage.transfer] = time.monotonic()
        await self._stop(stage)
        if stage.file is not None:
            await asyncio.to_thread(discard_download, stage.file)
            stage.file = None
        if not quiet:
            log.info("prefetch %s: stage dropped (%s)", _short(stage), why)

    # -- the download's side ---------------------------------------------------------------
    async def claim(self, manifest: Manifest) -> Claimed | None:
        """The stage holding the most of ``manifest``'s chunks at their offsets, stopped and
        taken out of the prefetcher (None if no stage holds any)."""
        if not self.stages:
            return None
        offsets = []
        pos = 0
        for ref in manifest.chunks:
            offsets.append(pos)
            pos += ref.size
        best: tuple[int, Stage] | None = None
        for stage in self.stages.values():
            if stage.keys.epoch != manifest.epoch or stage.file is None:
                continue
            n = sum(
                1
                for off, ref in zip(offsets, manifest.chunks, strict=True)
                if (off, ref.id) in stage.seen
            )
            if n and (best is None or n > best[0]):
                best = (n, stage)
        if best is None:
            return None
        stage = best[1]
        self.stages.pop(stage.transfer, None)
        self._closed[stage.transfer] = time.monotonic()
        await self._stop(stage)
        have = {
            i
            for i, (off, ref) in enumerate(zip(offsets, manifest.chunks, strict=True))
            if stage.chunks.get(off) == (ref.id, ref.size)
        }
        self.chunks_used += len(have)
        return Claimed(stage, have)

    async def adopt(self, claimed: Claimed, relpath: str, fid_hex: str) -> bool:
        """Move a claimed stage's file into ``relpath``'s folder as its download temp file;
        False (the stage deleted) if that is not possible (another file system, a bad path)."""
        f = claimed.stage.file
        claimed.stage.file = None
        if f is None:
            return False
        ok = await asyncio.to_thread(adopt_stage, f, self.binary.sync.root, relpath, fid_hex)
        if not ok:
            log.info(
                "prefetch %s: the stage could not be moved to %s", _short(claimed.stage), relpath
            )
        return ok


def _short(stage: Stage) -> str:
    return stage.transfer.hex()[:8]
