"""One Y.Text document per text file: create, load, read, and ingest a new disk version.

The trap this module exists for (design brief §4): the *same* disk content ingested
independently on two devices — a folder that already exists on both when a device joins, or a
``git pull`` run on both machines — must not double the text. A CRDT insert made by two
different clients is two different items, and both survive the merge.

What we do instead: every ingest is performed in a temporary Doc whose **client id is a
deterministic function of (logical state of the base document, its text, the new text)**. Two
replicas in the same logical state making the same change therefore produce the very same
items, with the same ids (client id + clock); yrs skips items whose ids it already has, so the
second copy is a no-op. Replicas in different states get different client ids, so their edits
merge as ordinary concurrent edits.

"Logical state" is the state vector plus the delete set (decoded from a pycrdt ``Snapshot`` and
canonicalized: sorted, ranges merged), not the raw ``get_update()`` bytes, whose block layout
may differ between replicas holding the same content. The current text is hashed as well, as
a belt-and-braces guard. The test suite (tests/unit/test_textdoc.py, test_pycrdt_traps.py)
verifies the dedup on pycrdt 0.14.13 for the initial seed (empty -> content) and for a later
identical modification on two replicas.

Cost: the temp doc is loaded with the base document's full state on every ingest (O(size of
the document)); see ``bench``/tests for measured numbers. Every ingest also introduces a new
client id into the document (about 8 to 10 bytes in each state vector, per ingest, forever).
"""

from __future__ import annotations

import hashlib
from typing import Any

from pycrdt import Doc, Snapshot, Text, TransactionEvent

from .causal import decode_snapshot
from .textdiff import apply_ops, diff_ops

__all__ = [
    "CONTENT",
    "adopt_text_doc",
    "deterministic_client_id",
    "ingest_disk_text",
    "load_text_doc",
    "new_text_doc",
    "text_of",
]

CONTENT = "content"  # name of the root Y.Text in every text-file document

_CLIENT_ID_MASK = (1 << 53) - 1  # stay within JS safe integers (Yjs interop, lib0 varuint)


def new_text_doc(client_id: int | None = None) -> Doc[Any]:
    """An empty text document (root ``Text`` named ``content``)."""
    doc: Doc[Any] = Doc(client_id=client_id)
    doc.get(CONTENT, type=Text)
    return doc


def adopt_text_doc(doc: Doc[Any]) -> Doc[Any]:
    """A plain ``Doc`` that updates were applied to, as a text document (same as
    ``load_text_doc`` of those updates: root types are found by name)."""
    doc.get(CONTENT, type=Text)
    return doc


def load_text_doc(state: bytes, client_id: int | None = None) -> Doc[Any]:
    """A text document from full state bytes (``doc.get_update()`` of a previous one)."""
    doc = new_text_doc(client_id)
    doc.apply_update(state)
    return doc


def _text(doc: Doc[Any]) -> Text:
    text: Text = doc.get(CONTENT, type=Text)
    return text


def text_of(doc: Doc[Any]) -> str:
    """The document's current text."""
    return str(_text(doc))


def _canonical_state(doc: Doc[Any]) -> tuple[bytes, dict[int, int]]:
    """Replica-independent encoding of the doc's logical state (state vector + delete set),
    and the decoded state vector."""
    sv, ds = decode_snapshot(Snapshot.from_doc(doc).encode())
    parts = [b"sv"]
    for client in sorted(sv):
        parts.append(b"%d:%d," % (client, sv[client]))
    parts.append(b"ds")
    for client in sorted(ds):
        parts.append(b"%d:" % client)
        parts.extend(b"%d+%d," % r for r in ds[client])
    return b"".join(parts), sv


def deterministic_client_id(canonical_state: bytes, old_text: str, new_text: str) -> int:
    """The client id used to ingest ``old_text -> new_text`` on a doc in ``canonical_state``.

    53 bits, never 0. Length-prefixed fields so no two different inputs hash alike by
    concatenation.
    """
    h = hashlib.blake2b(digest_size=16, person=b"qmoi-text-cid1")
    for part in (canonical_state, old_text.encode("utf-8"), new_text.encode("utf-8")):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    cid = int.from_bytes(h.digest()[:8], "big") & _CLIENT_ID_MASK
    return cid or 1


def ingest_disk_text(
    doc: Doc[Any], new_text: str, *, base_state: bytes | None = None
) -> bytes | None:
    """Make ``doc`` reflect the disk text ``new_text`` with minimal ops; return the update.

    Returns the incremental update of this change only (to persist and send), already applied
    to ``doc``; ``None`` when there is nothing to do.

    ``base_state``: full state (``doc.get_update()``) of the document *as it was when the
    agent last materialized the file*. Pass it when remote changes may have been applied to
    ``doc`` since the file was last written: the diff is then computed against the text the
    user actually edited (base -> disk) and merged with those remote changes, instead of
    silently reverting them. After such an ingest ``text_of(doc)`` may differ from
    ``new_text`` (it also holds the remote edits) and the file must be re-materialized.
    Without ``base_state`` the base is ``doc`` itself.
    """
    base = doc if base_state is None else load_text_doc(base_state)
    old_text = text_of(base)
    if old_text == new_text:
        return None
    ops = diff_ops(old_text, new_text)

    canonical, sv = _canonical_state(base)
    cid = deterministic_client_id(canonical, old_text, new_text)
    # Reusing a client id already in the document would make yrs discard our items as
    # duplicates: silent loss. A 53-bit hash collision is astronomically unlikely, but the check
    # is free, and the fallback stays deterministic (every replica in this state re-derives it).
    while cid in sv:
        cid = deterministic_client_id(canonical + b"+", old_text, new_text)
        canonical += b"+"
    tmp: Doc[Any] = Doc(client_id=cid)
    tmp.apply_update(base.get_update())
    tmp_text = tmp.get(CONTENT, type=Text)
    # Ops computed on old_text must land on the same text: a cheap check (len() is the UTF-8
    # length, O(1) in yrs) instead of a second O(n) get_string on every ingest.
    if len(tmp_text) != len(old_text.encode("utf-8")):
        raise RuntimeError("text document state did not round-trip")

    captured: list[bytes] = []

    def on_commit(event: TransactionEvent) -> None:
        captured.append(event.update)

    sub = tmp.observe(on_commit)
    try:
        with tmp.transaction():
            apply_ops(tmp_text, ops, old_text)
    finally:
        tmp.unobserve(sub)
    if len(captured) != 1:
        raise RuntimeError(f"expected one transaction update, got {len(captured)}")
    update = captured[0]
    doc.apply_update(update)
    return update
