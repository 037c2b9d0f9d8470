"""The per-space index document: which files exist, where, and whether they are deleted.

One pycrdt ``Doc`` with one root ``Map`` named ``files``. Keys are FLAT, ``"<fid_hex>/<field>"``,
and every value is a JSON-encoded string. Both choices are deliberate (design brief §4):

* Not a nested Y.Map per file: when two devices concurrently create the same fid (same path and
  content, hence the same derived id), each would insert its *own* nested map under the fid key
  and one whole map would silently replace the other. Flat keys merge field by field.
* JSON strings: pycrdt returns integers stored in a Map as floats (``5`` -> ``5.0``); encoding
  the leaves ourselves keeps ``int`` as ``int`` and lets us validate what comes back.

Concurrent writes to one key are won by the writer with the *highest client id* (yrs rule), not
the latest. That is acceptable here because every such race is between values any of which is
a correct outcome (two renames, two deletes, two identical creations), and the winner is the
same on every replica. The one race where "who wins" matters — an edit against a concurrent
delete — is not decided by LWW at all but by per-device edit counters:

* Every local change to a file (content edit, rename, mode change, (re)creation) increments
  this device's counter ``e:<device>`` (only that device ever writes that key, so it never
  races). A device's creation record ``c:<device>`` counts as 1 while no ``e:<device>`` key
  was written (schema 4: a new file then needs no counter entry of its own).
* A delete records ``seen``: the counters the deleting device had observed.
* The entry is alive iff it has a path and either no delete record, or some device's counter is
  greater than what the deleter saw — i.e. the edit was concurrent with (or after) the delete.
  An edit beats a concurrent delete; nothing is lost.

Fields per fid (index schema 4, ``INDEX_SCHEMA``): ``c:<dev>`` ([kind, created ts, path,
mtime]: the creation record that device wrote; the kind is part of the fid, so it never changes;
path and mtime are the ones the entry was created with), ``path`` (str: only once the file was
renamed, or re-created while such a key exists; it then overrides the creation record's path),
``mode`` (int; absent while it is the kind's default, ``DEFAULT_MODES``), ``del`` (null | {"ts",
"dev", "seen": {dev: int}}), ``e:<dev>`` (int), ``target`` (str, symlinks only), ``mtime`` (int
ns: the content's modification time where it was last written locally; only after a later
content change, it then overrides the creation record's mtime; not an edit of its own).

Every map entry costs ~330 bytes of yrs memory plus its key and value (bench/README.md: schema
1's 6 entries per text file were ~33 MB of an idle agent with 10,000 files; schema 2 had 4,
schema 3 2: ``c`` and ``e:<dev>``). Schema 4 writes ONE for a text file never renamed or edited
since its creation: ``c:<dev>``, which also stands for that device's first edit count (in-process
at 100,000 files: yrs memory 78 -> 42 MB, encoded state 19.3 -> 12.8 MB). The creation record
is keyed by its writer, so it never races: when several devices create the same fid
concurrently (same path and content, hence the same derived id), every record stays and each
still counts as its writer's edit, so an edit beats a concurrent delete exactly as with explicit
counters. The entry's kind, creation time, creating device, first path and mtime come from the
record with the highest (ts, device); a re-creation stamps its record after every record it has
seen (``create``), so a device whose clock is behind still re-creates at its own path. Fields
written concurrently by different devices (path, mode, del, mtime, target) are separate entries
once written after the creation, so a merge stays per field: a rename racing a creation, or two
renames, are decided by the map (any winner is a correct outcome), and a creation record's path
only counts while no device wrote the key. Schemas 1 (``kind`` and ``created`` entries), 2 and 3
(a shared ``c`` entry) are not read: ``legacy_keys`` reports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from pycrdt import Doc, Map, TransactionEvent

__all__ = [
    "DEFAULT_MODES",
    "FILES",
    "INDEX_SCHEMA",
    "KINDS",
    "DeleteRecord",
    "FileEntry",
    "IndexDoc",
    "Kind",
    "created_fids",
    "creation_fields",
    "derive_file_id",
    "fid_hex",
]

FILES = "files"  # root map name
INDEX_SCHEMA = 4
# Field names of index schemas 1-3 (schema 1's ``kind``/``created``, schemas 2-3's shared
# creation record ``c``), replaced by the per-device ``c:<dev>`` in schema 4.
LEGACY_FIELDS: frozenset[str] = frozenset({"kind", "created", "c"})
CREATED = "c:"  # prefix of a device's creation record
# How far after the latest creation record seen a re-creation stamps its own (seconds).
_RESTAMP = 0.001
EDITS = "e:"  # prefix of a device's edit counter
Kind = Literal["text", "binary", "dir", "symlink"]
KINDS: frozenset[str] = frozenset({"text", "binary", "dir", "symlink"})
# A mode equal to its kind's default is not stored (one map entry less per file).
DEFAULT_MODES: Mapping[str, int] = MappingProxyType(
    {"text": 0o644, "binary": 0o644, "dir": 0o755, "symlink": 0o777}
)
FID_BYTES = 16
_EMPTY_UPDATE = b"\x00\x00"  # v1 update with no structs and an empty delete set


def derive_file_id(key: bytes, path: str, content: bytes, *, kind: str = "") -> bytes:
    """Deterministic 16-byte file id: keyed BLAKE2b over (kind, path, content).

    Two devices that create the same path with the same content get the same fid, so their
    index entries (and text documents) merge instead of turning into a conflict. The hash is
    keyed with the space's file-id key so ids reveal nothing about paths or contents to anyone
    without it. ``kind`` separates e.g. a directory from an empty file, or a symlink from a file
    holding the same bytes as its target; the same file must always be given the same kind.
    """
    if not key:
        raise ValueError("file id key must not be empty")
    if len(key) > 64:  # BLAKE2b key limit: compress longer keys first
        key = hashlib.blake2b(key, digest_size=64).digest()
    h = hashlib.blake2b(key=key, digest_size=FID_BYTES, person=b"qmoi-fid-v1")
    for part in (kind.encode("utf-8"), path.encode("utf-8")):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    h.update(len(content).to_bytes(8, "big"))
    h.update(content)
    return h.digest()


@dataclass(frozen=True, slots=True)
class DeleteRecord:
    ts: float
    dev: str
    seen: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of the index as converged state says it is (read-only view)."""

    fid: str  # lowercase hex, 32 chars
    path: str | None
    kind: str
    mode: int
    created_ts: float
    created_dev: str
    edits: Mapping[str, int] = field(default_factory=dict)
    deleted: DeleteRecord | None = None
    alive: bool = False
    mtime_ns: int | None = None
    target: str | None = None  # a symlink's target, as read from the link


# An mtime is what os.stat can report: time_t seconds (signed 64-bit) in nanoseconds, before
# 1970 included. A value outside (another device's junk) would fail os.utime when written.
_MTIME_MIN = -(1 << 63) * 1_000_000_000
_MTIME_MAX = ((1 << 63) - 1) * 1_000_000_000 + 999_999_999


def _valid_mtime(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and _MTIME_MIN <= v <= _MTIME_MAX


def _is_alive(path: str | None, edits: Mapping[str, int], deleted: DeleteRecord | None) -> bool:
    if path is None:
        return False
    if deleted is None:
        return True
    return any(count > deleted.seen.get(dev, 0) for dev, count in edits.items())


def _check_fid(fid: str) -> str:
    if len(fid) != 2 * FID_BYTES or any(c not in "0123456789abcdef" for c in fid):
        raise ValueError(f"file id must be {2 * FID_BYTES} lowercase hex chars: {fid!r}")
    return fid


def _check_device(device: str) -> str:
    if not device or "/" in device or ":" in device:
        raise ValueError(f"bad device id: {device!r}")
    return device


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown file kind {kind!r}")
    return kind


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _parse_delete(raw: Any) -> tuple[bool, DeleteRecord | None]:
    """(valid, record). ``null`` is valid and means not deleted."""
    if raw is None:
        return True, None
    if not isinstance(raw, dict):
        return False, None
    ts, dev, seen = _num(raw.get("ts")), raw.get("dev"), raw.get("seen")
    if ts is None or not isinstance(dev, str) or not isinstance(seen, dict):
        return False, None
    clean: dict[str, int] = {}
    for k, v in seen.items():
        n = _int(v)
        if not isinstance(k, str) or n is None:
            return False, None
        clean[k] = n
    return True, DeleteRecord(ts, dev, MappingProxyType(clean))


def creation_fields(
    kind: str, mode: int, ts: float, dev: str, path: str, mtime_ns: int | None = None
) -> dict[str, Any]:
    """The fields a creation writes (``put_fields`` callers that write a whole new entry, e.g.
    a binary conflict split): ``c:<dev>``, which also counts as ``dev``'s first edit, and
    ``mode`` unless default."""
    _check_kind(kind)
    _check_device(dev)
    if not path:
        raise ValueError("empty path")
    out: dict[str, Any] = {CREATED + dev: [kind, float(ts), path, mtime_ns]}
    if int(mode) != DEFAULT_MODES[kind]:
        out["mode"] = int(mode)
    return out


@dataclass(frozen=True, slots=True)
class _Creation:
    kind: str
    ts: float
    dev: str
    path: Any
    mtime: Any


def _parse_creation(dev: str, raw: Any) -> _Creation | None:
    """A ``c:<dev>`` value; None if unusable (junk from a buggy or hostile peer)."""
    if not isinstance(raw, list) or len(raw) != 4 or not dev:
        return None
    kind, ts, path, mtime = raw
    if not isinstance(kind, str):
        return None
    return _Creation(sys.intern(kind), _num(ts) or 0.0, sys.intern(dev), path, mtime)


def _creation(fields: Mapping[str, Any]) -> _Creation | None:
    """The creation record that speaks for the entry: the highest (ts, device)."""
    best: _Creation | None = None
    for name, raw in fields.items():
        if name.startswith(CREATED):
            c = _parse_creation(name[len(CREATED) :], raw)
            if c is not None and (best is None or (c.ts, c.dev) > (best.ts, best.dev)):
                best = c
    return best


def _build_entry(fid: str, fields: Mapping[str, Any]) -> FileEntry:
    """Interpret one fid's decoded fields. Garbage (a buggy or hostile peer) degrades to "no
    path" / defaults, never to an exception: ``entries()`` must not fail on remote data."""
    c = _creation(fields)
    kind, created_ts, created_dev = (c.kind, c.ts, c.dev) if c else (None, 0.0, "")
    first_path, first_mtime = (c.path, c.mtime) if c else (None, None)
    # A written key overrides what the creation record says (a rename, a later content change).
    path = fields.get("path", first_path)
    if not isinstance(path, str) or not path:
        path = None
    if kind is None or kind not in KINDS:
        # Unknown kind (e.g. from a newer agent) or no creation record (e.g. schema 1 fields):
        # keep the entry but never materialize it.
        kind, path = "binary" if kind is None else kind, None
    mode = _int(fields.get("mode"))
    mtime_ns = _int(fields.get("mtime", first_mtime))
    target = fields.get("target")
    edits: dict[str, int] = {}
    for k, v in fields.items():
        if k.startswith(EDITS):
            n = _int(v)
            if n is not None and n >= 0:
                edits[k[2:]] = max(n, edits.get(k[2:], 0))
        elif k.startswith(CREATED) and _parse_creation(k[2:], v) is not None:
            edits[k[2:]] = max(1, edits.get(k[2:], 0))  # a creation is its writer's first edit
    valid, deleted = _parse_delete(fields.get("del"))
    if not valid:
        # A malformed delete record is treated as a delete that saw nothing newer than what
        # exists: conservative would be "alive", and an edit beats a delete anyway, so alive.
        deleted = None
    return FileEntry(
        fid=fid,
        path=path,
        kind=kind,
        mode=mode if mode is not None else DEFAULT_MODES.get(kind, 0o644),
        created_ts=created_ts,
        created_dev=created_dev,
        edits=MappingProxyType(edits),  # read-only: entries are cached and shared
        deleted=deleted,
        mtime_ns=mtime_ns if _valid_mtime(mtime_ns) else None,
        target=target if isinstance(target, str) and target else None,
        alive=_is_alive(path, edits, deleted),
    )


class IndexDoc:
    """The index of one space, wrapping a pycrdt ``Doc``.

    Every mutating method runs in one transaction and returns that transaction's incremental
    update (to persist and send); ``apply_update`` takes remote ones. Not thread-safe: one
    owner (the agent's state component) drives it.

    Reading the whole Y.Map is slow (≈150 ms for 60k keys), so the wrapper keeps, fed by a map
    observer, the set of field names of each fid and a cache of parsed entries invalidated
    per fid. ``entries()`` re-parses only fids touched since the last call, and
    ``take_changed()`` tells the caller which fids those were.
    """

    def __init__(self, doc: Doc[Any] | None = None, *, client_id: int | None = None) -> None:
        if doc is not None and client_id is not None:
            raise ValueError("pass either doc or client_id")
        self._ydoc: Doc[Any] | None = doc if doc is not None else Doc(client_id=client_id)
        self._ymap: Map[Any] | None = self._ydoc.get(FILES, type=Map)
        # While unloaded (``unload``): the whole document as one update, and its client id.
        self._parked: tuple[bytes, int] | None = None
        # Bumped by every change through this wrapper and by every hand-out of ``doc`` (whose
        # holder may write to any root): readers of other roots cache on it (``version``).
        self._version = 0
        # fid -> its field names. Tuples of interned strings, and interned fids: with 10,000
        # files, sets and per-key copies of the same few names cost ~10 MB (bench idle_rss).
        self._fields: dict[str, tuple[str, ...]] = {}
        self._cache: dict[str, FileEntry] = {}
        # Identical edit vectors (most files: one device, a small count) share one read-only
        # mapping instead of a dict + proxy per entry. Rebuilt when it outgrows the cache.
        self._edit_pool: dict[tuple[tuple[str, int], ...], Mapping[str, int]] = {}
        self._names_pool: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._dirty: set[str] = set()
        self._changed: set[str] = set()
        self._batching = False
        self.legacy_keys = False  # schema 1-3 fields seen (see ``schema_problem``)
        for key in self._ymap:
            self._note_key(key, added=True)
        self._sub = self._ymap.observe(self._on_map_event)

    @classmethod
    def from_state(cls, state: bytes, *, client_id: int | None = None) -> IndexDoc:
        idx = cls(client_id=client_id)
        idx.apply_update(state)
        return idx

    @property
    def doc(self) -> Doc[Any]:
        """The pycrdt document (loads it if unloaded; counts as a possible change)."""
        self._version += 1
        return self._doc

    @property
    def version(self) -> int:
        """Changes when the document may have changed: a value cached from ``doc`` together
        with the version read *after* it stays valid while the version is the same."""
        return self._version

    @property
    def _doc(self) -> Doc[Any]:
        if self._ydoc is None:
            self._load()
        assert self._ydoc is not None
        return self._ydoc

    @property
    def _map(self) -> Map[Any]:
        if self._ymap is None:
            self._load()
        assert self._ymap is not None
        return self._ymap

    # -- unloading while idle ----------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._ydoc is not None

    def unload(self) -> bool:
        """Keep the document only as its encoded state until it is next used.

        yrs holds ~550 bytes per map entry; the encoded state is ~15 % of that (10,000 files:
        ~23 MB in memory, 2.9 MB encoded; bench idle_rss). Called when the agent goes quiet
        after a large batch (agent/memtrim.py). The per-fid caches stay: the document does not
        change while unloaded, so they stay valid. The next use rebuilds the document from the
        state (~0.1 s for 10,000 files) with the same client id, so this device's later
        changes continue its own clock. Not while a ``batch`` is open. True if it unloaded."""
        if self._ydoc is None or self._ymap is None or self._batching:
            return False
        state = self._ydoc.get_update()
        self._parked = (state, self._ydoc.client_id)
        self._ymap.unobserve(self._sub)
        self._ydoc = self._ymap = None
        return True

    def _load(self) -> None:
        assert self._parked is not None
        state, client_id = self._parked
        doc: Doc[Any] = Doc(client_id=client_id)
        doc.apply_update(state)  # before observing: nothing in it is news to the caches
        self._ydoc, self._ymap = doc, doc.get(FILES, type=Map)
        self._sub = self._ymap.observe(self._on_map_event)
        self._parked = None

    # -- change tracking ---------------------------------------------------------------------

    def _note_key(self, key: str, *, added: bool) -> None:
        fid, sep, name = key.partition("/")
        if not sep:
            return
        fid = sys.intern(fid)
        if name in LEGACY_FIELDS:
            self.legacy_keys = True
        names = self._fields.get(fid, ())
        if added:
            if name not in names:
                self._fields[fid] = self._pooled((*names, sys.intern(name)))
        elif name in names:
            rest = tuple(n for n in names if n != name)
            if rest:
                self._fields[fid] = self._pooled(rest)
            else:
                del self._fields[fid]
        self._dirty.add(fid)
        self._changed.add(fid)

    def _on_map_event(self, event: Any) -> None:
        for key, change in event.keys.items():
            action = change.get("action") if isinstance(change, dict) else None
            self._note_key(key, added=action != "delete")

    def schema_problem(self) -> str | None:
        """Why this index cannot be used by this agent (written with index schema 1), or None."""
        if not self.legacy_keys:
            return None
        return (
            f"the space's index was written by an older qmoi-sync (index schema 1, 2 or 3; this "
            f"agent reads schema {INDEX_SCHEMA} only, there is no migration): remove the space "
            f"from this device and join it again from a device running this version"
        )

    def take_changed(self) -> set[str]:
        """Fids whose fields changed (locally or remotely) since the previous call."""
        changed, self._changed = self._changed, set()
        return changed

    # -- sync --------------------------------------------------------------------------------

    def apply_update(self, update: bytes) -> None:
        self._version += 1
        self._doc.apply_update(update)

    def state(self) -> bytes:
        """Full state as an update (``Doc.get_update()``)."""
        return self._doc.get_update()

    def state_vector(self) -> bytes:
        return self._doc.get_state()

    def update_since(self, state_vector: bytes) -> bytes:
        """What a peer with ``state_vector`` lacks (sync step 2)."""
        return self._doc.get_update(state_vector)

    def _pooled(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """One shared tuple per distinct list of field names: nearly all files have the same
        few, and a tuple per file cost ~0.9 MB at 10,000 files."""
        if len(self._names_pool) > 2 * len(self._fields) + 64:  # combinations no file uses
            self._names_pool.clear()
        return self._names_pool.setdefault(names, names)

    # -- reads -------------------------------------------------------------------------------

    def _decoded_fields(self, fid: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._fields.get(fid, ()):
            raw = self._map.get(f"{fid}/{name}")
            if isinstance(raw, str):
                try:
                    out[name] = json.loads(raw)
                except (ValueError, RecursionError):  # another device's junk (deep nesting)
                    continue
        return out

    def _refresh(self) -> None:
        if not self._dirty:
            return
        # One read transaction for all the reads (each Map.get outside one opens its own:
        # half the cost of a refresh of 1,000 new entries).
        with self._doc.transaction():
            self._refresh_dirty()

    def _refresh_dirty(self) -> None:
        for fid in self._dirty:
            fields = self._decoded_fields(fid)
            if fields:
                self._cache[fid] = self._shared(_build_entry(fid, fields))
            else:
                self._cache.pop(fid, None)
        self._dirty.clear()

    def _shared(self, entry: FileEntry) -> FileEntry:
        """The entry with its repeated values (device ids, edit vectors) shared with other
        entries: the cache holds one entry per file for the agent's lifetime."""
        key = tuple(sorted(entry.edits.items()))
        edits = self._edit_pool.get(key)
        if edits is None:
            if len(self._edit_pool) > 2 * len(self._cache) + 64:
                self._edit_pool.clear()
            edits = MappingProxyType({sys.intern(d): n for d, n in key})
            self._edit_pool[key] = edits
        return dataclasses.replace(entry, edits=edits, created_dev=sys.intern(entry.created_dev))

    def entries(self) -> dict[str, FileEntry]:
        """Every fid known to the index (alive or not), keyed by fid hex."""
        self._refresh()
        return dict(self._cache)

    def entry(self, fid: str) -> FileEntry | None:
        self._refresh()
        return self._cache.get(fid)

    # -- writes ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[list[bytes]]:
        """Make many changes in ONE transaction: a burst of new files then costs one
        transaction, one observer event and one update instead of two or three per file.
        Mutating methods called inside return ``b""``; when the block ends, the yielded list
        holds the transaction's update (none if nothing changed). Keep the block synchronous:
        another task's change made while it is open would land in this transaction."""
        if self._batching:
            raise RuntimeError("IndexDoc.batch() does not nest")
        out: list[bytes] = []

        def on_commit(event: TransactionEvent) -> None:
            out.append(event.update)

        sub = self._doc.observe(on_commit)
        self._batching = True
        try:
            with self._doc.transaction():
                yield out
        finally:
            self._batching = False
            self._doc.unobserve(sub)

    def _mutate(self, fn: Callable[[], None]) -> bytes:
        self._version += 1
        if self._batching:
            fn()  # part of the batch's transaction; its update comes out of batch()
            return b""
        captured: list[bytes] = []

        def on_commit(event: TransactionEvent) -> None:
            captured.append(event.update)

        sub = self._doc.observe(on_commit)
        try:
            with self._doc.transaction():
                fn()
        finally:
            self._doc.unobserve(sub)
        return captured[0] if captured else _EMPTY_UPDATE

    def _get(self, fid: str, name: str) -> Any:
        raw = self._map.get(f"{fid}/{name}")
        if not isinstance(raw, str):
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # another device's junk (deep nesting included)
            return None

    def _set(self, fid: str, name: str, value: Any) -> None:
        key = f"{fid}/{name}"
        encoded = _dump(value)
        # Rewriting an identical value still creates an item (and a race winner): skip it.
        if self._map.get(key) != encoded:
            self._map[key] = encoded
            if self._batching:
                # The map observer only fires at the batch's commit; later calls in the same
                # batch (``_require``, ``_current``) must already see the field.
                self._note_key(key, added=True)

    def _set_mode(self, fid: str, kind: str, mode: int) -> None:
        """Store ``mode`` unless it is what the entry already means (absent = kind default)."""
        current = _int(self._get(fid, "mode"))
        if mode != (current if current is not None else DEFAULT_MODES.get(kind, 0o644)):
            self._set(fid, "mode", mode)

    def _count(self, fid: str, device: str) -> int:
        """This device's edit count as the entry reads it: its ``e:`` key, or 1 for its
        creation record alone. Reads the map (inside a transaction the caches lag)."""
        n = _int(self._get(fid, EDITS + device))
        own = n if n is not None and n > 0 else 0
        created = _parse_creation(device, self._get(fid, CREATED + device)) is not None
        return max(own, 1 if created else 0)

    def _bump(self, fid: str, device: str) -> None:
        self._set(fid, EDITS + device, self._count(fid, device) + 1)

    def _current(self, fid: str) -> FileEntry | None:
        # Inside a transaction the observer has not fired yet: read the map directly.
        fields: dict[str, Any] = {}
        for name in self._fields.get(fid, ()):
            value = self._get(fid, name)
            if value is not None or name == "del":
                fields[name] = value
        return _build_entry(fid, fields) if fields else None

    def _require(self, fid: str) -> None:
        if fid not in self._fields:
            raise KeyError(f"unknown file id {fid}")

    def fields(self, fid: str) -> dict[str, Any]:
        """Every decoded field of one fid (binary manifests ``m:<dev>``, split marks ``x:<dev>``
        included; see agent/binary_sync.py)."""
        self._refresh()
        return self._decoded_fields(fid)

    def put_manifest(
        self, fid: str, device: str, manifest: Mapping[str, Any], base: Mapping[str, int]
    ) -> bytes:
        """A local content write of a binary file: bump this device's edit counter and store the
        manifest under ``m:<device>`` with its version vector: ``base`` (the version the disk
        file was derived from) plus this device's new counter."""
        _check_fid(fid)
        _check_device(device)
        self._require(fid)

        def run() -> None:
            self._bump(fid, device)
            vv = {k: v for k, v in base.items() if isinstance(v, int)}
            vv[device] = _int(self._get(fid, f"e:{device}")) or 1
            self._set(fid, f"m:{device}", {**manifest, "vv": vv})

        return self._mutate(run)

    def put_fields(self, fid: str, values: Mapping[str, Any]) -> bytes:
        """Write raw fields. Only for deterministic writes that any device may make with the
        same values (binary conflict splits): concurrent identical writes converge."""
        _check_fid(fid)

        def run() -> None:
            for name, value in values.items():
                self._set(fid, name, value)

        return self._mutate(run)

    def create(
        self,
        fid: str,
        path: str,
        kind: str,
        mode: int,
        device: str,
        now: float,
        mtime_ns: int | None = None,
    ) -> bytes:
        """Create the entry, or recreate/undelete it if it exists (deleted or not).

        ``c`` (with the path and ``mtime_ns``) is (re)stamped only when the entry is new or
        currently deleted: creating an alive fid again (the same file appeared by another
        route) just merges. A ``path`` or ``mtime`` key already written overrides ``c``, so a
        re-creation writes those keys too.
        """
        _check_fid(fid)
        _check_kind(kind)
        _check_device(device)
        if not path:
            raise ValueError("empty path")
        if not math.isfinite(now):
            raise ValueError("non-finite timestamp")
        if mtime_ns is not None and not _valid_mtime(mtime_ns):
            raise ValueError(f"bad mtime: {mtime_ns!r}")
        current = self._current(fid)
        written = self._fields.get(fid, ())

        def run() -> None:
            if current is None or not current.alive:
                before = self._count(fid, device)
                ts = float(now)
                if current is not None and ts <= current.created_ts:
                    # Stamped after every creation record seen, so this one speaks for the
                    # entry even when this device's clock is behind the earlier creator's.
                    ts = current.created_ts + _RESTAMP
                self._set(fid, CREATED + device, [kind, ts, path, mtime_ns])
                if before:
                    # The record alone counts 1: a re-creation must count beyond what this
                    # device counted before (and any delete saw), so it writes the counter.
                    self._set(fid, EDITS + device, before + 1)
                if "path" in written:
                    self._set(fid, "path", path)
                if "mtime" in written and mtime_ns is not None:
                    self._set(fid, "mtime", mtime_ns)
            else:
                if current.path != path:
                    self._set(fid, "path", path)
                if mtime_ns is not None and current.mtime_ns != mtime_ns:
                    self._set(fid, "mtime", mtime_ns)
                self._bump(fid, device)
            self._set_mode(fid, kind, int(mode))
            if current is not None and current.deleted is not None:
                self._set(fid, "del", None)

        return self._mutate(run)

    def record_edit(self, fid: str, device: str) -> bytes:
        """A local content change: bump this device's counter (an edit beats a delete)."""
        _check_fid(fid)
        _check_device(device)
        self._require(fid)
        return self._mutate(lambda: self._bump(fid, device))

    def rename(self, fid: str, new_path: str, device: str) -> bytes:
        """Move the file; counts as an edit (a rename beats a concurrent delete)."""
        _check_fid(fid)
        _check_device(device)
        if not new_path:
            raise ValueError("empty path")
        self._require(fid)

        def run() -> None:
            self._set(fid, "path", new_path)
            self._bump(fid, device)

        return self._mutate(run)

    def set_mode(self, fid: str, mode: int, device: str) -> bytes:
        """Change the mode (exec bit); counts as an edit."""
        _check_fid(fid)
        _check_device(device)
        self._require(fid)
        current = self._current(fid)
        kind = current.kind if current is not None else "binary"

        def run() -> None:
            self._set_mode(fid, kind, int(mode))
            self._bump(fid, device)

        return self._mutate(run)

    def set_target(self, fid: str, target: str, device: str) -> bytes:
        """A symlink's target (the string the link holds); counts as an edit."""
        _check_fid(fid)
        _check_device(device)
        self._require(fid)
        if not target or "\x00" in target:
            raise ValueError("bad symlink target")

        def run() -> None:
            self._set(fid, "target", target)
            self._bump(fid, device)

        return self._mutate(run)

    def set_mtime(self, fid: str, mtime_ns: int) -> bytes:
        """Record the content's modification time (ns). Not an edit by itself: it travels with
        the content change it belongs to; concurrent writes: the highest client id wins."""
        _check_fid(fid)
        self._require(fid)
        if not _valid_mtime(mtime_ns):
            raise ValueError(f"bad mtime: {mtime_ns!r}")
        return self._mutate(lambda: self._set(fid, "mtime", mtime_ns))

    def delete(
        self, fid: str, device: str, now: float, seen: Mapping[str, int] | None = None
    ) -> bytes:
        """Mark deleted, recording the edit counters seen so a concurrent edit still wins.

        ``seen`` (default: every counter of the entry) lets the caller claim less: a binary
        version that is in this index but never reached this device's disk was not seen by
        whoever deleted the file there (agent/binary_sync.py ``BinarySync.delete_seen``)."""
        _check_fid(fid)
        _check_device(device)
        if not math.isfinite(now):
            raise ValueError("non-finite timestamp")
        current = self._current(fid)
        if current is None:
            raise KeyError(f"unknown file id {fid}")
        counters = dict(current.edits) if seen is None else {k: int(v) for k, v in seen.items()}
        record = {"ts": float(now), "dev": device, "seen": counters}
        return self._mutate(lambda: self._set(fid, "del", record))


def created_fids(update_doc: Doc[Any], kind: str) -> list[str]:
    """The fids whose creation stamp (``c``) of kind ``kind`` a document holds: used on a
    throwaway document with one received index update applied, to see which files that update
    creates. Junk (a hostile peer's) yields nothing, never an exception."""
    out: list[str] = []
    try:
        files = update_doc.get(FILES, type=Map)
        for key, raw in files.items():
            fid, sep, name = key.partition("/")
            if not sep or not name.startswith(CREATED) or not isinstance(raw, str):
                continue
            with contextlib.suppress(ValueError, RecursionError):
                c = _parse_creation(name[len(CREATED) :], json.loads(raw))
                if c is not None and c.kind == kind and fid not in out:
                    out.append(_check_fid(fid))
    except Exception:  # a root of another type, or an update pycrdt cannot read as a map
        return []
    return out


def fid_hex(fid: bytes) -> str:
    """The index key form of a file id."""
    if len(fid) != FID_BYTES:
        raise ValueError(f"file id must be {FID_BYTES} bytes")
    return fid.hex()
