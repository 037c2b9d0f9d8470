"""Smoke run of the benchmark harness (`python -m bench run ... --quick`), so it cannot rot.

Real processes on loopback: a qmoi-sync relay and two agents, and two Syncthing instances
(Debian's `syncthing`, which .ci/run installs). Tiny sizes; no timing is asserted, only that
the harness measured both systems and wrote its table, JSON and chart.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("syncthing") is None,
        reason="syncthing is not installed (.ci/run installs it: apt-get install syncthing)",
    ),
]


def test_quick_run_compares_both_systems(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "latency",
            "small-files",
            "--quick",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| scenario | metric | qmoi-sync | Syncthing | ratio q/s | better |" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["versions"]["syncthing"].startswith("syncthing v")
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["total_wall_s"] > 0
    lat = doc["scenarios"]["latency"]["results"]
    small = doc["scenarios"]["small-files"]["results"]
    for system in ("qmoi-sync", "syncthing"):
        ms = lat[system]["ms"]
        assert lat[system]["timeouts"] == 0
        assert ms["n"] == len(ms["samples"]) >= 3
        assert 0 < ms["min"] <= ms["median"] <= ms["max"] < 10_000
        assert lat[system]["usage"]["a"]["peak_rss_mb"] > 1
        secs = small[system]["seconds"]
        assert small[system]["files"] == 50
        assert 0 < secs["median"] < 300
        assert small[system]["usage"]["b"]["cpu_s"] >= 0
    rows = doc["table_rows"]["latency"]
    assert rows[0]["values"]["qmoi-sync"] and rows[0]["values"]["syncthing"]
    assert rows[0]["ratio"] > 0

    table = out.with_suffix(".md").read_text()
    assert "| latency |" in table and "| small-files |" in table
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
