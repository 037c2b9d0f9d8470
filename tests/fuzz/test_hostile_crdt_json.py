"""JSON strings that another member device wrote into a shared CRDT document (the space index,
the settings registry and settings documents): junk there, deep nesting included, is skipped
when read, never an exception in the reading agent.

Regression: ``json.loads`` raises RecursionError (not ValueError) on deeply nested arrays, and
these readers caught only ValueError; a member could write ``"[[[[..."`` into the index and
break every other device's reads of it.
"""

from __future__ import annotations

from typing import Any

from pycrdt import Doc, Map

from qmoi_sync.agent.index import FILES, IndexDoc
from qmoi_sync.agent.settings_doc import ENTRIES, REGISTRY, SettingsDoc, read_registry

DEEP = "[" * 50_000
JUNK = [DEEP, "{" * 50_000, '{"a":' * 20_000, "not json", ""]


def _remote(root: str, values: dict[str, str]) -> bytes:
    """An update from another device that sets `values` in its map `root`."""
    doc: Doc[Any] = Doc()
    m = doc.get(root, type=Map)
    with doc.transaction():
        for k, v in values.items():
            m[k] = v
    return doc.get_update()


def test_index_skips_junk_fields() -> None:
    fid = "ab" * 16
    good = {f"{fid}/path": '"notes/a.md"', f"{fid}/kind": '"text"'}
    junk = {f"{fid}/j{i}": v for i, v in enumerate(JUNK)}
    junk[f"{fid}/size"] = DEEP
    idx = IndexDoc()
    idx.apply_update(_remote(FILES, {**good, **junk}))
    idx.entries()  # no exception
    fields = idx.fields(fid)
    assert fields["path"] == "notes/a.md"
    assert "size" not in fields and not any(k.startswith("j") for k in fields)


def test_settings_registry_and_entries_skip_junk() -> None:
    doc: Doc[Any] = Doc()
    doc.apply_update(_remote(REGISTRY, {"vscode/format": DEEP, "vscode/created": '"x"'}))
    assert "vscode" not in read_registry(doc)  # no format field left: not a document
    sdoc: Doc[Any] = Doc()
    sdoc.apply_update(_remote(ENTRIES, {"dev1|/editor/fontSize": DEEP, "dev2|/a": "{" * 50_000}))
    assert SettingsDoc(sdoc).entries() == {}
