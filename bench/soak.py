"""The chaos soak: random seeds of the fault scenario runner until time is up.

    python bench/soak.py --minutes 30            # random seeds until 30 minutes have passed
    python bench/soak.py --seed 1234 --ops 60    # replay one seed

Each seed is one tests/chaos scenario (three real agents, a real relay, a fault proxy per
agent; seeded operations interleaved with faults; every invariant of tests/chaos/invariants.py
checked at the end). Writes bench/results/soak-<timestamp>.json (seeds, operations and faults
by kind, what the proxies actually did, violations) and prints every failing seed as
``QMOI_CHAOS_SEED=<seed>``. Exit status 1 if any seed found a violation. Works from any
directory (it puts tests/ on sys.path), as a script or as ``python -m bench.soak``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# LAN discovery would multicast on this machine's real interfaces (as in tests/conftest.py).
os.environ.setdefault("QMOI_SYNC_LAN", "off")

from chaos.runner import Config, run_seed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="run seeds until this much time")
    ap.add_argument("--seed", type=int, action="append", help="run these seeds (repeatable)")
    ap.add_argument("--ops", type=int, default=60, help="operations per seed")
    ap.add_argument("--big", action="store_true", help="also > 4 MiB binary files")
    ap.add_argument("--keep", action="store_true", help="keep the work dirs of failing seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    started = time.time()
    deadline = time.monotonic() + args.minutes * 60
    fixed = list(args.seed or [])
    sysrng = random.SystemRandom()
    runs: list[dict[str, Any]] = []
    ops: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    failing: list[int] = []
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def write_report() -> dict[str, Any]:
        report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
            "load_average": os.getloadavg(),
            "seeds": len(runs),
            "ops": sum(v for k, v in ops.items() if not k.endswith("_raced")),
            "ops_by_kind": dict(ops),
            "faults": sum(faults.values()),
            "faults_by_kind": dict(faults),
            "proxies_applied": dict(applied),
            "violations": sum(len(r["violations"]) for r in runs),
            "failing_seeds": failing,
            "runs": runs,
        }
        out_path.write_text(json.dumps(report, indent=2))
        return report

    while fixed or (not args.seed and time.monotonic() < deadline):
        seed = fixed.pop(0) if fixed else sysrng.randrange(2**32)
        work = Path(tempfile.mkdtemp(prefix=f"qmoi-soak-{seed}-"))
        print(f"seed {seed} ...", flush=True)
        try:
            result = run_seed(work, Config(seed=seed, ops=args.ops, big_binary=args.big))
            entry = result.as_json()
            print(result.report() if result.violations else f"  ok {entry}", flush=True)
        except Exception as exc:  # a scenario that could not even run is a finding too
            entry = {"seed": seed, "violations": [f"[runner] {type(exc).__name__}: {exc}"]}
            print(f"  runner failed: {exc!r}", flush=True)
        runs.append(entry)
        ops.update(entry.get("ops", {}))
        faults.update(entry.get("faults", {}))
        applied.update(entry.get("applied", {}))
        if entry["violations"]:
            failing.append(seed)
            print(f"FAILING: QMOI_CHAOS_SEED={seed}  (work dir {work})", flush=True)
        if not (entry["violations"] and args.keep):
            shutil.rmtree(work, ignore_errors=True)
        write_report()

    report = write_report()
    print(
        f"soak: {report['seconds']:.0f}s, {report['seeds']} seeds, {report['ops']} ops, "
        f"{report['faults']} faults {report['faults_by_kind']}, "
        f"{report['violations']} violations; report {out_path}"
    )
    for s in failing:
        print(f"FAILING: QMOI_CHAOS_SEED={s}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
