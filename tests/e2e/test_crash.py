"""An agent killed with SIGKILL in the middle of a burst of edits loses nothing: once it runs
again, every edit that was on disk reaches every device."""

from __future__ import annotations

from pathlib import Path

from harness import Device, cluster, wait_until

N_FILES = 200
KILL_AT = 120


def _burst(dev: Device, expected: dict[str, bytes], start: int, stop: int) -> None:
    """Write files start..stop-1 (spread over a few folders); every 7th step also rewrites an
    earlier file of the burst, so edits are in flight as well as creations."""
    for i in range(start, stop):
        rel = f"burst/d{i % 5}/f{i:03d}.txt"
        text = f"file {i}\npayload {i * 7919 % 1000}\n"
        dev.write(rel, text)
        expected[rel] = text.encode()
        if i % 7 == 6:
            j = i - 5
            old = f"burst/d{j % 5}/f{j:03d}.txt"
            text = f"file {j}\npayload {j * 7919 % 1000}\nedited at step {i}\n"
            dev.write(old, text)
            expected[old] = text.encode()


def _wait_all_have(devices: list[Device], expected: dict[str, bytes], what: str) -> None:
    def ok() -> bool:
        return all(d.tree() == expected for d in devices)

    try:
        wait_until(ok, timeout=60, what=what)
    except AssertionError as exc:
        report = []
        for d in devices:
            tree = d.tree()
            missing = sorted(set(expected) - set(tree))
            wrong = sorted(p for p in expected if p in tree and tree[p] != expected[p])
            extra = sorted(set(tree) - set(expected))
            report.append(
                f"{d.name}: {len(missing)} missing {missing[:5]}, {len(wrong)} wrong {wrong[:5]},"
                f" {len(extra)} extra {extra[:5]}"
            )
        logs = "\n".join(f"--- agent {d.name}\n{d.log()[-5000:]}" for d in devices)
        raise AssertionError(f"{exc}\n" + "\n".join(report) + f"\n{logs}") from None


def test_writer_killed_mid_burst(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        expected: dict[str, bytes] = {}
        _burst(a, expected, 0, KILL_AT)
        # SIGKILL a while it is ingesting and sending the burst: once its first files reach b.
        wait_until(
            lambda: len(list(b.folder.rglob("f*.txt"))) >= 5,
            what="a's first files reach b",
            interval=0.002,
        )
        a.kill()
        # The rest of the burst lands on disk while a is dead.
        _burst(a, expected, KILL_AT, N_FILES)
        a.start()
        _wait_all_have([a, b], expected, "every edit of the burst on both devices")
        for d in (a, b):
            wait_until(
                lambda d=d: d.space_status()["pending_out"] == 0, what=f"{d.name} outbox drained"
            )


def test_receiver_killed_mid_burst(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        expected: dict[str, bytes] = {}
        _burst(a, expected, 0, N_FILES)
        # Kill b once some of the burst has reached it, while the rest is still arriving.
        wait_until(
            lambda: len(list(b.folder.rglob("f*.txt"))) >= 20,
            what="b receives part of the burst",
            interval=0.005,
        )
        b.kill()
        # a edits while b is down, and b's folder is touched too.
        a.write("after-kill.txt", "written on a while b was dead\n")
        expected["after-kill.txt"] = b"written on a while b was dead\n"
        b.write("b-offline.txt", "written on b while its agent was dead\n")
        expected["b-offline.txt"] = b"written on b while its agent was dead\n"
        b.start()
        _wait_all_have([a, b], expected, "every edit of the burst on both devices")


def test_receiver_killed_while_moving_a_folder(tmp_path: Path) -> None:
    """b applies a's folder move by staging each file under a temporary name, then placing it:
    a SIGKILL in between must not turn the staged files into deletions."""
    with cluster(tmp_path) as (_relay, (a, b)):
        expected: dict[str, bytes] = {}
        for i in range(N_FILES):
            rel = f"tree/d{i % 7}/f{i:03d}.txt"
            expected[rel] = f"file {i}\n".encode() * 3
            a.write(rel, expected[rel].decode())
        _wait_all_have([a, b], expected, "the folder on both devices")

        (a.folder / "tree").rename(a.folder / "moved")
        expected = {p.replace("tree/", "moved/", 1): v for p, v in expected.items()}
        wait_until(lambda: (b.folder / "moved").exists(), what="b starts moving", interval=0.002)
        b.kill()
        b.start()
        _wait_all_have([a, b], expected, "the moved folder, whole, on both devices")
