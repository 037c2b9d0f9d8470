"""Real agents whose resource *readings* come from a JSON file the test rewrites.

The agent reads them through its `QMOI_SYNC_TEST_RESOURCES` test hook (agent/resources.py,
FileProbe); every decision taken from them is the agent's real policy code. Each device also gets
a `policy.json` in its home with a short sampling interval, so a changed reading is acted on
within a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Device, Relay, create_space, invite, join

MiB = 1024 * 1024
GiB = 1024 * MiB

# Plenty of everything, an idle machine on AC power: nothing is deferred.
NORMAL: dict[str, Any] = {
    "on_ac": True,
    "battery_percent": 100.0,
    "load": 0.05,
    "disk_free": 50 * GiB,
    "disk_total": 100 * GiB,
}
FAST_POLICY: dict[str, Any] = {"sample_interval_s": 0.1, "publish_interval_s": 3600}


@dataclass
class Readings:
    path: Path

    def set(self, **values: Any) -> None:
        """Replace the readings (atomically: the agent never sees a half-written file)."""
        data = {**NORMAL, **values}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def resource_device(tmp: Path, name: str, **readings: Any) -> tuple[Device, Readings]:
    dev = Device(tmp / f"home-{name}", tmp / f"folder-{name}", name).init()
    r = Readings(tmp / f"resources-{name}.json")
    r.set(**readings)
    dev.env["QMOI_SYNC_TEST_RESOURCES"] = str(r.path)
    (dev.home / "policy.json").write_text(json.dumps(FAST_POLICY))
    return dev, r


@contextlib.contextmanager
def resource_cluster(
    tmp: Path, readings: dict[str, dict[str, Any]]
) -> Iterator[tuple[Relay, list[Device], dict[str, Readings]]]:
    """Like harness.cluster, with per-device readings files (names in `readings` order)."""
    relay = Relay(tmp / "relay-data").start()
    made = {n: resource_device(tmp, n, **r) for n, r in readings.items()}
    devices = [d for d, _ in made.values()]
    try:
        create_space(devices[0], relay)
        devices[0].start()
        for dev in devices[1:]:
            join(dev, invite(devices[0]))
            dev.start()
        yield relay, devices, {n: r for n, (_, r) in made.items()}
    finally:
        for dev in devices:
            dev.stop()
        relay.stop()


def write_atomic(dev: Device, rel: str, text: str) -> None:
    """Write a file the way editors save: a temp name (ignored by the agent), then a rename, so
    the watcher never sees it half written."""
    p = dev.folder / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def policy(dev: Device) -> dict[str, Any]:
    st = dev.status() or {}
    return (st.get("agent") or {}).get("policy") or {}


def warnings(dev: Device) -> list[str]:
    return list(dev.space_status()["warnings"])


def peer(dev: Device, name: str) -> dict[str, Any]:
    for d in dev.space_status()["devices"]:
        if d["name"] == name:
            return dict(d)
    raise KeyError(name)
