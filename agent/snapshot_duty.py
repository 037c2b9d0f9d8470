"""Who takes snapshots of a space: pure functions over converged state (no I/O, no clock).

One device per space holds snapshot duty at a time, recorded as a lease in the space's shared
configuration (``snapshot.lease = {device, until}``, agent/snapshot_config.py):

- **Ranking.** Devices that may write (admins and members) are ranked by the capabilities they
  publish (agent/resources.py): a headless server first, then AC power, battery level, CPUs,
  memory, free disk; ties by public key, so every device computes the same order from the same
  converged state. A device counts as online while its last published capabilities are recent
  (they are republished every 10 minutes); this device always counts.
- **Claim.** With no valid lease, the device of rank *r* among the online candidates claims it
  once the old lease has been expired (or, with no lease yet, since it first saw none) for
  ``r * claim_step`` seconds: the best one first, the next one only if the best did not.
  Two simultaneous claims converge to one winner (a map key written concurrently resolves
  to the same value everywhere); a claimant waits ``settle`` seconds and re-reads the
  lease before acting on it.
- **Renew / hand over.** The holder renews at half the lease; it stops renewing when a better
  device is online, which then claims at expiry.
- **When.** A snapshot is due when the interval ``floor(now / every)`` has no snapshot yet
  (``snapshot.last.at`` in the shared config), so two holders in turn never snapshot the same
  interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qmoi_sync.agent.snapshot_config import Lease, SharedConfig

#: A device is online while its last published capabilities are younger than this.
ONLINE_WINDOW_S = 25 * 60


@dataclass(frozen=True)
class Candidate:
    sign_pk: bytes
    capabilities: Mapping[str, Any] | None
    last_seen: float | None  # when it last published (None: never)


def score(caps: Mapping[str, Any] | None) -> tuple[float, ...]:
    """Higher is more capable."""
    c = caps or {}

    def num(key: str) -> float:
        v = c.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0

    on_ac = c.get("on_ac")
    battery = c.get("battery_percent")
    power = 2.0 if on_ac is True or (on_ac is None and battery is None) else 0.0
    return (
        1.0 if c.get("headless") is True else 0.0,
        power,
        float(battery) if isinstance(battery, int | float) else 100.0,
        num("cpu_count"),
        num("memory_total"),
        num("disk_free"),
    )


def rank(
    me: bytes, candidates: list[Candidate], now: float, online_window: float = ONLINE_WINDOW_S
) -> list[bytes]:
    """Online candidates, best first (ties broken by public key)."""
    online = [
        c
        for c in candidates
        if c.sign_pk == me or (c.last_seen is not None and now - c.last_seen <= online_window)
    ]
    online.sort(key=lambda c: (tuple(-x for x in score(c.capabilities)), c.sign_pk))
    return [c.sign_pk for c in online]


def lease_seconds(every_s: int) -> float:
    return float(min(max(2 * every_s, 20), 3600))


def claim_step(every_s: int) -> float:
    return float(min(max(every_s / 2, 5), 60))


@dataclass(frozen=True)
class Decision:
    write_lease: Lease | None  # a lease to write (claim or renewal), or None
    holder: bool  # this device holds a valid lease now
    due: bool  # a snapshot of the current interval is due (meaningful for the holder)
    reason: str


def interval_of(ts: float, every_s: int) -> int:
    return math.floor(ts / max(1, every_s))


def decide(
    me: bytes,
    config: SharedConfig,
    ranked: list[bytes],
    now: float,
    vacant_since: float | None = None,
) -> Decision:
    """What this device should do now about snapshot duty. ``vacant_since``: when this device
    first saw no valid lease (the rank delay counts from then when no lease ever existed)."""
    every = config.policy.every_s
    lease = config.lease
    length = lease_seconds(every)
    last_at = config.last.at if config.last is not None else None
    due = last_at is None or interval_of(last_at, every) < interval_of(now, every)
    if config.target is None:
        return Decision(None, False, False, "no snapshot target configured")
    if lease is not None and lease.until > now:
        if lease.device != me:
            return Decision(None, False, False, "another device holds snapshot duty")
        better = bool(ranked) and ranked[0] != me
        if not better and lease.until - now < length / 2:
            return Decision(Lease(me, now + length), True, due, "renewing snapshot duty")
        note = "handing snapshot duty to a more capable device" if better else "snapshot duty"
        return Decision(None, True, due, note)
    if me not in ranked:
        return Decision(None, False, False, "not a candidate for snapshot duty")
    r = ranked.index(me)
    expired_at = lease.until if lease is not None else (vacant_since or now)
    if now >= expired_at + r * claim_step(every):
        return Decision(Lease(me, now + length), False, due, "claiming snapshot duty")
    return Decision(None, False, False, "waiting for a more capable device to take duty")
