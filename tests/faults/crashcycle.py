"""Crash cycles on a two-device cluster: one device runs armed with a crash point while a small
workload goes through it, dies there, and is restarted (armed with the next point, or not).
Used by tests/faults/test_crash_points.py (a fixed list, dozens of kills) and by
bench/crash_soak.py (seeded random lists, hundreds of kills).

The ledger ``expected`` holds every file written so far (the last content of each): all of them
were on disk before any kill, so all must end up on every device."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from faultlib import (
    bad_state_lines,
    db_integrity,
    start_armed,
    stray_temps,
    wait_planned_death,
)
from harness import Device, wait_until

Ledger = dict[str, bytes]
MiB = 1024 * 1024


@dataclass
class Cycles:
    a: Device
    b: Device
    rng: random.Random
    expected: Ledger = field(default_factory=dict)
    kills: list[str] = field(default_factory=list)  # "device:point #hit" per planned death
    external_kills: int = 0
    n: int = 0

    def dev(self, name: str) -> Device:
        return self.a if name == "a" else self.b

    def other(self, dev: Device) -> Device:
        return self.b if dev is self.a else self.a

    # -- workloads (each writes on one device; the ledger records the content) -------------
    def put(self, dev: Device, rel: str, data: bytes) -> None:
        p = dev.folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")  # save like an editor: temp (ignored), rename
        tmp.write_bytes(data)
        tmp.replace(p)
        self.expected[rel] = data

    def text(self, dev: Device, files: int = 3) -> None:
        self.n += 1
        for i in range(files):
            self.put(dev, f"t{self.n % 4}/n{self.n}-{i}.txt", f"cycle {self.n} file {i}\n".encode())
        olds = sorted(p for p in self.expected if p.endswith(".txt"))
        if olds:  # and edit an earlier file, so updates are in flight as well as creations
            old = self.rng.choice(olds)
            self.put(dev, old, self.expected[old] + f"edited in cycle {self.n}\n".encode())

    def binary(self, dev: Device, size: int = 3 * MiB) -> None:
        self.n += 1
        self.put(dev, f"bin/b{self.n}.bin", self.rng.randbytes(size))

    def move(self, dev: Device) -> None:
        """Move a few files to a new folder (the receiver stages each under a temp name)."""
        self.n += 1
        src = f"mv{self.n}"
        for i in range(3):
            self.put(dev, f"{src}/f{i}.txt", f"moved file {i} of cycle {self.n}\n".encode())
        wait_until(
            lambda: all(self.other(dev).read(f"{src}/f{i}.txt") is not None for i in range(3)),
            timeout=60,
            what="the folder to move reaches the other device",
        )
        # file by file into a new folder (a folder rename is one rename_dir on the receiver)
        (dev.folder / f"{src}-moved").mkdir()
        for i in range(3):
            (dev.folder / f"{src}/f{i}.txt").rename(dev.folder / f"{src}-moved/f{i}.txt")
            self.expected[f"{src}-moved/f{i}.txt"] = self.expected.pop(f"{src}/f{i}.txt")

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
            hit = wait_planned_death(dev)
        else:
            hit = wait_planned_death(dev)  # died while starting: the death is already logged
        self.kills.append(f"{target}:{hit}")
        return hit

    def external(self, target: str, files: int, rng_delay: Callable[[], float]) -> None:
        """A SIGKILL from outside at a random moment while ``target`` receives a burst."""
        dev = self.dev(target)
        if dev.proc is None:
            start_armed(dev, None)
        writer = self.other(dev)
        self.n += 1
        for i in range(files):
            self.put(writer, f"burst{self.n}/f{i}.txt", f"burst {self.n} file {i}\n".encode() * 20)
        deadline = rng_delay()
        first = f"burst{self.n}/f0.txt"
        # kill somewhere between the first file arriving and `deadline` s later
        wait_until(lambda: dev.read(first) is not None, timeout=60, what="the burst starts")
        # Not a wait for a condition: the random delay *is* the fault being injected.
        threading.Event().wait(deadline)
        dev.stop(signal.SIGKILL)
        self.external_kills += 1

    # -- invariants ----------------------------------------------------------------------------
    def settle_and_check(self, timeout: float = 120) -> None:
        """Both agents disarmed and running: the state reopened cleanly, every file of the
        ledger is on both devices, no temp file is left in sight, the databases check ok."""
        for dev in (self.a, self.b):
            if dev.proc is None or dev.proc.poll() is not None:
                assert start_armed(dev, None)
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


def wait_for_ledger(devices: list[Device], expected: Ledger, timeout: float) -> None:
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


def folder_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".qmoi-tmp")
    }
