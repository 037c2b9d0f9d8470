"""Causal delivery of CRDT updates, and the few lib0/Yjs binary decoders we need for it.

Why this exists: with pycrdt 0.14 (yrs), applying updates out of causal order is not always
safe (design brief §4, y-crdt#582/#632: a delete set for a client the document has not seen yet
can be dropped). The agent therefore applies each sender's updates in that sender's order and
only once their dependencies are present, buffering the rest. This module is the sans-I/O part
of that discipline:

* :class:`CausalBuffer` releases updates tagged ``(sender, seq)`` per sender in ``seq`` order,
  holding later ones until the gap is filled, with a bound on what it holds.
* :func:`missing_dependencies` decodes a Yjs v1 update and tells whether the document (given
  its state vector) lacks something the update refers to: a gap before the update's first clock
  for a client, an origin / right origin / parent item not yet present, or a delete of an item
  not yet present.
* :func:`decode_state_vector`, :func:`decode_snapshot` and :func:`decode_update` expose the
  decoders (also used by ``textdoc`` to hash a document's logical state canonically).

All decoders are defensive: malformed input raises :class:`UpdateDecodeError` (a ValueError),
never IndexError or anything pycrdt-specific, and sizes are bounded by the input length.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "BufferFull",
    "CausalBuffer",
    "DecodedUpdate",
    "Released",
    "UpdateDecodeError",
    "decode_delete_set",
    "decode_snapshot",
    "decode_state_vector",
    "decode_update",
    "encode_state_vector",
    "missing_dependencies",
]


class UpdateDecodeError(ValueError):
    """The bytes are not a well-formed lib0 / Yjs v1 structure."""


# --------------------------------------------------------------------------------------------
# lib0 primitives


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise UpdateDecodeError("unexpected end of data")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varuint(self) -> int:
        # lib0 varuint: little-endian base-128. Yjs caps at 53 bits; yrs writes up to 64.
        # Hot: a text document's snapshot is decoded at every local ingest (textdoc), and it
        # grows by a client per ingest; so bytes are read inline, not through u8().
        data = self.data
        pos = self.pos
        end = len(data)
        result = 0
        shift = 0
        while True:
            if pos >= end:
                self.pos = pos
                raise UpdateDecodeError("unexpected end of data")
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return result
            shift += 7
            if shift > 70:
                self.pos = pos
                raise UpdateDecodeError("varuint too long")

    def varint(self) -> int:
        # lib0 varint: first byte holds sign (0x40) and 6 bits, then base-128.
        b = self.u8()
        negative = bool(b & 0x40)
        result = b & 0x3F
        shift = 6
        while b & 0x80:
            b = self.u8()
            result |= (b & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise UpdateDecodeError("varint too long")
        return -result if negative else result

    def buf(self) -> bytes:
        n = self.varuint()
        if n > len(self.data) - self.pos:
            raise UpdateDecodeError("buffer length past end of data")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> str:
        try:
            return self.buf().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UpdateDecodeError("invalid UTF-8 in string") from e

    def skip(self, n: int) -> None:
        if n > len(self.data) - self.pos:
            raise UpdateDecodeError("unexpected end of data")
        self.pos += n

    def count(self) -> int:
        # A count of following elements: each takes at least one byte, so a count larger than
        # the remaining input is malformed (and must not drive a huge loop).
        n = self.varuint()
        if n > len(self.data) - self.pos:
            raise UpdateDecodeError("element count past end of data")
        return n


def _write_varuint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


# --------------------------------------------------------------------------------------------
# State vectors, delete sets, snapshots


def _read_state_vector(r: _Reader) -> dict[int, int]:
    sv: dict[int, int] = {}
    for _ in range(r.count()):
        client = r.varuint()
        sv[client] = r.varuint()
    return sv


def decode_state_vector(data: bytes) -> dict[int, int]:
    """``{client_id: next_clock}`` from an encoded (v1) state vector."""
    r = _Reader(data)
    sv = _read_state_vector(r)
    if not r.at_end():
        raise UpdateDecodeError("trailing bytes after state vector")
    return sv


def encode_state_vector(sv: dict[int, int]) -> bytes:
    """Canonical encoding (clients sorted) of a state vector; pycrdt accepts it."""
    out = bytearray()
    _write_varuint(out, len(sv))
    for client in sorted(sv):
        _write_varuint(out, client)
        _write_varuint(out, sv[client])
    return bytes(out)


def _read_delete_set(r: _Reader) -> dict[int, list[tuple[int, int]]]:
    ds: dict[int, list[tuple[int, int]]] = {}
    for _ in range(r.count()):
        client = r.varuint()
        ranges = ds.setdefault(client, [])
        for _ in range(r.count()):
            clock = r.varuint()
            length = r.varuint()
            ranges.append((clock, length))
    return ds


def _normalize_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping/adjacent (clock, len) ranges; drop empty ones."""
    out: list[tuple[int, int]] = []
    for clock, length in sorted(r for r in ranges if r[1] > 0):
        if out and clock <= out[-1][0] + out[-1][1]:
            pc, pl = out[-1]
            out[-1] = (pc, max(pl, clock + length - pc))
        else:
            out.append((clock, length))
    return out


def decode_delete_set(data: bytes) -> dict[int, list[tuple[int, int]]]:
    """``{client: [(clock, len), ...]}`` (normalized) from an encoded delete set."""
    r = _Reader(data)
    ds = _read_delete_set(r)
    if not r.at_end():
        raise UpdateDecodeError("trailing bytes after delete set")
    return {c: _normalize_ranges(v) for c, v in ds.items()}


def decode_snapshot(
    data: bytes,
) -> tuple[dict[int, int], dict[int, list[tuple[int, int]]]]:
    """(state vector, normalized delete set) from ``pycrdt.Snapshot.encode()`` bytes.

    yrs encodes a snapshot as delete set then state vector. The pair identifies the logical
    state of a document (which items exist and which are deleted) independently of how each
    replica happens to have split its blocks or ordered its hash maps.
    """
    r = _Reader(data)
    ds = _read_delete_set(r)
    sv = _read_state_vector(r)
    if not r.at_end():
        raise UpdateDecodeError("trailing bytes after snapshot")
    return sv, {c: n for c, v in ds.items() if (n := _normalize_ranges(v))}


# --------------------------------------------------------------------------------------------
# Update (v1) decoding — only what dependency checks need


@dataclass(frozen=True, slots=True)
class DecodedUpdate:
    """What a v1 update contains, reduced to its causal footprint.

    ``ranges``: per client, the ``(start_clock, end_clock)`` of the structs carried (a client's
    structs are contiguous in an update, Skip structs excepted: they split the range).
    ``references``: the item ids ``(client, clock)`` the structs point at (origins, right
    origins, parent items). ``deletes``: the normalized delete set.
    """

    ranges: dict[int, list[tuple[int, int]]]
    references: frozenset[tuple[int, int]]
    deletes: dict[int, list[tuple[int, int]]]


# Struct content kinds (info & 0x1F), from the Yjs v1 encoding.
_GC, _DELETED, _JSON, _BINARY, _STRING, _EMBED, _FORMAT, _TYPE, _ANY, _DOC, _SKIP = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
)  # fmt: skip
_BIT_ORIGIN, _BIT_RIGHT_ORIGIN, _BIT_PARENT_SUB = 0x80, 0x40, 0x20
_ANY_MAX_DEPTH = 64


def _skip_any(r: _Reader, depth: int = 0) -> None:
    if depth > _ANY_MAX_DEPTH:
        raise UpdateDecodeError("Any value nested too deeply")
    tag = r.u8()
    if tag in (127, 126, 121, 120):  # undefined, null, false, true
        return
    if tag == 125:  # varint
        r.varint()
    elif tag == 124:  # float32
        r.skip(4)
    elif tag in (123, 122):  # float64, bigint64
        r.skip(8)
    elif tag == 119:  # string
        r.buf()
    elif tag == 118:  # object
        for _ in range(r.count()):
            r.buf()
            _skip_any(r, depth + 1)
    elif tag == 117:  # array
        for _ in range(r.count()):
            _skip_any(r, depth + 1)
    elif tag == 116:  # Uint8Array
        r.buf()
    else:
        raise UpdateDecodeError(f"unknown Any tag {tag}")


def _utf16_len(s: str) -> int:
    # Item lengths (clock spans) of strings are counted in UTF-16 code units, as in Yjs.
    return len(s.encode("utf-16-le")) // 2


def _content_length(r: _Reader, kind: int) -> int:
    """Skip an item's content and return its clock length."""
    if kind == _DELETED:
        return r.varuint()
    if kind == _JSON:
        n = r.count()
        for _ in range(n):
            r.buf()
        return n
    if kind == _BINARY:
        r.buf()
        return 1
    if kind == _STRING:
        return _utf16_len(r.string())
    if kind == _EMBED:
        r.buf()
        return 1
    if kind == _FORMAT:
        r.buf()
        r.buf()
        return 1
    if kind == _TYPE:
        type_ref = r.varuint()
        if type_ref in (3, 5):  # XmlElement / XmlHook carry a name
            r.buf()
        return 1
    if kind == _ANY:
        n = r.count()
        for _ in range(n):
            _skip_any(r)
        return n
    if kind == _DOC:
        r.buf()
        _skip_any(r)
        return 1
    raise UpdateDecodeError(f"unknown content kind {kind}")


def decode_update(update: bytes) -> DecodedUpdate:
    """Decode a Yjs **v1** update (what pycrdt's ``get_update`` and transaction events emit)."""
    r = _Reader(update)
    ranges: dict[int, list[tuple[int, int]]] = {}
    refs: set[tuple[int, int]] = set()
    for _ in range(r.count()):
        n_structs = r.count()
        client = r.varuint()
        clock = r.varuint()
        spans = ranges.setdefault(client, [])
        span_start = clock
        for _ in range(n_structs):
            info = r.u8()
            kind = info & 0x1F
            if kind == _GC:
                clock += r.varuint()
                continue
            if kind == _SKIP:
                if clock > span_start:
                    spans.append((span_start, clock))
                clock += r.varuint()
                span_start = clock
                continue
            has_origin = bool(info & _BIT_ORIGIN)
            has_right = bool(info & _BIT_RIGHT_ORIGIN)
            if has_origin:
                refs.add((r.varuint(), r.varuint()))
            if has_right:
                refs.add((r.varuint(), r.varuint()))
            if not has_origin and not has_right:
                # Parent is named: either a root type (by name) or an item id.
                if r.varuint() == 1:
                    r.buf()
                else:
                    refs.add((r.varuint(), r.varuint()))
                if info & _BIT_PARENT_SUB:
                    r.buf()
            length = _content_length(r, kind)
            if length <= 0:
                raise UpdateDecodeError("zero-length item")
            clock += length
        if clock > span_start:
            spans.append((span_start, clock))
    ds = _read_delete_set(r)
    if not r.at_end():
        raise UpdateDecodeError("trailing bytes after update")
    return DecodedUpdate(
        ranges={c: s for c, s in ranges.items() if s},
        references=frozenset(refs),
        deletes={c: _normalize_ranges(v) for c, v in ds.items() if _normalize_ranges(v)},
    )


def missing_dependencies(doc_state_vector: bytes, update: bytes) -> bool:
    """True when applying ``update`` to a document with state vector ``doc_state_vector``
    would leave something pending: the update refers to items (by origin, right origin,
    parent, a gap before its first struct, or a delete) that neither the document nor the
    update itself contains.

    Deletes of items *below* the document's clock are fine even if those items were already
    deleted; deletes of items above it (not yet received) are exactly the y-crdt#582 hazard.
    Raises :class:`UpdateDecodeError` on malformed input (treat as hostile: quarantine).
    """
    sv = decode_state_vector(doc_state_vector)
    dec = decode_update(update)

    def present(client: int, clock: int) -> bool:
        if clock < sv.get(client, 0):
            return True
        return any(start <= clock < end for start, end in dec.ranges.get(client, ()))

    for client, spans in dec.ranges.items():
        # The first struct must continue what the doc has (or overlap it: duplicates are fine).
        # Later spans (after a Skip) must be covered likewise by doc + earlier spans.
        known = sv.get(client, 0)
        for start, end in spans:
            if start > known:
                return True
            known = max(known, end)
    for client, clock in dec.references:
        if not present(client, clock):
            return True
    for client, dranges in dec.deletes.items():
        for clock, length in dranges:
            last = clock + length - 1
            if not (present(client, clock) and present(client, last)):
                return True
            # A delete range spanning a hole (not in doc, not in update) is missing too.
            if last >= sv.get(client, 0):
                covered = sv.get(client, 0)
                for start, end in sorted(dec.ranges.get(client, ())):
                    if start > covered:
                        break
                    covered = max(covered, end)
                if covered <= last:
                    return True
    return False


# --------------------------------------------------------------------------------------------
# Per-sender in-order release


class BufferFull(Exception):
    """The causal buffer reached its bound; the caller should drop the held updates for that
    sender (or all) and fall back to a state-vector resync."""

    def __init__(self, message: str, sender: Hashable) -> None:
        super().__init__(message)
        self.sender = sender


@dataclass(frozen=True, slots=True)
class Released:
    """One update released in causal (per-sender sequence) order."""

    sender: Hashable
    seq: int
    update: bytes


@dataclass(slots=True)
class _SenderState:
    next_seq: int
    held: dict[int, bytes] = field(default_factory=dict)


class CausalBuffer:
    """Releases updates per sender in consecutive ``seq`` order, holding ones that arrive early.

    Sans-I/O: ``offer()`` returns the (possibly empty) list of updates now ready, in order.
    Duplicates (``seq`` already released or already held) are dropped silently: relays and LAN
    peers may deliver the same envelope twice. ``max_count``/``max_bytes`` bound what is held
    across all senders; exceeding them raises :class:`BufferFull` *without* storing the update,
    so the caller can fall back to a resync (sync step 1) instead of growing without limit.

    Sequence numbers start at ``first_seq`` (1 by default) for a sender never seen; a persisted
    position is restored with :meth:`set_next`.
    """

    def __init__(
        self, *, max_count: int = 10_000, max_bytes: int = 64 * 1024 * 1024, first_seq: int = 1
    ) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("buffer bounds must be positive")
        self._senders: dict[Hashable, _SenderState] = {}
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._first_seq = first_seq
        self._held_count = 0
        self._held_bytes = 0

    # -- inspection --------------------------------------------------------------------------

    @property
    def held_count(self) -> int:
        return self._held_count

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def next_seq(self, sender: Hashable) -> int:
        """The seq expected next from ``sender``."""
        st = self._senders.get(sender)
        return st.next_seq if st else self._first_seq

    def gaps(self) -> dict[Hashable, tuple[int, int]]:
        """Per sender with held updates: (first missing seq, lowest held seq) — what to ask for."""
        out: dict[Hashable, tuple[int, int]] = {}
        for sender, st in self._senders.items():
            if st.held:
                out[sender] = (st.next_seq, min(st.held))
        return out

    # -- mutation ----------------------------------------------------------------------------

    def set_next(self, sender: Hashable, next_seq: int) -> list[Released]:
        """Declare that everything from ``sender`` below ``next_seq`` is already applied (e.g.
        restored from the durable log, or covered by a resync); returns held updates that
        become ready, and drops held ones that are now stale."""
        st = self._state(sender)
        if next_seq > st.next_seq:
            st.next_seq = next_seq
            for seq in [s for s in st.held if s < next_seq]:
                self._forget(st, seq)
        return self._drain(sender, st)

    def offer(self, sender: Hashable, seq: int, update: bytes) -> list[Released]:
        """Offer one update; returns every update of ``sender`` now releasable, in order."""
        st = self._state(sender)
        if seq < st.next_seq or seq in st.held:
            return []  # duplicate
        if seq > st.next_seq:
            if self._held_count + 1 > self._max_count:
                raise BufferFull(f"causal buffer holds {self._held_count} updates", sender)
            if self._held_bytes + len(update) > self._max_bytes:
                raise BufferFull(f"causal buffer holds {self._held_bytes} bytes", sender)
            st.held[seq] = update
            self._held_count += 1
            self._held_bytes += len(update)
            return []
        st.next_seq += 1
        return [Released(sender, seq, update), *self._drain(sender, st)]

    def drop_sender(self, sender: Hashable) -> int:
        """Forget what is held for ``sender`` (after a resync); returns how many were held."""
        st = self._senders.get(sender)
        if st is None:
            return 0
        n = len(st.held)
        for seq in list(st.held):
            self._forget(st, seq)
        return n

    def __iter__(self) -> Iterator[tuple[Hashable, int]]:
        """(sender, seq) of every held update."""
        for sender, st in self._senders.items():
            for seq in sorted(st.held):
                yield sender, seq

    # -- internals ---------------------------------------------------------------------------

    def _state(self, sender: Hashable) -> _SenderState:
        st = self._senders.get(sender)
        if st is None:
            st = self._senders[sender] = _SenderState(self._first_seq)
        return st

    def _forget(self, st: _SenderState, seq: int) -> bytes:
        update = st.held.pop(seq)
        self._held_count -= 1
        self._held_bytes -= len(update)
        return update

    def _drain(self, sender: Hashable, st: _SenderState) -> list[Released]:
        out: list[Released] = []
        while st.next_seq in st.held:
            seq = st.next_seq
            out.append(Released(sender, seq, self._forget(st, seq)))
            st.next_seq += 1
        return out
