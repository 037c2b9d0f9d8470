"""State-vector resync *through the relay*: the repair of a gap that re-subscribing cannot fill.

A relay that withholds particular envelopes of a sender (agent/relay_order.py sees the hole in
its seqs) sends them no better when asked again. Another member may hold their content: its
state already merged them. So the device asks, in a sealed stream envelope of its own
(payload kind 7, :class:`RepairRequest`: the gaps, its state vectors, the devices asked), and
an asked device answers with the diff as new envelopes of *its* stream (kind 8,
:class:`RepairReply`, split into parts), saying per gap sender up to which seq its state covers
that sender. Both are end-to-end sealed and signed like any envelope: the relay sees a sender,
a seq and a size, not that they are a repair, nor who asks whom. A relay that withholds only
particular envelopes therefore cannot keep a device behind as long as one asked member is
online and receives them; a relay that withholds everything withholds the replies too (the gap
stays listed in ``status``).

Nothing unauthenticated is applied: a reply's updates are applied only by the device it names
as requester, only for a request id this device sent (and still waits for), only if it opened
as an envelope of a writer of the space. The ``covers`` of a reply are trusted as follows: the
replier's own stream (it is the authority on it, and its reply comes after every envelope it
sealed) — the replay window advances to it, persisted; another sender's stream — the gap is
treated as filled for the held envelopes (in memory, bounded by the highest seq of that sender
this device actually received), but the replay window is not moved: should the withheld
envelopes come after all, they are applied (CRDT updates apply idempotently), so a lying member
can not make a device drop a third device's envelopes.

Bounds (a hostile member, or a relay replaying requests, must not turn this into a flood):

* a device sends a request at most every :data:`REQUEST_MIN_INTERVAL_S` (and only for gaps a
  re-subscription did not fill, on the relay-order repair's back-off); a request waits
  :data:`REQUEST_TTL_S` for its replies;
* it answers only members' requests that name it (or name nobody), each request id once within
  :data:`ANSWERED_TTL_S`, one requester at most every :data:`ANSWER_MIN_INTERVAL_S`, and at most
  :data:`ANSWERS_PER_MINUTE` requests in all; requests delivered in one batch are answered once
  per requester (the latest);
* a reply is split into parts of :data:`PART_BYTES` and holds at most :data:`REPLY_MAX_BYTES`
  (a larger diff: the first parts, without ``covers`` — the requester asks again, its state
  vectors having grown).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qmoi_sync.protocol.payload import RepairGap, RepairReply, RepairRequest

__all__ = [
    "ANSWERED_TTL_S",
    "ANSWERS_PER_MINUTE",
    "ANSWER_MIN_INTERVAL_S",
    "PART_BYTES",
    "REPLY_MAX_BYTES",
    "REQUEST_MIN_INTERVAL_S",
    "REQUEST_TTL_S",
    "RelayRepair",
    "split_parts",
]

#: Shortest pause between two repair requests of one device (per space).
REQUEST_MIN_INTERVAL_S = 5.0
#: A request's replies are accepted this long after it was sent.
REQUEST_TTL_S = 120.0
#: One requester is answered at most this often.
ANSWER_MIN_INTERVAL_S = 5.0
#: Requests answered per minute, all requesters together.
ANSWERS_PER_MINUTE = 12
#: A request id is answered once within this long (a relay replaying it gets nothing).
ANSWERED_TTL_S = 600.0
#: Updates per reply part (well under the envelope limit, so parts flow like ordinary edits).
PART_BYTES = 1 << 20
#: Most bytes of updates in one reply; the rest waits for the next request.
REPLY_MAX_BYTES = 64 << 20
#: Devices asked per request besides the gaps' senders.
EXTRA_RESPONDERS = 2


@dataclass
class _Request:
    sent: float  # monotonic
    senders: set[bytes]  # the gap senders it asked about
    #: replier -> parts received so far (a reply is whole when it has them all).
    parts: dict[bytes, set[int]] = field(default_factory=dict)


@dataclass
class RelayRepair:
    clock: Callable[[], float] = time.monotonic
    #: request id -> what this device asked (requester side).
    outstanding: dict[bytes, _Request] = field(default_factory=dict)
    last_request: float = -1e18
    #: request id -> when answered (replier side).
    answered: dict[bytes, float] = field(default_factory=dict)
    last_answer_to: dict[bytes, float] = field(default_factory=dict)
    answer_times: deque[float] = field(default_factory=deque)
    #: requests delivered in the current batch, waiting to be answered: requester -> request.
    queued: dict[bytes, RepairRequest] = field(default_factory=dict)
    #: counters for `status` / tests
    requests_sent: int = 0
    replies_sent: int = 0
    requests_ignored: int = 0
    replies_ignored: int = 0

    # -- requester side ------------------------------------------------------------------------
    def may_request(self) -> bool:
        """A new request may go now. One whose replies did not come (withheld too) does not
        stop the next: their replies are still accepted while they wait (REQUEST_TTL_S)."""
        now = self.clock()
        for rid, req in list(self.outstanding.items()):
            if now - req.sent > REQUEST_TTL_S:
                del self.outstanding[rid]
        return now - self.last_request >= REQUEST_MIN_INTERVAL_S

    def new_request(
        self,
        gaps: list[RepairGap],
        writers: list[bytes],
        items: list[tuple[bytes, bytes]],
    ) -> RepairRequest:
        """A request about ``gaps``, asking their senders that are writers plus a few other
        writers (``writers``: the space's writers but this device, in a fair order)."""
        senders = {g.sender for g in gaps}
        asked = [pk for pk in writers if pk in senders]
        asked += [pk for pk in writers if pk not in senders][:EXTRA_RESPONDERS]
        request = RepairRequest(os.urandom(16), asked[:16], gaps[:256], items)
        self.outstanding[request.request_id] = _Request(self.clock(), senders)
        self.last_request = self.clock()
        self.requests_sent += 1
        return request

    def accepts(self, reply: RepairReply, me: bytes) -> bool:
        """Whether ``reply`` answers a request of this device that still waits."""
        if reply.requester != me:
            return False
        req = self.outstanding.get(reply.request_id)
        return req is not None and self.clock() - req.sent <= REQUEST_TTL_S

    def part_received(self, reply: RepairReply, replier: bytes) -> set[bytes] | None:
        """Count one part; when the replier's reply is whole, the senders its covers may speak
        for (the request's gap senders), else None."""
        req = self.outstanding[reply.request_id]
        got = req.parts.setdefault(replier, set())
        got.add(reply.part)
        if len(got) < reply.parts:
            return None
        return req.senders

    # -- replier side ---------------------------------------------------------------------------
    def offer(self, requester: bytes, request: RepairRequest, me: bytes, member: bool) -> bool:
        """A request was delivered: queue it if this device should answer it (a member asked,
        naming this device or nobody, and its id was not answered yet). False: ignored."""
        now = self.clock()
        for rid, at in list(self.answered.items()):
            if now - at > ANSWERED_TTL_S:
                del self.answered[rid]
        if (
            not member
            or requester == me
            or (request.responders and me not in request.responders)
            or request.request_id in self.answered
        ):
            self.requests_ignored += 1
            return False
        self.queued[requester] = request  # the latest of a batch wins
        return True

    def take_due(self) -> list[tuple[bytes, RepairRequest]]:
        """The queued requests to answer now (rate limits applied; the rest is dropped: their
        requesters ask again)."""
        now = self.clock()
        while self.answer_times and now - self.answer_times[0] > 60.0:
            self.answer_times.popleft()
        due = []
        for requester, request in self.queued.items():
            if (
                now - self.last_answer_to.get(requester, -1e18) < ANSWER_MIN_INTERVAL_S
                or len(self.answer_times) >= ANSWERS_PER_MINUTE
            ):
                self.requests_ignored += 1
                continue
            self.last_answer_to[requester] = now
            self.answer_times.append(now)
            self.answered[request.request_id] = now
            due.append((requester, request))
        self.queued.clear()
        return due


def split_parts(
    items: list[tuple[bytes, bytes]], part_bytes: int = PART_BYTES, max_bytes: int = REPLY_MAX_BYTES
) -> tuple[list[list[tuple[bytes, bytes]]], bool]:
    """Updates grouped into parts of about ``part_bytes`` (one update larger than that is a part
    of its own), at most ``max_bytes`` in all. Returns (parts, complete); at least one part (an
    empty one when there is nothing to send: the reply still carries its covers)."""
    parts: list[list[tuple[bytes, bytes]]] = [[]]
    size = total = 0
    complete = True
    for doc_id, update in items:
        if total + len(update) > max_bytes and total > 0:
            complete = False
            break
        if parts[-1] and size + len(update) > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append((doc_id, update))
        size += len(update) + 32
        total += len(update)
    return parts, complete
