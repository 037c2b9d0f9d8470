"""Full disks, for real: device b's space folder on a 4 MiB tmpfs, then its agent home (SQLite)
on a tmpfs filled to the last block (mounted by the test as root, unmounted in finally).

a sends more than fits. b says so in `status`, never leaves a truncated or partial file where a
good one was, never deletes anything, and catches up once space is freed; with its home full,
its state survives (SQLite integrity ok), the failure is reported, and it recovers."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos.invariants import check_all, format_violations
from chaos.ledger import Ledger
from crashcycle import wait_for_ledger
from faultlib import bad_state_lines, can_mount, db_integrity, stray_temps, tiny_tmpfs
from harness import Device, Relay, create_space, invite, join, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs"),
]
KiB = 1024


def _text(ledger: Ledger, dev: str, rel: str, size: int) -> bytes:
    lin = ledger.lineage()
    tok = ledger.token(dev)
    body = f"# lineage {lin}\n{tok} {rel}\n" + "padding line of a large note\n" * (size // 29)
    ledger.text_written(dev, "create", rel, lin, [tok], [])
    return body.encode()


def _save(path: Path, data: bytes) -> None:
    """Save like an editor (temp, then rename): a's watcher never sees a half-written file, so
    every version b could receive is a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def _problems(dev: Device) -> str:
    """Every warning b shows: the space's and the agent's resource policy's."""
    st = dev.status() or {}
    out = [w for s in st.get("spaces", []) for w in s.get("warnings", [])]
    out += list(((st.get("agent") or {}).get("policy") or {}).get("reasons", []))
    return "\n".join(out)


@contextlib.contextmanager
def _pair(tmp: Path, b_home: Path, b_folder: Path) -> Iterator[tuple[Relay, Device, Device]]:
    relay = Relay(tmp / "relay-data").start()
    a = Device(tmp / "home-a", tmp / "folder-a", "a").init()
    b = Device(b_home, b_folder, "b")
    b.log_path = tmp / "agent-b.log"  # not on the tiny file systems
    b.init()
    try:
        create_space(a, relay)
        a.start()
        join(b, invite(a))
        b.start()
        yield relay, a, b
    finally:
        a.stop()
        b.stop()
        relay.stop()


def test_space_folder_fills_up_then_catches_up(tmp_path: Path) -> None:
    with (
        tiny_tmpfs(tmp_path / "small", "4m") as small,
        _pair(tmp_path, tmp_path / "home-b", small / "folder-b") as (relay, a, b),
    ):
        ledger = Ledger()
        expected: dict[str, bytes] = {}
        own = _text(ledger, "b", "b-own.txt", 2 * KiB)
        (b.folder / "b-own.txt").write_bytes(own)
        keep_v1 = _text(ledger, "a", "keep.txt", 4 * KiB)
        _save(a.folder / "keep.txt", keep_v1)
        wait_until(lambda: b.read("keep.txt") is not None, timeout=60, what="keep.txt on b")
        wait_until(lambda: a.read("b-own.txt") is not None, timeout=60, what="b-own on a")

        # 6 MiB of notes for a 4 MiB file system, then a bigger version of keep.txt.
        for i in range(10):
            rel = f"big/n{i}.txt"
            expected[rel] = _text(ledger, "a", rel, 600 * KiB)
            _save(a.folder / rel, expected[rel])
        keep_v2 = keep_v1 + b"a second version, much longer\n" * (700 * KiB // 30)
        _save(a.folder / "keep.txt", keep_v2)
        ledger.text_written("a", "edit", "keep.txt", "-", [], [])

        wait_until(
            lambda: "No space left" in _problems(b) or "disk almost full" in _problems(b),
            timeout=90,
            what="b reports the full disk",
        )

        def whole() -> bool:
            """Nothing on b is partial or empty: each file is absent or whole."""
            assert (b.folder / "b-own.txt").read_bytes() == own
            keep = (b.folder / "keep.txt").read_bytes()
            assert keep in (keep_v1, keep_v2), f"keep.txt on b is {len(keep)} bytes"
            for rel, data in expected.items():
                p = b.folder / rel
                # A new file appears with its content or not at all (it showed empty until
                # its content's envelope arrived, and stayed so while the disk was full,
                # before the index was sealed last: tests/e2e/test_text_visible_whole.py).
                if p.exists():
                    got = p.read_bytes()
                    assert got == data, f"{rel} on b is partial or empty ({len(got)} bytes)"
            return not stray_temps(b.folder)

        wait_until(whole, timeout=60, what="no temp file left on the full disk")
        assert b.proc is not None and b.proc.poll() is None, "b's agent died"

        # Space is freed: b catches up with everything.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        expected["keep.txt"] = keep_v2
        expected["b-own.txt"] = own
        violations = check_all(relay, [a, b], ledger)
        assert not violations, format_violations(violations)
        wait_for_ledger([a, b], expected, 60)
        wait_until(lambda: "No space left" not in _problems(b), timeout=60, what="cleared")


def test_full_home_is_reported_plainly_not_as_a_relay_link_traceback(tmp_path: Path) -> None:
    """Bug: with its home full, b's relay link failed with a traceback per retry and status
    said only "relay link error: OperationalError"; now a plain message, nothing lost."""
    with (
        tiny_tmpfs(tmp_path / "homefs", "16m") as homefs,
        _pair(tmp_path, homefs / "home-b", tmp_path / "folder-b") as (relay, a, b),
    ):
        ledger = Ledger()
        expected: dict[str, bytes] = {}
        first = _text(ledger, "a", "first.txt", 1 * KiB)
        _save(a.folder / "first.txt", first)
        wait_until(lambda: b.read("first.txt") is not None, timeout=60, what="first on b")

        # Fill b's home to the last block, then send b more than its WAL can take.
        filler = homefs / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (64 * KiB))
                f.flush()
        for i in range(30):
            rel = f"during/n{i}.txt"
            expected[rel] = _text(ledger, "a", rel, 8 * KiB)
            _save(a.folder / rel, expected[rel])

        def reported() -> bool:
            if b.proc is not None and b.proc.poll() is not None:
                raise AssertionError(f"b's agent died:\n{b.log()[-3000:]}")
            relay_state = b.space_status()["relay"]
            return "qmoi-sync home is full" in str(relay_state.get("last_error"))

        wait_until(reported, timeout=90, what="b reports its full home in status")
        assert "Traceback" not in b.log(), b.log()[-3000:]
        for rel, data in expected.items():  # whatever b wrote is whole
            p = b.folder / rel
            assert not p.exists() or p.read_bytes() == data, rel

        filler.unlink()
        expected["first.txt"] = first
        violations = check_all(relay, [a, b], ledger)
        assert not violations, format_violations(violations)
        wait_for_ledger([a, b], expected, 60)
        b.stop()
        assert db_integrity(b) == "ok"
        corrupt = [ln for ln in bad_state_lines(b) if "malformed" in ln or "not a data" in ln]
        assert not corrupt, corrupt
