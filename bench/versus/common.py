"""What every comparison scenario shares: the run context, table rows, sample statistics."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import percentile, workdir

from .systems import SYSTEMS, Pair, make_pair


@dataclass
class Ctx:
    quick: bool = False
    keep: bool = False
    systems: tuple[str, ...] = SYSTEMS
    #: perf_counter() by which the whole run should be done (the many-files budget uses it)
    deadline: float = float("inf")
    rng: random.Random = field(default_factory=lambda: random.Random(8))
    #: temporary directories to remove once the results are written: deleting 100,000+ files
    #: takes minutes on a machine busy with I/O, and is no part of any measurement
    cleanup: list[Path] = field(default_factory=list)

    @contextlib.contextmanager
    def workdir(self, prefix: str) -> Iterator[Path]:
        with workdir(prefix, keep=True) as tmp:
            if not self.keep:
                self.cleanup.append(tmp)
            yield tmp

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()


@dataclass
class Row:
    """One line of the comparison table: a metric and each system's value (None = n/a)."""

    metric: str
    unit: str
    values: dict[str, float | None]
    lower_is_better: bool = True
    note: str = ""

    def ratio(self) -> float | None:
        q, s = self.values.get("qmoi-sync"), self.values.get("syncthing")
        if q is None or s is None or s == 0:
            return None
        return q / s


def stats(values: list[float], digits: int = 1) -> dict[str, Any]:
    """Median, p95, p99, min, max and every sample (rounded)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": round(percentile(values, 50), digits),
        "p95": round(percentile(values, 95), digits),
        "p99": round(percentile(values, 99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "samples": [round(v, digits + 2) for v in values],
    }


def per_system(
    ctx: Ctx, name: str, body: Callable[[str, Path], dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Run `body(system, tmp)` once per system, each in a fresh temporary directory."""
    return {
        system: _in_workdir(ctx, f"{name}-{system}", lambda tmp, s=system: body(s, tmp))
        for system in ctx.systems
    }


def _in_workdir(ctx: Ctx, prefix: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    with ctx.workdir(prefix) as tmp:
        return fn(tmp)


def pair(system: str, tmp: Path, proxy: bool = False, dialer: str = "b") -> Pair:
    return make_pair(system, tmp, proxy=proxy, dialer=dialer)


def side_usage(watch: dict[str, dict[str, Any]], key: str, role: str) -> float | None:
    v = watch.get(role, {}).get(key)
    return float(v) if v is not None else None


def usage_rows(res: dict[str, dict[str, Any]], key: str = "usage", what: str = "") -> list[Row]:
    """CPU seconds and peak RSS of side a, side b and (qmoi-sync only) the relay."""
    rows = []
    label = f" ({what})" if what else ""
    for role, name in (("a", "side a"), ("b", "side b"), ("relay", "relay")):
        for metric, unit, field_ in (("CPU", "s", "cpu_s"), ("peak RSS", "MB", "peak_rss_mb")):
            values = {s: side_usage(r.get(key, {}), field_, role) for s, r in res.items()}
            if any(v is not None for v in values.values()):
                rows.append(Row(f"{metric} {name}{label}", unit, values))
    return rows
