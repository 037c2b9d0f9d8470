"""Crash points: named places where a fault-injection test can have the agent SIGKILL itself.

Inert by default: with ``QMOI_SYNC_CRASHPOINT`` unset (every real run) ``crashpoint(name)`` is
one global lookup and a return. Tests and ``bench/crash_soak.py`` set it to make the process die
at exactly the moments whose interruption the on-disk state must survive (between a temp file's
write, fsync and rename; inside a SQLite transaction; between snapshot objects and their
manifest), which random-time kills from outside hit only by luck.

``QMOI_SYNC_CRASHPOINT`` is a comma-separated list of:

* ``name:N`` — die at the N-th time (1-based) the point ``name`` is reached. ``name`` may end
  with ``*`` to match every point with that prefix (``sqlite.*:3``: the third SQLite point).
* ``random:P:SEED`` — at every point reached, die with probability ``P`` (a seeded stream, so
  a soak run can be replayed).

Before dying the process writes one line ``qmoi-sync crashpoint: <name> #<hit>`` to stderr (the
agent's log), so a test can tell a planned death from a real crash.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading

ENV = "QMOI_SYNC_CRASHPOINT"
MARK = "qmoi-sync crashpoint:"

#: Every point placed in the agent (tests iterate over these; a typo in a spec fails loudly).
POINTS = (
    "sqlite.begin",  # BEGIN IMMEDIATE done, the transaction's body not run yet
    "sqlite.commit",  # the body ran, COMMIT not sent: the whole transaction must vanish
    "sqlite.committed",  # COMMIT returned, the caller has not acted on it yet
    "materialize.written",  # temp files written, not yet fsynced
    "materialize.fsynced",  # temp files durable, not yet renamed over their targets
    "materialize.renamed",  # one target renamed into place, the store does not know yet
    "move.staged",  # a moved file parked under .qmoi-tmp-mv-<fid>, not yet at its new path
    "chunk.written",  # a downloaded chunk written into the .qmoi-tmp-dl- temp file
    "chunk.resumed",  # a resumed download's temp file truncated to its verified prefix
    "chunk.install",  # a complete download fsynced, not yet renamed over its target
    "chunk.installed",  # a download renamed into place, the index and store not told yet
    "snapshot.object",  # one snapshot object stored, more to go
    "snapshot.manifest",  # every object stored, the manifest not yet
    "snapshot.manifest_stored",  # the manifest stored, not yet recorded locally
)


class _Armed:
    def __init__(self, spec: str) -> None:
        self.exact: dict[str, int] = {}
        self.prefixes: list[tuple[str, int]] = []
        self.prob = 0.0
        self.rng = random.Random(0)
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()  # points are reached from worker threads too
        for part in filter(None, (p.strip() for p in spec.split(","))):
            fields = part.split(":")
            try:
                if fields[0] == "random" and len(fields) == 3:
                    self.prob = float(fields[1])
                    self.rng = random.Random(int(fields[2]))
                    continue
                if len(fields) != 2 or int(fields[1]) < 1:
                    raise ValueError(part)
            except ValueError:
                raise SystemExit(
                    f"{ENV}: cannot parse {part!r} (want name:N or random:P:SEED)"
                ) from None
            name, n = fields[0], int(fields[1])
            if name.endswith("*"):
                if not any(p.startswith(name[:-1]) for p in POINTS):
                    raise SystemExit(f"{ENV}: no crash point matches {name!r}")
                self.prefixes.append((name[:-1], n))
            elif name in POINTS:
                self.exact[name] = n
            else:
                raise SystemExit(f"{ENV}: unknown crash point {name!r} (known: {POINTS})")

    def hit(self, name: str) -> None:
        with self.lock:
            die = False
            count = self.hits[name] = self.hits.get(name, 0) + 1
            if self.exact.get(name) == count:
                die = True
            for prefix, n in self.prefixes:
                if name.startswith(prefix):
                    key = f"{prefix}*"
                    c = self.hits[key] = self.hits.get(key, 0) + 1
                    die = die or c == n
            if self.prob and self.rng.random() < self.prob:
                die = True
            if die:
                sys.stderr.write(f"{MARK} {name} #{count}\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)


_armed: _Armed | None = _Armed(os.environ[ENV]) if os.environ.get(ENV) else None


def crashpoint(name: str) -> None:
    """SIGKILL this process here if the environment asks for it (see the module doc)."""
    if _armed is not None:
        _armed.hit(name)


__all__ = ["ENV", "MARK", "POINTS", "crashpoint"]
