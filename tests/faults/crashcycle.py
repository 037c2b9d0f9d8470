"""Crash cycles on a two-device cluster: one device runs armed with a crash point while a small
workload goes through it, dies there, and is restarted (armed with the next point, or not).
Used by tests/faults/test_crash_points.py (a fixed list, dozens of kills) and by
bench/crash_soak.py (seeded random lists, hundreds of kills).

Writes are recorded in the chaos write ledger (tests/chaos/ledger.py, its token/lineage file
format) and the end state is judged by the shared invariant checker (chaos.invariants.check_all:
converged, nothing lost, no plaintext on the relay, no unexpected death, no unexplained drops).
On top, what only a crash test needs: ``expected`` holds the exact last content of every file
(each was on disk before any kill, so each must be on every device byte for byte), SQLite's
integrity check passes, no "database is locked"/corruption error was logged, and no temp file of
the agent is left in sight."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos.invariants import check_all, format_violations
from chaos.ledger import BIN_MAGIC, Ledger
from faultlib import (
    bad_state_lines,
    db_integrity,
    start_armed,
    stray_temps,
    wait_planned_death,
)
from harness import Device, Relay, wait_until

MiB = 1024 * 1024


@dataclass
class Cycles:
    relay: Relay
    a: Device
    b: Device
    rng: random.Random
    expected: dict[str, bytes] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    lineages: dict[str, str] = field(default_factory=dict)  # path -> its ledger lineage
    kills: list[str] = field(default_factory=list)  # "device:point #hit" per planned death
    external_kills: int = 0
    n: int = 0
    iterations: int = 0  # bench/crash_soak.py's bookkeeping
    checks: int = 0

    def dev(self, name: str) -> Device:
        return self.a if name == "a" else self.b

    def other(self, dev: Device) -> Device:
        return self.b if dev is self.a else self.a

    # -- workloads (each writes on one device; the ledger records the content) -------------
    def put(self, dev: Device, rel: str, data: bytes) -> None:
        p = dev.folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")  # save like an editor: temp (ignored), rename
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # durable before it is recorded
        tmp.replace(p)
        self.expected[rel] = data

    def new_text(self, dev: Device, rel: str) -> None:
        lin = self.lineages[rel] = self.ledger.lineage()
        tok = self.ledger.token(dev.name)
        self.put(dev, rel, f"# lineage {lin}\n{tok} created on {dev.name}\n".encode())
        self.ledger.text_written(dev.name, "create", rel, lin, [tok], [])

    def append_text(self, dev: Device, rel: str) -> None:
        tok = self.ledger.token(dev.name)
        self.put(dev, rel, self.expected[rel] + f"{tok} appended on {dev.name}\n".encode())
        self.ledger.text_written(dev.name, "append", rel, self.lineages[rel], [tok], [])

    def text(self, dev: Device, files: int = 3) -> None:
        self.n += 1
        for i in range(files):
            self.new_text(dev, f"t{self.n % 4}/n{self.n}-{i}.txt")
        olds = sorted(p for p in self.expected if p.endswith(".txt"))
        if olds:  # and edit an earlier file, so updates are in flight as well as creations
            self.append_text(dev, self.rng.choice(olds))

    def binary(self, dev: Device, size: int = 3 * MiB) -> None:
        self.n += 1
        rel = f"bin/b{self.n}.bin"
        lin = self.lineages[rel] = self.ledger.lineage()
        data = BIN_MAGIC + f"{lin}\n".encode() + self.rng.randbytes(size)
        self.put(dev, rel, data)
        self.ledger.binary_written(dev.name, "bin_new", rel, lin, data, None)

    def move(self, dev: Device) -> None:
        """Move a few files to a new folder (the receiver stages each under a temp name)."""
        self.n += 1
        src = f"mv{self.n}"
        for i in range(3):
            self.new_text(dev, f"{src}/f{i}.txt")
        wait_until(
            lambda: all(self.other(dev).read(f"{src}/f{i}.txt") is not None for i in range(3)),
            timeout=60,
            what="the folder to move reaches the other device",
        )
        # file by file into a new folder (a folder rename is one rename_dir on the receiver)
        (dev.folder / f"{src}-moved").mkdir()
        for i in range(3):
            old, new = f"{src}/f{i}.txt", f"{src}-moved/f{i}.txt"
            (dev.folder / old).rename(dev.folder / new)
            self.expected[new] = self.expected.pop(old)
            self.lineages[new] = self.lineages.pop(old)
            self.ledger.moved(dev.name, old, new)

    def workload(self, kind: str, writer: Device) -> None:
        {"text": self.text, "binary": self.binary, "move": self.move, "none": lambda d: None}[kind](
            writer
        )

    # -- cycles ----------------------------------------------------------------------------
    def planned(self, target: str, spec: str, kind: str, writer: str) -> str:
        """Run ``target`` armed with ``spec`` while ``writer`` does a ``kind`` workload; wait
        for the planned death. Returns what was hit."""
        dev = self.dev(target)
        peer = self.other(dev)
        if peer.proc is None or peer.proc.poll() is not None:
            assert start_armed(peer, None)  # killed in an earlier cycle
        if dev.proc is not None:
            dev.stop()
        if start_armed(dev, spec):
            self.workload(kind, self.dev(writer))
        return self.planned_death_logged(target)

    def planned_death_logged(self, target: str, returncode: int | None = None) -> str:
        """Wait for (or, with ``returncode``, check) ``target``'s death at its crash point and
        record it; a death of any other kind fails."""
        dev = self.dev(target)
        if returncode is not None and returncode != -signal.SIGKILL:
            raise AssertionError(f"{target} exited {returncode}:\n{dev.log()[-4000:]}")
        hit = wait_planned_death(dev)
        self.kills.append(f"{target}:{hit}")
        self.ledger.fault(f"{target} killed at crash point {hit}")
        return hit

    def external(self, target: str, files: int, rng_delay: Callable[[], float]) -> None:
        """A SIGKILL from outside at a random moment while ``target`` receives a burst."""
        dev = self.dev(target)
        writer = self.other(dev)
        for d in (dev, writer):
            if d.proc is None or d.proc.poll() is not None:
                assert start_armed(d, None)
        self.n += 1
        for i in range(files):
            self.new_text(writer, f"burst{self.n}/f{i}.txt")
        deadline = rng_delay()
        first = f"burst{self.n}/f0.txt"
        # kill somewhere between the first file arriving and `deadline` s later
        wait_until(lambda: dev.read(first) is not None, timeout=60, what="the burst starts")
        # Not a wait for a condition: the random delay *is* the fault being injected.
        threading.Event().wait(deadline)
        dev.stop(signal.SIGKILL)
        self.external_kills += 1
        self.ledger.fault(f"{target} SIGKILLed from outside {deadline:.2f} s into a burst")

    # -- invariants ----------------------------------------------------------------------------
    def settle_and_check(self, timeout: float = 120) -> None:
        """Both agents disarmed and running, then the shared invariants; then the crash-only
        checks: exact contents, temp files gone, SQLite integrity, no state errors logged."""
        for dev in (self.a, self.b):
            if dev.proc is None or dev.proc.poll() is not None:
                assert start_armed(dev, None)
        violations = check_all(self.relay, [self.a, self.b], self.ledger, settle_timeout=timeout)
        assert not violations, format_violations(violations) + "\n" + self.ledger.tail()
        wait_for_ledger([self.a, self.b], self.expected, timeout)
        for dev in (self.a, self.b):
            wait_until(
                lambda dev=dev: not stray_temps(dev.folder),
                timeout=60,
                what=f"{dev.name}: temp files cleaned up ({stray_temps(dev.folder)[:5]})",
            )
        for dev in (self.a, self.b):
            dev.stop()
            assert db_integrity(dev) == "ok", f"{dev.name}: state.db integrity check failed"
            bad = bad_state_lines(dev)
            assert not bad, f"{dev.name}: state errors after kills: {bad[:5]}"


def wait_for_ledger(devices: list[Device], expected: dict[str, bytes], timeout: float) -> None:
    def missing(d: Device) -> list[str]:
        out = []
        for rel, data in expected.items():
            try:
                if (d.folder / rel).read_bytes() != data:
                    out.append(rel)
            except OSError:
                out.append(rel)
        return out

    try:
        wait_until(lambda: not any(missing(d) for d in devices), timeout=timeout, what="the ledger")
    except AssertionError as exc:
        detail = "; ".join(f"{d.name} lacks {missing(d)[:6]}" for d in devices)
        logs = "\n".join(f"--- {d.name}\n{d.log()[-3000:]}" for d in devices)
        raise AssertionError(f"{exc}: {detail}\n{logs}") from None
