"""Smoke run of the relay fan-out / load scenario (bench/scenario_fanout.py) at a small scale.

One real relay process and 20 simulated devices (real identities in a real signed membership
log, real handshakes, real sealed envelopes) in one client process: all connect and stay
connected, and every envelope a publisher sends reaches every other member of the space.
No timing is asserted (numbers go to bench/results when the scenario is run as a benchmark).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _scenario() -> ModuleType:
    # Loaded by path: bench/ is a directory of scripts (or a package), not an installed module.
    path = ROOT / "bench" / "scenario_fanout.py"
    spec = importlib.util.spec_from_file_location("qmoi_bench_scenario_fanout", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_fanout_smoke() -> None:
    r = _scenario().run(20, duration_s=3.0, quick=True, rate_per_publisher=10.0)
    assert r["connected"] == r["caught_up"] == r["connections_held"] == 20, r
    assert r["connect_failed"] == r["closed_early"] == r["error_frames"] == 0, r
    assert r["client_errors"] == [] and r["relay_alive_at_end"], r
    # two publishers at 10/s for 3 s; each envelope to the 19 other members
    assert r["publishes"] >= 20 and r["acks"] == r["publishes"], r
    assert r["expected_deliveries"] == r["publishes"] * 19, r
    assert r["delivered"] == r["delivered_total"] == r["expected_deliveries"], r
    assert r["latency_ms"]["samples"] == r["delivered"], r
    assert r["opened_sample"] > 0 and r["opened_mismatch"] == 0, r
    assert r["envelopes_per_s"] > 0 and math.isfinite(r["relay_rss_per_connection_kb"]), r
    assert r["presence_frames"] >= 20, r  # every device was told who is online
