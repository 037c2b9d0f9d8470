"""Create, edit, rename and delete files (and nested folders) on one device: the other device
shows the same, in both directions. Real relay and agent processes, real files, real watchers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from harness import Device, Relay, cluster, ensure_running, wait_until

Pair = tuple[Device, Device]


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relay | None, Pair]]:
    with cluster(tmp_path_factory.mktemp("crud")) as (relay, (a, b)):
        yield relay, (a, b)


@pytest.fixture
def pair(_shared: tuple[Relay | None, Pair]) -> Pair:
    """One relay and two joined devices shared by the module's tests (each test uses its own
    names and checks whole trees, so a stray file from anywhere still fails it)."""
    relay, (a, b) = _shared
    ensure_running(relay, [a, b])
    return a, b


def _expect(devices: list[Device], expected: dict[str, str], what: str) -> None:
    """Wait until every device's tree is exactly `expected` (path -> text)."""
    want = {p: t.encode() for p, t in expected.items()}

    def ok() -> bool:
        return all(d.tree() == want for d in devices)

    try:
        wait_until(ok, timeout=20, what=what)
    except AssertionError as exc:
        trees = {d.name: {p: b[:60] for p, b in d.tree().items()} for d in devices}
        logs = "\n".join(f"--- {d.name}\n{d.log()[-3000:]}" for d in devices)
        raise AssertionError(f"{exc}\nwant: {want}\ntrees: {trees}\n{logs}") from None


def _flat_ops(src: Device, devs: list[Device], tag: str) -> None:
    """The CRUD cycle on top-level files, made on `src`, checked on every device."""
    state: dict[str, str] = {p: t for p, t in _decoded(devs[0].tree()).items()}

    src.write(f"{tag}.txt", f"first line from {tag}\n")
    state[f"{tag}.txt"] = f"first line from {tag}\n"
    _expect(devs, state, f"{tag}: create")

    src.write(f"{tag}.txt", f"first line from {tag}\nsecond line\n")
    state[f"{tag}.txt"] = f"first line from {tag}\nsecond line\n"
    _expect(devs, state, f"{tag}: edit (append)")

    src.write(f"{tag}.txt", f"FIRST line from {tag}\nsecond line\n")
    state[f"{tag}.txt"] = f"FIRST line from {tag}\nsecond line\n"
    _expect(devs, state, f"{tag}: edit (same size, in place)")

    # An editor's atomic save: write a temporary file, rename it over the original.
    tmp = src.folder / f".{tag}.txt.swp"
    tmp.write_text(f"FIRST line from {tag}\nsecond line\nsaved atomically\n")
    os.replace(tmp, src.folder / f"{tag}.txt")
    state[f"{tag}.txt"] = f"FIRST line from {tag}\nsecond line\nsaved atomically\n"
    _expect(devs, state, f"{tag}: edit (atomic save)")

    os.rename(src.folder / f"{tag}.txt", src.folder / f"{tag}-renamed.txt")
    state[f"{tag}-renamed.txt"] = state.pop(f"{tag}.txt")
    _expect(devs, state, f"{tag}: rename")

    # Rename onto an existing file (mv over it): the target's old content is replaced.
    src.write(f"{tag}-victim.txt", "to be overwritten\n")
    state[f"{tag}-victim.txt"] = "to be overwritten\n"
    _expect(devs, state, f"{tag}: create the rename target")
    os.replace(src.folder / f"{tag}-renamed.txt", src.folder / f"{tag}-victim.txt")
    state[f"{tag}-victim.txt"] = state.pop(f"{tag}-renamed.txt")
    _expect(devs, state, f"{tag}: rename over an existing file")

    (src.folder / f"{tag}-victim.txt").unlink()
    del state[f"{tag}-victim.txt"]
    _expect(devs, state, f"{tag}: delete")


def _decoded(tree: dict[str, bytes]) -> dict[str, str]:
    return {p: b.decode() for p, b in tree.items()}


def test_flat_crud_both_directions(pair: Pair) -> None:
    a, b = pair
    _flat_ops(a, [a, b], "from-a")
    _flat_ops(b, [a, b], "from-b")
    # Both sides active in turn on one file: each edits what the other wrote.
    state = _decoded(a.tree())
    for dev, text in ((a, "one\n"), (b, "one\ntwo\n"), (a, "zero\none\ntwo\n")):
        dev.write("shared.txt", text)
        state["shared.txt"] = text
        _expect([a, b], state, f"shared.txt written on {dev.name}")
    (b.folder / "shared.txt").unlink()
    del state["shared.txt"]
    _expect([a, b], state, "shared.txt deleted on b")


def _nested_ops(src: Device, devs: list[Device], tag: str) -> None:
    state = _decoded(devs[0].tree())

    # Create in nested folders.
    files = {
        f"{tag}/docs/readme.md": f"# {tag}\n",
        f"{tag}/docs/deep/er/note.txt": "deep note\n",
        f"{tag}/src/main.py": "print('hi')\n",
        f"{tag}/src/lib/util.py": "def f():\n    return 1\n",
    }
    for p, t in files.items():
        src.write(p, t)
    state.update(files)
    _expect(devs, state, f"{tag}: nested create")

    # Edit a deep file.
    src.write(f"{tag}/docs/deep/er/note.txt", "deep note\nedited\n")
    state[f"{tag}/docs/deep/er/note.txt"] = "deep note\nedited\n"
    _expect(devs, state, f"{tag}: nested edit")

    # Rename across folders (into a folder that does not exist yet).
    (src.folder / f"{tag}/other").mkdir()
    os.rename(src.folder / f"{tag}/src/main.py", src.folder / f"{tag}/other/main.py")
    state[f"{tag}/other/main.py"] = state.pop(f"{tag}/src/main.py")
    _expect(devs, state, f"{tag}: rename across folders")

    # Move a whole folder (with a subfolder) somewhere else.
    (src.folder / f"{tag}/archive").mkdir()
    os.rename(src.folder / f"{tag}/docs", src.folder / f"{tag}/archive/docs-old")
    for p in [p for p in state if p.startswith(f"{tag}/docs/")]:
        state[p.replace(f"{tag}/docs/", f"{tag}/archive/docs-old/", 1)] = state.pop(p)
    _expect(devs, state, f"{tag}: move a whole folder")

    # Delete a whole folder.
    shutil.rmtree(src.folder / f"{tag}/src")
    for p in [p for p in state if p.startswith(f"{tag}/src/")]:
        del state[p]
    _expect(devs, state, f"{tag}: delete a folder")
    # The folders themselves follow, not just the files in them: a moved or deleted folder
    # does not linger empty on the other device.
    for d in devs:
        for gone in (f"{tag}/src", f"{tag}/docs"):
            wait_until(
                lambda d=d, gone=gone: not (d.folder / gone).exists(),
                what=f"folder {gone} gone on {d.name}",
            )


def test_nested_folders_both_directions(pair: Pair) -> None:
    a, b = pair
    _nested_ops(a, [a, b], "ta")
    _nested_ops(b, [a, b], "tb")
    # The folder moved on a is renamed again on b: the move follows back.
    os.rename(b.folder / "ta/archive", b.folder / "ta-archive")
    state = _decoded(b.tree())
    assert "ta-archive/docs-old/readme.md" in state
    _expect([a, b], state, "folder moved on b back to a")
