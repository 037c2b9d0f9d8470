"""Membership pushes, revocation and the invite join flow through a real relay."""

from __future__ import annotations

import time

from relay_helpers import Client, RelayFactory, Space, authed, url_of, wait_for
from websockets.frames import CloseCode

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.invite import Invite, build_join_request
from qmoi_sync.protocol.membership import MembershipLog, Role
from qmoi_sync.relay import RelayServer

# --------------------------------------------------------------------------- membership push


async def test_push_membership_revocation_closes_revoked_connection(
    relay: RelayServer, relay_url: str
) -> None:
    space = Space.create(2)
    alice, bob = space.members
    admin = await authed(relay_url, space, space.admin)
    a = await authed(relay_url, space, alice)
    b = await authed(relay_url, space, bob)
    await b.send(F.Subscribe(from_seq=0))
    await b.expect(F.CaughtUp)

    space.remove(bob)
    await admin.send(F.PushMembership(log=space.log_bytes))
    # Everyone still a member (the pusher included, as confirmation) gets the new log.
    assert (await admin.expect(F.Membership)).log == space.log_bytes
    assert (await a.expect(F.Membership)).log == space.log_bytes
    # The removed device is told and disconnected.
    await b.expect_error("revoked", fatal=True)
    assert await b.wait_closed() == CloseCode.POLICY_VIOLATION
    rec = await relay.store.get_space(space.space_id)
    assert rec is not None and rec.log == space.log_bytes
    # It cannot come back.
    b2 = await Client.connect(relay_url)
    err = await b2.auth(bob, space.space_id, b"")
    assert isinstance(err, F.Error) and err.code == "not_a_member"
    # Alice keeps working, in the new epoch.
    await a.send(F.Publish(envelope=space.envelope(alice)))
    assert (await a.expect(F.Ack)).relay_seq == 1


async def test_push_membership_must_extend(relay_url: str) -> None:
    space = Space.create(1)
    a = await authed(relay_url, space, space.admin)
    # A fork: a different log for the same space id (another genesis) does not extend ours.
    fork, _ = MembershipLog.create(space.admin, now=time.time(), space_id=space.space_id)
    await a.send(F.PushMembership(log=fork.to_bytes()))
    await a.expect_error("bad_membership", fatal=False)
    # Garbage.
    await a.send(F.PushMembership(log=b"\x01garbage"))
    err = await a.expect(F.Error)
    assert not err.fatal and err.code in ("malformed", "bad_membership", "too_large")
    # Pushing the same log again is a harmless no-op; a real extension works.
    await a.send(F.PushMembership(log=space.log_bytes))
    space.add()
    await a.send(F.PushMembership(log=space.log_bytes))
    assert (await a.expect(F.Membership)).log == space.log_bytes


async def test_role_change_to_reader_stops_publishing(relay_url: str) -> None:
    space = Space.create(1)
    alice = space.members[0]
    admin = await authed(relay_url, space, space.admin)
    a = await authed(relay_url, space, alice)
    space.log.set_role(space.admin, alice.public.sign_pk, Role.reader, now=time.time())
    await admin.send(F.PushMembership(log=space.log_bytes))
    assert (await a.expect(F.Membership)).log == space.log_bytes
    await a.send(F.Publish(envelope=space.envelope(alice)))
    await a.expect_error("read_only", fatal=False)


# --------------------------------------------------------------------------- joins


def _invite(space: Space, joiner: DeviceIdentity) -> tuple[Invite, bytes]:
    invite = Invite.new(
        space.space_id, space.admin.public.sign_pk, expires_at=int(time.time()) + 3600
    )
    return invite, build_join_request(invite, joiner.public, "joiner laptop")


async def test_join_accepted(relay: RelayServer, relay_url: str) -> None:
    space = Space.create(1)
    admin = await authed(relay_url, space, space.admin)
    member = await authed(relay_url, space, space.members[0])
    joiner_dev = DeviceIdentity.generate()
    invite, request = _invite(space, joiner_dev)

    joiner = await Client.connect(relay_url)
    await joiner.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request)
    )
    fwd = await admin.expect(F.JoinForward)
    assert fwd.request == request
    # The admin device adds the joiner (it would check the proof and expiry first).
    space.add(device=joiner_dev)
    await admin.send(
        F.JoinReply(request_id=fwd.request_id, accepted=True, reason="welcome", log=space.log_bytes)
    )
    result = await joiner.expect(F.JoinResult)
    assert result.ok and result.reason == "welcome" and result.log == space.log_bytes
    assert await joiner.wait_closed() == CloseCode.NORMAL_CLOSURE
    # Members hear about the new log; the relay stored it.
    assert (await admin.expect(F.Membership)).log == space.log_bytes
    assert (await member.expect(F.Membership)).log == space.log_bytes
    rec = await relay.store.get_space(space.space_id)
    assert rec is not None and rec.log == space.log_bytes
    # The new device can now authenticate normally.
    j = await Client.connect(relay_url)
    w = await j.auth(joiner_dev, space.space_id)
    assert isinstance(w, F.Welcome)


async def test_join_refused(relay_url: str) -> None:
    space = Space.create(0)
    admin = await authed(relay_url, space, space.admin)
    joiner_dev = DeviceIdentity.generate()
    invite, request = _invite(space, joiner_dev)
    joiner = await Client.connect(relay_url)
    await joiner.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request)
    )
    fwd = await admin.expect(F.JoinForward)
    await admin.send(F.JoinReply(request_id=fwd.request_id, accepted=False, reason="expired"))
    result = await joiner.expect(F.JoinResult)
    assert not result.ok and result.reason == "expired" and result.log == b""
    await joiner.wait_closed()
    # Answering again: the request is gone.
    await admin.send(F.JoinReply(request_id=fwd.request_id, accepted=False, reason="again"))
    await admin.expect_error("unknown_request", fatal=False)


async def test_join_timeout(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(join_timeout_s=0.5)
    url = url_of(relay)
    space = Space.create(0)
    await authed(url, space, space.admin)  # registers the space; this admin never answers
    joiner_dev = DeviceIdentity.generate()
    invite, request = _invite(space, joiner_dev)
    joiner = await Client.connect(url)
    await joiner.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request)
    )
    await joiner.expect_error("join_timeout", fatal=True, timeout=5)
    assert await joiner.wait_closed() == CloseCode.TRY_AGAIN_LATER
    await wait_for(lambda: not relay._spaces[space.space_id].joins)


async def test_join_forwarded_to_admin_connecting_later_and_not_to_members(
    relay_url: str,
) -> None:
    space = Space.create(1)
    member = await authed(relay_url, space, space.members[0])
    joiner_dev = DeviceIdentity.generate()
    invite, request = _invite(space, joiner_dev)
    joiner = await Client.connect(relay_url)
    await joiner.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request)
    )
    admin = await authed(relay_url, space, space.admin)
    fwd = await admin.expect(F.JoinForward)
    # A plain member gets nothing and may not answer.
    await member.send(F.JoinReply(request_id=fwd.request_id, accepted=False, reason="no"))
    await member.expect_error("forbidden", fatal=False)
    # An accepted log that does not add the joiner is refused; the request stays pending.
    other = space.add()
    await admin.send(
        F.JoinReply(request_id=fwd.request_id, accepted=True, reason="", log=space.log_bytes)
    )
    await admin.expect_error("bad_membership", fatal=False)
    assert other is not None
    space.add(device=joiner_dev)
    await admin.send(
        F.JoinReply(request_id=fwd.request_id, accepted=True, reason="ok", log=space.log_bytes)
    )
    result = await joiner.expect(F.JoinResult)
    assert result.ok and result.log == space.log_bytes


async def test_join_request_validation(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(max_pending_joins_per_space=1)
    url = url_of(relay)
    space = Space.create(0)
    await authed(url, space, space.admin)
    invite, request = _invite(space, DeviceIdentity.generate())
    # Unknown space.
    elsewhere = Space.create(0)
    inv2, req2 = _invite(elsewhere, DeviceIdentity.generate())
    c = await Client.connect(url)
    await c.send(F.JoinRequest(space_id=elsewhere.space_id, invite_id=inv2.invite_id, request=req2))
    await c.expect_error("unknown_space", fatal=True)
    # A frame whose space does not match its request body.
    c = await Client.connect(url)
    await c.send(F.JoinRequest(space_id=space.space_id, invite_id=inv2.invite_id, request=req2))
    await c.expect_error("malformed", fatal=True)
    # Garbage request body.
    c = await Client.connect(url)
    await c.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=b"junk")
    )
    await c.expect_error("malformed", fatal=True)
    # Per-space pending limit, and one join per connection.
    first = await Client.connect(url)
    await first.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request)
    )
    await wait_for(lambda: len(relay._spaces[space.space_id].joins) == 1)
    second = await Client.connect(url)
    request2 = build_join_request(invite, DeviceIdentity.generate().public, "second")
    await second.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request2)
    )
    await second.expect_error("too_many_joins", fatal=True)
    await first.send(
        F.JoinRequest(space_id=space.space_id, invite_id=invite.invite_id, request=request)
    )
    await first.expect_error("join_pending", fatal=False)
    # A joiner that goes away frees its slot.
    await first.close()
    await wait_for(lambda: not relay._spaces[space.space_id].joins)
