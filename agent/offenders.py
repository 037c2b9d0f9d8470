"""Who sent what this device refused, per space: the `offenders` list of `status`.

A refusal is attributed to whoever can be proven responsible. An envelope whose signature
verifies names its sender: that member signed it (garbage payload, malformed CRDT update, content
from a read-only member, ...). An envelope that does not verify (bad signature, unknown sender,
another space, not an envelope at all) proves nothing about the device it names — anyone can
write a header — so it is charged to the path it came by: the relay (which verifies signatures
and membership before it stores anything, so an honest relay never delivers one) or a LAN peer.
The relay is also charged with deliveries it must never make (replays, per-subscription order
going backwards) and with sequence gaps it does not fill (agent/relay_order.py).

Counts since the agent started, seeded at start-up from the quarantine table (which keeps every
quarantined envelope with its sender and reason).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["LAN", "RELAY", "Offence", "Offenders"]

#: Offender keys of the paths (device offenders are keyed by their sign_pk).
RELAY = b"relay"
LAN = b"lan"
#: Distinct (offender, what) pairs kept; the least recent is forgotten beyond this.
MAX_ENTRIES = 256


@dataclass
class Offence:
    offender: bytes  # a sign_pk, RELAY or LAN
    what: str
    count: int = 0
    last: float = 0.0  # unix time


class Offenders:
    def __init__(self) -> None:
        self._entries: dict[tuple[bytes, str], Offence] = {}

    def note(self, offender: bytes, what: str, count: int = 1, at: float | None = None) -> None:
        key = (offender, what)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_ENTRIES:
                oldest = min(self._entries.values(), key=lambda e: e.last)
                del self._entries[(oldest.offender, oldest.what)]
            entry = self._entries[key] = Offence(offender, what)
        entry.count += count
        entry.last = max(entry.last, time.time() if at is None else at)

    def entries(self) -> list[Offence]:
        """Most recent first."""
        return sorted(self._entries.values(), key=lambda e: -e.last)

    def count(self, offender: bytes, what: str | None = None) -> int:
        return sum(
            e.count
            for e in self._entries.values()
            if e.offender == offender and (what is None or e.what == what)
        )
