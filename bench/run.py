"""qmoi-sync benchmarks: `python bench/run.py [scenario ...] [--quick]`.

Scenarios: latency, burst, edit_bytes, idle_rss, binary, snapshot (default: all, in that order),
and scale (100,000 files and Syncthing on the same files; only when named).
Each one starts a real relay and real agent processes on loopback with the `qmoi-sync` CLI, in a
temporary directory it removes afterwards, writes bench/results/<scenario>-<timestamp>.json and
prints a one-line summary. Not part of the test suite. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import scenario_binary
import scenario_burst
import scenario_edit_bytes
import scenario_idle_rss
import scenario_latency
import scenario_scale
import scenario_snapshot

SCENARIOS: dict[str, Any] = {
    "latency": scenario_latency,
    "burst": scenario_burst,
    "edit_bytes": scenario_edit_bytes,
    "idle_rss": scenario_idle_rss,
    "binary": scenario_binary,
    "snapshot": scenario_snapshot,
    "scale": scenario_scale,
}
# Not run by default: 100,000 files take several minutes per device (ask for it by name).
DEFAULT = [name for name in SCENARIOS if name != "scale"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "scenarios",
        nargs="*",
        choices=[*SCENARIOS, []],
        metavar="scenario",
        help=f"one or more of {', '.join(SCENARIOS)} (default: all but scale)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples/repetitions (latency 30 samples, burst 1 run, "
        "edit_bytes 3 edits, idle_rss 2,000 files and a 3 s window)",
    )
    p.add_argument(
        "--latency-method",
        choices=["auto", "inotify", "poll"],
        default="auto",
        help="how b's side of the latency scenario notices the new content",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument(
        "--profile",
        nargs="?",
        const="cprofile",
        choices=["cprofile", "pyinstrument", "py-spy", "memory"],
        help="run relay and agents under a profiler; profiles go to "
        "bench/results/profile-<scenario>-<timestamp>/ (memory: idle_rss and scale, a "
        "breakdown of each agent's memory once idle, bench/memprobe.py)",
    )
    p.add_argument(
        "--lan",
        action="store_true",
        help="leave LAN peer discovery on (default: `config set lan.enabled false` on every "
        "device, so traffic goes through the relay only)",
    )
    p.add_argument(
        "--files", type=int, help="scale: number of files (default 100,000; --quick 5,000)"
    )
    p.add_argument(
        "--no-syncthing", action="store_true", help="scale: skip the Syncthing comparison"
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = p.parse_args(argv)
    names = args.scenarios or DEFAULT
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every scenario's `finally` stops the
    # relay and agents it started instead of leaving them orphaned.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    if args.lan:
        os.environ[benchlib.LAN_ENV] = "1"

    if benchlib.CLI is None:
        print(
            "qmoi-sync console script not found: activate the venv (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    print(f"machine: {json.dumps(benchlib.machine_info())}", flush=True)
    failed = 0
    for name in names:
        mod = SCENARIOS[name]
        kwargs: dict[str, Any] = {"quick": args.quick, "keep": args.keep}
        if name == "latency":
            kwargs["method"] = args.latency_method
        if name == "scale":
            kwargs["files"] = args.files
            kwargs["with_syncthing"] = not args.no_syncthing
        if args.profile:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            prof_dir = benchlib.RESULTS_DIR / f"profile-{name}-{stamp}"
            os.environ[benchlib.PROFILE_ENV] = str(prof_dir)
            os.environ[benchlib.PROFILER_ENV] = args.profile
        print(f"== {name}{' (quick)' if args.quick else ''} …", flush=True)
        t0 = time.perf_counter()
        load0 = [round(x, 2) for x in os.getloadavg()]
        try:
            result = mod.run(**kwargs)
        except Exception:
            failed += 1
            traceback.print_exc()
            print(f"== {name}: FAILED", flush=True)
            continue
        result["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        result["lan"] = bool(args.lan)
        result["loadavg_at_start"] = load0
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.profile:
            result["profile_dir"] = os.environ[benchlib.PROFILE_ENV]
        print(mod.summary(result), flush=True)
        if not args.no_save:
            path = benchlib.write_result(name, result, args.quick)
            print(f"   -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
