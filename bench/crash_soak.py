"""crash soak: the crash cycles of tests/faults/test_crash_points.py by the hundred.

Two devices on a relay (resource readings pinned to an idle machine, so nothing is deferred).
Each iteration picks, from one seeded random stream, a device, a crash point of
agent/crashpoint.py (or a seeded ``random:P`` spec), a hit count and a workload that reaches it
(text files, 3 MiB binaries, file moves), starts that agent armed and waits for it to kill
itself (after a kill at ``chunk.written`` the next run dies at ``chunk.resumed``); every fifth
iteration is instead a SIGKILL from outside at a random moment of a burst.
A point the workload did not reach within a deadline is counted as "unreached" (the agent is
stopped normally). Every ``--check-every`` iterations, and at the end, both agents run disarmed
and the full checks run: the chaos invariants (converged, nothing lost, no plaintext on the
relay, no unexpected death, no unexplained drops), exact contents of every file written, no
temp files left, SQLite integrity ok and no "database is locked"/corruption errors logged.

    python bench/crash_soak.py --iterations 300 --seed 7      # or --minutes 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
for sub in ("tests", "tests/faults"):
    sys.path.insert(0, str(HERE.parent / sub))
os.environ.setdefault("QMOI_SYNC_LAN", "off")  # as in tests/conftest.py: loopback only

from crashcycle import Cycles  # noqa: E402
from faultlib import start_armed  # noqa: E402
from harness import wait_until  # noqa: E402
from resource_env import resource_cluster  # noqa: E402

from qmoi_sync.agent.crashpoint import POINTS  # noqa: E402

# Which workload reaches a point, and who writes it ("other": the device not armed).
RECEIVER_POINTS = {
    "materialize.written": "text",
    "materialize.fsynced": "text",
    "materialize.renamed": "text",
    "move.staged": "move",
    "chunk.written": "binary",
    "chunk.install": "binary",
    "chunk.installed": "binary",
}
SQLITE_POINTS = ("sqlite.begin", "sqlite.commit", "sqlite.committed")
REACH_DEADLINE_S = 20.0


def pick(rng: random.Random) -> tuple[str, str, str, str]:
    """(target, spec, workload, writer) for one planned crash."""
    target = rng.choice("ab")
    other = "b" if target == "a" else "a"
    roll = rng.random()
    if roll < 0.1:
        return (
            target,
            f"random:{rng.choice((0.02, 0.05, 0.1))}:{rng.randrange(1 << 30)}",
            "text",
            other,
        )
    if roll < 0.45:
        point = rng.choice(SQLITE_POINTS)
        return (
            target,
            f"{point}:{rng.randint(1, 6)}",
            rng.choice(("text", "binary")),
            rng.choice((target, other)),
        )
    point = rng.choice(sorted(RECEIVER_POINTS))
    n = rng.randint(1, 3) if point == "materialize.renamed" else 1
    return target, f"{point}:{n}", RECEIVER_POINTS[point], other


def planned(c: Cycles, target: str, spec: str, kind: str, writer: str) -> str | None:
    """One armed run; the point hit, or None if the workload did not reach it in time."""
    dev = c.dev(target)
    peer = c.other(dev)
    if peer.proc is None or peer.proc.poll() is not None:
        assert start_armed(peer, None)
    if dev.proc is not None:
        dev.stop()
    before = len(c.kills)
    if not start_armed(dev, spec):
        return c.planned_death_logged(target)
    c.workload(kind, c.dev(writer))
    proc = dev.proc
    assert proc is not None
    try:
        wait_until(lambda: proc.poll() is not None, timeout=REACH_DEADLINE_S, what="crash")
    except AssertionError:
        dev.stop()  # not reached: a normal stop, the agent disarmed next time
        return None
    dev.proc = None
    hit = c.planned_death_logged(target, proc.returncode)
    assert len(c.kills) == before + 1
    return hit


def soak(
    c: Cycles, args: argparse.Namespace, deadline: float | None, unreached: Counter[str]
) -> None:
    rng = c.rng
    resume_on: str | None = None  # device whose download a chunk.written kill interrupted
    while c.iterations < args.iterations and (deadline is None or time.monotonic() < deadline):
        c.iterations += 1
        if c.iterations % 5 == 0:
            c.external(rng.choice("ab"), files=20, rng_delay=lambda: rng.uniform(0.0, 1.0))
        else:
            if resume_on is not None:
                # the download the last kill interrupted resumes from its verified prefix: die
                # there (once; a full check in between may have finished the download)
                target, spec, kind, writer = resume_on, "chunk.resumed:1", "none", resume_on
            else:
                target, spec, kind, writer = pick(rng)
            hit = planned(c, target, spec, kind, writer)
            resume_on = target if hit is not None and hit.startswith("chunk.written") else None
            if hit is None:
                unreached[spec.split(":")[0]] += 1
        if c.iterations % args.check_every == 0:
            c.settle_and_check()
            c.checks += 1
            print(
                f"[{c.iterations}] checks passed; kills {len(c.kills)} planned + "
                f"{c.external_kills} external; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    c.settle_and_check()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long instead")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = ap.parse_args()
    assert set(RECEIVER_POINTS) | set(SQLITE_POINTS) <= set(POINTS)
    rng = random.Random(args.seed)
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    unreached: Counter[str] = Counter()
    with (
        tempfile.TemporaryDirectory(prefix="crash-soak-") as tmp,
        resource_cluster(Path(tmp), {"a": {}, "b": {}}) as (relay, (a, b), _r),
    ):
        c = Cycles(relay, a, b, rng)
        c.text(a)
        try:
            soak(c, args, deadline, unreached)
        except AssertionError as exc:  # a finding: report what ran before it, then fail
            print(f"FINDING after {len(c.kills)} planned + {c.external_kills} external kills:")
            print(str(exc)[-6000:])
            print(c.ledger.tail())
            return 1
        iterations, checks = c.iterations, c.checks + 1  # + the final one in soak()
        by_point = Counter(k.split(":", 1)[1].split(" #")[0] for k in c.kills)
        summary = {
            "seed": args.seed,
            "iterations": iterations,
            "planned_kills": len(c.kills),
            "external_kills": c.external_kills,
            "kills_by_point": dict(sorted(by_point.items())),
            "unreached": dict(unreached),
            "full_checks_passed": checks,
            "files_in_ledger": len(c.expected),
            "minutes": round((time.monotonic() - started) / 60, 1),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
