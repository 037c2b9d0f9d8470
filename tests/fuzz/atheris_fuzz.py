"""Coverage-guided fuzzing of the same targets with atheris (libFuzzer) — optional, not in CI.

    pip install atheris            # 3.x has wheels for CPython 3.11 on x86-64 Linux
    python tests/fuzz/atheris_fuzz.py frame -max_total_time=600
    python tests/fuzz/atheris_fuzz.py --list

The target names are those of tests/fuzz/targets.py (each one checks its parser's contract:
documented error type, readable message, canonical round trip). The valid samples and the
saved regression corpus seed libFuzzer's working corpus (a temporary directory unless a
directory is given after the target name). A crash is written by libFuzzer as
``crash-<sha1>`` in the current directory: fix the parser, then copy the file into
tests/fuzz/corpus/<target>/ so that test_corpus.py replays it from then on.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `fuzz.*` as the test suite imports it

import atheris  # noqa: E402

with atheris.instrument_imports(include=["qmoi_sync"]):
    from fuzz.fuzzlib import corpus
    from fuzz.targets import TARGETS


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "--list"):
        print(__doc__)
        print("targets:", ", ".join(sorted(TARGETS)))
        return 0
    name = argv[1]
    if name not in TARGETS:
        print(f"unknown target {name!r}; one of: {', '.join(sorted(TARGETS))}", file=sys.stderr)
        return 2
    target = TARGETS[name]
    rest = argv[2:]
    dirs = [a for a in rest if not a.startswith("-")]
    work = Path(dirs[0]) if dirs else Path(tempfile.mkdtemp(prefix=f"atheris-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(target.samples()):
        (work / f"sample-{i}").write_bytes(sample)
    for path in corpus(name):
        (work / f"corpus-{path.name}").write_bytes(path.read_bytes())
    flags = [a for a in rest if a.startswith("-")]
    # libFuzzer bounds: inputs up to 64 KiB, a slow input (> 10 s) counts as a hang.
    defaults = ["-max_len=65536", "-timeout=10", "-rss_limit_mb=4096"]
    atheris.Setup([argv[0], *defaults, *flags, str(work)], target.check)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
