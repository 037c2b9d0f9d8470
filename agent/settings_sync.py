"""Settings sync for one space: local settings files <-> the space's settings documents.

`SettingsService` belongs to a `SpaceRuntime`. It never touches a CRDT document outside the
space owner's lock: every change goes through `SpaceSync.run_local` (commit + seal, then the
file write-back, still under the lock), and it hears about remote changes from
`SpaceSync.batch_listeners`.

Per logical document a device keeps a *mapping* (SQLite table ``settings_map``): its own local
path, and the **base** — for every synced key, the value the file held at the last sync and the
version (every device's write counter for the key) that value reflected. One sync of a document:

1. read the file; if it does not parse, stop: nothing is sent, nothing is written, `status`
   warns (remote changes keep arriving in the document and are merged once it parses again);
2. keys whose value differs from the base are the user's changes: each is written to the
   document superseding the version the base recorded (so a remote change the user never saw
   is a concurrent write, resolved deterministically and listed by ``conflicts``); keys whose
   new value already is the shared value are not written again;
3. the document is resolved and the file patched towards it in place (only changed keys are
   touched: comments, order and layout stay), written atomically (temp file + fsync + rename
   in the same directory, the file's mode kept) unless the file changed since step 1 (then the
   sync runs again);
4. the new base is saved.

Device-local keys (glob patterns registered with ``settings local``, shared through the
registry) and keys that look like credentials (unless allow-listed) are never written to the
document and never touched in the file. Syncs of a document are serialized; triggers are the
file watcher (watchfiles on the parent folder, filtered to the file name, since editors save by
rename), a 2 s stat poll as a safety net, remote changes, and the control commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat as stat_mod
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchfiles import awatch

from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.settings_doc import (
    Change,
    DocInfo,
    Resolved,
    SettingsDoc,
    read_registry,
    registry_update,
    settings_doc_id,
)
from qmoi_sync.agent.settings_formats import (
    FormatHandler,
    KeyPath,
    ParsedSettings,
    SettingsParseError,
    SettingsTree,
    canon,
    check_doc_name,
    detect_format,
    display_path,
    format_handler,
    from_pointer,
    looks_secret,
    matches_any,
    ordinals,
    plan,
    to_pointer,
)
from qmoi_sync.agent.shared_options import AGENT_DOC, OPTIONS, apply_option
from qmoi_sync.agent.space import INDEX_DOC_ID
from qmoi_sync.agent.status import SettingsDocStatus
from qmoi_sync.agent.tasks import cancel_and_wait

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime
    from qmoi_sync.agent.store import Store

log = logging.getLogger("qmoi_sync.settings")

MAX_SETTINGS_BYTES = 4 * 1024 * 1024
POLL_S = 2.0
WATCH_STEP_MS = 5
WATCH_DEBOUNCE_MS = 200
MAX_PATTERN = 256

_UMASK = os.umask(0)
os.umask(_UMASK)

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings_map (
    space_id TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, format TEXT NOT NULL,
    base TEXT NOT NULL DEFAULT '{}', initial INTEGER NOT NULL DEFAULT 1,
    prefer TEXT NOT NULL DEFAULT 'shared', added_at REAL NOT NULL,
    PRIMARY KEY (space_id, name)
);
"""


# -- persistence (own table in the agent's database) ---------------------------------------------
async def ensure_schema(store: Store) -> None:
    await store.apply_schema(SCHEMA)


@dataclass(frozen=True)
class MappingRow:
    space_id: str
    name: str
    path: str
    format: str
    base: str
    initial: bool
    prefer: str


async def load_mappings(store: Store, space_id: str | None = None) -> list[MappingRow]:
    await ensure_schema(store)
    sql = "SELECT space_id, name, path, format, base, initial, prefer FROM settings_map"
    args: tuple[str, ...] = ()
    if space_id is not None:
        sql += " WHERE space_id=?"
        args = (space_id,)
    rows = await store.db.execute_fetchall(sql + " ORDER BY space_id, name", args)
    return [MappingRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]


@dataclass
class BaseKey:
    present: bool
    canon: str | None
    vv: dict[str, int]


def _base_to_json(base: dict[KeyPath, BaseKey]) -> str:
    return json.dumps(
        {
            to_pointer(p): {"p": b.present, "c": b.canon, "vv": b.vv}
            for p, b in sorted(base.items())
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def _base_from_json(text: str) -> dict[KeyPath, BaseKey]:
    out: dict[KeyPath, BaseKey] = {}
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):  # json raises RecursionError on deep nesting
        return out
    if not isinstance(raw, dict):
        return out
    for ptr, b in raw.items():
        try:
            path = from_pointer(ptr)
        except ValueError:
            continue
        if isinstance(b, dict):
            vv = {str(k): int(v) for k, v in (b.get("vv") or {}).items() if isinstance(v, int)}
            c = b.get("c")
            out[path] = BaseKey(bool(b.get("p")), c if isinstance(c, str) else None, vv)
    return out


@dataclass
class Mapping:
    name: str
    path: Path
    format: str
    base: dict[KeyPath, BaseKey]
    initial: bool
    prefer: str
    stat: tuple[int, int, int] | None = None  # (size, mtime_ns, inode) last read or written
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class DocState:
    state: str = "waiting"
    error: str | None = None
    local_keys: list[str] = field(default_factory=list)
    secret_keys: list[str] = field(default_factory=list)
    held_keys: list[str] = field(default_factory=list)
    conflicts: int = 0
    synced_keys: int = 0


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _read(path: Path) -> tuple[bytes | None, tuple[int, int, int] | None]:
    """(content, stat) of the file the path leads to; (None, None) when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > MAX_SETTINGS_BYTES:
            raise OSError(f"{path} is larger than {MAX_SETTINGS_BYTES} bytes")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), _stat_key(st)
    finally:
        os.close(fd)


def write_settings_atomic(path: Path, data: bytes, expect: tuple[int, int, int] | None) -> bool:
    """Replace the file with ``data``: temp file in the same folder, fsync, rename, folder fsync;
    the file's mode is kept (new files: 0666 minus the umask). Returns False, writing nothing,
    if the file is no longer what was read (``expect``: its stat then, None: it did not exist).
    A symlinked settings file (dotfiles repositories) is written where the link points."""
    target = Path(os.path.realpath(path))
    try:
        st = os.stat(target)
        current: tuple[int, int, int] | None = _stat_key(st)
        mode = stat_mod.S_IMODE(st.st_mode)
    except FileNotFoundError:
        current, mode = None, 0o666 & ~_UMASK
    if current != expect:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.qmoi-tmp-", dir=target.parent)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def _agent_doc_info() -> DocInfo:
    return DocInfo(name=AGENT_DOC, format="json")


class SettingsService:
    def __init__(self, runtime: SpaceRuntime) -> None:
        self.rt = runtime
        self.sync = runtime.sync
        self.mappings: dict[str, Mapping] = {}
        self.states: dict[str, DocState] = {}
        self.registry: dict[str, DocInfo] = {}
        self._doc_ids: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._serial = asyncio.Lock()
        self._registry_changed = False
        self._applied: dict[str, str] = {}  # option key -> canonical raw value applied
        self.option_notes: dict[str, str] = {}
        self.options: dict[str, Any] = {}
        self.started = False

    @property
    def store(self) -> Store:
        return self.rt.agent.store

    @property
    def space_id(self) -> str:
        return self.rt.record.space_id

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        await ensure_schema(self.store)
        self.registry = read_registry(self.sync.index.doc)
        for row in await load_mappings(self.store, self.space_id):
            self.mappings[row.name] = Mapping(
                row.name,
                Path(row.path),
                row.format,
                _base_from_json(row.base),
                row.initial,
                row.prefer,
            )
        self.sync.batch_listeners.append(self._on_batch)
        for m in self.mappings.values():
            self._start_watch(m)
        self.rt.tasks.append(asyncio.create_task(self._worker()))
        self.rt.tasks.append(asyncio.create_task(self._poll()))
        self.started = True
        for name in [*self.mappings, AGENT_DOC]:
            self.request(name)

    def request(self, name: str) -> None:
        self._dirty.add(name)
        self._wake.set()

    def doc_id(self, name: str) -> bytes:
        did = self._doc_ids.get(name)
        if did is None:
            did = settings_doc_id(self.rt.keyring.file_id_key, name)
            self._doc_ids[name] = did
        return did

    def info(self, name: str) -> DocInfo | None:
        info = self.registry.get(name)
        if name == AGENT_DOC:
            base = _agent_doc_info()
            return base if info is None else DocInfo(AGENT_DOC, "json", info.local, info.allow)
        return info

    def _on_batch(self, doc_ids: set[bytes]) -> None:
        """SpaceSync listener (under its lock, synchronous): remote changes arrived. It must
        never raise: it runs at the end of SpaceSync's batch."""
        try:
            if INDEX_DOC_ID in doc_ids:
                self._registry_changed = True
                self._wake.set()
            names = set(self.registry) | set(self.mappings) | {AGENT_DOC}
            for name in names:
                if self.doc_id(name) in doc_ids:
                    self.request(name)
        except Exception:
            log.exception("settings: reacting to remote changes failed")

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._registry_changed:
                self._registry_changed = False
                try:
                    new = read_registry(self.sync.index.doc)
                except Exception:
                    log.exception("settings: cannot read the registry")
                    new = self.registry
                for name in set(new) | set(self.registry):
                    if new.get(name) != self.registry.get(name):
                        self.request(name)
                self.registry = new
            names, self._dirty = sorted(self._dirty), set()
            for name in names:
                try:
                    await self.sync_doc(name)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("settings %s: sync failed", name)
                    self._fail(name, f"sync failed: {exc}")

    async def _poll(self) -> None:
        """Safety net for missed watcher events (a folder created later, a symlink target
        edited elsewhere): stat every mapped file every POLL_S seconds."""
        while True:
            await asyncio.sleep(POLL_S)
            for m in list(self.mappings.values()):
                try:
                    st: tuple[int, int, int] | None = _stat_key(os.stat(m.path))
                except OSError:
                    st = None
                if st != m.stat:
                    self.request(m.name)

    def _start_watch(self, m: Mapping) -> None:
        m.stop = asyncio.Event()
        m.task = asyncio.create_task(self._watch(m))
        self.rt.tasks.append(m.task)

    async def _stop_watch(self, m: Mapping) -> None:
        m.stop.set()
        task, m.task = m.task, None
        if task is not None:
            await cancel_and_wait(task)
            if task in self.rt.tasks:
                self.rt.tasks.remove(task)

    async def _watch(self, m: Mapping) -> None:
        names, folders = await asyncio.to_thread(_watch_targets, m.path)

        def keep(_change: object, path: str) -> bool:
            return Path(path).name in names

        try:
            async for _changes in awatch(
                *folders,
                watch_filter=keep,
                step=WATCH_STEP_MS,
                debounce=WATCH_DEBOUNCE_MS,
                stop_event=m.stop,
                recursive=False,
                ignore_permission_denied=True,
            ):
                self.request(m.name)
        except (OSError, RuntimeError) as exc:
            log.warning("settings %s: cannot watch %s (%s); polling instead", m.name, folders, exc)

    # -- status -----------------------------------------------------------------------------------
    def _state(self, name: str) -> DocState:
        return self.states.setdefault(name, DocState())

    def _warn(self, key: str, text: str | None) -> None:
        if text is None:
            self.sync.warnings.pop(key, None)
        else:
            self.sync.warnings[key] = text

    def _fail(self, name: str, error: str, state: str = "error") -> None:
        st = self._state(name)
        st.state, st.error = state, error
        m = self.mappings.get(name)
        where = f" ({m.path})" if m is not None else ""
        self._warn(f"settings:{name}", f"settings {name}{where}: {error}")

    def status_items(self) -> list[SettingsDocStatus]:
        out = []
        for name in sorted(set(self.registry) | set(self.mappings)):
            info = self.info(name)
            m = self.mappings.get(name)
            st = self.states.get(name, DocState())
            state = st.state
            if m is None:
                state = "removed" if info is not None and info.deleted else "unmapped"
            out.append(
                SettingsDocStatus(
                    name=name,
                    format=info.format if info is not None else (m.format if m else "?"),
                    path=str(m.path) if m is not None else None,
                    state=state,
                    error=st.error if m is not None else None,
                    keys=st.synced_keys,
                    local_keys=len(st.local_keys),
                    secret_keys=list(st.secret_keys),
                    conflicts=st.conflicts,
                )
            )
        return out

    # -- the sync of one document ---------------------------------------------------------------
    def _kept(self, info: DocInfo, path: KeyPath, value: Any) -> str | None:
        """Why this key stays on the device ("local", "secret"), or None if it is synced."""
        if matches_any(path, info.local):
            return "local"
        if looks_secret(path, value) and not matches_any(path, info.allow):
            return "secret"
        return None

    async def sync_doc(self, name: str) -> None:
        async with self._serial:
            await self._sync_doc(name)

    async def _sync_doc(self, name: str) -> None:
        info = self.info(name)
        m = self.mappings.get(name)
        if m is None:
            self._warn(f"settings:{name}", None)
            if name == AGENT_DOC:
                async with self.sync.lock:
                    sdoc = SettingsDoc(await self.sync.doc(self.doc_id(name)))
                    resolved = sdoc.resolve()
                await self._apply_options(resolved)
            return
        if info is None:
            self._fail(name, "not known in this space yet (waiting for its registry)", "waiting")
            return
        if info.deleted:
            self._fail(
                name,
                "removed from the space on another device: not synced any more (your file is "
                f"kept; `qmoi-sync settings remove {self.rt.record.name} {name}` forgets it)",
                "removed",
            )
            return
        if info.format != m.format:
            self._fail(
                name,
                f"the space's {name} is {info.format} but this device maps it to a "
                f"{m.format} file: not synced",
            )
            return
        result: dict[str, Resolved] = {}

        async def produce(
            add: Callable[[bytes, bytes | None], None],
        ) -> Callable[[], Awaitable[None]] | None:
            return await self._produce(name, info, m, add, result)

        await self.sync.run_local(produce)
        if name == AGENT_DOC and "resolved" in result:
            await self._apply_options(result["resolved"])

    async def _produce(
        self,
        name: str,
        info: DocInfo,
        m: Mapping,
        add: Callable[[bytes, bytes | None], None],
        result: dict[str, Resolved],
    ) -> Callable[[], Awaitable[None]] | None:
        st = self._state(name)
        doc_id = self.doc_id(name)
        sdoc = SettingsDoc(await self.sync.doc(doc_id))
        try:
            data, disk_stat = await asyncio.to_thread(_read, m.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                m.stat = _stat_key(os.stat(m.path))  # retried when it changes, not every poll
            self._fail(name, f"cannot read: {exc}")
            return None
        m.stat = disk_stat
        try:
            text = "" if data is None else data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._fail(
                name,
                f"not UTF-8 text ({exc.reason} at byte {exc.start}); not synced until fixed",
                "invalid",
            )
            return None
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        body = text[len(bom) :]
        handler = format_handler(info.format, style_hint=m.path.name)
        try:
            parsed = handler.parse(body)
        except SettingsParseError as exc:
            self._fail(
                name,
                f"not valid {info.format.upper()}: {exc}; not synced and not overwritten until "
                "it parses again",
                "invalid",
            )
            return None
        tree = parsed.tree()
        # A missing or empty file where there were settings is not "every key deleted" (a
        # reset, a half-done save): it is recreated from the shared document.
        vanished = not tree.leaves and not body.strip() and any(b.present for b in m.base.values())
        if vanished:
            log.info("settings %s: %s is missing or empty: writing it again", name, m.path)
        kept: dict[KeyPath, str] = {}
        disk: dict[KeyPath, Any] = {}
        for p, v in tree.leaves.items():
            why = self._kept(info, p, v)
            if why is None:
                disk[p] = v
            else:
                kept[p] = why
        resolved = sdoc.resolve()
        block = self.sync.send_block
        order = ordinals(tree)
        changes: dict[KeyPath, Change] = {}
        seen: dict[KeyPath, dict[str, int]] = {}
        held: set[KeyPath] = set()
        for p in [] if vanished else sorted(set(disk) | set(m.base)):
            b = m.base.get(p)
            cur = resolved.keys.get(p)
            if p in disk:
                c = canon(disk[p])
                if b is not None and b.present and b.canon == c:
                    continue
                if cur is not None and not cur.deleted and canon(cur.value) == c:
                    continue
                if block is not None:
                    held.add(p)
                    continue
                ts = None
                if m.initial and m.prefer == "shared" and b is None and cur is not None:
                    ts = 0.0  # first import of an existing file: the shared value wins
                changes[p] = Change(False, disk[p], float(order[p]), ts)
                seen[p] = dict(b.vv) if b is not None else {}
            elif b is not None and b.present:
                if p in kept or self._kept(info, p, None) is not None:
                    continue  # it became device-local: not a deletion
                if cur is None or cur.deleted:
                    continue
                if block is not None:
                    held.add(p)
                    continue
                changes[p] = Change(True)
                seen[p] = dict(b.vv)
        if changes:
            add(doc_id, sdoc.write(self.sync.device, changes, seen, self.sync.clock()))
            resolved = sdoc.resolve()
        result["resolved"] = resolved
        try:
            # From here on the document may hold our update: whatever fails, return normally so
            # run_local commits it (an update applied in memory but never committed would be
            # missing from the log and from every other device).
            desired, unwritable, new_body = self._write_back(
                info, tree, parsed, resolved, kept, held, body, handler
            )
        except Exception as exc:
            log.exception("settings %s: write-back failed", name)
            self._fail(name, f"write-back failed, file left as it was: {exc}")
            return None
        new_text = bom + new_body
        new_base: dict[KeyPath, BaseKey] = {}
        for p, state in resolved.keys.items():
            if p in kept or p in held:
                continue
            if p in desired:
                new_base[p] = BaseKey(True, canon(desired[p]), state.version())
            elif state.deleted:
                new_base[p] = BaseKey(False, None, state.version())
        for p in held:
            if p in m.base:
                new_base[p] = m.base[p]
        must_write = new_text != text or (data is None and bool(desired))
        space = self.rt.record.name

        async def after() -> None:
            if must_write:
                try:
                    ok = await asyncio.to_thread(
                        write_settings_atomic, m.path, new_text.encode("utf-8"), disk_stat
                    )
                except OSError as exc:
                    self._fail(name, f"cannot write the file: {exc}")
                    return
                if not ok:
                    self.request(name)  # the user saved meanwhile: merge that first
                    return
                try:
                    m.stat = _stat_key(os.stat(m.path))
                except OSError:
                    m.stat = None
            if new_base != m.base or m.initial:
                m.base, m.initial = new_base, False
                async with self.store.transaction():
                    await self.store.db.execute(
                        "UPDATE settings_map SET base=?, initial=0 WHERE space_id=? AND name=?",
                        (_base_to_json(new_base), self.space_id, name),
                    )
            st.state, st.error = "ok", None
            st.local_keys = sorted(display_path(p) for p, why in kept.items() if why == "local")
            st.secret_keys = sorted(display_path(p) for p, why in kept.items() if why == "secret")
            st.held_keys = sorted(display_path(p) for p in held)
            st.synced_keys = len(desired)
            st.conflicts = len(resolved.conflicts())
            self._warn(f"settings:{name}", None)
            self._warn(
                f"settings-secret:{name}",
                (
                    f"settings {name}: {len(st.secret_keys)} key(s) look like credentials and "
                    f"stay on this device: {', '.join(st.secret_keys[:5])}"
                    f"{' …' if len(st.secret_keys) > 5 else ''} (to sync one: qmoi-sync settings "
                    f"local {space} {name} --allow-secret KEY)"
                )
                if st.secret_keys
                else None,
            )
            self._warn(
                f"settings-held:{name}",
                f"settings {name}: {block}: local change(s) to {', '.join(st.held_keys)} not synced"
                if st.held_keys
                else None,
            )
            self._warn(
                f"settings-toml:{name}",
                f"settings {name}: TOML has no null: {', '.join(unwritable)} not written"
                if unwritable
                else None,
            )

        return after

    def _write_back(
        self,
        info: DocInfo,
        tree: SettingsTree,
        parsed: ParsedSettings,
        resolved: Resolved,
        kept: dict[KeyPath, str],
        held: set[KeyPath],
        body: str,
        handler: FormatHandler,
    ) -> tuple[dict[KeyPath, Any], list[str], str]:
        """(desired values, keys TOML cannot hold, the patched file body)."""
        desired: dict[KeyPath, Any] = {}
        unwritable: list[str] = []
        for p, v in resolved.values().items():
            if p in held or self._kept(info, p, v) is not None or p in kept:
                continue
            if info.format == "toml" and _has_null(v):
                unwritable.append(display_path(p))
                continue
            desired[p] = v
        hints = resolved.hints()
        ops = plan(
            tree,
            desired,
            keep=lambda p: p in kept or p in held,
            hint=hints.get,
        )
        new_body = parsed.apply(ops) if ops else body
        if ops:
            try:
                handler.parse(new_body)
            except SettingsParseError as exc:  # our own output must parse: never write junk
                raise RuntimeError(f"internal error, write-back refused: {exc}") from None
        return desired, unwritable, new_body

    # -- the agent's own options (the qmoi-sync document) -----------------------------------------
    async def _apply_options(self, resolved: Resolved) -> None:
        by_key: dict[str, Any] = {}
        for p, v in resolved.values().items():
            by_key.setdefault(display_path(p), v)
        unknown = sorted(k for k in by_key if k not in OPTIONS)
        self._warn(
            "settings-options",
            f"settings {AGENT_DOC}: unknown option(s) {', '.join(unknown)} (ignored)"
            if unknown
            else None,
        )
        for key, option in OPTIONS.items():
            raw = by_key.get(key)
            mark = canon(raw)
            if self._applied.get(key) == mark:
                continue
            self._applied[key] = mark
            try:
                value, note = await apply_option(self.rt, option, raw)
            except (ValueError, UserError) as exc:
                self._warn(f"settings-option:{key}", f"shared option {key}: {exc} (not applied)")
                continue
            self._warn(f"settings-option:{key}", None)
            if value is None:
                self.options.pop(key, None)
            else:
                self.options[key] = value
            if note:
                self.option_notes[key] = note
            else:
                self.option_notes.pop(key, None)

    def option(self, key: str) -> Any:
        """The effective value of a shared option (None: not set in this space)."""
        return self.options.get(key)

    # -- control commands -----------------------------------------------------------------------
    async def add(self, path: str, name: str, fmt: str | None, prefer: str) -> dict[str, Any]:
        try:
            check_doc_name(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        file = Path(path)
        if not file.is_absolute():
            raise UserError(f"{path}: give an absolute path")
        try:
            detected = detect_format(file, fmt)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if name == AGENT_DOC and detected != "json":
            raise UserError(f"the {AGENT_DOC} settings document is JSON")
        if prefer not in ("shared", "local"):
            raise UserError("--prefer is shared or local")
        if name in self.mappings:
            raise UserError(
                f"{name} is already mapped to {self.mappings[name].path} on this device "
                f"(qmoi-sync settings remove {self.rt.record.name} {name} first)"
            )
        folders = {rt.record.name: rt.record.folder for rt in self.rt.agent.spaces.values()}
        rows = await load_mappings(self.store)
        await asyncio.to_thread(_check_place, file, folders, rows)
        info = self.info(name)
        if info is not None and not info.deleted and info.format != detected:
            raise UserError(
                f"settings {name} of this space is {info.format}, but {file.name} would be read as "
                f"{detected} (pass --format {info.format} if it is)"
            )
        try:
            data, _st = await asyncio.to_thread(_read, file)
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc}") from None
        if data is not None:
            try:
                format_handler(detected, style_hint=file.name).parse(
                    data.decode("utf-8").removeprefix("\ufeff")
                )
            except UnicodeDecodeError:
                raise UserError(f"{file} is not UTF-8 text") from None
            except SettingsParseError as exc:
                raise UserError(f"{file} is not valid {detected.upper()}: {exc}") from None
        file.parent.mkdir(parents=True, exist_ok=True)
        need_registry = name != AGENT_DOC and (info is None or info.deleted)
        if need_registry and self.sync.send_block is not None:
            raise UserError(
                f"{self.sync.send_block}: this device cannot add a settings document to the space"
            )
        async with self._serial:
            if need_registry:
                await self._registry_write(
                    name, fmt=detected, deleted=False if info is not None else None
                )
            async with self.store.transaction():
                await self.store.db.execute(
                    "INSERT INTO settings_map(space_id, name, path, format, base, initial, prefer,"
                    " added_at) VALUES (?,?,?,?,?,?,?,?)",
                    (self.space_id, name, str(file), detected, "{}", 1, prefer, self.sync.clock()),
                )
            m = Mapping(name, file, detected, {}, True, prefer)
            self.mappings[name] = m
            self._start_watch(m)
            await self._sync_doc(name)
        return self._summary(name)

    async def _registry_write(self, name: str, **kwargs: Any) -> None:
        async def produce(
            add: Callable[[bytes, bytes | None], None],
        ) -> Callable[[], Awaitable[None]] | None:
            add(
                INDEX_DOC_ID,
                registry_update(
                    self.sync.index.doc,
                    name,
                    device=self.sync.device,
                    now=self.sync.clock(),
                    **kwargs,
                ),
            )
            return None

        await self.sync.run_local(produce)
        self.registry = read_registry(self.sync.index.doc)

    def _summary(self, name: str) -> dict[str, Any]:
        item = next((s for s in self.status_items() if s.name == name), None)
        st = self.states.get(name, DocState())
        info = self.info(name)
        return {
            "space": self.rt.record.name,
            "name": name,
            "status": item.model_dump(mode="json") if item is not None else None,
            "local_patterns": list(info.local) if info else [],
            "allow_patterns": list(info.allow) if info else [],
            "local_keys": st.local_keys,
            "secret_keys": st.secret_keys,
        }

    async def remove(self, name: str, everywhere: bool) -> dict[str, Any]:
        m = self.mappings.get(name)
        info = self.info(name)
        if m is None and not everywhere:
            raise UserError(f"{name} is not mapped on this device")
        if everywhere:
            if name == AGENT_DOC:
                raise UserError(f"the {AGENT_DOC} settings document cannot be removed")
            if info is None:
                raise UserError(f"no settings document {name} in this space")
            if self.sync.send_block is not None:
                raise UserError(f"{self.sync.send_block}: cannot remove it from the space")
        async with self._serial:
            if m is not None:
                await self._stop_watch(m)
                async with self.store.transaction():
                    await self.store.db.execute(
                        "DELETE FROM settings_map WHERE space_id=? AND name=?",
                        (self.space_id, name),
                    )
                self.mappings.pop(name, None)
                self.states.pop(name, None)
                for key in list(self.sync.warnings):
                    if key.split(":", 1)[-1] == name and key.startswith("settings"):
                        del self.sync.warnings[key]
            if everywhere:
                await self._registry_write(name, deleted=True)
        return {
            "space": self.rt.record.name,
            "name": name,
            "unmapped": str(m.path) if m is not None else None,
            "removed_from_space": everywhere,
        }

    async def patterns(
        self,
        name: str,
        add: list[str],
        remove: list[str],
        allow: list[str],
        disallow: list[str],
    ) -> dict[str, Any]:
        info = self.info(name)
        if info is None or info.deleted:
            raise UserError(f"no settings document {name} in this space")
        for pat in [*add, *remove, *allow, *disallow]:
            if not pat or len(pat) > MAX_PATTERN or any(ord(c) < 32 for c in pat):
                raise UserError(f"bad pattern {pat!r}")
        if add or remove or allow or disallow:
            if self.sync.send_block is not None:
                raise UserError(f"{self.sync.send_block}: cannot change the space's patterns")
            async with self._serial:
                await self._registry_write(
                    name,
                    fmt=info.format if name == AGENT_DOC else None,
                    local=[(p, True) for p in add] + [(p, False) for p in remove],
                    allow=[(p, True) for p in allow] + [(p, False) for p in disallow],
                )
                if name in self.mappings:
                    await self._sync_doc(name)
        return self._summary(name)

    async def read(self, name: str) -> dict[str, Any]:
        info = self.info(name)
        if info is None:
            raise UserError(f"no settings document {name} in this space")
        async with self.sync.lock:
            resolved = SettingsDoc(await self.sync.doc(self.doc_id(name))).resolve()
        values = [
            {"key": display_path(p), "pointer": to_pointer(p), "value": v}
            for p, v in sorted(resolved.values().items())
        ]
        out = self._summary(name)
        out.update(
            {
                "format": info.format,
                "values": values,
                "conflicts": len(resolved.conflicts()),
            }
        )
        if name == AGENT_DOC:
            out["options"] = {
                key: {
                    "value": self.options.get(key),
                    "help": opt.help,
                    "note": self.option_notes.get(key),
                }
                for key, opt in OPTIONS.items()
            }
        return out

    async def set_value(self, name: str, key: str, value: Any, delete: bool) -> dict[str, Any]:
        info = self.info(name)
        if info is None or info.deleted:
            raise UserError(f"no settings document {name} in this space")
        if self.sync.send_block is not None:
            raise UserError(f"{self.sync.send_block}: cannot change shared settings")
        from qmoi_sync.agent.settings_formats import check_json_value, parse_key_arg

        async with self._serial:
            async with self.sync.lock:
                resolved = SettingsDoc(await self.sync.doc(self.doc_id(name))).resolve()
            try:
                path = parse_key_arg(key, resolved.keys)
                if not delete:
                    check_json_value(value)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            if matches_any(path, info.local):
                raise UserError(f"{key} is device-local in {name}: edit the file on this device")
            if info.format == "toml" and not delete and _has_null(value):
                raise UserError("TOML has no null value")
            opt = OPTIONS.get(display_path(path)) if name == AGENT_DOC else None
            if opt is not None and not delete:
                try:
                    opt.parse(value)
                except ValueError as exc:
                    raise UserError(f"{display_path(path)}: {exc}") from None
            hint = max((h for h in resolved.hints().values()), default=-1.0) + 1

            async def produce(
                add: Callable[[bytes, bytes | None], None],
            ) -> Callable[[], Awaitable[None]] | None:
                sdoc = SettingsDoc(await self.sync.doc(self.doc_id(name)))
                current = sdoc.resolve()
                known = current.keys.get(path)
                order = known.winner.order if known is not None else hint
                change = Change(True) if delete else Change(False, value, order)
                add(
                    self.doc_id(name),
                    sdoc.write(
                        self.sync.device,
                        {path: change},
                        {path: current.version(path)},
                        self.sync.clock(),
                    ),
                )
                return None

            await self.sync.run_local(produce)
            await self._sync_doc(name)
        return await self.read(name)

    async def conflicts(self) -> list[dict[str, Any]]:
        names = {}
        me = self.rt.agent.identity.public.sign_pk
        infos = await self.store.device_infos(self.space_id)
        for pk, member in self.rt.keyring.log.members().items():
            short = member.public.short_id
            names[short] = self.rt.agent.device_name if pk == me else infos.get(pk, {}).get("name")
        out: list[dict[str, Any]] = []
        for name in sorted(set(self.registry) | {AGENT_DOC}):
            async with self.sync.lock:
                resolved = SettingsDoc(await self.sync.doc(self.doc_id(name))).resolve()

            def side(e: Any) -> dict[str, Any]:
                return {
                    "device": e.device,
                    "device_name": names.get(e.device),
                    "value": e.value,
                    "deleted": e.deleted,
                    "at": e.ts,
                }

            for path, state in resolved.conflicts():
                out.append(
                    {
                        "kind": "setting",
                        "document": name,
                        "key": display_path(path),
                        "pointer": to_pointer(path),
                        "winner": side(state.winner),
                        "losers": [side(e) for e in state.losers()],
                    }
                )
        return out


def _watch_targets(path: Path) -> tuple[set[str], list[str]]:
    """File names and folders to watch: the mapped path and, for a symlink, its target."""
    real = Path(os.path.realpath(path))
    folders = sorted({str(path.parent), str(real.parent)})
    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
    return {path.name, real.name}, folders


def _check_place(file: Path, folders: dict[str, Path], rows: list[MappingRow]) -> None:
    """A settings file must not be inside a space folder (it would sync twice) nor mapped
    twice on this device."""
    real = os.path.realpath(file)
    for space, folder in folders.items():
        top = os.path.realpath(folder)
        if real == top or real.startswith(top + os.sep):
            raise UserError(
                f"{file} is inside the folder of space {space}: it is synced as a file already"
            )
    for row in rows:
        if os.path.realpath(row.path) == real:
            raise UserError(f"{file} is already mapped as {row.name} (space {row.space_id[:8]})")


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    return False
