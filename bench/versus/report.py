"""The comparison's outputs: a Markdown table (printed and saved), the JSON, a PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .common import Row


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _verdict(row: Row) -> str:
    r = row.ratio()
    if r is None:
        return ""
    worse = r > 1 if row.lower_is_better else r < 1
    if math.isclose(r, 1.0, rel_tol=0.05):
        return "even"
    return "Syncthing" if worse else "qmoi-sync"


def table(rows_by_scenario: dict[str, list[Row]], errors: dict[str, str]) -> str:
    lines = [
        "| scenario | metric | qmoi-sync | Syncthing | ratio q/s | better |",
        "|---|---|---:|---:|---:|---|",
    ]
    notes = []
    for scenario, rows in rows_by_scenario.items():
        for i, row in enumerate(rows):
            r = row.ratio()
            unit = f" ({row.unit})" if row.unit else ""
            lines.append(
                f"| {scenario if i == 0 else ''} | {row.metric}{unit} | "
                f"{_fmt(row.values.get('qmoi-sync'))} | {_fmt(row.values.get('syncthing'))} | "
                f"{'' if r is None else f'{r:.2f}'} | {_verdict(row)} |"
            )
            if row.note:
                notes.append(f"* {scenario}, {row.metric}: {row.note}")
    for scenario, err in errors.items():
        lines.append(f"| {scenario} | FAILED: {err.splitlines()[-1][:120]} | | | | |")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def chart(path: Path, rows_by_scenario: dict[str, list[Row]], title: str) -> bool:
    """One horizontal bar per metric both systems have: how many times qmoi-sync's figure is
    worse (> 1, red) or better (< 1, green) than Syncthing's, on a log scale. False when there
    is nothing to compare or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels: list[str] = []
    factors: list[float] = []
    texts: list[str] = []
    for scenario, rows in rows_by_scenario.items():
        for row in rows:
            r = row.ratio()
            if r is None or r <= 0:
                continue
            labels.append(f"{scenario}: {row.metric}")
            factors.append(r if row.lower_is_better else 1 / r)
            unit = f" {row.unit}" if row.unit else ""
            texts.append(
                f"{_fmt(row.values['qmoi-sync'])} vs {_fmt(row.values['syncthing'])}{unit}"
            )
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.2), dpi=80)
    ys = list(range(len(labels)))[::-1]
    colors = ["#c0392b" if f > 1 else "#27ae60" for f in factors]
    ax.barh(ys, [math.log10(f) for f in factors], color=colors)
    ax.set_yticks(ys, labels, fontsize=7)
    for y, f, t in zip(ys, factors, texts, strict=True):
        ax.text(
            0, y, f"  {f:.2g}x ({t})  ", va="center", fontsize=6, ha="left" if f <= 1 else "right"
        )
    ax.axvline(0, color="black", linewidth=0.8)
    logs = [math.log10(f) for f in factors]
    lo, hi = min(-1.0, min(logs) - 0.3), max(1.0, max(logs) + 0.3)
    ax.set_xlim(lo, hi)
    ticks = [t for t in range(-4, 5) if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{10**t:g}x" for t in ticks], fontsize=7)
    ax.set_xlabel(
        "qmoi-sync vs Syncthing: > 1x = qmoi-sync worse (red), < 1x = better (green)", fontsize=8
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
