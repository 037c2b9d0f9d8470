"""`python -m bench run [scenario ...] [--json results.json] [--quick]`

Runs each scenario against qmoi-sync (relay + two agents) and against two Syncthing instances
(Debian package `syncthing`, installed with apt-get when missing), on this machine, in this run;
prints a table with both figures and their ratio, and writes the JSON (machine, versions, every
sample), the table (.md) and a chart (.png) next to it.

Scenarios, in the order they run (many-files last: it gets what is left of the time budget):
latency, small-files, big-file, edit-in-large, concurrent-edit, idle, relay-fanout, many-files.
Default: all of them. `--quick`: tiny sizes (a smoke run of the harness itself).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import benchlib
import syncthing

from . import (
    big_file,
    concurrent_edit,
    edit_in_large,
    idle,
    latency,
    many_files,
    relay_fanout,
    report,
    small_files,
)
from .common import Ctx, Row
from .systems import SYSTEMS, describe_setup

SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        latency,
        small_files,
        big_file,
        edit_in_large,
        concurrent_edit,
        idle,
        relay_fanout,
        many_files,
    )
}
#: the whole run (all scenarios, both systems) should take at most this long
BUDGET_S = 14 * 60


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="scenario",
        help=f"any of: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--json",
        type=Path,
        help="results file (default: "
        "bench/results/versus-<UTC timestamp>.json); .md and .png are written beside it",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the harness")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help=f"seconds the whole run may take (default {BUDGET_S}); many-files gets "
        "what the other scenarios left",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of qmoi-sync,syncthing (default: both)",
    )
    p.add_argument("--files", type=int, help="many-files: number of files (default 100,000)")
    p.add_argument(
        "--profile",
        choices=["cprofile", "pyinstrument", "py-spy"],
        help="run qmoi-sync's relay and agents under a profiler (bench/README.md)",
    )
    return p


def _bytecode_as_installed() -> None:
    """Let qmoi-sync's processes start from compiled bytecode, as an installed copy does.

    With PYTHONDONTWRITEBYTECODE set (CI and these sessions set it) an editable install's own
    modules (agent/, relay/, protocol/) are compiled from source at every process start: a py-spy
    profile of a restarted agent showed ~35 % of its start-up in `source_to_code`. Syncthing is
    a compiled binary, so that cost would be an artefact of the bench, not of qmoi-sync.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    root = str(Path(benchlib.BENCH_DIR).parent)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "agent", "relay", "protocol"],
        cwd=root,
        check=False,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        _parser().error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    names = [n for n in SCENARIOS if n in args.scenarios] if args.scenarios else list(SCENARIOS)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    if benchlib.CLI is None:
        print("qmoi-sync console script not found: pip install -e . in this venv", file=sys.stderr)
        return 2
    if not syncthing.ensure_installed():
        print(
            "syncthing is not installed and could not be (apt-get install syncthing)",
            file=sys.stderr,
        )
        return 2
    _bytecode_as_installed()
    now = dt.datetime.now(dt.UTC)
    out = args.json or benchlib.RESULTS_DIR / f"versus-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    t_start = time.perf_counter()
    systems = tuple(s for s in SYSTEMS if s in args.systems.split(","))
    ctx = Ctx(quick=args.quick, keep=args.keep, deadline=t_start + args.budget, systems=systems)
    if args.profile:
        prof = benchlib.RESULTS_DIR / f"profile-versus-{now.strftime('%Y%m%dT%H%M%S')}"
        os.environ[benchlib.PROFILE_ENV] = str(prof)
        os.environ[benchlib.PROFILER_ENV] = args.profile
    doc: dict[str, Any] = {
        "command": " ".join(["python -m bench run", *(argv if argv is not None else sys.argv[1:])]),
        "started": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": benchlib.machine_info(),
        "versions": {
            "syncthing": syncthing.version(),
            "qmoi-sync": benchlib.machine_info().get("git_rev"),
        },
        "setup": describe_setup(),
        "budget_s": args.budget,
        "scenarios": {},
    }
    print(f"machine: {doc['machine']}\nsyncthing: {doc['versions']['syncthing']}", flush=True)
    try:
        return _run(names, args, ctx, doc, out, t_start)
    finally:
        t = time.perf_counter()
        for path in ctx.cleanup:
            # rm(1): several times faster than shutil.rmtree on a CPU-starved machine
            subprocess.run(["rm", "-rf", "--", str(path)], check=False)
        if ctx.cleanup:
            print(
                f"(temporary directories removed after the results were written: "
                f"{time.perf_counter() - t:.1f} s)"
            )


def _run(
    names: list[str],
    args: argparse.Namespace,
    ctx: Ctx,
    doc: dict[str, Any],
    out: Path,
    t_start: float,
) -> int:
    rows: dict[str, list[Row]] = {}
    errors: dict[str, str] = {}
    for name in names:
        mod = SCENARIOS[name]
        print(f"== {name}{' (quick)' if args.quick else ''} …", flush=True)
        t0 = time.perf_counter()
        load0 = [round(x, 2) for x in os.getloadavg()]
        entry: dict[str, Any] = {"loadavg_at_start": load0}
        try:
            res = mod.run(ctx, files=args.files) if mod is many_files else mod.run(ctx)
            entry["results"] = res
            rows[name] = mod.rows(res)
        except Exception:
            errors[name] = traceback.format_exc()
            entry["error"] = errors[name]
            print(errors[name], file=sys.stderr, flush=True)
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        entry["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        doc["scenarios"][name] = entry
        print(
            f"== {name}: {entry['wall_s']} s, load {load0} -> {entry['loadavg_at_end']}", flush=True
        )
    doc["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    doc["table_rows"] = {
        n: [
            {
                "metric": r.metric,
                "unit": r.unit,
                "values": r.values,
                "ratio": r.ratio(),
                "lower_is_better": r.lower_is_better,
                "note": r.note,
            }
            for r in rs
        ]
        for n, rs in rows.items()
    }
    text = report.table(rows, errors)
    report.write_json(out, doc)
    out.with_suffix(".md").write_text(
        f"Command: `{doc['command']}`; {doc['started']}; whole run {doc['total_wall_s']} s; "
        f"{doc['versions']['syncthing']}; qmoi-sync {doc['versions']['qmoi-sync']}; "
        f"load average at start {doc['machine']['loadavg_1_5_15']}.\n\n{text}"
    )
    charted = report.chart(
        out.with_suffix(".png"),
        rows,
        f"qmoi-sync {doc['versions']['qmoi-sync']} vs Syncthing "
        f"{doc['versions']['syncthing'].split()[1] if ' ' in doc['versions']['syncthing'] else ''}"
        f" ({doc['started']}{', quick' if args.quick else ''})",
    )
    print("\n" + text)
    print(
        f"whole run: {doc['total_wall_s']} s; JSON {out}; table {out.with_suffix('.md')}"
        + (
            f"; chart {out.with_suffix('.png')}"
            if charted
            else "; no chart (no metric both systems have, or no matplotlib)"
        )
    )
    return 1 if errors else 0
