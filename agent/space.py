"""The single owner of one space's CRDT state.

Watchers and sync links never touch documents directly: they hand this object batches (changed
paths, delivered envelopes) and it serializes all work behind one lock. The order inside a batch
is what makes the agent crash-safe:

1. local edits that are already on disk are ingested *before* remote updates touch the same
   documents, so a remote change never overwrites unsaved-to-CRDT user work;
2. document updates, the relay cursor, replay windows, the outbox and the set of documents that
   still need materializing commit in one SQLite transaction;
3. only then are files written (temp + fsync + rename) and the pending set cleared. A crash
   between 2 and 3 is repaired at start-up from the pending set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import math
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pycrdt import Doc, merge_updates

from qmoi_sync.agent import memtrim
from qmoi_sync.agent.causal import UpdateDecodeError, missing_dependencies
from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.crashpoint import crashpoint
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.ignore import IgnoreRules
from qmoi_sync.agent.index import FileEntry, IndexDoc, created_fids, derive_file_id
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.layout import Layout, LayoutCache
from qmoi_sync.agent.materialize import (
    TEMP_PREFIX,
    ChangedOnDisk,
    DiskStat,
    FileTooLargeError,
    UnsafePathError,
    WriteJob,
    content_hash,
    delete_file,
    delete_link,
    is_temp_name,
    link_target_inside,
    make_dir,
    make_link,
    read_file,
    read_link,
    remove_dir,
    rename_dir,
    rename_file,
    set_executable,
    set_mtime,
    stat_dir,
    stat_file,
    write_files_atomic,
)
from qmoi_sync.agent.offenders import LAN, RELAY, Offenders
from qmoi_sync.agent.rate import SpaceRates
from qmoi_sync.agent.read_retry import ReadRetry
from qmoi_sync.agent.relay_order import RelayOrder
from qmoi_sync.agent.relay_repair import RelayRepair, split_parts
from qmoi_sync.agent.store import (
    COMPACT_AFTER,
    FileRecord,
    SpaceRecord,
    Store,
    records_by_fid,
)
from qmoi_sync.agent.textdoc import (
    adopt_text_doc,
    ingest_disk_text,
    load_text_doc,
    new_text_doc,
    text_of,
)
from qmoi_sync.protocol.envelope import (
    EnvelopeHeader,
    open_envelope,
    parse_header,
    seal,
    verify_envelope_signature,
)
from qmoi_sync.protocol.errors import PathError, ProtocolError, TooLargeError
from qmoi_sync.protocol.identity import DeviceIdentity, device_id
from qmoi_sync.protocol.lan import direct_seq, is_direct_seq
from qmoi_sync.protocol.membership import Role
from qmoi_sync.protocol.paths import conflict_name, validate_relpath
from qmoi_sync.protocol.payload import (
    Capabilities,
    DeviceInfo,
    DocUpdate,
    Payload,
    RepairGap,
    RepairReply,
    RepairRequest,
    StateReply,
    StateRequest,
    Updates,
    decode_payload,
    encode_payload,
)
from qmoi_sync.protocol.replay import ReplayWindow

if TYPE_CHECKING:
    from qmoi_sync.agent.binary_sync import BinarySync
from qmoi_sync.agent.policy import SyncGate

log = logging.getLogger("qmoi_sync.space")

INDEX_DOC_ID = bytes(16)
# Temp names of materialize.write_file_atomic and the watcher's probe (see _sweep_write_temps).
_WRITE_TEMP = re.compile(r"\.qmoi-tmp-(?:[0-9a-f]{12}|probe-[0-9a-f]{8})")
# Files above this size are not text documents (the chunked binary path owns them).
TEXT_MAX_BYTES = 4 * 1024 * 1024
# Keep each envelope comfortably under protocol.envelope.MAX_ENVELOPE.
ENVELOPE_PAYLOAD_BUDGET = 6 * 1024 * 1024
# Text documents kept in memory; the rest live in SQLite until touched.
DOC_CACHE_SIZE = 128
# Files written to disk as one group (materialize.write_files_atomic): their temp files are
# fsynced together, which the file system commits at once (ext4 here: ~5 ms per file one at a
# time, ~0.2 ms each in a group). A group holds two fds at most per distinct folder.
MATERIALIZE_GROUP = 64
# A large local batch (a checkout, an unzip, the first scan) is committed and sealed every this
# many changed files, so sending, the relay and the receivers overlap with the ingest.
LOCAL_SLICE = 128
# Delivered envelopes are applied, committed and written to disk in rounds that touch about
# this many documents (a round finishes the envelope that crossed it): the first files of a
# large delivery appear early, and the round's documents are still in the cache
# (DOC_CACHE_SIZE) when they are written.
REMOTE_SLICE_DOCS = 100
# Changed files read per worker-thread hop while ingesting local changes.
READ_GROUP = 64
# A start-up scan of more files than this is ingested and committed in slices of this many
# paths (bounds its memory: each slice's file contents are held until it is ingested).
RESCAN_SLICE = 5000
# Gap repairs through the relay (subscribing again from before the gap, which gets everything
# after it again) per gap: a gap still open after these is left to LAN peers, and reported.
RELAY_REPAIRS = 4
# After this many attempts (about 100 s) a gap is given up on: envelopes held for it are applied
# (agent/relay_order.py, give_up) so the relay cursor is not held back for good.
GIVE_UP_REPAIRS = 6
UNREPAIRED_GAP = "unrepaired sequence gap (withheld by the relay, or skipped by its sender)"
# A batch reconciles only the entries it touched (agent/layout.py LayoutCache); every entry is
# reconciled again at most this often, and never more than 1/20 of the time (at 100,000 files
# one full pass costs about a second): it retries what a scoped pass does not revisit (a move
# that failed, a record left where its entry no longer is).
FULL_RECONCILE_EVERY_S = 60.0
# The index is compacted into merged parts of about this size, not one state (_compact).
INDEX_PART_BYTES = 2 << 20
FULL_RECONCILE_SHARE = 20.0
# How long a delivered envelope from an unknown sender or of a future epoch waits for the
# membership log that explains it (the relay sends that log just before, on another task).
MEMBERSHIP_WAIT_S = 5.0
# Editor/OS droppings and the space's .qmoiignore patterns: agent/ignore.py (SpaceSync.ignores).
# The `hash` of a folder's record in the `files` table (folders and files share it, keyed by
# path). A file's hash is BLAKE2b-128 of its content: 16 zero bytes is never one in practice.
DIR_MARK = bytes(16)


@dataclass
class SpaceStats:
    quarantined: int = 0
    last_sync: float | None = None
    last_error: str | None = None
    applied_envelopes: int = 0
    sent_envelopes: int = 0
    duplicates: int = 0  # envelopes dropped because they had arrived already (relay or LAN)


@dataclass(frozen=True)
class SnapshotView:
    """What SpaceSync.snapshot_view returns (see there)."""

    index_state: bytes
    cursor: int
    epoch_fence: int
    windows: dict[bytes, bytes]
    seq: int
    doc_ids: list[bytes]


@dataclass
class _LocalChange:
    path: str
    data: bytes
    stat: DiskStat


@dataclass
class _Batch:
    """Updates produced while handling one batch, sealed together at the end."""

    items: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: The items are this device's whole state (a relay move): sealed as full-state Updates.
    full_state: bool = False

    def add(self, doc_id: bytes, update: bytes | None) -> None:
        if update:
            self.items.append((doc_id, update))


class SpaceSync:
    def __init__(
        self,
        store: Store,
        identity: DeviceIdentity,
        record: SpaceRecord,
        keyring: Keyring,
        clock: Callable[[], float] = wall,
    ) -> None:
        self.store = store
        self.identity = identity
        self.record = record
        self.keyring = keyring
        self.clock = clock
        self.space_id = record.space_id
        self.space_bytes = bytes.fromhex(record.space_id)
        self.root = record.folder
        self.device = identity.public.short_id
        self.index = IndexDoc()
        self._docs: OrderedDict[bytes, Doc] = OrderedDict()
        self.files: dict[str, FileRecord] = {}
        # Folders this device has seen or made, as "dir" index entries (hash DIR_MARK, inode).
        # A record outlives a dead entry while the folder still holds something (ignored or
        # unsynced files): the folder is known, not new, and is not sent again.
        self.dirs: dict[str, FileRecord] = {}
        # Whether the folder's file system ignores case (probed at load): names differing only
        # by case then collide in the layout and the later one gets a conflict name.
        self.case_insensitive = False
        # Local paths never sent (built-in droppings + .qmoiignore, re-read when it changes).
        self.ignores = IgnoreRules(self.root)
        # Changes to `files` not yet in SQLite (path -> record, None = forget): written in the
        # transaction that commits the document updates they belong to (_write_file_records).
        self._file_ops: dict[str, FileRecord | None] = {}
        self.windows: dict[bytes, ReplayWindow] = {}
        # Per-sender order, gaps and their repair on the relay path (agent/relay_order.py).
        self.order = RelayOrder()
        # State-vector resync through the relay, for gaps re-subscribing does not fill
        # (agent/relay_repair.py).
        self.repair = RelayRepair()
        # Who sent what this device refused (agent/offenders.py): `status` names them.
        self.offenders = Offenders()
        # Asked (by the relay-order repair) to resync with a LAN peer about a sender's gap;
        # returns False when no LAN peer can answer. Set by agent/peer_sync.py.
        self.on_stream_gap: Callable[[bytes], Awaitable[bool]] | None = None
        self.lock = asyncio.Lock()
        self.outbox_changed = asyncio.Event()
        self.stats = SpaceStats()
        # Bytes sent / received for this space over the last seconds (relay, LAN, chunks).
        self.rates = SpaceRates()
        self.warnings: dict[str, str] = {}
        self.conflicts = 0
        # The layout, kept up to date per changed entry (rebuilt when the index is replaced).
        self._layouts: LayoutCache | None = None
        self._layouts_of: IndexDoc | None = None
        self._full_at = -math.inf  # time.monotonic() of the last reconcile of every entry
        self._full_cost = 0.0
        # Paths whose file record went away since the last reconcile: an entry placed there
        # may have waited for the path (a local file of another entry stood in the way), so
        # the next scoped pass takes it in even though nothing changed in it.
        self._vacated: set[str] = set()
        self.seq = 0
        self.cursor = 0
        # Relay sequences of this device's own envelopes above the cursor (the relay never
        # delivers them back): the cursor moves over them once everything before is applied.
        self._own_above: set[int] = set()
        # The relay cursor last written to the store (see save_cursor).
        self._saved_cursor = 0
        # Resource policy (agent/policy.py); None = never defer, never hold writes back.
        self.gate: SyncGate | None = None
        # This device's capabilities for this space's folder, published with every DeviceInfo.
        self.capabilities_source: Callable[[Path], Capabilities] | None = None
        # Large files whose ingest waits until bulk work is allowed (path -> size).
        self.deferred: dict[str, int] = {}
        # Documents committed but not written to disk yet (the disk was full), and for the ones
        # with a stale file on disk the document state that file was written from, so a local
        # edit of the stale file merges with the remote changes instead of reverting them.
        self.unwritten: set[bytes] = set()
        self._bases: dict[bytes, bytes] = {}
        self._bases_changed: set[bytes] = set()
        # Paths a write found changed on disk (materialize.ChangedOnDisk): ingested by _finish.
        self._changed_on_disk: set[str] = set()
        # Tracked documents as they were before the current batch's remote changes.
        self._inflight_bases: dict[bytes, bytes] = {}
        self._disk_note: str | None = None
        # Highest epoch of any envelope opened in relay order: see keyring.sender_role.
        self.epoch_fence = 0
        # Set by the relay link when the relay says this device is not (or no longer) a member.
        self.refused: str | None = None
        self._keyring_changed = asyncio.Event()
        # Set while handle_remote waits for a longer membership log: the relay link's reader
        # then reads past its delivery bound, so the Membership frame behind the queued
        # envelopes is read (agent/deliver_gate.py).
        self.membership_wanted = asyncio.Event()
        self._gave_up_waiting_on: Keyring | None = None
        # Called synchronously, right after the commit, with every (seq, envelope) this device
        # seals into its stream, so LAN peers get it at once (agent/peer_sync.py).
        self.on_sealed: Callable[[list[tuple[int, bytes]]], None] | None = None
        # Called by the relay link when the relay's log no longer holds what this device needs
        # (it was truncated after a snapshot): restores from the snapshot (snapshot_service).
        self.on_log_truncated: Callable[[int], Awaitable[None]] | None = None
        # Called synchronously at the end of every batch, still under the lock, with the ids of
        # the documents remote updates changed in it (agent/settings_sync.py listens).
        self.batch_listeners: list[Callable[[set[bytes]], None]] = []
        # Binary and large files (agent/binary_sync.py); None: they are skipped with a warning.
        self.binary: BinarySync | None = None
        # Files whose read failed, tried again with backoff (the daemon runs its timer).
        self.read_retry = ReadRetry()

    # -- membership -----------------------------------------------------------------------------
    def set_keyring(self, keyring: Keyring) -> None:
        """Switch to a grown membership log (new members, roles, epochs). Anything sealed from
        now on uses its current epoch."""
        self.keyring = keyring
        self._keyring_changed.set()

    @property
    def send_block(self) -> str | None:
        """Why this device must not send content changes, or None if it may."""
        if self.refused is not None:
            return self.refused
        role = self.keyring.role_of(self.identity.public.sign_pk)
        if role is None:
            return "this device was removed from the space"
        if role is Role.reader:
            return "read-only member"
        if not self.keyring.can_write():
            return f"no key for epoch {self.keyring.current_epoch}"
        return None

    # -- loading ------------------------------------------------------------------------------
    async def load(self) -> None:
        state, updates = await self.store.load_doc(self.space_id, INDEX_DOC_ID)
        if state:
            self.index.apply_update(state)
        for u in updates:
            self.index.apply_update(u)
        problem = self.index.schema_problem()
        if problem is not None:
            raise UserError(f"space {self.space_id[:8]}: {problem}")
        records = await self.store.files(self.space_id)
        self.dirs = {p: r for p, r in records.items() if r.hash == DIR_MARK}
        self.files = {p: r for p, r in records.items() if r.hash != DIR_MARK}
        self.windows = {
            s: ReplayWindow.from_bytes(w)
            for s, w in (await self.store.load_replay(self.space_id)).items()
        }
        self.seq = await self.store.get_counter(self.space_id, "seq")
        self.cursor = await self.store.get_counter(self.space_id, "relay_cursor")
        self._saved_cursor = self.cursor
        self.epoch_fence = await self.store.get_counter(self.space_id, "epoch_fence")
        self.stats.quarantined = await self.store.quarantine_count(self.space_id)
        for sender, what, count, last in await self.store.quarantine_by_sender(self.space_id):
            self.offenders.note(sender, _what(what), count, at=last)
        last = await self.store.get_counter(self.space_id, "last_sync_ms", 0)
        self.stats.last_sync = last / 1000 if last else None
        self.unwritten = set(await self.store.get_pending(self.space_id))
        self._bases = await self.store.materialize_bases(self.space_id)
        self.root.mkdir(parents=True, exist_ok=True)
        self.case_insensitive = await asyncio.to_thread(_probe_case_insensitive, self.root)
        await asyncio.to_thread(self._restore_staged_moves)
        await asyncio.to_thread(self._sweep_write_temps)

    def _sweep_write_temps(self) -> None:
        """Remove temp files of atomic writes (and watch probes) a killed agent left behind.

        Only exact ``.qmoi-tmp-<12 hex>`` / ``.qmoi-tmp-probe-<8 hex>`` names: a crash before
        their rename means their content never became the file, and the CRDT still holds it.
        Resumable download temps and staged moves have other names and are kept."""
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not is_temp_name(d)]
            for name in filenames:
                if _WRITE_TEMP.fullmatch(name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))

    def _restore_staged_moves(self) -> None:
        """Put files stranded under ``.qmoi-tmp-mv-<fid>`` back at their recorded paths.

        ``_reconcile_once`` moves files in two steps (old -> temporary name -> new) so swaps
        never clobber each other. A crash between the steps leaves files under the temporary
        name while their records still name the old path, and the rescan would read every one
        of them as deleted (and send the deletes: data loss on every device). Restored, they
        match their records again and the reconcile redoes the moves."""
        prefix = ".qmoi-tmp-mv-"
        try:
            names = [n for n in os.listdir(self.root) if n.startswith(prefix)]
        except OSError:
            return
        if not names:
            return
        by_fid = {rec.fid.hex(): path for path, rec in self.files.items()}
        for name in names:
            old = by_fid.get(name[len(prefix) :])
            if old is None or stat_file(self.root, old) is not None:
                continue  # unknown, or its old path is taken: leave it, never delete data
            try:
                rename_file(self.root, name, old)
            except (OSError, UnsafePathError) as exc:
                self.warnings[f"move:{old}"] = f"cannot put {old} back after a crash: {exc}"

    def _read_settled(self, path: str) -> None:
        self.read_retry.settled(path)
        self.warnings.pop(f"read:{path}", None)

    async def _doc(self, fid: bytes) -> Doc:
        doc = self._docs.get(fid)
        if doc is not None:
            self._docs.move_to_end(fid)
            return doc
        state, updates = await self.store.load_doc(self.space_id, fid)
        doc = load_text_doc(state) if state else new_text_doc()
        for u in updates:
            doc.apply_update(u)
        self._docs[fid] = doc
        while len(self._docs) > DOC_CACHE_SIZE:
            self._docs.popitem(last=False)
        return doc

    async def _adopt_new_doc(self, fid: bytes, scratch: Doc) -> bool:
        """A remote update of a text document this device does not have yet: the scratch
        document it was checked on (_scratch_apply) becomes the document, instead of applying
        the same update a second time to a new empty one. False if the document exists."""
        if fid in self._docs or await self.store.has_doc(self.space_id, fid):
            return False
        self._docs[fid] = adopt_text_doc(scratch)
        while len(self._docs) > DOC_CACHE_SIZE:
            self._docs.popitem(last=False)
        return True

    def drop_loaded_docs(self) -> None:
        """Forget the cached text documents (they reload from the store on demand) and keep the
        index only in its encoded form until next used. Called when the agent goes quiet after
        a large batch (agent/memtrim.py); never mid-batch."""
        if not self.lock.locked():
            self._docs.clear()
            self.index.unload()  # ~2.3 KB per file while quiet (see IndexDoc.unload)

    # -- local side ---------------------------------------------------------------------------
    def relpath_of(self, abspath: str) -> str | None:
        try:
            rel = os.path.relpath(abspath, self.root)
        except ValueError:
            return None
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        return rel.replace(os.sep, "/")

    async def handle_local(self, paths: Iterable[str]) -> None:
        """Ingest the current disk state of these relative paths (files or folders)."""
        async with self.lock:
            self._begin_batch()
            batch = _Batch()
            await self._ingest_local(set(paths), batch, gate=True, publish_every=LOCAL_SLICE)
            await self._finish(batch, dirty=set(), delivered=[])

    async def rescan(self) -> None:
        """Pick up everything that changed while the agent was not watching."""
        async with self.lock:
            self._begin_batch()
            pending = await self._pending_materialize()
            self._reload_ignores()
            on_disk, folders = await asyncio.to_thread(self._walk, "")
            paths = set(on_disk) | set(self.files)
            all_folders = set(folders) | set(self.dirs)
            # A first index of 100,000 files read every file before ingesting any (RSS > 700
            # MB): slices of RESCAN_SLICE paths are read, ingested and committed in turn. Only
            # when no tracked file is missing from the walk: a rename is a missing file paired
            # with a new one *within one batch*, and slices could separate the two. Folders all
            # go with the first slice (their entries precede their files'; a folder rename is
            # paired among them).
            if len(paths) <= RESCAN_SLICE or not set(self.files) <= set(on_disk):
                slices = [paths]
            else:
                ordered = sorted(paths)
                slices = [
                    set(ordered[i : i + RESCAN_SLICE]) for i in range(0, len(ordered), RESCAN_SLICE)
                ]
            for i, part in enumerate(slices):
                if i:
                    self._begin_batch()
                batch = _Batch()
                await self._ingest_local(
                    part,
                    batch,
                    walked=True,
                    gate=True,
                    publish_every=LOCAL_SLICE,
                    folders=all_folders if i == 0 else set(),
                )
                if i < len(slices) - 1:
                    # Commit only: reconciling lays out every entry (O(files)), once at the end
                    # is enough (a restart on 100,000 unchanged files spent minutes here).
                    await self._commit(batch.items, [], pending=None)
                else:
                    await self._finish(batch, dirty=pending, delivered=[])

    def _walk_files(self, under: str) -> list[str]:
        return self._walk(under)[0]

    def _walk(self, under: str) -> tuple[list[str], list[str]]:
        """(files and symlinks, folders) under ``under`` ("" = the root; ``under`` itself is
        listed as a folder), skipping temp names and ignored folders."""
        base = self.root / under if under else self.root
        out: list[str] = []
        folders: list[str] = [under] if under else []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            # Symlinks to folders are listed as folders (never followed): report them as entries.
            out.extend(rel_dir + d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            dirnames[:] = [
                d
                for d in dirnames
                if not is_temp_name(d) and not self.ignores.is_ignored(rel_dir + d, is_dir=True)
            ]
            folders.extend(
                rel_dir + d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))
            )
            for name in filenames:
                out.append(rel_dir + name)
        return out, folders

    async def _ingest_local(
        self,
        paths: set[str],
        batch: _Batch,
        walked: bool = False,
        set_aside: bool = False,
        gate: bool = False,
        publish_every: int = 0,
        folders: set[str] | None = None,
    ) -> None:
        """Take local changes of these paths into the CRDT. On a device that may not send
        (reader, removed) they are only detected and reported; with ``set_aside`` (a remote
        change is about to land on them) changed files are first moved to a conflict name.
        With ``gate`` (the watcher/scan entry points) the resource policy may defer large files;
        a local edit absorbed before a remote change lands is never deferred. With
        ``publish_every`` (only where ``batch`` holds nothing but local changes) the updates are
        committed and sealed every that many changed files, so the relay and the other devices
        work on the first files while the rest are ingested. ``folders``: the folder paths to check
        as well (a walk lists them; otherwise they are derived from ``paths``)."""
        changed: list[_LocalChange] = []
        gone: list[str] = []
        bins: list[str] = []  # binary or > TEXT_MAX_BYTES: chunked by self.binary
        mode_changed: list[tuple[bytes, int]] = []
        links: list[tuple[str, tuple[str, DiskStat] | None]] = []  # symlinks now / before
        expanded: set[str] = set()
        maybe_folders: set[str] = set()
        dir_paths: set[str] = set(folders or ())
        if self._reload_ignores() and not walked:
            # New patterns: files they no longer ignore are picked up now, without a restart.
            on_disk, on_disk_dirs = await asyncio.to_thread(self._walk, "")
            paths = paths | set(on_disk)
            dir_paths.update(on_disk_dirs)
        for path in sorted(paths):
            full = self.root / path
            if not walked and full.is_dir() and not full.is_symlink():
                inside, subdirs = await asyncio.to_thread(self._walk, path)
                expanded.update(inside)
                dir_paths.update(subdirs)
                if path in self.files:
                    expanded.add(path)  # a tracked file replaced by a folder: it is gone
                continue
            expanded.add(path)
            if not walked and path not in self.files:
                maybe_folders.add(path)
        # A folder moved away or deleted reports only itself: its tracked files are gone. (A
        # walk already lists every tracked file; one pass over them, not one per path: with
        # 10,000 files a rescan spent ~10 s here.)
        expanded.update(_tracked_under(self.files, maybe_folders))
        if not walked:
            dir_paths.update(p for p in maybe_folders if p in self.dirs)
            dir_paths.update(_tracked_under(self.dirs, maybe_folders))
            # A new file's folders may have been made before the watch saw them (mkdir -p).
            for path in expanded:
                if path not in self.files:
                    dir_paths.update(self._untracked_parents(path))
        to_read: list[str] = []
        for path in sorted(expanded):
            if self.ignores.is_ignored(path):
                self._read_settled(path)
                continue
            try:
                validate_relpath(path)
            except PathError as exc:
                self.warnings[f"path:{path}"] = f"not synced: {exc}"
                continue
            rec = self.files.get(path)
            link = read_link(self.root, path)
            if link is not None or (rec is not None and self._is_link(rec.fid)):
                links.append((path, link))
                continue
            st = stat_file(self.root, path)
            if st is None:
                if rec is not None:
                    gone.append(path)
                else:
                    self.warnings.pop(f"held:{path}", None)
                self._read_settled(path)
                continue
            if rec is not None and (st.size, st.mtime_ns, st.inode) == rec.stat_key():
                # A chmod changes neither size nor mtime: compare the exec bit with the entry.
                entry = self.index.entry(rec.fid.hex())
                if entry is not None and entry.alive and _exec_differs(st.mode, entry.mode):
                    mode_changed.append((rec.fid, _mode_bits(st.mode)))
                continue
            if gate and self._defer_bulk(path, st.size):
                continue
            to_read.append(path)
        # Read in groups, one worker-thread hop per group (a hop per file cost ~0.1 ms each
        # and delayed the first slice of a burst).
        for start in range(0, len(to_read), READ_GROUP):
            group = to_read[start : start + READ_GROUP]
            results = await asyncio.to_thread(_read_files, self.root, group)
            for path, got in zip(group, results, strict=True):
                rec = self.files.get(path)
                if isinstance(got, FileTooLargeError):
                    self._read_settled(path)
                    bins.append(path)
                    continue
                if isinstance(got, (OSError, UnsafePathError)):
                    delay = self.read_retry.failed(path)
                    self.warnings[f"read:{path}"] = (
                        f"{path}: cannot read ({getattr(got, 'strerror', None) or got}); "
                        f"retrying in {delay:.0f} s"
                    )
                    continue
                self._read_settled(path)
                if got is None:
                    if rec is not None:
                        gone.append(path)
                    continue
                data, st = got
                if rec is not None and content_hash(data) == rec.hash:
                    await self._record(path, rec.fid, data, st)
                    continue
                changed.append(_LocalChange(path, data, st))
        gone.sort()  # as if read in path order with the rest (rename matching order)

        block = self.send_block
        if block is None:
            # Folders first: their entries precede their files' in the batch.
            await self._ingest_dirs(dir_paths, batch)
        if block is not None:
            self._hold_back(block, changed, gone, set_aside)
            for path, _link in links:
                self.warnings[f"held:{path}"] = f"{block}: local change to {path} not synced"
            for path in bins:
                self.warnings[f"held:{path}"] = f"{block}: local change to {path} not synced"
            return
        for fid, mode in mode_changed:
            batch.add(INDEX_DOC_ID, self.index.set_mode(fid.hex(), mode, self.device))

        # A delete plus an add of identical content in one batch is a rename: keep the file id.
        gone_by_hash: dict[bytes, list[str]] = {}
        for path in gone:
            gone_by_hash.setdefault(self.files[path].hash, []).append(path)
        entries = self.index.entries()
        new: list[tuple[_LocalChange, str]] = []  # new text files, ingested together
        for i, ch in enumerate(changed):
            if publish_every and i:
                if i % publish_every == 0:
                    await self._ingest_new(new, entries, batch)
                    new = []
                    await self._publish_slice(batch)
                elif i % 16 == 0:
                    await asyncio.sleep(0)  # the relay link sends the previous slice meanwhile
            rec = self.files.get(ch.path)
            text = _as_text(ch.data)
            kind = entries[rec.fid.hex()].kind if rec and rec.fid.hex() in entries else None
            if text is None or (not ch.data and kind == "binary"):
                # An emptied binary file stays binary: a rewrite in place (truncate, then
                # write) is seen empty in between, and taken for text it replaced the file's
                # entry by a text one and then by a new binary one, cutting the file off from
                # concurrent versions. The binary path waits for the file to be quiet.
                bins.append(ch.path)
                continue
            if rec is not None and kind == "binary":
                # binary -> text: a new text entry replaces the binary one
                batch.add(INDEX_DOC_ID, self._delete_local(rec, entries[rec.fid.hex()]))
                await self._forget(ch.path)
                rec = None
            if rec is not None:
                await self._ingest_edit(rec.fid, ch, text, batch)
                continue
            candidates = gone_by_hash.get(content_hash(ch.data))
            if candidates:
                old = candidates.pop(0)
                fid = self.files[old].fid
                batch.add(INDEX_DOC_ID, self.index.rename(fid.hex(), ch.path, self.device))
                await self._forget(old)
                await self._record(ch.path, fid, ch.data, ch.stat)
                gone.remove(old)
                continue
            new.append((ch, text))
        await self._ingest_new(new, entries, batch)
        for path in bins:
            if self.binary is None:
                self.warnings[f"binary:{path}"] = f"{path}: binary/large file not synced (skipped)"
                continue
            st = stat_file(self.root, path)
            if st is None:
                continue
            moved = next((g for g in gone if _same_file(self.files[g], st)), None)
            if moved is not None and path not in self.files:
                # mv keeps inode, size and mtime: a rename, the file id stays
                fid = self.files[moved].fid
                batch.add(INDEX_DOC_ID, self.index.rename(fid.hex(), path, self.device))
                await self._record_stat(path, fid, self.files[moved].hash, st)
                await self._forget(moved)
                gone.remove(moved)
                continue
            if path not in self.files:
                moved = _changed_and_moved(gone, st, self.files, entries)
            if moved is not None:
                # The same inode, changed since last synced: renamed with a local edit not
                # published yet (a binary upload waits for the relay). Still a rename, and the
                # edit a new version of the same file: ingested as a delete plus a new file, it
                # claimed to have seen versions from other devices that never reached this disk
                # (its own change stood there), and killed them (chaos soak seed 1615408819).
                # The record keeps the old stat, so the edit is still seen as one and uploaded.
                old = self.files[moved]
                batch.add(INDEX_DOC_ID, self.index.rename(old.fid.hex(), path, self.device))
                await self._record_stat(
                    path, old.fid, old.hash, DiskStat(old.size, old.mtime_ns, old.inode)
                )
                await self._forget(moved)
                gone.remove(moved)
            self.binary.local_changed(path, st.size)
        for path in gone:
            rec = self.files[path]
            entry = entries.get(rec.fid.hex())
            if entry is not None and entry.alive:
                batch.add(INDEX_DOC_ID, self._delete_local(rec, entry))
            await self._forget(path)
        for path, link in links:
            await self._ingest_link(path, link, entries, batch)

    def _delete_local(self, rec: FileRecord, entry: FileEntry) -> bytes:
        """The index update for a file deleted (or replaced by another kind) on this disk.
        A binary file's delete claims only the versions that reached this disk."""
        seen = None
        if entry.kind == "binary" and self.binary is not None:
            seen = self.binary.delete_seen(rec.fid, entry.edits, rec.hash)
        return self.index.delete(rec.fid.hex(), self.device, self.clock(), seen)

    async def _publish_slice(self, batch: _Batch) -> None:
        """Commit and seal what a large local batch produced so far: the same transaction as at
        the end of a batch (updates, envelopes, the records of the files they came from)."""
        await self._commit(batch.items, [], pending=None)
        batch.items.clear()
        await asyncio.sleep(0)  # let the relay link read the outbox

    def _untracked_parents(self, path: str) -> list[str]:
        out = []
        i = path.rfind("/")
        while i > 0 and path[:i] not in self.dirs:
            out.append(path[:i])
            i = path.rfind("/", 0, i)
        return out

    async def _ingest_dirs(self, candidates: set[str], batch: _Batch) -> None:
        """Folders appeared, went away or moved at these paths: one "dir" entry per folder.

        A new folder with the inode of a vanished tracked one is that folder renamed (``mv``
        keeps the inode): its entry moves, so other devices move the folder in one rename. A
        vanished folder deletes every alive "dir" entry claiming its path. Ignored folders are
        never sent (a record is kept while ignored, like a file's)."""
        appeared: list[tuple[str, DiskStat]] = []
        vanished: list[str] = []
        for path in sorted(candidates):
            name = path.rpartition("/")[2]
            if not path or is_temp_name(name) or self.ignores.is_ignored(path, is_dir=True):
                continue
            try:
                validate_relpath(path)
            except PathError as exc:
                self.warnings[f"path:{path}"] = f"not synced: {exc}"
                continue
            st = stat_dir(self.root, path)
            rec = self.dirs.get(path)
            if st is None:
                if rec is not None:
                    vanished.append(path)
                continue
            if rec is None:
                appeared.append((path, st))
            elif rec.inode != st.inode:
                await self._record_dir(path, rec.fid, st)  # removed and made again: same folder
        if not appeared and not vanished:
            return
        entries = self.index.entries()
        alive_at: dict[str, list[str]] = {}
        for e in entries.values():
            if e.kind == "dir" and e.alive and e.path is not None:
                alive_at.setdefault(e.path, []).append(e.fid)
        by_inode = {self.dirs[p].inode: p for p in vanished}
        for path, st in appeared:
            old = by_inode.pop(st.inode, None)
            if old is not None:
                fid = self.dirs[old].fid
                e = entries.get(fid.hex())
                if e is not None and e.alive and e.path == old:
                    batch.add(INDEX_DOC_ID, self.index.rename(fid.hex(), path, self.device))
                    await self._forget_dir(old)
                    await self._record_dir(path, fid, st)
                    vanished.remove(old)
                    continue
            claimed = alive_at.get(path)
            if claimed:  # a folder an entry already wants (made for a remote file): adopt it
                await self._record_dir(path, bytes.fromhex(min(claimed)), st)
                continue
            fid = derive_file_id(self.keyring.file_id_key, path, b"", kind="dir")
            existing = entries.get(fid.hex())
            if existing is not None and existing.alive and existing.path != path:
                fid = os.urandom(16)
            batch.add(
                INDEX_DOC_ID,
                self.index.create(fid.hex(), path, "dir", 0o755, self.device, self.clock()),
            )
            await self._record_dir(path, fid, st)
        for path in vanished:
            own = self.dirs[path].fid.hex()
            for fid_hex in sorted(set(alive_at.get(path, [])) | {own}):
                e = self.index.entry(fid_hex)
                if e is not None and e.alive and e.path == path:
                    batch.add(INDEX_DOC_ID, self.index.delete(fid_hex, self.device, self.clock()))
            await self._forget_dir(path)

    def _is_link(self, fid: bytes) -> bool:
        entry = self.index.entry(fid.hex())
        return entry is not None and entry.kind == "symlink"

    async def _ingest_link(
        self,
        path: str,
        link: tuple[str, DiskStat] | None,
        entries: dict[str, FileEntry],
        batch: _Batch,
    ) -> None:
        """A symlink appeared, changed target or went away at ``path`` (links are recorded
        with their target string, never followed)."""
        rec = self.files.get(path)
        if rec is not None:
            if (
                link is not None
                and self._is_link(rec.fid)
                and rec.hash == content_hash(link[0].encode())
            ):
                return  # unchanged (or the link we created ourselves)
            if link is not None and self._is_link(rec.fid):
                batch.add(INDEX_DOC_ID, self.index.set_target(rec.fid.hex(), link[0], self.device))
                await self._record_link(path, rec.fid, link)
                return
            # A link replaced by a file or folder, a file replaced by a link, or a link removed.
            entry = self.index.entry(rec.fid.hex())
            if entry is not None and entry.alive:
                batch.add(INDEX_DOC_ID, self.index.delete(rec.fid.hex(), self.device, self.clock()))
            await self._forget(path)
            if link is None:
                if _lexists(self.root / path):
                    await self._ingest_local({path}, batch)  # what replaced it is new
                return
        assert link is not None
        target = link[0]
        fid = derive_file_id(self.keyring.file_id_key, path, target.encode(), kind="symlink")
        existing = entries.get(fid.hex())
        if existing is not None and not (existing.alive and existing.path == path):
            fid, existing = os.urandom(16), None
        if existing is None:
            now = self.clock()
            batch.add(
                INDEX_DOC_ID, self.index.create(fid.hex(), path, "symlink", 0o777, self.device, now)
            )
            batch.add(INDEX_DOC_ID, self.index.set_target(fid.hex(), target, self.device))
        await self._record_link(path, fid, link)

    async def _record_link(self, path: str, fid: bytes, link: tuple[str, DiskStat]) -> None:
        await self._record_stat(path, fid, content_hash(link[0].encode()), link[1])

    async def _reconcile_links(
        self,
        entries: dict[str, FileEntry],
        layout: Layout,
        cache: LayoutCache,
        create: bool,
        records: dict[str, FileRecord],
        scope: set[bytes] | None = None,
        gone_from: Iterable[str] = (),
    ) -> None:
        """Symlinks: (re)create those whose target stays inside the space, remove the ones we
        made that are no longer wanted. A link whose target leaves the space (absolute, or
        ``..`` above the root) is recorded and synced but never created: a status warning.
        Removal runs before files are placed (``create`` False), creation after them."""
        placed: dict[bytes, tuple[str, str]] = {}
        for path, fid_hex in cache.links.items():
            e = entries[fid_hex]
            if e.target is None:
                continue
            if scope is not None and bytes.fromhex(fid_hex) not in scope:
                continue
            try:
                validate_relpath(path)
            except PathError as exc:
                self.warnings[f"remote:{fid_hex}"] = f"refused a remote path: {exc}"
                continue
            placed[bytes.fromhex(fid_hex)] = (path, e.target)
        for path, rec in list(records.items()):
            if not self._is_link(rec.fid):
                continue
            where = placed.get(rec.fid)
            if (
                where is not None
                and where[0] == path
                and content_hash(where[1].encode()) == rec.hash
            ):
                continue
            if where is not None and rec.fid.hex() in layout.conflicts:
                # Our own link lost its path to a file or folder: the user's link stays where
                # it is (nothing is written through it); it syncs under the conflict name.
                self.warnings[f"linkkept:{path}"] = (
                    f"{path}: symlink kept here; it syncs as {where[0]} (the path is taken)"
                )
                continue
            self.warnings.pop(f"linkkept:{path}", None)
            got = read_link(self.root, path)
            if got is not None and content_hash(got[0].encode()) == rec.hash:
                delete_link(self.root, path, got[0])
            await self._forget(path)
        if not create:
            return
        stale = {k for k in self.warnings if k.startswith("link:")}
        if scope is not None:
            # A scoped pass settles only the links it looks at: other warnings stay.
            stale &= (
                {f"link:{p}" for p, _ in placed.values()}
                | {f"link:{p}" for p, rec in records.items() if rec.fid in scope}
                | {f"link:{p}" for p in gone_from}
            )
        kept = {rec.fid for rec in records.values() if self._is_link(rec.fid)}
        for fid, (path, target) in placed.items():
            have = self.files.get(path)
            if (have is not None and have.fid == fid) or fid in kept:
                continue
            if not link_target_inside(path, target):
                self.warnings[f"link:{path}"] = (
                    f"{path}: symlink to {target!r} points outside the space: recorded, not "
                    "created here"
                )
                stale.discard(f"link:{path}")
                continue
            if have is not None or _lexists(self.root / path):
                self.warnings[f"link:{path}"] = f"{path}: symlink not created, the path is taken"
                stale.discard(f"link:{path}")
                continue
            try:
                st = await asyncio.to_thread(make_link, self.root, path, target)
            except (OSError, UnsafePathError) as exc:
                self.warnings[f"link:{path}"] = f"{path}: cannot create the symlink: {exc}"
                stale.discard(f"link:{path}")
                continue
            await self._record_link(path, fid, (target, st))
        for key in stale:
            self.warnings.pop(key, None)

    def _reload_ignores(self) -> bool:
        changed = self.ignores.reload()
        if self.ignores.error is not None:
            self.warnings["ignore"] = self.ignores.error
        else:
            self.warnings.pop("ignore", None)
        return changed

    async def _ingest_edit(self, fid: bytes, ch: _LocalChange, text: str, batch: _Batch) -> None:
        doc = await self._doc(fid)
        base = self._bases.get(fid)
        update = ingest_disk_text(doc, text, base_state=base)
        if update and base is not None:
            # The file on disk is stale (disk full): the edit was diffed against what it was
            # written from. The document now differs from the disk; rewrite it when possible.
            base_doc = load_text_doc(base)
            base_doc.apply_update(update)
            self._bases[fid] = base_doc.get_update()
            self._bases_changed.add(fid)
            self.unwritten.add(fid)
        if update:
            batch.add(fid, update)
            batch.add(INDEX_DOC_ID, self.index.record_edit(fid.hex(), self.device))
        mode = _mode_of(ch.stat, self.root / ch.path)
        entry = self.index.entry(fid.hex())
        if update and entry is not None and entry.mtime_ns != ch.stat.mtime_ns:
            batch.add(INDEX_DOC_ID, self.index.set_mtime(fid.hex(), ch.stat.mtime_ns))
        if entry is not None and entry.mode != mode:
            batch.add(INDEX_DOC_ID, self.index.set_mode(fid.hex(), mode, self.device))
        await self._record(ch.path, fid, ch.data, ch.stat)

    async def _ingest_new(
        self, new: list[tuple[_LocalChange, str]], entries: dict[str, FileEntry], batch: _Batch
    ) -> None:
        """New text files: their index entries in one index transaction, then their text."""
        if not new:
            return
        planned: list[tuple[_LocalChange, str, bytes, bool]] = []
        for ch, text in new:
            # Same path + same content on two devices ⇒ same file id and byte-identical seed
            # updates, so a folder that already exists on both sides merges instead of doubling.
            fid = derive_file_id(self.keyring.file_id_key, ch.path, ch.data)
            existing = entries.get(fid.hex())
            if existing is not None and not (existing.alive and existing.path == ch.path):
                fid = os.urandom(16)
                existing = None
            planned.append((ch, text, fid, existing is None))
        with self.index.batch() as index_updates:  # synchronous: nothing else runs meanwhile
            for ch, _text, fid, create in planned:
                if create:
                    mode = _mode_of(ch.stat, self.root / ch.path)
                    self.index.create(
                        fid.hex(),
                        ch.path,
                        "text",
                        mode,
                        self.device,
                        self.clock(),
                        mtime_ns=ch.stat.mtime_ns,
                    )
        for update in index_updates:
            batch.add(INDEX_DOC_ID, update)
        for ch, text, fid, _create in planned:
            doc = await self._doc(fid)
            batch.add(fid, ingest_disk_text(doc, text))
            await self._record(ch.path, fid, ch.data, ch.stat)

    def _hold_back(
        self, block: str, changed: list[_LocalChange], gone: list[str], set_aside: bool
    ) -> None:
        """Report local changes this device may not send; never seal them (a reader's CRDT stays
        an exact replica of what the writers sent)."""
        for ch in changed:
            note = f"{block}: local change to {ch.path} not synced"
            if set_aside:
                aside = conflict_name(ch.path, self.clock(), self.device)
                try:
                    moved = rename_file(self.root, ch.path, aside)
                except (OSError, UnsafePathError) as exc:
                    moved = None
                    note += f" (could not move it aside: {exc})"
                if moved is not None:
                    note += f"; kept as {aside}"
            self.warnings[f"held:{ch.path}"] = note
        for path in gone:
            self.warnings[f"held:{path}"] = f"{block}: local deletion of {path} not synced"
        if changed or gone:
            log.info(
                "space %s: %d local change(s) not synced (%s)",
                self.space_id[:8],
                len(changed) + len(gone),
                block,
            )

    async def _record(self, path: str, fid: bytes, data: bytes, st: DiskStat) -> None:
        rec = FileRecord(path, fid, content_hash(data), st.size, st.mtime_ns, st.inode)
        self.files[path] = rec
        self.warnings.pop(f"held:{path}", None)
        self._file_ops[path] = rec

    async def _record_stat(self, path: str, fid: bytes, digest: bytes, st: DiskStat) -> None:
        rec = FileRecord(path, fid, digest, st.size, st.mtime_ns, st.inode)
        self.files[path] = rec
        self._file_ops[path] = rec

    async def _forget(self, path: str) -> None:
        self.files.pop(path, None)
        self._file_ops[path] = None
        self._vacated.add(path)

    async def _record_dir(self, path: str, fid: bytes, st: DiskStat) -> None:
        rec = FileRecord(path, fid, DIR_MARK, 0, 0, st.inode)
        self.dirs[path] = rec
        self._file_ops[path] = rec

    async def _forget_dir(self, path: str) -> None:
        self.dirs.pop(path, None)
        self._file_ops[path] = None

    async def _write_file_records(self) -> None:
        """Persist the queued file records; call inside a transaction. A record must never be
        durable before the document updates of the content it describes: after a crash in
        between, the file would look already ingested while its content never reached the
        CRDT (and the next reconcile would even delete it as not alive). One executemany per
        batch also replaces one autocommitted INSERT per file."""
        ops, self._file_ops = self._file_ops, {}
        # Files and folders share the table: a path that changed from one to the other in this
        # batch has two ops, so what counts is what the path holds now.
        final = {p: self.files.get(p) or self.dirs.get(p) for p in ops}
        puts = [rec for rec in final.values() if rec is not None]
        gone = [path for path, rec in final.items() if rec is None]
        if puts:
            await self.store.put_files(self.space_id, puts)
        if gone:
            await self.store.delete_files(self.space_id, gone)

    # -- remote side --------------------------------------------------------------------------
    async def handle_remote(self, delivered: list[tuple[int, bytes]]) -> None:
        """Apply envelopes delivered by a sync link (relay_seq, envelope), in order.

        An envelope from a sender our membership log does not know yet, or of an epoch we have
        no key for yet, is normally explained by a log the relay sent just before (on another
        of its tasks, so it may arrive a moment later): the batch stops there, and resumes once
        the log grew. If nothing arrives within MEMBERSHIP_WAIT_S, such envelopes are
        quarantined (one wait per log version, so a stream of forged envelopes cannot stall
        the space).
        """
        pending = list(delivered)
        final = False
        while pending:
            before = self.keyring
            done: list[tuple[int, bytes]] = []
            waiting = False
            async with self.lock:
                self._begin_batch()
                batch = _Batch()
                dirty: set[bytes] = set()
                for relay_seq, envelope in pending:
                    if len(dirty) >= REMOTE_SLICE_DOCS:
                        break  # write these to disk before applying more
                    regressed = self.order.regressed(relay_seq)
                    if not await self._apply_envelope(
                        envelope, batch, dirty, final, relay_seq=relay_seq, regressed=regressed
                    ):
                        waiting = True
                        break
                    self.order.delivered(relay_seq)
                    self.cursor = max(self.cursor, relay_seq)
                    self._skip_own()
                    done.append((relay_seq, envelope))
                await self._release_held(batch, dirty)
                self.order.refresh(self.windows)
                await self._finish(batch, dirty=dirty, delivered=done)
            pending = pending[len(done) :]
            if waiting:
                final = not await self._await_new_keyring(before)
        await self._answer_repairs()

    async def _await_new_keyring(self, before: Keyring) -> bool:
        if self.keyring is not before:
            return True
        if self._gave_up_waiting_on is before:
            return False
        self._keyring_changed.clear()
        self.membership_wanted.set()
        try:
            async with asyncio.timeout(MEMBERSHIP_WAIT_S):
                while self.keyring is before:
                    await self._keyring_changed.wait()
                    self._keyring_changed.clear()
        except TimeoutError:
            self._gave_up_waiting_on = before
            return False
        finally:
            self.membership_wanted.clear()
        return True

    async def _apply_envelope(
        self,
        envelope: bytes,
        batch: _Batch,
        dirty: set[bytes],
        final: bool = True,
        peer: bool = False,
        relay_seq: int = 0,
        regressed: bool = False,
    ) -> bool:
        """Apply (or quarantine, or drop as a replay, or hold until its sender's gap fills)
        one envelope. Returns False, changing nothing, if it should wait for a longer
        membership log (see handle_remote) or, for an envelope from a LAN peer (``peer``), if
        its updates lack a dependency (handle_peer). ``relay_seq`` / ``regressed``: where the
        relay delivered it, and whether that went backwards in the subscription
        (agent/relay_order.py)."""
        try:
            header = parse_header(envelope)
        except ProtocolError as exc:
            await self._quarantine(None, f"{exc.code}: {exc}", envelope, peer=peer)
            return True
        ring = self.keyring
        if (
            not final
            and header.space_id == self.space_bytes
            and (
                not ring.ever_member(header.sender)
                or (header.epoch > ring.current_epoch and header.epoch not in ring.epoch_keys)
            )
        ):
            return False
        if peer and (not ring.ever_member(header.sender) or header.epoch not in ring.epoch_keys):
            # Not openable yet (a log we lack): skipped, not quarantined; the relay or the
            # next resync brings it once the membership log explains it.
            return True
        role = ring.sender_role(header.sender, header.epoch, self.epoch_fence)
        try:
            opened = open_envelope(
                envelope,
                expected_space_id=self.space_bytes,
                msg_keys=ring.msg_keys(),
                is_member=lambda _sender: role is not None,
            )
        except ProtocolError as exc:
            await self._quarantine(
                None,
                f"{exc.code}: {exc}",
                envelope,
                peer=peer,
                signer=self._verified_member(header, envelope),
            )
            return True
        sender = opened.header.sender
        seq = opened.header.seq
        if not peer:  # the fence follows relay order only
            self.epoch_fence = max(self.epoch_fence, opened.header.epoch)
        if sender == self.identity.public.sign_pk:
            return True
        # Direct envelopes from a LAN peer (state replies, its device info) are outside the
        # sender's stream: they never enter its replay window (a scratch one stands in).
        direct = peer and is_direct_seq(seq)
        window = ReplayWindow() if direct else self.windows.setdefault(sender, ReplayWindow())

        def consumed() -> bool:
            window.mark(seq)
            if not peer and not direct and window.watermark >= seq:
                self.order.advanced(sender, relay_seq)
            return True

        if window.seen(seq):
            self.stats.duplicates += 1
            if regressed:
                # Within one subscription an honest relay never goes back: this is a replay.
                self.offenders.note(RELAY, "replayed an envelope (dropped)")
            return True
        if not peer and self.order.is_held(sender, seq):
            return True  # delivered again while held: the held copy waits for the gap
        if regressed:
            self.offenders.note(RELAY, "delivered out of order")
        try:
            payload = decode_payload(opened.plaintext)
        except ProtocolError as exc:
            await self._quarantine(sender, f"{exc.code}: {exc}", envelope)
            return consumed()
        if isinstance(payload, Updates) and payload.full_state and not direct:
            # The sender's whole state, sealed when it moved relays: it covers its stream
            # below this seq (which the new relay never had) — not a gap; late copies of those
            # are replays (the window is persisted with the batch).
            window.advance_to(seq - 1)
        if isinstance(payload, RepairRequest | RepairReply):
            # Never held for a gap in its sender's stream: a reply's updates are a diff against
            # this device's own state vectors, so they have what they depend on.
            if direct:
                await self._quarantine(sender, "repair payload outside the stream", envelope)
            else:
                await self._on_repair(sender, seq, role, payload, envelope, batch, dirty)
            return consumed()
        # A relay envelope past a gap in its sender's seqs (the relay dropped, withheld or
        # reordered): applied at once unless its updates lack a dependency, then held.
        out_of_order = not peer and not direct and seq > self.order.baseline(sender, window)
        if isinstance(payload, Updates) or (direct and isinstance(payload, StateReply)):
            if role is Role.reader:
                # The relay refuses publishes from readers; this is the second line of defence.
                await self._quarantine(sender, "content change from a read-only member", envelope)
                return consumed()
            scratches = _scratch_apply(payload.items)
            if scratches is None:
                await self._quarantine(sender, "malformed CRDT update", envelope)
                return consumed()
            if peer or out_of_order:
                try:
                    lacks = await self._lacks_dependencies(payload.items)
                except UpdateDecodeError:
                    await self._quarantine(sender, "malformed CRDT update", envelope)
                    return consumed()
                if lacks and peer:
                    return False
                # An index update past a gap that creates a text file whose document this
                # device has nowhere waits for the gap too: its sender sealed that text no
                # later than the entry (_index_last), so the missing envelope may hold it (an
                # honest relay delivers a late envelope after higher ones when its first
                # publish was refused). Applied now, the file would be written empty. A gap
                # given up on releases it (give_up).
                lacks = lacks or (
                    out_of_order and await self._creates_unseen_text(payload.items, scratches)
                )
                if lacks and self.order.can_hold() and sender not in self.order.unheld:
                    self.order.hold(sender, seq, relay_seq, envelope)
                    return True
            await self._apply_items(sender, payload.items, scratches, envelope, batch, dirty)
        elif isinstance(payload, DeviceInfo):
            info: dict[str, object] = {
                "name": payload.name,
                "platform": payload.platform,
                "agent_version": payload.agent_version,
            }
            if payload.capabilities is not None:
                info["capabilities"] = dataclasses.asdict(payload.capabilities)
            await self.store.put_device_info(self.space_id, sender, info)
        self.stats.applied_envelopes += 1
        return consumed()

    async def _apply_items(
        self,
        sender: bytes,
        items: list[DocUpdate],
        scratches: list[Doc],
        envelope: bytes,
        batch: _Batch,
        dirty: set[bytes],
    ) -> None:
        """Apply verified, scratch-checked updates of ``sender`` to the live documents."""
        # Before a remote change lands on a document, make sure any edit the user already
        # saved to that file is in the CRDT; otherwise materializing would overwrite it.
        # The records of these documents are found in one pass over every tracked file, shared
        # by the three steps (a pass per step cost ~8 ms each at 100,000 files, per envelope),
        # and found again only if absorbing an edit changed the records.
        doc_ids = [i.doc_id for i in items]
        tracked = records_by_fid(self.files.values(), doc_ids)
        text_ids = [d for d in doc_ids if d != INDEX_DOC_ID]
        if await self._absorb_unsaved(text_ids, batch, tracked):
            tracked = records_by_fid(self.files.values(), doc_ids)
        if self._disk_note is not None:
            await self._keep_bases(doc_ids, tracked)
        await self._note_inflight_bases(doc_ids, tracked)
        applied: list[tuple[bytes, bytes]] = []
        for item, scratch in zip(items, scratches, strict=True):
            try:
                if item.doc_id == INDEX_DOC_ID:
                    self.index.apply_update(item.update)
                    if self.index.legacy_keys:
                        # An older agent's entries are never materialized (no kind).
                        self.warnings["index-schema"] = (
                            "a device of this space runs an older qmoi-sync (index "
                            "schema 1, 2 or 3): its files are ignored until it is updated"
                        )
                elif not await self._adopt_new_doc(item.doc_id, scratch):
                    (await self._doc(item.doc_id)).apply_update(item.update)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                    raise
                await self._quarantine(sender, f"update rejected by CRDT: {exc!r}", envelope)
                await self._reload_doc(item.doc_id)
                continue
            applied.append((item.doc_id, item.update))
            dirty.add(item.doc_id)
        # Only what a live document accepted is made durable: a rejected update must not
        # come back at the next start and poison the document it failed on.
        if applied:
            await self.store.append_doc_updates(self.space_id, applied)

    # -- state-vector resync through the relay (agent/relay_repair.py) ---------------------------
    async def _on_repair(
        self,
        sender: bytes,
        seq: int,
        role: Role | None,
        payload: RepairRequest | RepairReply,
        envelope: bytes,
        batch: _Batch,
        dirty: set[bytes],
    ) -> None:
        """A repair request (queued, answered after the batch: _answer_repairs) or a reply
        (applied only if it answers a request of this device that still waits)."""
        me = self.identity.public.sign_pk
        if isinstance(payload, RepairRequest):
            self.repair.offer(sender, payload, me, member=self.keyring.is_member(sender))
            return
        if payload.requester != me:
            return  # for another device: consumed (its seq), nothing applied
        if not self.repair.accepts(payload, me):
            self.repair.replies_ignored += 1
            log.info("space %s: ignored a repair reply to no request of ours", self.space_id[:8])
            return
        if role is Role.reader:
            await self._quarantine(sender, "content change from a read-only member", envelope)
            return
        if payload.items:
            scratches = _scratch_apply(payload.items)
            if scratches is None:
                await self._quarantine(sender, "malformed CRDT update", envelope)
                return
            await self._apply_items(sender, payload.items, scratches, envelope, batch, dirty)
        senders = self.repair.part_received(payload, sender)
        if senders is None:
            return  # more parts to come: covers hold only for the whole reply
        for covered, upto in payload.covers:
            if covered not in senders or covered == me:
                continue
            window = self.windows.setdefault(covered, ReplayWindow())
            if covered == sender:
                # Its own stream: its reply comes after every envelope it sealed before.
                window.advance_to(min(upto, seq - 1))
            else:
                # Another's: the gap counts as filled, but the window stays (see relay_repair),
                # and what was held for the gap is applied now, not dropped: if the replier
                # lied, those envelopes are still in, and the missing ones apply when they come.
                upto = min(upto, self.order.top_seen(covered, window))
                if upto > self.order.covered.get(covered, 0):
                    self.order.covered[covered] = upto
                for _seq, relay_seq, held in self.order.take_upto(covered, upto):
                    await self._apply_envelope(held, batch, dirty, relay_seq=relay_seq)
            self.order.note_filled(covered, "state resync through the relay", sender)

    async def _answer_repairs(self) -> None:
        """Answer the repair requests the last batch delivered (outside its lock: a reply
        walks every document)."""
        if not self.repair.queued:
            return
        for requester, request in self.repair.take_due():
            async with self.lock:
                if self.send_block is not None or not self.keyring.is_member(requester):
                    return
                await self._answer_repair(requester, request)

    async def _answer_repair(self, requester: bytes, request: RepairRequest) -> None:
        me = self.identity.public.sign_pk
        items = await self._diff_for(dict(request.items))
        parts, complete = split_parts(items)
        covers: list[tuple[bytes, int]] = []
        for gap in request.gaps if complete else []:
            if gap.sender == me:
                covers.append((me, self.seq))
            elif gap.sender != requester:
                window = self.windows.get(gap.sender) or ReplayWindow()
                upto = self.order.baseline(gap.sender, window) - 1
                if upto > 0:
                    covers.append((gap.sender, upto))
        replies: list[Payload] = [
            RepairReply(
                request_id=request.request_id,
                requester=requester,
                part=i,
                parts=len(parts),
                covers=covers if i == len(parts) - 1 else [],
                items=[DocUpdate(d, u) for d, u in part],
            )
            for i, part in enumerate(parts)
        ]
        await self._send_stream(replies)
        self.repair.replies_sent += 1
        log.info(
            "space %s: answered a repair request of %s (%d part(s), %d bytes%s)",
            self.space_id[:8],
            device_id(requester)[:9],
            len(parts),
            sum(len(u) for _d, u in items),
            "" if complete else ", truncated",
        )

    async def request_relay_repair(self) -> bool:
        """Ask other members, through the relay, for what this device misses of the senders
        whose gaps are open (agent/relay_repair.py). False if not sent (rate limit, nothing
        to ask, cannot send)."""
        if not self.repair.may_request():
            return False
        async with self.lock:
            if self.send_block is not None:
                return False
            gaps = [
                RepairGap(
                    g.sender,
                    g.first_missing,
                    max(
                        g.first_missing,
                        self.order.top_seen(g.sender, self.windows.get(g.sender) or ReplayWindow()),
                    ),
                )
                for g in self.order.gaps(self.windows)
            ]
            if not gaps:
                return False
            me = self.identity.public.sign_pk
            members = self.keyring.log.members()
            writers = [
                pk
                for pk in members
                if pk != me and self.keyring.role_of(pk) not in (None, Role.reader)
            ]
            random.shuffle(writers)  # the extra devices asked change from one request to the next
            request = self.repair.new_request(gaps, writers, await self._state_vectors())
            try:
                await self._send_stream([request])
            except TooLargeError as exc:
                log.warning("space %s: cannot ask for a repair: %s", self.space_id[:8], exc)
                return False
        log.info(
            "space %s: asked %d device(s) through the relay for %d sender gap(s)",
            self.space_id[:8],
            len(request.responders),
            len(gaps),
        )
        return True

    async def _send_stream(self, payloads: list[Payload]) -> None:
        """Seal payloads that are not document updates into this device's stream (outbox, LAN
        peers), as _commit does for updates. Raises TooLargeError before sealing anything."""
        plaintexts = [encode_payload(p) for p in payloads]
        sealed: list[tuple[int, bytes]] = []
        async with self.store.transaction():
            for plaintext in plaintexts:
                sealed.append(await self._seal_next(plaintext))
            await self.store.set_counter(self.space_id, "seq", self.seq)
        self.stats.sent_envelopes += 1
        self.outbox_changed.set()
        if self.on_sealed is not None:
            self.on_sealed(sealed)

    async def _state_vectors(self) -> list[tuple[bytes, bytes]]:
        """(doc id, state vector) of every document of the space, the index first."""
        items = [(INDEX_DOC_ID, self.index.state_vector())]
        for doc_id in await self.store.doc_ids(self.space_id):
            if doc_id != INDEX_DOC_ID:
                items.append((doc_id, (await self._peek_doc(doc_id)).get_state()))
        return items

    async def _diff_for(self, theirs: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        """Every update the given state vectors lack (documents not listed come whole); a
        state vector that does not decode is skipped."""
        items: list[tuple[bytes, bytes]] = []
        # The index last: a file becomes visible only after its text (_index_last).
        doc_ids = await self.store.doc_ids(self.space_id)
        doc_ids = [d for d in doc_ids if d != INDEX_DOC_ID] + [INDEX_DOC_ID]
        for doc_id in doc_ids:
            sv = theirs.get(doc_id, b"\x00")
            try:
                if doc_id == INDEX_DOC_ID:
                    diff = self.index.update_since(sv)
                else:
                    diff = (await self._peek_doc(doc_id)).get_update(sv)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                    raise
                log.warning("state request: refused a state vector: %r", exc)
                continue
            if diff != b"\x00\x00":
                items.append((doc_id, diff))
        return items

    async def _creates_unseen_text(self, items: list[DocUpdate], scratches: list[Doc]) -> bool:
        """An index update among ``items`` creates a text file whose document is neither in
        ``items`` nor known here (``scratches``: each item applied alone, _scratch_apply)."""
        carried = {item.doc_id for item in items}
        for item, scratch in zip(items, scratches, strict=True):
            if item.doc_id != INDEX_DOC_ID:
                continue
            for fid_hex in created_fids(scratch, "text"):
                fid = bytes.fromhex(fid_hex)
                if fid in carried or fid in self._docs:
                    continue
                if not await self.store.has_doc(self.space_id, fid):
                    return True
        return False

    async def _release_held(self, batch: _Batch, dirty: set[bytes]) -> None:
        """Apply the held relay envelopes that are next in their sender's order now."""
        progress = True
        while progress and self.order.held:
            progress = False
            for sender in list(self.order.held):
                window = self.windows.setdefault(sender, ReplayWindow())
                nxt = self.order.take_next(sender, window)
                if nxt is not None:
                    _seq, relay_seq, envelope = nxt
                    await self._apply_envelope(envelope, batch, dirty, relay_seq=relay_seq)
                    progress = True

    async def release_held(self) -> None:
        """After a LAN state reply covered part of a sender's stream (peer_sync): held relay
        envelopes that now follow what is covered are applied."""
        async with self.lock:
            if not self.order.held:
                self.order.refresh(self.windows)
                return
            self._begin_batch()
            batch = _Batch()
            dirty: set[bytes] = set()
            await self._release_held(batch, dirty)
            self.order.refresh(self.windows)
            await self._finish(batch, dirty=dirty, delivered=[(0, b"")])

    @property
    def applied_cursor(self) -> int:
        """The relay cursor as committed: "every relay seq up to here is applied" — so never
        past an envelope held for a gap (a restart gets it from the relay again)."""
        limit = self.order.cursor_limit()
        return self.cursor if limit is None else min(self.cursor, limit)

    def subscribe_from(self, resubscribe: bool = False) -> int:
        """Where the relay link subscribes: the applied cursor, or earlier when a gap repair
        asked to hear the relay again from before a gap. ``resubscribe``: on a connection that
        already had a subscription (see RelayOrder.begin_subscription)."""
        start = self.applied_cursor
        if self.order.resubscribe_from is not None:
            start = min(start, self.order.resubscribe_from)
            self.order.resubscribe_from = None
        self.order.begin_subscription(start, settling=resubscribe)
        return start

    def _verified_member(self, header: EnvelopeHeader, envelope: bytes) -> bytes | None:
        """The sender of an envelope that failed to open, if it is a device of the space and its
        signature verifies (that device signed it); None if anyone could have written it."""
        if header.space_id != self.space_bytes or not self.keyring.ever_member(header.sender):
            return None
        try:
            verify_envelope_signature(envelope)
        except ProtocolError:
            return None
        return header.sender

    async def repair_gaps(self) -> None:
        """Called periodically by the relay link: each gap open for GAP_REPORT_S gets a repair
        attempt (backing off) — a LAN resync when a peer can answer, else a new subscription
        from before the gap. Gaps that stay open are charged to the relay in `offenders`."""
        due = self.order.due_repairs()
        if not due:
            return
        by_relay = []
        by_state = False
        for sender in due:
            attempt = self.order.repairs_of(sender)
            if attempt > 1:
                # An honest relay stores every seq of an honest sender (which resends what was
                # refused): the relay withheld it — or the sender skipped seqs on purpose.
                self.offenders.note(RELAY, UNREPAIRED_GAP)
            hook = self.on_stream_gap
            if hook is None or not await hook(sender):
                if attempt <= RELAY_REPAIRS:
                    by_relay.append(sender)
                # Subscribing again did not fill it: ask other members through the relay.
                by_state = by_state or attempt > 1
        if by_relay:
            self.order.request_resubscribe(by_relay)
        if by_state:
            await self.request_relay_repair()
        stuck = [s for s in due if self.order.repairs_of(s) >= GIVE_UP_REPAIRS]
        for sender in stuck:
            if sender not in self.order.unheld:
                log.warning(
                    "space %s: a sequence gap of %s was not repaired; applying what waited for it",
                    self.space_id[:8],
                    device_id(sender)[:9],
                )
                self.order.give_up(sender)
        if stuck:
            await self.release_held()

    async def _lacks_dependencies(self, items: list[DocUpdate]) -> bool:
        """True if an update refers to items its document does not have yet: pycrdt would hold
        it pending and may lose it (design brief §4). Raises UpdateDecodeError."""
        by_doc: dict[bytes, list[bytes]] = {}
        for item in items:
            by_doc.setdefault(item.doc_id, []).append(item.update)
        for doc_id, updates in by_doc.items():
            if doc_id == INDEX_DOC_ID:
                sv = self.index.state_vector()
            else:
                sv = (await self._doc(doc_id)).get_state()
            try:
                merged = updates[0] if len(updates) == 1 else merge_updates(*updates)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                    raise
                raise UpdateDecodeError(f"updates do not merge: {exc!r}") from None
            if missing_dependencies(sv, merged):
                return True
        return False

    # -- LAN peers (agent/peer_sync.py drives these) ---------------------------------------------
    async def handle_peer(self, envelopes: list[bytes]) -> int:
        """Apply envelopes a LAN peer sent: its own stream envelopes, already in its sequence
        order (peer_sync puts a CausalBuffer in front), or direct ones (a StateReply, its
        DeviceInfo). Unlike handle_remote this never advances the relay cursor nor the epoch
        fence. Stops before the first envelope whose updates lack a dependency; returns how many
        were consumed (applied, dropped as replays, or quarantined)."""
        async with self.lock:
            self._begin_batch()
            batch = _Batch()
            dirty: set[bytes] = set()
            done = 0
            for envelope in envelopes:
                if not await self._apply_envelope(envelope, batch, dirty, peer=True):
                    break
                done += 1
            # What a peer brought may be the gap relay envelopes were held for.
            await self._release_held(batch, dirty)
            self.order.refresh(self.windows, via="lan")
            await self._finish(batch, dirty=dirty, delivered=[(0, e) for e in envelopes[:done]])
        await self._answer_repairs()
        return done

    def _seal_direct(self, payload: Payload) -> bytes:
        return seal(
            identity=self.identity,
            space_id=self.space_bytes,
            epoch=self.keyring.current_epoch,
            msg_key=self.keyring.msg_key,
            seq=direct_seq(self.seq),
            plaintext=encode_payload(payload),
        )

    async def seal_direct(self, payload: Payload) -> bytes | None:
        """A direct envelope (outside the stream, for one LAN peer); None without a key."""
        async with self.lock:
            return self._seal_direct(payload) if self.keyring.can_write() else None

    async def _peek_doc(self, doc_id: bytes) -> Doc:
        """A text document, without pulling it into the cache (resyncs walk every document)."""
        doc = self._docs.get(doc_id)
        if doc is not None:
            return doc
        state, updates = await self.store.load_doc(self.space_id, doc_id)
        doc = load_text_doc(state) if state else new_text_doc()
        for u in updates:
            doc.apply_update(u)
        return doc

    async def state_request(self) -> bytes | None:
        """Sync step 1 for a LAN peer: a direct envelope with the state vector of every
        document of the space; None if this device holds no key to seal with."""
        async with self.lock:
            if not self.keyring.can_write():
                return None
            return self._seal_direct(StateRequest(items=await self._state_vectors()))

    async def state_reply(self, request: StateRequest) -> list[bytes]:
        """Sync step 2: direct StateReply envelopes holding every update the requester's state
        vectors lack (documents it did not list come whole). Their seq tells the requester they
        cover this device's stream up to its current seq. Empty without a key."""
        async with self.lock:
            if not self.keyring.can_write():
                return []
            items = await self._diff_for(dict(request.items))
            return [
                self._seal_direct(StateReply(items=[DocUpdate(d, u) for d, u in chunk]))
                for chunk in _split(items)
            ]

    async def _absorb_unsaved(
        self, fids: list[bytes], batch: _Batch, by_fid: Mapping[bytes, FileRecord] | None = None
    ) -> bool:
        """Ingest the unsaved local edits of these files (``by_fid``: their records, if the
        caller has them). True if there were any (the records may have changed)."""
        if by_fid is None:
            by_fid = records_by_fid(self.files.values(), fids)
        absorbed = False
        for fid in fids:
            rec = by_fid.get(fid)
            if rec is None:
                continue
            st = stat_file(self.root, rec.path)
            if st is None or (st.size, st.mtime_ns, st.inode) == rec.stat_key():
                continue
            await self._ingest_local({rec.path}, batch, set_aside=True)
            absorbed = True
        return absorbed

    async def _reload_doc(self, doc_id: bytes) -> None:
        """Rebuild a document from its durable state after a failed apply (it may be poisoned)."""
        if doc_id == INDEX_DOC_ID:
            self.index = IndexDoc()
            state, updates = await self.store.load_doc(self.space_id, INDEX_DOC_ID)
            if state:
                self.index.apply_update(state)
            for u in updates:
                self.index.apply_update(u)
        else:
            self._docs.pop(doc_id, None)

    async def _quarantine(
        self,
        sender: bytes | None,
        reason: str,
        envelope: bytes,
        *,
        peer: bool = False,
        signer: bytes | None = None,
    ) -> None:
        """Keep a refused envelope. ``sender``: the verified member whose payload is refused;
        None when the envelope did not open — then a ``signer`` whose signature verifies is
        charged with it, else the path it came by (see agent/offenders.py)."""
        log.warning("quarantined an envelope in space %s: %s", self.space_id[:8], reason)
        self.stats.quarantined += 1
        culprit = sender or signer or (LAN if peer else RELAY)
        self.offenders.note(culprit, _what(reason))
        await self.store.quarantine(self.space_id, sender, reason, envelope)

    # -- commit + materialize -----------------------------------------------------------------
    async def _finish(
        self, batch: _Batch, dirty: set[bytes], delivered: list[tuple[int, bytes]]
    ) -> None:
        remote = set(dirty)
        # Documents an earlier batch could not write (disk full) are retried with every batch.
        dirty = dirty | self.unwritten
        await self._commit(batch.items, delivered, pending=dirty, full_state=batch.full_state)
        committed = dirty
        for _attempt in range(4):
            extra = _Batch()
            blocked = await self._reconcile_once(dirty, extra)
            if blocked:
                # Untracked local files sat where remote files belong: ingest them as concurrent
                # creations (the layout then gives one a conflict name) and settle again. A device
                # that may not send moves them aside instead.
                await self._ingest_local(set(blocked), extra, set_aside=True)
            edited, self._changed_on_disk = self._changed_on_disk, set()
            if edited:
                # Saved while this batch was being written: merge the save into the document
                # (diffed against what the disk held, the kept base), then write the result.
                await self._ingest_local(edited, extra)
            for fid in [f for f in self._bases if f not in self.unwritten]:
                del self._bases[fid]
                self._bases_changed.add(fid)
            changed = self.unwritten != committed
            committed = set(self.unwritten)
            await self._commit(extra.items, [], pending=committed if changed else None)
            dirty = {rec.fid for p in edited if (rec := self.files.get(p)) is not None}
            if not extra.items and not blocked and not dirty:
                break
        self._inflight_bases.clear()
        self._show_disk_note()
        if remote:
            for listener in self.batch_listeners:
                listener(remote)

    async def _pending_materialize(self) -> set[bytes]:
        return set(await self.store.get_pending(self.space_id))

    async def _layout_for(
        self, entries: dict[str, FileEntry], changed: set[str]
    ) -> tuple[Layout, LayoutCache, dict[str, str | None] | None]:
        cache = self._layouts
        if (
            cache is None
            or self._layouts_of is not self.index
            or cache.fold_case != self.case_insensitive
        ):
            cache = self._layouts = LayoutCache(fold_case=self.case_insensitive)
            self._layouts_of = self.index
        got = cache.update(entries, changed)
        if got is None:
            # Laying out 100,000 entries takes seconds on a loaded machine: in a worker
            # thread (on this batch's own copy of the entries), so the event loop keeps
            # answering the relay's keepalive pings meanwhile.
            return await asyncio.to_thread(cache.full, entries), cache, None
        return got[0], cache, got[1]

    def _full_reconcile_due(self) -> bool:
        if any(k.startswith(("move:", "write:")) for k in self.warnings):
            return True  # retried with every batch, as before scoped passes
        since = time.monotonic() - self._full_at
        return since >= max(FULL_RECONCILE_EVERY_S, FULL_RECONCILE_SHARE * self._full_cost)

    def _records_of(
        self, fids: set[bytes], layout: Layout, before: dict[str, str | None]
    ) -> dict[str, FileRecord]:
        """path -> record of the files these fids had or have (where the layout placed them
        before this batch, or places them now): what a scoped pass looks at."""
        out: dict[str, FileRecord] = {}
        for fid in fids:
            h = fid.hex()
            for p in (before.get(h), layout.by_fid.get(h)):
                rec = self.files.get(p) if p is not None else None
                if rec is not None and rec.fid == fid:
                    out[p] = rec  # type: ignore[index]
        return out

    async def _reconcile_once(self, dirty: set[bytes], batch: _Batch) -> list[str]:
        entries = self.index.entries()
        changed = self.index.take_changed()
        layout, cache, before = await self._layout_for(entries, changed)
        started = time.monotonic()
        # None: every entry (start-up, a change near a conflict copy, or the periodic full
        # pass); otherwise only the entries this batch touched (placed anew, content, fields).
        scope: set[bytes] | None = None
        vacated, self._vacated = self._vacated, set()
        if before is not None and not self._full_reconcile_due():
            scope = {bytes.fromhex(h) for h in (*before, *changed)} | dirty | self.unwritten
            # A remote file that could not be written while a local file of another entry
            # held its path (kept because the user changed it: an edit beats a delete) is
            # written once that file is moved or deleted here: nothing else touches it.
            scope |= {bytes.fromhex(h) for p in vacated if (h := layout.paths.get(p))}
        want_dirs = self._wanted_dirs(cache)
        await self._move_dirs(entries, layout, want_dirs)
        records = self.files if scope is None else self._records_of(scope, layout, before or {})
        await self._reconcile_links(entries, layout, cache, create=False, records=records)
        self.conflicts = len(layout.conflicts)
        desired: dict[bytes, str] = {}
        binary: dict[bytes, str] = {}
        if scope is None:
            placed: Iterable[tuple[str, str]] = layout.paths.items()
        else:
            placed = [
                (p, h)
                for h in (f.hex() for f in scope)
                if (p := layout.by_fid.get(h)) is not None and layout.paths.get(p) == h
            ]
        for path, fid_hex in placed:
            entry = entries[fid_hex]
            if entry.kind == "binary" and self.binary is not None:
                binary[bytes.fromhex(fid_hex)] = path
            elif entry.kind != "text":
                continue
            try:
                validate_relpath(path)
            except PathError as exc:
                self.warnings[f"remote:{fid_hex}"] = f"refused a remote path: {exc}"
                continue
            desired[bytes.fromhex(fid_hex)] = path
        binary = {f: p for f, p in binary.items() if f in desired}
        binary_at = {p: f for f, p in binary.items()}
        if scope is not None:
            records = self._records_of(scope, layout, before or {})
        current = {rec.fid: path for path, rec in records.items() if not self._is_link(rec.fid)}

        # Files whose entry is no longer alive: delete, unless the user changed them since we
        # last saw them (then the change is an edit, and an edit beats a delete).
        for fid, path in list(current.items()):
            if fid in desired:
                continue
            rec = self.files[path]
            st = stat_file(self.root, path)
            if st is not None and (st.size, st.mtime_ns, st.inode) != rec.stat_key():
                dead = entries.get(fid.hex())
                try:
                    got = read_file(self.root, path, TEXT_MAX_BYTES)
                except FileTooLargeError:
                    got = None
                binary_now = got is None or _as_text(got[0]) is None
                if (
                    self.binary is not None
                    and self.send_block is None
                    and (binary_now or (dead is not None and dead.kind == "binary"))
                ):
                    # changed locally: an edit beats the delete (ingested as a new version)
                    self.binary.local_changed(path, st.size)
                    continue
                if got is not None and content_hash(got[0]) != rec.hash:
                    text = _as_text(got[0])
                    block = self.send_block
                    if text is not None and block is not None:
                        # Keep the user's edited file, untracked; it cannot be sent.
                        self.warnings[f"held:{path}"] = (
                            f"{block}: {path} was deleted remotely; your local change is kept "
                            "but not synced"
                        )
                        await self._forget(path)
                        continue
                    if text is not None:
                        fid_hex = fid.hex()
                        batch.add(INDEX_DOC_ID, self.index.rename(fid_hex, path, self.device))
                        await self._ingest_edit(
                            fid, _LocalChange(path, got[0], got[1]), text, batch
                        )
                        continue
            taker = binary_at.get(path)
            if taker is not None and st is not None:
                # a binary version replaces this file in place when it is complete
                await self._record_stat(path, taker, rec.hash, st)
                continue
            delete_file(self.root, path)
            await self._forget(path)

        # Folders before the files that go into them (and that a move may need).
        blocked: list[str] = await self._make_dirs(want_dirs)
        # Moves go through temporary names so swaps and chains never clobber each other.
        staged: list[tuple[bytes, str, str, str]] = []
        for fid, p in desired.items():
            old = current.get(fid)
            if old is None or old == p:
                continue
            tmp = f".qmoi-tmp-mv-{fid.hex()}"
            try:
                st = rename_file(self.root, old, tmp)
            except (OSError, UnsafePathError) as exc:
                self.warnings[f"move:{old}"] = f"cannot move {old} to {p}: {exc}"
                continue
            if st is not None:
                staged.append((fid, old, tmp, p))
                crashpoint("move.staged")
        for fid, old, tmp, new in staged:
            rec = self.files[old]
            target = new
            if new not in self.files and stat_file(self.root, new) is not None:
                # Someone's untracked file is in the way: put ours back and settle it first.
                blocked.append(new)
                target = old
            try:
                st = rename_file(self.root, tmp, target)
            except (OSError, UnsafePathError) as exc:
                self.warnings[f"move:{new}"] = f"cannot move to {new}: {exc}"
                continue
            if st is None or target == old:
                continue
            await self._forget(old)
            if (st.size, st.mtime_ns, st.inode) != (rec.size, rec.mtime_ns, rec.inode):
                # Saved since we last read it: moved as it is, but recorded as last read, so
                # the save is ingested rather than taken for the synced content (which left
                # the file different from its document for good).
                self._saved_meanwhile(fid, new)
                st = DiskStat(rec.size, rec.mtime_ns, rec.inode, st.mode)
            await self._record_stat(new, fid, rec.hash, st)
        if staged:
            log.debug("moved %d file(s)", len(staged))
        # Emptied folders whose entry is gone (deepest first), before a file takes the path of
        # one; then folders whose path a moved-away file held.
        await self._remove_dirs(want_dirs, layout)
        if staged:
            blocked += await self._make_dirs(want_dirs)

        # Content: new files and documents that changed.
        if scope is not None:
            records = self._records_of(scope, layout, before or {})
        current = {rec.fid: path for path, rec in records.items() if not self._is_link(rec.fid)}
        # Modes (exec bit) of tracked files whose entry changed: a remote chmod touches no
        # document. The check after our own chmod sees the disk already matching (no echo).
        # (Changes this pass makes itself are taken by the next pass of _finish.)
        for fid_hex in changed:
            fid = bytes.fromhex(fid_hex)
            at = current.get(fid)
            if at is not None and desired.get(fid) == at:
                await self._apply_meta(fid, at, entries[fid_hex])
        todo: list[tuple[bytes, str, FileEntry]] = []
        for fid, path in desired.items():
            if fid in binary or (fid in current and fid not in dirty):
                continue
            if fid not in current:
                existing = stat_file(self.root, path)
                if existing is not None and path not in self.files:
                    got = read_file(self.root, path, TEXT_MAX_BYTES)
                    doc = await self._doc(fid)
                    if got is not None and got[0] == text_of(doc).encode():
                        await self._record(path, fid, got[0], got[1])
                        self.unwritten.discard(fid)
                        continue
                    blocked.append(path)
                    continue
            if self._disk_note is not None:
                # Disk (almost) full: the document stays committed and pending; it is written
                # once the policy sees free space again (PolicyMonitor -> materialize_pending).
                self.unwritten.add(fid)
                continue
            todo.append((fid, path, entries[fid.hex()]))
        for i in range(0, len(todo), MATERIALIZE_GROUP):
            await self._materialize_texts(todo[i : i + MATERIALIZE_GROUP])
        if self.binary is not None:
            self.binary.reconcile(binary, entries, batch, scope=scope)
        if scope is None:
            self.unwritten.intersection_update(desired)
        else:
            self.unwritten.difference_update([f for f in scope if f not in desired])
        if scope is not None:
            records = self._records_of(scope, layout, before or {})
        await self._reconcile_links(
            entries,
            layout,
            cache,
            create=True,
            records=records,
            scope=scope,
            gone_from=[p for p in (before or {}).values() if p is not None],
        )
        if scope is None:
            self._full_at = time.monotonic()
            self._full_cost = self._full_at - started
        return blocked

    def _wanted_dirs(self, cache: LayoutCache) -> dict[str, bytes]:
        """Path -> fid of every folder an alive "dir" entry places (merged entries: the
        layout's winner)."""
        out: dict[str, bytes] = {}
        for path, fid_hex in cache.dirs.items():
            try:
                validate_relpath(path)
            except PathError as exc:
                self.warnings[f"remote:{fid_hex}"] = f"refused a remote path: {exc}"
                continue
            out[path] = bytes.fromhex(fid_hex)
        return out

    async def _move_dirs(
        self, entries: dict[str, FileEntry], layout: Layout, want: dict[str, bytes]
    ) -> None:
        """A tracked folder whose entry moved is moved in ONE rename, with everything in it;
        records under it follow, so the files that moved with their folder are already where
        the layout wants them. Not done (the entries then move one by one, and the old folder
        is removed once empty) if the old path is still wanted as a folder, or the new one is
        taken. Outermost folders first; a nested folder that moved with its parent but is
        wanted elsewhere is handled in the next round."""
        for _round in range(8):
            moves = []
            for path, rec in self.dirs.items():
                fid_hex = rec.fid.hex()
                target = layout.by_fid.get(fid_hex)
                e = entries.get(fid_hex)
                if target is None or target == path or e is None or e.kind != "dir":
                    continue
                if path in want or path in layout.needed or target not in want:
                    continue
                moves.append((path.count("/"), path, target))
            done = 0
            for _depth, old, new in sorted(moves):
                if old not in self.dirs or _lexists(self.root / new):
                    continue
                try:
                    st = await asyncio.to_thread(rename_dir, self.root, old, new)
                except (OSError, UnsafePathError) as exc:
                    self.warnings[f"move:{old}"] = f"cannot move folder {old} to {new}: {exc}"
                    continue
                if st is None:
                    continue
                self.warnings.pop(f"move:{old}", None)
                self._rebase_records(old, new)
                done += 1
            if not done:
                return

    def _rebase_records(self, old: str, new: str) -> None:
        """Records of a folder moved as a whole (old -> new) and of everything under it."""
        prefix = old + "/"
        for table in (self.files, self.dirs):
            for path in [p for p in table if p == old or p.startswith(prefix)]:
                rec = table.pop(path)
                moved = new + path[len(old) :]
                table[moved] = rec.with_path(moved)
                self._file_ops[moved] = table[moved]
                if path not in self.files and path not in self.dirs:
                    self._file_ops[path] = None

    async def _make_dirs(self, want: dict[str, bytes]) -> list[str]:
        """Create the wanted folders this device has no record of. Returns paths where an
        untracked file or link stands in the way (settled like any concurrent creation)."""
        blocked: list[str] = []
        for path in sorted(p for p in want if p not in self.dirs):  # parents first
            fid = want[path]
            st = stat_dir(self.root, path)
            if st is None:
                if _lexists(self.root / path):
                    if path not in self.files:
                        blocked.append(path)
                    continue  # a tracked file that moves away or is deleted first
                try:
                    st = await asyncio.to_thread(make_dir, self.root, path)
                except (OSError, UnsafePathError) as exc:
                    self.warnings[f"dir:{path}"] = f"cannot create folder {path}: {exc}"
                    continue
            self.warnings.pop(f"dir:{path}", None)
            await self._record_dir(path, fid, st)
        return blocked

    async def _remove_dirs(self, want: dict[str, bytes], layout: Layout) -> None:
        """Remove tracked folders no alive entry wants any more, deepest first, and only when
        empty: a folder that still holds untracked or ignored files stays (its record too, so
        it is not sent again as new); it goes once it is empty, at a later batch."""
        unwanted = [p for p in self.dirs if p not in want and p not in layout.needed]
        for path in sorted(unwanted, key=lambda p: (-p.count("/"), p)):
            try:
                removed = await asyncio.to_thread(remove_dir, self.root, path)
            except (OSError, UnsafePathError) as exc:
                self.warnings[f"dir:{path}"] = f"cannot remove folder {path}: {exc}"
                continue
            if removed is False:
                continue
            self.warnings.pop(f"dir:{path}", None)
            await self._forget_dir(path)

    async def _apply_meta(self, fid: bytes, path: str, entry: FileEntry) -> None:
        """Exec bit and modification time of an unchanged tracked file whose entry changed.
        A file the user changed since we recorded it is left alone (it is ingested next)."""
        st = stat_file(self.root, path)
        rec = self.files.get(path)
        if st is None or rec is None:
            return
        if (st.size, st.mtime_ns, st.inode) != (rec.size, rec.mtime_ns, rec.inode):
            return
        new: DiskStat | None = None
        try:
            if _exec_differs(st.mode, entry.mode):
                new = set_executable(self.root, path, bool(entry.mode & 0o111))
            if entry.mtime_ns is not None and st.mtime_ns != entry.mtime_ns:
                new = set_mtime(self.root, path, entry.mtime_ns) or new
        except (OSError, UnsafePathError) as exc:
            self.warnings[f"mode:{path}"] = f"cannot change the mode/mtime of {path}: {exc}"
            return
        self.warnings.pop(f"mode:{path}", None)
        if new is not None:
            await self._record_stat(path, fid, rec.hash, new)

    async def _materialize_texts(self, group: list[tuple[bytes, str, FileEntry]]) -> None:
        """Write a group of text files (temp + fsync + rename each; their fsyncs are shared:
        materialize.write_files_atomic), then record them in one transaction."""
        jobs: list[tuple[bytes, str, bytes, WriteJob]] = []
        for fid, path, entry in group:
            doc = await self._doc(fid)
            data = text_of(doc).encode("utf-8")
            rec = self.files.get(path)
            if rec is not None and rec.hash == content_hash(data):
                st = stat_file(self.root, path)
                if st is not None:
                    continue
            mode = 0o755 if entry.mode & 0o111 else 0o644
            # A tracked file is replaced only if it is still what we last read: a save the
            # watcher has not delivered yet would otherwise be overwritten (and lost).
            expect = None if rec is None else rec.stat_key()
            jobs.append((fid, path, data, WriteJob(path, data, mode, entry.mtime_ns, expect)))
        if not jobs:
            return
        results = await asyncio.to_thread(
            write_files_atomic, self.root, [job for _f, _p, _d, job in jobs]
        )
        for (fid, path, data, _job), res in zip(jobs, results, strict=True):
            if isinstance(res, ChangedOnDisk):
                self._saved_meanwhile(fid, path)
                continue
            if isinstance(res, (OSError, UnsafePathError)):
                if isinstance(res, OSError) and res.errno in (errno.ENOSPC, errno.EDQUOT):
                    self.unwritten.add(fid)  # retried with the next batch or when space is freed
                self.warnings[f"write:{path}"] = f"cannot write {path}: {res}"
                continue
            self.warnings.pop(f"write:{path}", None)
            self.unwritten.discard(fid)
            await self._record(path, fid, data, res)
        if self._file_ops:
            async with self.store.transaction():
                await self._write_file_records()

    async def _commit(
        self,
        items: list[tuple[bytes, bytes]],
        delivered: list[tuple[int, bytes]],
        pending: set[bytes] | None,
        full_state: bool = False,
    ) -> None:
        """One transaction: document updates, their sealed envelopes, the relay cursor, replay
        windows and the set of documents still to be written to disk."""
        if (
            not items
            and not delivered
            and pending is None
            and not self._bases_changed
            and not self._file_ops
        ):
            return
        # Large batches are committed in slices: count the work here, where every slice passes.
        memtrim.trimmer.note(len(items) + len(delivered))
        now = self.clock()
        due: list[bytes] = []
        sealed: list[tuple[int, bytes]] = []
        block = self.send_block if items else None
        if block is not None:
            # Local changes are held back before they reach a document (_ingest_local); this
            # is the last line of defence: never seal them.
            log.error("space %s: refusing to seal local updates (%s)", self.space_id[:8], block)
            items = []
        items = _index_last(_coalesce(items))
        async with self.store.transaction():
            if items:
                due = await self.store.append_doc_updates(self.space_id, items)
                for i, chunk in enumerate(_split(items)):
                    payload = encode_payload(
                        Updates(
                            items=[DocUpdate(doc_id=d, update=u) for d, u in chunk],
                            # Only the first envelope of a full state is marked: it covers the
                            # seqs below it; a hole among the rest is still a gap.
                            full_state=full_state and i == 0,
                        )
                    )
                    sealed.append(await self._seal_next(payload))
                await self.store.set_counter(self.space_id, "seq", self.seq)
            cursor = self.applied_cursor
            wrote_cursor: int | None = None
            if delivered or cursor > self._saved_cursor:
                # Also when only this device's own Acks moved it (note_own_relay_seq).
                await self.store.set_counter(self.space_id, "relay_cursor", cursor)
                wrote_cursor = cursor
            if delivered:
                await self.store.set_counter(self.space_id, "epoch_fence", self.epoch_fence)
                for sender, window in self.windows.items():
                    await self.store.save_replay(self.space_id, sender, window.to_bytes())
            if pending is not None:
                await self.store.set_pending(self.space_id, sorted(pending))
            await self._write_file_records()
            for fid in self._bases_changed:
                if fid in self._bases:
                    await self.store.put_materialize_base(self.space_id, fid, self._bases[fid])
                else:
                    await self.store.delete_materialize_base(self.space_id, fid)
            self._bases_changed.clear()
            if items or delivered:
                self.stats.last_sync = now
                await self.store.set_counter(self.space_id, "last_sync_ms", int(now * 1000))
        if wrote_cursor is not None:
            self._saved_cursor = wrote_cursor
        if items:
            self.stats.sent_envelopes += 1
            self.outbox_changed.set()
        if sealed and self.on_sealed is not None:
            self.on_sealed(sealed)
        for doc_id in due:
            await self._compact(doc_id)

    async def _compact(self, doc_id: bytes) -> None:
        if doc_id == INDEX_DOC_ID:
            if await self._compact_index_in_parts():
                return
            state = self.index.state()
        else:
            state = (await self._doc(doc_id)).get_update()
        async with self.store.transaction():
            await self.store.compact_doc(self.space_id, doc_id, state)

    async def _compact_index_in_parts(self) -> bool:
        """Compact the index's appended updates by merging runs of them into parts of at most
        INDEX_PART_BYTES, instead of one state of the whole index: applying (at start-up) or
        encoding (here) a 100,000-file index in one piece took as much memory again as the
        index itself (a restart peaked at 832 MB). False if the parts would still be too many
        (an index of more than COMPACT_AFTER parts): then one state, as for any document."""
        sizes = await self.store.doc_update_sizes(self.space_id, INDEX_DOC_ID)
        groups: list[list[int]] = []
        total = 0
        for row_id, n in sizes:
            if not groups or total + n > INDEX_PART_BYTES:
                groups.append([])
                total = 0
            groups[-1].append(row_id)
            total += n
        if len(groups) >= COMPACT_AFTER:
            return False
        for ids in groups:
            if len(ids) < 2:
                continue
            parts = await self.store.doc_updates_by_id(self.space_id, ids)
            merged = merge_updates(*parts)
            del parts
            async with self.store.transaction():
                await self.store.merge_doc_updates(self.space_id, ids, merged)
        return True

    # -- resource policy (agent/policy.py) ------------------------------------------------------
    def _begin_batch(self) -> None:
        """Ask the policy once per batch whether the disk has room, so a batch decides
        consistently (bases kept at apply time == documents held back at write time)."""
        self._disk_note = self.gate.disk_blocked(self.root) if self.gate is not None else None
        self._inflight_bases.clear()  # left over only if the previous batch failed half-way

    def _defer_bulk(self, path: str, size: int) -> bool:
        reason = None
        if self.gate is not None and size <= TEXT_MAX_BYTES:
            reason = self.gate.defer_bulk(size)
        if reason is None:
            self.deferred.pop(path, None)
        else:
            self.deferred[path] = size
        if self.deferred:
            total = sum(self.deferred.values()) / (1024 * 1024)
            self.warnings["deferred"] = (
                f"{len(self.deferred)} large file(s) ({total:.1f} MiB) wait until bulk work is "
                f"allowed: {reason or 'deferred'}"
            )
        else:
            self.warnings.pop("deferred", None)
        return reason is not None

    def _saved_meanwhile(self, fid: bytes, path: str) -> None:
        """The user saved ``path`` after we last read it and before a write or move of ours
        reached it: keep the document pending, with the document as it was before this batch's
        remote changes as its base. _finish ingests the save against that base (diffing
        against the document itself would revert the remote changes) and writes the merge."""
        base = self._inflight_bases.get(fid)
        if base is not None and fid not in self._bases:
            self._bases[fid] = base
            self._bases_changed.add(fid)
        self.unwritten.add(fid)
        self._changed_on_disk.add(path)

    async def _note_inflight_bases(
        self, fids: list[bytes], tracked: Mapping[bytes, FileRecord]
    ) -> None:
        """Remember, until this batch is written, what tracked documents were before a remote
        change: the base to merge a save against if one lands before the write (ChangedOnDisk).
        In memory only; it becomes a durable base only in that (rare) case. ``tracked``: the
        records of ``fids``."""
        for fid in fids:
            if fid == INDEX_DOC_ID or fid in self._inflight_bases or fid in self._bases:
                continue
            if fid in tracked:
                self._inflight_bases[fid] = (await self._doc(fid)).get_update()

    async def _keep_bases(self, fids: list[bytes], tracked: Mapping[bytes, FileRecord]) -> None:
        for fid in fids:
            if fid in tracked and fid not in self._bases and fid not in self.unwritten:
                self._bases[fid] = (await self._doc(fid)).get_update()
                self._bases_changed.add(fid)

    def _show_disk_note(self) -> None:
        if self._disk_note is not None:
            self.note_disk_low(self._disk_note)
        elif not self.unwritten:
            self.warnings.pop("disk", None)

    def note_disk_low(self, message: str) -> None:
        waiting = f" ({len(self.unwritten)} file(s) waiting)" if self.unwritten else ""
        self.warnings["disk"] = message + waiting

    async def materialize_pending(self) -> None:
        """Write the documents held back while the disk was full, if it has room now."""
        if not self.unwritten:
            self.warnings.pop("disk", None)
            return
        async with self.lock:
            self._begin_batch()
            if self._disk_note is not None:
                self._show_disk_note()
                return
            batch = _Batch()
            # A stale file the user edited meanwhile is merged in first (against its base).
            await self._absorb_unsaved(sorted(self.unwritten), batch)
            await self._finish(batch, dirty=set(), delivered=[])

    async def resume_deferred(self) -> None:
        """Ingest the large files that waited for bulk work to be allowed."""
        paths = set(self.deferred)
        self.deferred.clear()
        self.warnings.pop("deferred", None)
        if paths:
            await self.handle_local(paths)

    async def send_device_info(
        self, name: str, platform: str, version: str, capabilities: Capabilities | None = None
    ) -> None:
        if self.send_block is not None:
            return  # readers cannot publish at all (the relay refuses it)
        if capabilities is None and self.capabilities_source is not None:
            capabilities = self.capabilities_source(self.root)
        async with self.lock, self.store.transaction():
            payload = encode_payload(
                DeviceInfo(
                    name=name, platform=platform, agent_version=version, capabilities=capabilities
                )
            )
            sealed = [await self._seal_next(payload)]
            await self.store.set_counter(self.space_id, "seq", self.seq)
        self.outbox_changed.set()
        if self.on_sealed is not None:
            self.on_sealed(sealed)

    async def _seal_next(self, plaintext: bytes) -> tuple[int, bytes]:
        """Seal a payload as the next seq of this device's stream and queue it in the outbox
        (inside the caller's store transaction; the caller stores the seq counter)."""
        self.seq += 1
        envelope = seal(
            identity=self.identity,
            space_id=self.space_bytes,
            epoch=self.keyring.current_epoch,
            msg_key=self.keyring.msg_key,
            seq=self.seq,
            plaintext=plaintext,
        )
        await self.store.add_outbox(self.space_id, self.seq, envelope)
        return self.seq, envelope

    # -- snapshots (agent/snapshotter.py, agent/restore.py drive these) -------------------------
    async def update_shared(self, mutate: Callable[[Doc], bytes]) -> bool:
        """Change the space's shared configuration kept in the index document (e.g. the
        snapshot target, policy and duty lease): ``mutate`` runs on the index's pycrdt Doc and
        returns its update, which is committed and sealed like any index change. False when
        this device may not send (reader, removed)."""
        async with self.lock:
            if self.send_block is not None:
                return False
            self._begin_batch()
            batch = _Batch()
            batch.add(INDEX_DOC_ID, mutate(self.index.doc))
            await self._finish(batch, dirty=set(), delivered=[])
            return True

    # -- settings documents (agent/settings_sync.py drives these) --------------------------------
    async def doc(self, doc_id: bytes) -> Doc:
        """A non-index document (loaded lazily, cached): use it only while holding the lock."""
        return await self._doc(doc_id)

    async def run_local(
        self,
        produce: Callable[
            [Callable[[bytes, bytes | None], None]],
            Awaitable[Callable[[], Awaitable[None]] | None],
        ],
        full_state: bool = False,
    ) -> None:
        """A local change made under the owner's lock: ``produce(add)`` edits documents and
        hands each update to ``add(doc_id, update)``; they commit and are sealed like any local
        change (``produce`` must check ``send_block`` itself). What it returns runs after the
        commit, still under the lock (e.g. writing a file that reflects the committed state).
        ``full_state``: ``produce`` adds this device's whole state (a relay move), sealed so
        that receivers know it covers everything this device sealed before."""
        async with self.lock:
            self._begin_batch()
            batch = _Batch(full_state=full_state)
            after = await produce(batch.add)
            await self._finish(batch, dirty=set(), delivered=[])
            if after is not None:
                await after()

    def note_own_relay_seq(self, relay_seq: int) -> None:
        """The relay stored one of this device's envelopes as ``relay_seq`` (its Ack). Its
        content is applied here already, so the cursor — "every relay seq up to here is
        applied" — may pass over it; this is what lets a snapshot of a device that is the only
        writer cover its own changes (relay log compaction)."""
        if relay_seq > self.cursor:
            self._own_above.add(relay_seq)
            self._skip_own()

    def reset_cursor(self, cursor: int) -> None:
        """The relay cursor was just written to the store as ``cursor`` (a move to another
        relay, agent/relay_switch.py): follow it from there."""
        self.cursor = self._saved_cursor = cursor

    async def save_cursor(self) -> None:
        """Write the relay cursor if this device's own Acks moved it since the last commit.

        Commits write it too, but the Acks of the last envelopes of an upload come after the
        last commit: a device that only writes then kept its stored cursor before all of its
        own envelopes, and every restart subscribed from there, so the relay sent each one
        back (100,000 files: ~130 MB queued in memory and opened again, bench scale restart).
        Only when the space is not busy (a batch in progress commits it itself)."""
        if self.lock.locked() or self.applied_cursor <= self._saved_cursor:
            return
        async with self.lock:
            cursor = self.applied_cursor
            if cursor <= self._saved_cursor:
                return
            async with self.store.transaction():
                await self.store.set_counter(self.space_id, "relay_cursor", cursor)
            self._saved_cursor = cursor

    def _skip_own(self) -> None:
        while self.cursor + 1 in self._own_above:
            self.cursor += 1
            self._own_above.discard(self.cursor)
        if self._own_above and min(self._own_above) <= self.cursor:
            self._own_above = {s for s in self._own_above if s > self.cursor}

    async def snapshot_view(self) -> SnapshotView:
        """A consistent starting point for a snapshot, taken between batches: the index state,
        the relay cursor it covers, replay windows, this device's seq and every document id.
        Documents read from the store afterwards are at least as new as this index."""
        async with self.lock:
            return SnapshotView(
                index_state=self.index.state(),
                cursor=self.applied_cursor,
                epoch_fence=self.epoch_fence,
                windows={s: w.to_bytes() for s, w in self.windows.items()},
                seq=self.seq,
                doc_ids=[d for d in await self.store.doc_ids(self.space_id) if d != INDEX_DOC_ID],
            )

    async def apply_snapshot(
        self,
        states: list[tuple[bytes, bytes]],
        cursor: int,
        epoch_fence: int,
        windows: dict[bytes, bytes],
        own_seq: int,
    ) -> None:
        """Merge document states restored from a snapshot (CRDT merge: on a fresh device this
        *is* the snapshot's state), then follow the relay from the snapshot's cursor. Files are
        written by the usual reconcile, and recorded, so nothing is re-ingested as new.
        ``own_seq``: the highest sequence number this device's identity is known to have used
        (a device restored under the same identity must not reuse sequence numbers)."""
        async with self.lock:
            self._begin_batch()
            batch = _Batch()
            # Text documents first, the index last: files appear once their content is there.
            ordered = [x for x in states if x[0] != INDEX_DOC_ID]
            ordered += [x for x in states if x[0] == INDEX_DOC_ID]
            await self._absorb_unsaved([d for d, _ in ordered if d != INDEX_DOC_ID], batch)
            dirty: set[bytes] = set()
            for doc_id, state in ordered:
                if _scratch_apply([DocUpdate(doc_id=doc_id, update=state)]) is None:
                    raise ValueError(f"snapshot state of document {doc_id.hex()} is malformed")
                if doc_id == INDEX_DOC_ID:
                    self.index.apply_update(state)
                else:
                    (await self._doc(doc_id)).apply_update(state)
                dirty.add(doc_id)
            for sender, raw in windows.items():
                if sender not in self.windows and sender != self.identity.public.sign_pk:
                    self.windows[sender] = ReplayWindow.from_bytes(raw)
            async with self.store.transaction():
                due = await self.store.append_doc_updates(self.space_id, ordered)
                if cursor > self.cursor:
                    self.cursor = cursor
                    await self.store.set_counter(self.space_id, "relay_cursor", self.cursor)
                if epoch_fence > self.epoch_fence:
                    self.epoch_fence = epoch_fence
                    await self.store.set_counter(self.space_id, "epoch_fence", self.epoch_fence)
                if own_seq > self.seq:
                    self.seq = own_seq
                    await self.store.set_counter(self.space_id, "seq", self.seq)
                for sender, window in self.windows.items():
                    await self.store.save_replay(self.space_id, sender, window.to_bytes())
            await self._finish(batch, dirty=dirty, delivered=[])
            for doc_id in due:
                await self._compact(doc_id)


def _what(reason: str) -> str:
    """A quarantine reason as an `offenders` category: the protocol error code ("malformed",
    "bad_signature", ...) or the fixed sentence before any detail."""
    head = reason.split(":", 1)[0].strip()
    return head[:80] or "refused"


def _tracked_under(files: Iterable[str], folders: set[str]) -> list[str]:
    """Tracked paths inside any of `folders` (relative paths, '/'-separated)."""
    if not folders:
        return []
    if len(folders) <= 4:
        prefixes = tuple(f + "/" for f in folders)
        return [p for p in files if p.startswith(prefixes)]
    out = []
    for p in files:
        i = p.rfind("/")
        while i > 0:
            if p[:i] in folders:
                out.append(p)
                break
            i = p.rfind("/", 0, i)
    return out


def _lexists(path: Path) -> bool:
    """Whether anything (a dangling symlink included) is at ``path``; one lstat."""
    return os.path.lexists(path)


def _probe_case_insensitive(root: Path) -> bool:
    """Create a mixed-case probe file (a temp name: never synced) and look for its swapped-case
    spelling. False if the probe cannot be made (a read-only folder: nothing is written)."""
    name = f"{TEMP_PREFIX}case-{os.urandom(4).hex()}-aB"
    try:
        fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        return os.path.lexists(root / name.swapcase())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(root / name)


def _coalesce(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """One update per document (``merge_updates`` of its updates, in order; the documents keep
    the order of their first update). A burst of new files makes 2-3 index updates per file:
    merged, a receiver applies the index once per envelope, and the store keeps one row."""
    by_doc: dict[bytes, list[bytes]] = {}
    for doc_id, update in items:
        by_doc.setdefault(doc_id, []).append(update)
    if len(by_doc) == len(items):
        return items
    out: list[tuple[bytes, bytes]] = []
    for doc_id, updates in by_doc.items():
        if len(updates) == 1:
            out.append((doc_id, updates[0]))
            continue
        try:
            out.append((doc_id, merge_updates(*updates)))
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            # Our own updates always merge; should one not, send them as they are.
            log.error("could not merge %d updates of one document: %r", len(updates), exc)
            out.extend((doc_id, u) for u in updates)
    return out


def _index_last(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The index update after every document update (the documents keep their order).

    An index entry is what makes a text file appear on a receiver, which writes the document
    as it stands; a batch larger than one envelope (_split) used to put the index first, so a
    receiver applying the first envelope wrote new files empty until the envelope holding
    their text came (tests/e2e/test_text_visible_whole.py). With the
    index last, a sender's stream, applied in its order (relay order, LAN causal order), never
    shows a file before its text."""
    index = [item for item in items if item[0] == INDEX_DOC_ID]
    if not index or items[-len(index) :] == index:
        return items
    return [item for item in items if item[0] != INDEX_DOC_ID] + index


def _split(items: list[tuple[bytes, bytes]]) -> list[list[tuple[bytes, bytes]]]:
    out: list[list[tuple[bytes, bytes]]] = [[]]
    size = 0
    for doc_id, update in items:
        if out[-1] and size + len(update) > ENVELOPE_PAYLOAD_BUDGET:
            out.append([])
            size = 0
        out[-1].append((doc_id, update))
        size += len(update) + 32
    return out


def _same_file(rec: FileRecord, st: DiskStat) -> bool:
    return rec.stat_key() == (st.size, st.mtime_ns, st.inode)


def _changed_and_moved(
    gone: list[str],
    st: DiskStat,
    files: Mapping[str, FileRecord],
    entries: Mapping[str, FileEntry],
) -> str | None:
    """The vanished binary file whose inode a new binary file has (``mv`` keeps the inode;
    written in place since last synced, so size/mtime differ), if exactly one: a rename of a
    file with an unpublished edit."""
    found = [
        g
        for g in gone
        if files[g].inode == st.inode
        and (e := entries.get(files[g].fid.hex())) is not None
        and e.kind == "binary"
        and e.alive
    ]
    return found[0] if len(found) == 1 else None


def _as_text(data: bytes) -> str | None:
    if len(data) > TEXT_MAX_BYTES or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _mode_bits(perms: int) -> int:
    """The mode an index entry records: 0o755 if any exec bit is set, else 0o644."""
    return 0o755 if perms & 0o111 else 0o644


def _exec_differs(disk_perms: int, entry_mode: int) -> bool:
    """The disk's exec bit differs from the entry's (``disk_perms`` 0 = unknown: never)."""
    return disk_perms != 0 and bool(disk_perms & 0o111) != bool(entry_mode & 0o111)


def _mode_of(st: DiskStat, path: Path) -> int:
    if st.mode:  # the stat the content was read with (0: unknown)
        return 0o755 if st.mode & 0o111 else 0o644
    try:
        return 0o755 if os.stat(path, follow_symlinks=False).st_mode & 0o111 else 0o644
    except OSError:
        return 0o644


_ReadResult = tuple[bytes, DiskStat] | FileTooLargeError | OSError | UnsafePathError | None


def _read_files(root: Path, paths: list[str]) -> list[_ReadResult]:
    """read_file of each path (in a worker thread); a failure is returned in its place."""
    out: list[_ReadResult] = []
    for path in paths:
        try:
            out.append(read_file(root, path, TEXT_MAX_BYTES))
        except (FileTooLargeError, OSError, UnsafePathError) as exc:
            out.append(exc)
    return out


def _scratch_apply(items: list[DocUpdate]) -> list[Doc] | None:
    """Apply each update to a throwaway document first: a crafted update that makes yrs panic
    must never reach a live document (a panicked document may be unusable afterwards). Returns
    the scratch documents (one per item), or None if any update was refused."""
    out: list[Doc] = []
    for item in items:
        scratch = Doc()
        try:
            scratch.apply_update(item.update)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            return None
        out.append(scratch)
    return out
