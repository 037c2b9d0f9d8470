"""Per-sender order, gaps and their repair on the relay path (the relay is not trusted with it).

Every envelope carries its sender's sequence number inside the signed header (1, 2, 3, ... per
device and space; protocol/envelope.py), and an honest relay stores every seq of an honest
sender (which resends what was refused) exactly once — a late one (its first publish was
rate-limited or lost) after higher ones, which the receiver sees as a gap that fills itself
(it is reported only if still open after :data:`GAP_REPORT_S`). So what a relay may do wrong is
visible to the receiver:

* **replay / reorder**: within one subscription an honest relay's ``relay_seq`` only grows. A
  delivery whose ``relay_seq`` goes backwards is the relay's fault; if its envelope was seen
  already it is refused as a replay (never applied twice — the replay window would drop it
  anyway), otherwise it is applied in the sender's order like any other;
* **drop / withhold / reorder**: a sender's seq above its contiguous watermark means the seqs in
  between are missing. pycrdt can silently lose updates applied out of causal order (design
  brief §4), so an out-of-order envelope whose updates lack a dependency is *held* (in memory)
  until the missing ones arrive; the others apply at once. The relay cursor stays below the
  oldest held envelope, so a restart gets it again from the relay;
* a gap still open after :data:`GAP_REPORT_S` is shown in ``status`` (``gaps``) and repaired:
  through a LAN peer when one is connected (its state-vector resync; a reply from the sender
  itself covers its stream), and through the relay by subscribing again from before the gap
  (on the same connection; a relay that lost a delivery sends it again; a few times per gap,
  as that gets everything after the gap again). Attempts back off up to
  :data:`REPAIR_MAX_S`. A relay that withholds a sender's envelopes for good cannot be repaired
  through itself: the gap stays in ``status`` until a LAN peer (or another relay) brings the
  content, or the state-vector resync through the relay does (agent/relay_repair.py: another
  member answers with what it holds). After a few more attempts it is
  given up on (:meth:`RelayOrder.give_up`): what was held is applied, so the relay cursor is
  not held back for good.

Not detectable from sequence numbers: a relay withholding a sender's *latest* envelopes (no
later seq arrives to show the hole) — until that sender publishes again. Not distinguishable:
a hole the relay made from one a (hostile) sender made by skipping seqs; `status` shows the gap
with its sender either way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qmoi_sync.protocol.replay import ReplayWindow

__all__ = [
    "GAP_REPORT_S",
    "HELD_MAX",
    "REPAIRED_KEPT",
    "REPAIR_MAX_S",
    "Gap",
    "RelayOrder",
    "Repaired",
]

#: A gap open this long is reported and a repair is attempted.
GAP_REPORT_S = 3.0
#: Longest pause between two repair attempts of one gap.
REPAIR_MAX_S = 120.0
#: Envelopes held for a missing predecessor, all senders together. Beyond this, an out-of-order
#: envelope is applied anyway (pycrdt may then hold it pending; the resync repairs that).
HELD_MAX = 4096
#: Repaired gaps kept for `status` (most recent last).
REPAIRED_KEPT = 16


@dataclass
class Gap:
    """One sender's open gap, as `status` shows it."""

    sender: bytes
    first_missing: int  # the first seq not received
    missing: int  # how many seqs below the highest one received are missing
    held: int  # envelopes received after the gap, held until it fills
    since: float  # unix time it was first seen
    repairs: int  # repair attempts so far
    reported: bool  # open for longer than GAP_REPORT_S


@dataclass(frozen=True)
class Repaired:
    """A reported gap that closed, and how (`status` lists the last few)."""

    sender: bytes
    first_missing: int
    missing: int
    since: float  # unix time the gap was first seen
    at: float  # unix time it closed
    repairs: int  # repair attempts it took
    how: str  # e.g. "relay re-subscription", "LAN resync", "state resync through the relay"
    by: bytes | None  # the device whose state filled it (a resync), if known


@dataclass
class _Open:
    since_mono: float
    since_wall: float
    repairs: int = 0
    next_repair: float = 0.0
    first_missing: int = 0
    missing: int = 0


@dataclass
class RelayOrder:
    clock: Callable[[], float] = time.monotonic
    #: sender -> seq -> (relay_seq, envelope): received out of order, waiting for the gap.
    held: dict[bytes, dict[int, tuple[int, bytes]]] = field(default_factory=dict)
    #: sender -> the stream seq a LAN state reply from that sender covered (peer_sync).
    covered: dict[bytes, int] = field(default_factory=dict)
    #: highest relay_seq delivered in the current subscription (it may only grow).
    sub_last: int = 0
    settling: bool = False
    #: relay_seq at which each sender's contiguous part last grew (where a repair resubscribes).
    contiguous_at: dict[bytes, int] = field(default_factory=dict)
    #: a repair asks the relay link to subscribe again from here.
    resubscribe_from: int | None = None
    #: senders whose gap was given up on: their envelopes are no longer held (see give_up).
    unheld: set[bytes] = field(default_factory=set)
    #: sender -> how its gap was just filled (a resync; read when the gap closes in refresh).
    filled_by: dict[bytes, tuple[str, bytes | None]] = field(default_factory=dict)
    repaired: deque[Repaired] = field(default_factory=lambda: deque(maxlen=REPAIRED_KEPT))
    _open: dict[bytes, _Open] = field(default_factory=dict)

    # -- subscription order ----------------------------------------------------------------
    def begin_subscription(self, from_seq: int, settling: bool = False) -> None:
        """A new subscription from ``from_seq``. ``settling``: it replaces one on the same
        connection, whose last deliveries may still arrive before the new backlog, so relay
        seqs may go back until the new subscription's CaughtUp (:meth:`settled`)."""
        self.sub_last = from_seq
        self.settling = settling

    def settled(self) -> None:
        self.settling = False

    def regressed(self, relay_seq: int) -> bool:
        """The relay delivers ``relay_seq`` at or below one it already delivered."""
        return not self.settling and relay_seq <= self.sub_last

    def delivered(self, relay_seq: int) -> None:
        self.sub_last = max(self.sub_last, relay_seq)

    # -- per-sender order -------------------------------------------------------------------
    def baseline(self, sender: bytes, window: ReplayWindow) -> int:
        """The sender's next expected seq: everything below is applied, or covered (by a LAN
        state reply from it, or its full state after a relay move) and applied after that."""
        base = max(window.watermark, self.covered.get(sender, 0)) + 1
        while window.seen(base):
            base += 1
        return base

    def can_hold(self) -> bool:
        return sum(len(h) for h in self.held.values()) < HELD_MAX

    def hold(self, sender: bytes, seq: int, relay_seq: int, envelope: bytes) -> None:
        self.held.setdefault(sender, {})[seq] = (relay_seq, envelope)

    def is_held(self, sender: bytes, seq: int) -> bool:
        return seq in self.held.get(sender, {})

    def take_next(self, sender: bytes, window: ReplayWindow) -> tuple[int, int, bytes] | None:
        """The held envelope that is now next in the sender's order (seq, relay_seq, envelope),
        removed from the held set; held ones the window has seen since are dropped."""
        h = self.held.get(sender)
        if not h:
            return None
        base = self.baseline(sender, window)
        for seq in [s for s in h if s < base or window.seen(s)]:
            del h[seq]
        if h and sender in self.unheld:
            base = min(h)  # given up on the gap: the held ones go in their order
        item = h.pop(base, None) if h else None
        if not h:
            self.held.pop(sender, None)
        return None if item is None else (base, item[0], item[1])

    def take_upto(self, sender: bytes, upto: int) -> list[tuple[int, int, bytes]]:
        """The held envelopes of ``sender`` up to seq ``upto`` (seq, relay_seq, envelope), in
        seq order, removed from the held set."""
        h = self.held.get(sender, {})
        out = [(seq, *h.pop(seq)) for seq in sorted(s for s in h if s <= upto)]
        if not h:
            self.held.pop(sender, None)
        return out

    def cursor_limit(self) -> int | None:
        """The relay cursor may not pass this: below the oldest held envelope's relay_seq."""
        seqs = [rs for h in self.held.values() for rs, _e in h.values()]
        return min(seqs) - 1 if seqs else None

    def advanced(self, sender: bytes, relay_seq: int) -> None:
        """A relay delivery from ``sender`` was applied in order (its watermark grew)."""
        self.contiguous_at[sender] = max(self.contiguous_at.get(sender, 0), relay_seq)

    # -- gaps -------------------------------------------------------------------------------
    def _summary(self, sender: bytes, window: ReplayWindow) -> tuple[int, int, int] | None:
        """(first missing seq, missing count, held count), or None without a gap."""
        base = self.baseline(sender, window)
        above = [s for s in window.above() if s >= base]
        held = [s for s in self.held.get(sender, {}) if s >= base]
        got = set(above) | set(held)
        if not got:
            return None
        top = max(got)
        return base, top - base + 1 - len(got), len(held)

    def note_filled(self, sender: bytes, how: str, by: bytes | None) -> None:
        """What is being applied may fill ``sender``'s gap: if it closes at the next
        :meth:`refresh`, it is listed as repaired this way."""
        self.filled_by[sender] = (how, by)

    def refresh(self, windows: dict[bytes, ReplayWindow], via: str = "relay") -> None:
        """Open (or close) each sender's gap record from its replay window and held set.
        ``via``: what was just applied came from the relay or a LAN peer (how a gap that closes
        now was filled, unless :meth:`note_filled` said)."""
        now, wall = self.clock(), time.time()
        senders = set(self.held) | set(self._open) | {s for s, w in windows.items() if w.above()}
        senders |= set(self.filled_by)
        for sender in senders:
            window = windows.get(sender) or ReplayWindow()
            summary = self._summary(sender, window)
            filled = self.filled_by.pop(sender, None)
            if summary is None:
                o = self._open.pop(sender, None)
                self.unheld.discard(sender)
                if o is not None and now - o.since_mono >= GAP_REPORT_S:
                    if filled is None:
                        how = "LAN peer" if via == "lan" else "late delivery by the relay"
                        if via == "relay" and o.repairs:
                            how = "relay re-subscription"
                        filled = (how, None)
                    self.repaired.append(
                        Repaired(
                            sender,
                            o.first_missing,
                            o.missing,
                            o.since_wall,
                            wall,
                            o.repairs,
                            filled[0],
                            filled[1],
                        )
                    )
                continue
            o = self._open.get(sender)
            if o is None:
                o = self._open[sender] = _Open(now, wall, next_repair=now + GAP_REPORT_S)
            o.first_missing, o.missing = summary[0], summary[1]

    def gaps(self, windows: dict[bytes, ReplayWindow]) -> list[Gap]:
        now = self.clock()
        out = []
        for sender, o in self._open.items():
            s = self._summary(sender, windows.get(sender) or ReplayWindow())
            if s is None:
                continue
            first, missing, held = s
            reported = now - o.since_mono >= GAP_REPORT_S
            out.append(Gap(sender, first, missing, held, o.since_wall, o.repairs, reported))
        return out

    def due_repairs(self) -> list[bytes]:
        """Senders whose gap is due a repair attempt now (each call counts as one attempt)."""
        now = self.clock()
        due = []
        for sender, o in self._open.items():
            if now >= o.next_repair:
                o.repairs += 1
                # 3 s, 3 s, 6 s, 12 s, ... between attempts
                o.next_repair = now + min(REPAIR_MAX_S, GAP_REPORT_S * 2 ** (o.repairs - 1))
                due.append(sender)
        return due

    def top_seen(self, sender: bytes, window: ReplayWindow) -> int:
        """The highest seq of ``sender`` this device received (applied or held)."""
        return max([window.highest, *self.held.get(sender, {})])

    def give_up(self, sender: bytes) -> None:
        """The gap will not be filled (repairs exhausted): stop holding this sender's
        envelopes — apply the held ones in order, as before gaps were tracked (pycrdt may keep
        an update pending; a LAN resync still repairs that) — so the relay cursor is not held
        back for good. The gap stays listed until it closes."""
        self.unheld.add(sender)

    def repairs_of(self, sender: bytes) -> int:
        o = self._open.get(sender)
        return o.repairs if o is not None else 0

    def request_resubscribe(self, senders: list[bytes]) -> None:
        """Ask the relay link to subscribe again from before these senders' gaps."""
        start = min(self.contiguous_at.get(s, 0) for s in senders)
        self.resubscribe_from = (
            start if self.resubscribe_from is None else min(start, self.resubscribe_from)
        )
