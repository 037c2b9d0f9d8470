"""Settings documents in the CRDT: one pycrdt doc per logical settings file, and the registry.

**Registry** (in the space's index document, root map ``settings``; flat keys, JSON leaves):
``<name>/format`` ("json" | "toml" | "ini"), ``<name>/created`` ({"ts", "dev"}),
``<name>/deleted`` (null | {"ts", "dev"}), ``<name>/local:<pattern>`` (bool: keys matching the
glob stay on each device), ``<name>/allow:<pattern>`` (bool: keys matching it are synced although
they look like credentials). Every device learns from it which settings documents exist, their
format and their per-device key patterns. Which local file a device maps a document to is the
device's own business (agent/settings_sync.py keeps it in SQLite).

**Document** (doc id = keyed hash of ``"settings:" + name``; root map ``entries``). A settings
file is flattened to leaves addressed by JSON pointers. Each device writes only its *own* map
keys, ``"<device>|<pointer>"``, so the Y.Map rule "concurrent writes to one key: highest client id
wins" never decides anything. The value of such a key is a JSON string::

    {"v": <leaf value>, "d": false, "n": 3, "ts": 1764000000.5, "seen": {"DEV1": 2}, "o": 4}

``v`` the JSON-encoded leaf (an int stays an int: pycrdt would turn a raw int into a float),
``d`` a deletion, ``n`` this device's write counter for the key, ``ts`` the writer's clock,
``seen`` the counters of every device's entry for the key that the writer had seen (its file
reflected) when it wrote, ``o`` an order hint (the leaf's position in the writer's file).

**Resolution** (pure, identical on every replica): an entry is *superseded* when another entry
for the key has seen it (``other.seen[dev] >= n``). The rest are the *heads*: one head is the
value; several heads are concurrent writes — a conflict. The winner is deterministic: a value
beats a deletion (an edit beats a concurrent delete), then the latest ``ts``, then the highest
device id. The losing heads stay in the document, listed by ``qmoi-sync conflicts``, until a
later write (an edit of that key on any device that has seen them) supersedes them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Map, TransactionEvent

from qmoi_sync.agent.settings_formats import (
    FORMATS,
    KeyPath,
    canon,
    check_json_value,
    from_pointer,
    to_pointer,
)

__all__ = [
    "ENTRIES",
    "REGISTRY",
    "Change",
    "DocInfo",
    "Entry",
    "KeyState",
    "Resolved",
    "SettingsDoc",
    "read_registry",
    "registry_update",
    "settings_doc_id",
]

ENTRIES = "entries"
REGISTRY = "settings"
_EMPTY = b"\x00\x00"


def settings_doc_id(key: bytes, name: str) -> bytes:
    """16-byte doc id of a settings document: keyed BLAKE2b of ``"settings:" + name`` (the key
    is the space's file-id key, so ids reveal nothing to the relay)."""
    if not key:
        raise ValueError("empty key")
    if len(key) > 64:
        key = hashlib.blake2b(key, digest_size=64).digest()
    h = hashlib.blake2b(key=key, digest_size=16, person=b"qmoi-set-v1")
    h.update(("settings:" + name).encode("utf-8"))
    return h.digest()


def _capture(doc: Doc[Any], fn: Callable[[], None]) -> bytes:
    captured: list[bytes] = []

    def on_commit(event: TransactionEvent) -> None:
        captured.append(event.update)

    sub = doc.observe(on_commit)
    try:
        with doc.transaction():
            fn()
    finally:
        doc.unobserve(sub)
    return captured[0] if captured else _EMPTY


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


# -- entries --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    device: str
    n: int
    ts: float
    seen: Mapping[str, int]
    deleted: bool
    value: Any
    order: float | None

    def to_json(self) -> str:
        out: dict[str, Any] = {"n": self.n, "ts": self.ts, "seen": dict(self.seen)}
        if self.deleted:
            out["d"] = True
        else:
            out["v"] = self.value
        if self.order is not None:
            out["o"] = self.order
        return _dump(out)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _parse_entry(device: str, raw: Any) -> Entry | None:
    """A stored entry, or None for garbage (a buggy or hostile peer must not break reads)."""
    if not isinstance(raw, str):
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # json raises RecursionError on deep nesting
        return None
    if not isinstance(data, dict):
        return None
    n, ts, seen = _int(data.get("n")), data.get("ts"), data.get("seen", {})
    if n is None or n < 1 or isinstance(ts, bool) or not isinstance(ts, int | float):
        return None
    if not math.isfinite(ts) or not isinstance(seen, dict):
        return None
    clean: dict[str, int] = {}
    for k, v in seen.items():
        c = _int(v)
        if not isinstance(k, str) or c is None:
            return None
        clean[k] = c
    deleted = data.get("d") is True
    if not deleted and "v" not in data:
        return None
    value = None if deleted else data["v"]
    order = data.get("o")
    if isinstance(order, bool) or not isinstance(order, int | float) or not math.isfinite(order):
        order = None
    return Entry(device, n, float(ts), clean, deleted, value, order)


@dataclass
class KeyState:
    """One key's resolution."""

    entries: dict[str, Entry]
    heads: list[Entry]
    winner: Entry

    @property
    def deleted(self) -> bool:
        return self.winner.deleted

    @property
    def value(self) -> Any:
        return self.winner.value

    def version(self) -> dict[str, int]:
        """Every device's counter for this key: what a writer that saw all of it records."""
        return {dev: e.n for dev, e in self.entries.items()}

    def losers(self) -> list[Entry]:
        """Concurrent heads that lost, unless they hold the winner's value anyway."""
        win = (self.winner.deleted, canon(self.winner.value))
        return [
            h for h in self.heads if h is not self.winner and (h.deleted, canon(h.value)) != win
        ]


def _rank(e: Entry) -> tuple[bool, float, str]:
    return (not e.deleted, e.ts, e.device)


def resolve_key(entries: dict[str, Entry]) -> KeyState:
    items = list(entries.values())
    heads = [
        e for e in items if not any(o is not e and o.seen.get(e.device, 0) >= e.n for o in items)
    ]
    if not heads:  # only possible with inconsistent data: fall back to every entry
        heads = items
    winner = max(heads, key=_rank)
    return KeyState(entries, sorted(heads, key=_rank, reverse=True), winner)


@dataclass
class Resolved:
    keys: dict[KeyPath, KeyState] = field(default_factory=dict)

    def values(self) -> dict[KeyPath, Any]:
        return {p: s.value for p, s in self.keys.items() if not s.deleted}

    def hints(self) -> dict[KeyPath, float]:
        return {p: s.winner.order for p, s in self.keys.items() if s.winner.order is not None}

    def version(self, path: KeyPath) -> dict[str, int]:
        state = self.keys.get(path)
        return state.version() if state is not None else {}

    def conflicts(self) -> list[tuple[KeyPath, KeyState]]:
        return [(p, s) for p, s in sorted(self.keys.items()) if s.losers()]


@dataclass(frozen=True)
class Change:
    """One local write: a value (or a deletion), its order hint, and optionally the clock to
    record (a device's first import of an existing file records 0, so the shared value wins)."""

    deleted: bool
    value: Any = None
    order: float | None = None
    ts: float | None = None


class SettingsDoc:
    """A settings document (wrapping the pycrdt ``Doc`` its owner, SpaceSync, holds)."""

    def __init__(self, doc: Doc[Any]) -> None:
        self.doc = doc
        self.map: Map[Any] = doc.get(ENTRIES, type=Map)

    def entries(self) -> dict[KeyPath, dict[str, Entry]]:
        out: dict[KeyPath, dict[str, Entry]] = {}
        for key, raw in self.map.items():
            device, sep, pointer = str(key).partition("|")
            if not sep or not device:
                continue
            try:
                path = from_pointer(pointer)
            except ValueError:
                continue
            entry = _parse_entry(device, raw)
            if entry is not None:
                out.setdefault(path, {})[device] = entry
        return out

    def resolve(self) -> Resolved:
        return Resolved({p: resolve_key(es) for p, es in self.entries().items()})

    def write(
        self,
        device: str,
        changes: Mapping[KeyPath, Change],
        seen: Mapping[KeyPath, Mapping[str, int]],
        now: float,
    ) -> bytes:
        """Record this device's writes, each with the version (every device's counter for the
        key) it supersedes. Returns the update (an empty update when nothing changed)."""
        if not changes:
            return _EMPTY
        if not device or "|" in device:
            raise ValueError(f"bad device id {device!r}")
        if not math.isfinite(now):
            raise ValueError("non-finite clock")
        current = self.entries()
        rows: dict[str, str] = {}
        for path, ch in changes.items():
            if not path:
                raise ValueError("empty key path")
            if not ch.deleted:
                check_json_value(ch.value)
            mine = current.get(path, {}).get(device)
            vv = {d: c for d, c in seen.get(path, {}).items() if d != device}
            entry = Entry(
                device=device,
                n=(mine.n if mine is not None else 0) + 1,
                ts=float(now if ch.ts is None else ch.ts),
                seen=vv,
                deleted=ch.deleted,
                value=None if ch.deleted else ch.value,
                order=ch.order,
            )
            rows[f"{device}|{to_pointer(path)}"] = entry.to_json()

        def run() -> None:
            for k, v in rows.items():
                self.map[k] = v

        return _capture(self.doc, run)


# -- registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocInfo:
    name: str
    format: str
    local: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    deleted: bool = False
    created_by: str = ""


def read_registry(index_doc: Doc[Any]) -> dict[str, DocInfo]:
    """Every settings document the space knows (deleted ones too)."""
    m: Map[Any] = index_doc.get(REGISTRY, type=Map)
    fields: dict[str, dict[str, Any]] = {}
    for key, raw in m.items():
        name, sep, fname = str(key).partition("/")
        if not sep or not isinstance(raw, str):
            continue
        try:
            fields.setdefault(name, {})[fname] = json.loads(raw)
        except (ValueError, RecursionError):  # another device's junk (deep nesting included)
            continue
    out: dict[str, DocInfo] = {}
    for name, f in sorted(fields.items()):
        fmt = f.get("format")
        if fmt not in FORMATS:
            continue  # unknown (a newer agent's format) or garbage: not ours to touch
        created = f.get("created")
        local = tuple(sorted(k[6:] for k, v in f.items() if k.startswith("local:") and v is True))
        allow = tuple(sorted(k[6:] for k, v in f.items() if k.startswith("allow:") and v is True))
        out[name] = DocInfo(
            name=name,
            format=str(fmt),
            local=local,
            allow=allow,
            deleted=isinstance(f.get("deleted"), dict),
            created_by=str(created.get("dev", "")) if isinstance(created, dict) else "",
        )
    return out


def registry_update(
    index_doc: Doc[Any],
    name: str,
    *,
    fmt: str | None = None,
    device: str = "",
    now: float = 0.0,
    deleted: bool | None = None,
    local: Iterable[tuple[str, bool]] = (),
    allow: Iterable[tuple[str, bool]] = (),
) -> bytes:
    """Change one registry entry; returns the index doc update (empty if nothing changed)."""
    if "/" in name:
        raise ValueError(f"bad settings name {name!r}")
    m: Map[Any] = index_doc.get(REGISTRY, type=Map)
    sets: dict[str, str] = {}
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        sets[f"{name}/format"] = _dump(fmt)
        if f"{name}/created" not in m:
            sets[f"{name}/created"] = _dump({"ts": float(now), "dev": device})
    if deleted is not None:
        sets[f"{name}/deleted"] = _dump({"ts": float(now), "dev": device} if deleted else None)
    for pattern, on in local:
        sets[f"{name}/local:{pattern}"] = _dump(bool(on))
    for pattern, on in allow:
        sets[f"{name}/allow:{pattern}"] = _dump(bool(on))
    changed = {k: v for k, v in sets.items() if m.get(k) != v}
    if deleted is False and f"{name}/deleted" in changed and f"{name}/deleted" not in m:
        del changed[f"{name}/deleted"]  # never deleted: no need to record "not deleted"

    def run() -> None:
        for k, v in changed.items():
            m[k] = v

    return _capture(index_doc, run) if changed else _EMPTY
