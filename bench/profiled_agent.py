"""Run the qmoi-sync CLI under a profiler (bench-only; used by `run.py --profile`).

argv is passed to the CLI unchanged. The profile is written when the process exits (the agent
and relay stop cleanly on SIGTERM) to $QMOI_BENCH_PROFILE_DIR/<role>-<pid>.{prof,html}, where
role is "relay" or the device home's folder name. $QMOI_BENCH_PROFILER picks the profiler:
"cprofile" (default, stdlib), "pyinstrument" (if installed), or "memory": tracemalloc (one frame)
from the start, and on SIGUSR1 a breakdown of the process's memory is written to
<role>-<pid>.mem.txt (idle_rss sends it once both agents are idle; see bench/memprobe.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _role(argv: list[str]) -> str:
    if "relay" in argv:
        return "relay"
    if "--home" in argv:
        return Path(argv[argv.index("--home") + 1]).name
    return "agent"


def main() -> int:
    from qmoi_sync.agent.cli import main as cli_main

    argv = sys.argv[1:]
    out_dir = Path(os.environ["QMOI_BENCH_PROFILE_DIR"])
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{_role(argv)}-{os.getpid()}"
    which = os.environ.get("QMOI_BENCH_PROFILER", "cprofile")
    if which == "memory":
        import memprobe

        memprobe.install(base.with_suffix(".mem.txt"))
        return cli_main(argv)
    if which == "pyinstrument":
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0005, async_mode="disabled")
        prof.start()
        try:
            return cli_main(argv)
        finally:
            prof.stop()
            base.with_suffix(".html").write_text(prof.output_html())
            base.with_suffix(".txt").write_text(prof.output_text(unicode=True, show_all=False))
    import cProfile
    import pstats

    cprof = cProfile.Profile()
    cprof.enable()
    try:
        return cli_main(argv)
    finally:
        cprof.disable()
        cprof.dump_stats(str(base.with_suffix(".prof")))
        with open(base.with_suffix(".txt"), "w") as f:
            pstats.Stats(cprof, stream=f).sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    sys.exit(main())
