"""relay-fanout: N simulated clients on one space through one relay (qmoi-sync only).

Calls bench/scenario_fanout.py (`run(clients, duration_s, quick)`: connections held, envelopes
delivered per second, relay RSS per connection, p99 delivery latency) for N = 10, 100, 1000
(10 only with --quick). Syncthing has no relay in this role: its column is "n/a". If
scenario_fanout is not there yet, the scenario reports "not yet available" instead of numbers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .common import Ctx, Row

NAME = "relay-fanout"


def run(ctx: Ctx) -> dict[str, Any]:
    try:
        fanout = importlib.import_module("scenario_fanout")
    except ImportError:
        return {"qmoi-sync": {"status": "not yet available (bench/scenario_fanout.py missing)"}}
    sizes = (10,) if ctx.quick else (10, 100, 1000)
    duration = 2.0 if ctx.quick else 10.0
    runs = {str(n): fanout.run(clients=n, duration_s=duration, quick=ctx.quick) for n in sizes}
    return {"qmoi-sync": {"status": "ok", "duration_s": duration, "clients": runs}}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def rows(res: dict[str, Any]) -> list[Row]:
    q = res["qmoi-sync"]
    if q.get("status") != "ok":
        return [Row("envelopes delivered per second", "1/s", {"qmoi-sync": None}, note=q["status"])]
    out = []
    for n, r in q["clients"].items():
        lat = r.get("latency_ms") or {}
        out += [
            Row(
                f"{n} clients: connections held", "", {"qmoi-sync": _num(r.get("connections_held"))}
            ),
            Row(
                f"{n} clients: envelopes delivered/s",
                "1/s",
                {"qmoi-sync": _num(r.get("envelopes_per_s"))},
                lower_is_better=False,
                note=f"{r.get('delivered_fraction')} of the expected deliveries arrived",
            ),
            Row(
                f"{n} clients: relay RSS per connection",
                "KB",
                {
                    "qmoi-sync": _num(
                        r.get("relay_rss_per_conn_kb", r.get("relay_rss_per_connection_kb"))
                    )
                },
            ),
            Row(f"{n} clients: p99 delivery latency", "ms", {"qmoi-sync": _num(lat.get("p99"))}),
        ]
    return out
