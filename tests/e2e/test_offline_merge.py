"""Concurrent offline edits to different lines of one text file merge: both edits survive, both
devices end with identical files, and no conflict copy is made. Offline = the peer's agent is
stopped, or the relay is down while both agents keep running."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
from harness import Device, Relay, cluster, ensure_running, wait_until

Pair = tuple[Relay, Device, Device]

BASE = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(1, 13)]


def _text(lines: list[str]) -> str:
    return "".join(lines)


def _conflict_copies(devices: list[Device]) -> list[str]:
    return [
        f"{d.name}:{p}" for d in devices for p in d.folder.rglob("*") if "sync-conflict" in p.name
    ]


def _wait_merged(devices: list[Device], path: str, want: str, what: str) -> None:
    def ok() -> bool:
        return all(d.read(path) == want for d in devices)

    try:
        wait_until(ok, timeout=30, what=what)
    except AssertionError as exc:
        got = {d.name: d.read(path) for d in devices}
        logs = "\n".join(f"--- {d.name}\n{d.log()[-4000:]}" for d in devices)
        raise AssertionError(f"{exc}\nwant:\n{want}\ngot: {got}\n{logs}") from None


def _edit(lines: list[str], changes: dict[int, str | None], insert_top: str = "") -> list[str]:
    """A copy of `lines` with line i replaced (or removed, for None), optionally a new first
    line."""
    out = [changes.get(i, line) for i, line in enumerate(lines)]
    return ([insert_top] if insert_top else []) + [x for x in out if x is not None]


# path -> (a's version, b's version, the merge of both), every case editing DIFFERENT lines.
CASES = {
    "notes/far-apart.txt": (
        _edit(BASE, {1: "line 2: EDITED ON A while b was offline\n"}),
        _edit(BASE, {9: "line 10: EDITED ON B while its agent was stopped\n"}),
        _edit(
            BASE,
            {
                1: "line 2: EDITED ON A while b was offline\n",
                9: "line 10: EDITED ON B while its agent was stopped\n",
            },
        ),
    ),
    "adjacent.txt": (
        _edit(BASE, {4: "line 5: a's version\n"}),
        _edit(BASE, {5: "line 6: b's version\n"}),
        _edit(BASE, {4: "line 5: a's version\n", 5: "line 6: b's version\n"}),
    ),
    "notes/top-and-bottom.txt": (
        _edit(BASE, {}, insert_top="a new first line from a\n"),
        [*BASE, "a new last line from b\n"],
        [*_edit(BASE, {}, insert_top="a new first line from a\n"), "a new last line from b\n"],
    ),
    "delete-and-edit.txt": (
        _edit(BASE, {7: "line 8: a edits this one\n"}),
        _edit(BASE, {2: None, 3: None}),  # b deletes lines 3 and 4
        _edit(BASE, {7: "line 8: a edits this one\n", 2: None, 3: None}),
    ),
}


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with cluster(tmp_path_factory.mktemp("offline")) as (relay, (a, b)):
        assert relay is not None
        yield relay, a, b


@pytest.fixture
def pair(_shared: Pair) -> Pair:
    """A relay and two joined devices shared by the module's tests (each under its own folder),
    all running at the start of every test."""
    relay, a, b = _shared
    ensure_running(relay, [a, b])
    return _shared


def _cases(prefix: str) -> dict[str, tuple[list[str], list[str], list[str]]]:
    return {f"{prefix}/{path}": case for path, case in CASES.items()}


def _seed(a: Device, b: Device, cases: Iterable[str]) -> None:
    for path in cases:
        a.write(path, _text(BASE))
    for path in cases:
        _wait_merged([a, b], path, _text(BASE), "seed files on both devices")


def test_peer_stopped_concurrent_edits_merge(pair: Pair) -> None:
    _relay, a, b = pair
    cases = _cases("peer-stopped")
    _seed(a, b, cases)
    b.stop()

    for path, (a_lines, b_lines, _merged) in cases.items():
        a.write(path, _text(a_lines))
        b.write(path, _text(b_lines))
    # Usually a's edits are at the relay before b comes back; the merge must not care.
    wait_until(lambda: a.space_status()["pending_out"] == 0, what="a's outbox drained")

    b.start()
    for path, (_a, _b, merged) in cases.items():
        _wait_merged([a, b], path, _text(merged), f"{path}: both offline edits merged")
    assert a.tree() == b.tree()
    assert _conflict_copies([a, b]) == []
    assert a.space_status()["conflicts"] == 0
    assert b.space_status()["conflicts"] == 0


def test_relay_down_concurrent_edits_merge(pair: Pair) -> None:
    relay, a, b = pair
    cases = _cases("relay-down")
    _seed(a, b, cases)
    port = relay.port
    relay.stop()
    for d in (a, b):
        wait_until(
            lambda d=d: not d.space_status()["relay"]["connected"],
            what=f"{d.name} notices the relay is down",
        )

    for path, (a_lines, b_lines, _merged) in cases.items():
        a.write(path, _text(a_lines))
        b.write(path, _text(b_lines))
    # Each agent has taken its own edits in and holds them in its outbox.
    for d in (a, b):
        wait_until(
            lambda d=d: d.space_status()["pending_out"] > 0,
            what=f"{d.name} queues its edits while the relay is down",
        )
    for path, (a_lines, b_lines, _merged) in cases.items():
        assert a.read(path) == _text(a_lines)
        assert b.read(path) == _text(b_lines)

    relay.start()  # same data directory, same port
    assert relay.port == port
    for path, (_a, _b, merged) in cases.items():
        _wait_merged([a, b], path, _text(merged), f"{path}: agents reconnect and merge")
    for d in (a, b):
        wait_until(
            lambda d=d: d.space_status()["pending_out"] == 0, what=f"{d.name} outbox drained"
        )
    assert a.tree() == b.tree()
    assert _conflict_copies([a, b]) == []
