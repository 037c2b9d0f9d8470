"""An agent killed with SIGKILL in the middle of a burst of edits loses nothing: once it runs
again, every edit that was on disk reaches every device.

The tests share one relay and two devices (each test under its own top-level folders, and the
agents are restarted by the tests themselves or, after a failure, by the fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Device, Relay, cluster, ensure_running, wait_until

N_FILES = 200
KILL_AT = 120

Pair = tuple[Device, Device]


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relay | None, Pair]]:
    with cluster(tmp_path_factory.mktemp("crash")) as (relay, (a, b)):
        yield relay, (a, b)


@pytest.fixture
def pair(_shared: tuple[Relay | None, Pair]) -> Pair:
    relay, (a, b) = _shared
    ensure_running(relay, [a, b])
    return a, b


def _burst(dev: Device, expected: dict[str, bytes], top: str, start: int, stop: int) -> None:
    """Write files start..stop-1 (spread over a few folders under `top`); every 7th step also
    rewrites an earlier file of the burst, so edits are in flight as well as creations."""
    for i in range(start, stop):
        rel = f"{top}/d{i % 5}/f{i:03d}.txt"
        text = f"file {i}\npayload {i * 7919 % 1000}\n"
        dev.write(rel, text)
        expected[rel] = text.encode()
        if i % 7 == 6:
            j = i - 5
            old = f"{top}/d{j % 5}/f{j:03d}.txt"
            text = f"file {j}\npayload {j * 7919 % 1000}\nedited at step {i}\n"
            dev.write(old, text)
            expected[old] = text.encode()


def _count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("f*.txt")) if folder.exists() else 0


def _wait_all_have(
    devices: list[Device], expected: dict[str, bytes], tops: set[str], what: str
) -> None:
    """Wait until, under the top-level folders `tops`, every device holds exactly `expected`."""

    def sub(d: Device) -> dict[str, bytes]:
        return {p: v for p, v in d.tree().items() if p.split("/", 1)[0] in tops}

    try:
        wait_until(lambda: all(sub(d) == expected for d in devices), timeout=60, what=what)
    except AssertionError as exc:
        report = []
        for d in devices:
            tree = sub(d)
            missing = sorted(set(expected) - set(tree))
            wrong = sorted(p for p in expected if p in tree and tree[p] != expected[p])
            extra = sorted(set(tree) - set(expected))
            report.append(
                f"{d.name}: {len(missing)} missing {missing[:5]}, {len(wrong)} wrong {wrong[:5]},"
                f" {len(extra)} extra {extra[:5]}"
            )
        logs = "\n".join(f"--- agent {d.name}\n{d.log()[-5000:]}" for d in devices)
        raise AssertionError(f"{exc}\n" + "\n".join(report) + f"\n{logs}") from None


def test_writer_killed_mid_burst(pair: Pair) -> None:
    a, b = pair
    expected: dict[str, bytes] = {}
    _burst(a, expected, "writer", 0, KILL_AT)
    # SIGKILL a while it is ingesting and sending the burst: once its first files reach b.
    wait_until(
        lambda: _count(b.folder / "writer") >= 5, what="a's first files reach b", interval=0.002
    )
    a.kill()
    # The rest of the burst lands on disk while a is dead.
    _burst(a, expected, "writer", KILL_AT, N_FILES)
    a.start()
    _wait_all_have([a, b], expected, {"writer"}, "every edit of the burst on both devices")
    for d in (a, b):
        wait_until(
            lambda d=d: d.space_status()["pending_out"] == 0, what=f"{d.name} outbox drained"
        )


def test_receiver_killed_mid_burst(pair: Pair) -> None:
    a, b = pair
    expected: dict[str, bytes] = {}
    _burst(a, expected, "receiver", 0, N_FILES)
    # Kill b once some of the burst has reached it, while the rest is still arriving.
    wait_until(
        lambda: _count(b.folder / "receiver") >= 20,
        what="b receives part of the burst",
        interval=0.005,
    )
    b.kill()
    # a edits while b is down, and b's folder is touched too.
    a.write("receiver/after-kill.txt", "written on a while b was dead\n")
    expected["receiver/after-kill.txt"] = b"written on a while b was dead\n"
    b.write("receiver/b-offline.txt", "written on b while its agent was dead\n")
    expected["receiver/b-offline.txt"] = b"written on b while its agent was dead\n"
    b.start()
    _wait_all_have([a, b], expected, {"receiver"}, "every edit of the burst on both devices")


def test_receiver_killed_while_moving_a_folder(pair: Pair) -> None:
    """b applies a's folder move by staging each file under a temporary name, then placing it:
    a SIGKILL in between must not turn the staged files into deletions."""
    a, b = pair
    tops = {"tree", "moved"}
    expected: dict[str, bytes] = {}
    for i in range(N_FILES):
        rel = f"tree/d{i % 7}/f{i:03d}.txt"
        expected[rel] = f"file {i}\n".encode() * 3
        a.write(rel, expected[rel].decode())
    _wait_all_have([a, b], expected, tops, "the folder on both devices")

    (a.folder / "tree").rename(a.folder / "moved")
    expected = {p.replace("tree/", "moved/", 1): v for p, v in expected.items()}
    wait_until(lambda: (b.folder / "moved").exists(), what="b starts moving", interval=0.002)
    b.kill()
    b.start()
    _wait_all_have([a, b], expected, tops, "the moved folder, whole, on both devices")
