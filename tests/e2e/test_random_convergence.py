"""Three devices, seeded random concurrent file operations while one device is offline (its
agent stopped, its folder still edited), then that device comes back: all three trees converge
to identical contents.

Reproduce a failure with the printed seed:
    QMOI_TEST_SEED=<seed> pytest tests/e2e/test_random_convergence.py
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from harness import Device, cluster, wait_until

FOLDERS = ["", "docs", "docs/drafts", "src/pkg"]
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
N_OPS = 50


def _seed() -> int:
    env = os.environ.get("QMOI_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


def _line(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + "\n"


class Ops:
    """Seeded operations. Which device does what to which path is drawn from the seed alone:
    file lists are the test's own model, never read from disk, so the same seed attempts the
    same operations whatever the sync timing. The online devices share one list (so they race
    on each other's files, including ones that have not arrived yet); the offline device has
    its own. An operation on a file that is not (or no longer) there is recorded as raced and
    skipped."""

    def __init__(self, rng: random.Random, offline: str) -> None:
        self.rng = rng
        self.offline = offline
        self.counter = 0
        self.known: dict[str, list[str]] = {"online": [], offline: []}
        self.done: list[str] = []

    def _group(self, dev: Device) -> list[str]:
        return self.known[dev.name if dev.name == self.offline else "online"]

    def fresh_path(self, dev: Device) -> str:
        self.counter += 1
        folder = self.rng.choice(FOLDERS)
        name = f"{dev.name}-{self.counter}.txt"
        return f"{folder}/{name}" if folder else name

    def share_initial(self, paths: list[str]) -> None:
        for known in self.known.values():
            known[:] = sorted(paths)

    def run_one(self, dev: Device) -> None:
        rng = self.rng
        known = self._group(dev)
        kinds = ["create", "edit", "save", "append", "rename", "replace", "delete"]
        op = rng.choices(kinds, weights=[3, 3, 1, 3, 2, 1, 1])[0]
        if len(known) < 2:
            op = "create"
        path = ""
        try:
            if op == "create":
                path = self.fresh_path(dev)
                dev.write(path, "".join(_line(rng) for _ in range(rng.randint(1, 6))))
                known.append(path)
                return
            path = rng.choice(known)
            full = dev.folder / path
            if op in ("edit", "save"):
                where, new = rng.random(), _line(rng)
                lines = full.read_text().splitlines(keepends=True) or ["\n"]
                lines[int(where * len(lines))] = new
                if op == "edit":
                    full.write_text("".join(lines))
                else:  # an editor's atomic save: temp file renamed over the original
                    tmp = full.with_name(f".{full.name}.swp")
                    tmp.write_text("".join(lines))
                    os.replace(tmp, full)
            elif op == "append":
                new = _line(rng)
                with full.open("r+") as f:  # r+: never recreate a file a remote change deleted
                    f.seek(0, os.SEEK_END)
                    f.write(new)
            elif op in ("rename", "replace"):
                if op == "rename":
                    target = self.fresh_path(dev)
                else:  # mv onto another existing file
                    target = rng.choice([p for p in known if p != path])
                dest = dev.folder / target
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(full, dest)
                known.remove(path)
                if target in known:
                    known.remove(target)
                known.append(target)
                path = f"{path} -> {target}"
            else:
                full.unlink()
                known.remove(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A remote change moved or deleted the file under us: that's fine.
            op += " (raced, skipped)"
        finally:
            self.done.append(f"{dev.name}: {op} {path}")


def _describe(devices: list[Device]) -> str:
    trees = [d.tree() for d in devices]
    paths = sorted(set().union(*trees))
    out = []
    for p in paths:
        vals = [t.get(p) for t in trees]
        if len(set(vals)) > 1:
            cols = " | ".join(
                f"{d.name}={'-' if v is None else repr(v[:40])}"
                for d, v in zip(devices, vals, strict=True)
            )
            out.append(f"  {p}: {cols}")
    return "\n".join(out) or "  (trees equal)"


def test_three_devices_random_ops_converge(tmp_path: Path) -> None:
    seed = _seed()
    print(f"QMOI_TEST_SEED={seed}")
    rng = random.Random(seed)
    with cluster(tmp_path, names=("a", "b", "c")) as (_relay, devices):
        a, _b, c = devices
        ops = Ops(rng, offline=c.name)
        # A common starting point.
        for _ in range(8):
            ops.run_one(a)
        start = a.tree()
        ops.share_initial(list(start))
        wait_until(
            lambda: all(d.tree() == start for d in devices), timeout=30, what="initial files"
        )

        c.stop()
        # c's folder keeps being edited while its agent is down; a and b race each other live.
        for _ in range(N_OPS):
            ops.run_one(rng.choice(devices))
        print("\n".join(ops.done))
        c.start()

        def converged() -> bool:
            trees = [d.tree() for d in devices]
            return trees[0] == trees[1] == trees[2]

        def fail(exc: AssertionError) -> AssertionError:
            logs = "\n".join(f"--- agent {d.name}\n{d.log()[-5000:]}" for d in devices)
            return AssertionError(
                f"QMOI_TEST_SEED={seed}: {exc}\ndifferences:\n{_describe(devices)}\n"
                f"ops:\n" + "\n".join(ops.done) + f"\n{logs}"
            )

        try:
            wait_until(converged, timeout=45, what="three trees to converge")
            # Settled, not just momentarily equal: every outbox drained, and still equal.
            for d in devices:
                wait_until(
                    lambda d=d: d.space_status()["pending_out"] == 0,
                    what=f"{d.name} outbox drained",
                )
            wait_until(converged, timeout=20, what="trees equal once outboxes drained")
        except AssertionError as exc:
            raise fail(exc) from None
        assert a.tree(), f"QMOI_TEST_SEED={seed}: everything vanished"
