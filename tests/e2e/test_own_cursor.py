"""A device that only writes moves its stored relay cursor over its own envelopes once the relay
acknowledged them. Before, only applying someone else's envelopes wrote the cursor: every restart
subscribed from the old cursor and the relay sent all of the device's own envelopes back (at
100,000 files ~130 MB queued in memory and opened again; bench scale restart)."""

import sqlite3
from pathlib import Path

from harness import cluster, wait_idle, wait_until


def _counters(home: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True) as db:
        return {name: int(value) for name, value in db.execute("SELECT name, value FROM counters")}


def test_stored_relay_cursor_passes_own_acknowledged_envelopes(tmp_path: Path) -> None:
    with cluster(tmp_path, names=("a",)) as (_relay, (a,)):
        for i in range(3):
            a.write(f"f{i}.txt", f"file {i}\n")
            wait_idle(a)
        # Only a publishes, so every relay seq of the space is one of a's envelopes: once all
        # are acknowledged, the stored cursor must reach the last of them (a's own seq count).
        wait_until(
            lambda: (c := _counters(a.home)).get("relay_cursor", 0) >= c.get("seq", 0) > 0,
            what="a's stored relay cursor past its own acknowledged envelopes",
        )
