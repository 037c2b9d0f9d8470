"""The relay over real websockets on 127.0.0.1: auth, publish, fan-out, resume, limits."""

from __future__ import annotations

import asyncio
import struct

import pytest
from relay_helpers import Client, RelayFactory, Space, authed, url_of, wait_for
from websockets.frames import CloseCode

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.membership import Role
from qmoi_sync.relay import RelayServer

# --------------------------------------------------------------------------- authentication


async def test_auth_registers_space_and_welcomes(relay: RelayServer, relay_url: str) -> None:
    space = Space.create(1)
    c = await Client.connect(relay_url)
    w = await c.auth(space.admin, space.space_id, space.log_bytes)
    assert isinstance(w, F.Welcome)
    assert w.head_seq == 0
    assert w.log == space.log_bytes
    # A second device of the space authenticates without sending a log.
    c2 = await Client.connect(relay_url)
    w2 = await c2.auth(space.members[0], space.space_id)
    assert isinstance(w2, F.Welcome) and w2.log == space.log_bytes
    assert relay.store.space_count == 1
    await c.close()
    await c2.close()


async def test_auth_key_not_in_membership_refused(relay_url: str) -> None:
    space = Space.create(1)
    await authed(relay_url, space, space.admin)  # registers the space
    stranger = DeviceIdentity.generate()
    c = await Client.connect(relay_url)
    err = await c.auth(stranger, space.space_id, space.log_bytes)
    assert isinstance(err, F.Error) and err.code == "not_a_member" and err.fatal
    assert await c.wait_closed() == CloseCode.POLICY_VIOLATION


async def test_unknown_space_with_log_not_containing_device_refused(relay_url: str) -> None:
    space = Space.create(0)
    stranger = DeviceIdentity.generate()
    c = await Client.connect(relay_url)
    err = await c.auth(stranger, space.space_id, space.log_bytes)
    assert isinstance(err, F.Error) and err.code == "not_a_member"
    await c.wait_closed()


async def test_unknown_space_without_log_refused(relay_url: str) -> None:
    space = Space.create(0)
    c = await Client.connect(relay_url)
    err = await c.auth(space.admin, space.space_id, b"")
    assert isinstance(err, F.Error) and err.code == "unknown_space" and err.fatal


async def test_log_for_another_space_refused(relay_url: str) -> None:
    space, other = Space.create(0), Space.create(0)
    c = await Client.connect(relay_url)
    err = await c.auth(space.admin, space.space_id, other.log_bytes)
    assert isinstance(err, F.Error) and err.fatal
    assert err.code in ("wrong_space", "bad_membership", "malformed")


async def test_bad_signature_refused(relay_url: str) -> None:
    space = Space.create(0)
    dev = space.admin
    pk = dev.public.sign_pk
    c = await Client.connect(relay_url)
    await c.send(F.Hello(space_id=space.space_id, sign_pk=pk, proto_version=F.PROTO_VERSION))
    ch = await c.expect(F.Challenge)
    assert len(ch.nonce) == 32
    # Signed over the wrong nonce: a replayed answer to someone else's challenge.
    sig = dev.sign(F.auth_message(bytes(32), space.space_id, pk))
    await c.send(F.Auth(signature=sig, membership_log=space.log_bytes))
    await c.expect_error("bad_signature", fatal=True)
    await c.wait_closed()


async def test_wrong_proto_version_refused(relay_url: str) -> None:
    space = Space.create(0)
    c = await Client.connect(relay_url)
    await c.send(
        F.Hello(
            space_id=space.space_id,
            sign_pk=space.admin.public.sign_pk,
            proto_version=F.PROTO_VERSION + 1,
        )
    )
    await c.expect_error("unsupported_version", fatal=True)


async def test_auth_with_longer_log_extends_stored(relay: RelayServer, relay_url: str) -> None:
    space = Space.create(0)
    admin = await authed(relay_url, space, space.admin)
    newcomer = space.add()
    c = await Client.connect(relay_url)
    w = await c.auth(newcomer, space.space_id, space.log_bytes)
    assert isinstance(w, F.Welcome) and w.log == space.log_bytes
    # The admin's connection hears about the longer log.
    m = await admin.expect(F.Membership)
    assert m.log == space.log_bytes
    rec = await relay.store.get_space(space.space_id)
    assert rec is not None and rec.log == space.log_bytes


async def test_handshake_timeout(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(handshake_timeout_s=0.3)
    c = await Client.connect(url_of(relay))
    await c.expect_error("handshake_timeout", fatal=True, timeout=5)
    await c.wait_closed()


async def test_max_spaces(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(max_spaces=1)
    url = url_of(relay)
    s1, s2 = Space.create(0), Space.create(0)
    await authed(url, s1, s1.admin)
    c = await Client.connect(url)
    err = await c.auth(s2.admin, s2.space_id, s2.log_bytes)
    assert isinstance(err, F.Error) and err.code == "too_many_spaces"


# --------------------------------------------------------------------------- publish / fan-out


async def test_publish_fanout_and_ack(relay_url: str) -> None:
    space = Space.create(2)
    alice, bob = space.members
    a = await authed(relay_url, space, alice)
    b = await authed(relay_url, space, bob)
    admin = await authed(relay_url, space, space.admin)
    for c in (a, b, admin):
        await c.send(F.Subscribe(from_seq=0))
        assert (await c.expect(F.CaughtUp)).head_seq == 0
    env = space.envelope(alice, plaintext=b"secret")
    await a.send(F.Publish(envelope=env))
    ack = await a.expect(F.Ack)
    assert (ack.sender_seq, ack.relay_seq, ack.duplicate) == (1, 1, False)
    for c in (b, admin):
        d = await c.expect(F.Deliver)
        assert d.relay_seq == 1 and d.envelope == env
    # The publisher does not get its own envelope echoed back.
    await b.send(F.Publish(envelope=space.envelope(bob)))
    assert (await b.expect(F.Ack)).relay_seq == 2
    d = await a.expect(F.Deliver)
    assert d.relay_seq == 2


async def test_duplicate_seq_acked_as_duplicate_not_stored(
    relay: RelayServer, relay_url: str
) -> None:
    space = Space.create(1)
    alice = space.members[0]
    a = await authed(relay_url, space, alice)
    watcher = await authed(relay_url, space, space.admin)
    await watcher.send(F.Subscribe(from_seq=0))
    await watcher.expect(F.CaughtUp)
    env = space.envelope(alice, seq=1)
    await a.send(F.Publish(envelope=env))
    assert await a.expect(F.Ack) == F.Ack(sender_seq=1, relay_seq=1, duplicate=False)
    # Resend after a "reconnect": same bytes, and also a different envelope reusing seq 1.
    await a.close()
    a = await authed(relay_url, space, alice)
    await a.send(F.Publish(envelope=env))
    assert await a.expect(F.Ack) == F.Ack(sender_seq=1, relay_seq=1, duplicate=True)
    await a.send(F.Publish(envelope=space.envelope(alice, seq=1, plaintext=b"other")))
    assert await a.expect(F.Ack) == F.Ack(sender_seq=1, relay_seq=1, duplicate=True)
    assert await relay.store.head_seq(space.space_id) == 1
    await a.send(F.Publish(envelope=space.envelope(alice, seq=2)))
    assert (await a.expect(F.Ack)).relay_seq == 2
    delivers, _ = await watcher.collect_delivers(2)
    assert [d.relay_seq for d in delivers] == [1, 2]


async def test_resume_from_sequence(relay_url: str) -> None:
    space = Space.create(1)
    alice = space.members[0]
    a = await authed(relay_url, space, alice)
    envs = [space.envelope(alice) for _ in range(5)]
    for e in envs:
        await a.send(F.Publish(envelope=e))
    for i in range(5):
        assert (await a.expect(F.Ack)).relay_seq == i + 1
    b = await authed(relay_url, space, space.admin)
    await b.send(F.Subscribe(from_seq=3))
    delivers, others = await b.collect_delivers(2)
    assert [(d.relay_seq, d.envelope) for d in delivers] == [(4, envs[3]), (5, envs[4])]
    assert others == []
    assert (await b.expect(F.CaughtUp)).head_seq == 5
    # From the head: nothing but CaughtUp; from beyond the head: CaughtUp at the real head.
    c = await authed(relay_url, space, space.admin)
    await c.send(F.Subscribe(from_seq=5))
    assert (await c.expect(F.CaughtUp)).head_seq == 5
    await c.send(F.Subscribe(from_seq=99))
    assert (await c.expect(F.CaughtUp)).head_seq == 5


@pytest.mark.parametrize("buffer_bytes", [16 * 1024 * 1024, 2_000])
async def test_backlog_then_live_without_gaps_or_duplicates(
    relay_factory: RelayFactory, buffer_bytes: int
) -> None:
    """Publishing never stops while a subscriber catches up; it must see 1..N exactly once.

    With a tiny subscriber buffer the live path overflows and falls back to the store.
    """
    relay = await relay_factory(subscriber_buffer_bytes=buffer_bytes)
    url = url_of(relay)
    space = Space.create(1)
    alice = space.members[0]
    a = await authed(url, space, alice)
    total = 1000

    async def publish_all() -> None:
        # Waves of 10 (each waits for its acks) so publishing lasts while the subscriber joins.
        for _ in range(total // 10):
            for _ in range(10):
                await a.send(F.Publish(envelope=space.envelope(alice, plaintext=b"p" * 100)))
            for _ in range(10):
                await a.expect(F.Ack)

    pub = asyncio.create_task(publish_all())
    await wait_for(lambda: (relay.store.committed_head(space.space_id) or 0) >= 100)
    b = await authed(url, space, space.admin)
    await b.send(F.Subscribe(from_seq=0))
    delivers, others = await b.collect_delivers(total, timeout=30)
    await pub
    assert [d.relay_seq for d in delivers] == list(range(1, total + 1))
    # Exactly one CaughtUp: somewhere in the stream, or right after the last backlog page.
    assert all(isinstance(o, F.CaughtUp) for o in others) and len(others) <= 1
    if not others:
        assert (await b.expect(F.CaughtUp)).head_seq == total
    if buffer_bytes < 10_000:
        subs = [c.sub for c in relay._spaces[space.space_id].conns if c.sub is not None]
        assert subs and subs[0].overflows > 0  # the store fallback really was exercised


async def test_stuck_subscriber_slows_nobody(relay_factory: RelayFactory) -> None:
    """A subscriber that stops reading must not hold up publishers or other subscribers, and
    must still get everything, in order, once it reads again."""
    relay = await relay_factory(subscriber_buffer_bytes=256 * 1024)
    url = url_of(relay)
    space = Space.create(1)
    alice = space.members[0]
    a = await authed(url, space, alice)
    healthy = await authed(url, space, space.admin)
    stuck = await Client.connect(url, max_queue=1)
    assert isinstance(await stuck.auth(space.admin, space.space_id), F.Welcome)
    for c in (healthy, stuck):
        await c.send(F.Subscribe(from_seq=0))
        await c.expect(F.CaughtUp)
    total = 200  # x 64 KiB = 12.5 MiB, far beyond socket buffers and the subscriber buffer
    payload = b"z" * 65536
    envs = [space.envelope(alice, plaintext=payload) for _ in range(total)]

    async def publish() -> None:
        for e in envs:
            await a.send(F.Publish(envelope=e))

    pub = asyncio.create_task(publish())
    got, _ = await healthy.collect_delivers(total, timeout=30)
    assert [d.relay_seq for d in got] == list(range(1, total + 1))
    acks = [await a.expect(F.Ack, timeout=30) for _ in range(total)]
    assert [x.relay_seq for x in acks] == list(range(1, total + 1))
    await pub
    subs = [c.sub for c in relay._spaces[space.space_id].conns if c.sub is not None]
    assert max(sub.overflows for sub in subs) > 0  # it did fall back to the store
    # Now the stuck one reads: everything arrives, once, in order.
    late, others = await stuck.collect_delivers(total, timeout=30)
    assert [d.relay_seq for d in late] == list(range(1, total + 1))
    assert others == []


async def test_envelope_for_another_space_refused(relay_url: str) -> None:
    space, other = Space.create(1), Space.create(0)
    alice = space.members[0]
    a = await authed(relay_url, space, alice)
    env = space.envelope(alice, seq=1, space_id=other.space_id)
    await a.send(F.Publish(envelope=env))
    await a.expect_error("wrong_space", fatal=False)
    # The connection is still usable.
    await a.send(F.Publish(envelope=space.envelope(alice, seq=1)))
    assert (await a.expect(F.Ack)).relay_seq == 1


async def test_publishing_as_another_sender_refused(relay_url: str) -> None:
    space = Space.create(2)
    alice, bob = space.members
    a = await authed(relay_url, space, alice)
    await a.send(F.Publish(envelope=space.envelope(bob, seq=1)))
    await a.expect_error("wrong_sender", fatal=False)
    await a.send(F.Publish(envelope=space.envelope(alice, seq=1)))
    assert (await a.expect(F.Ack)).relay_seq == 1


async def test_tampered_envelope_refused(relay_url: str) -> None:
    space = Space.create(1)
    alice = space.members[0]
    a = await authed(relay_url, space, alice)
    env = bytearray(space.envelope(alice, seq=1))
    env[-70] ^= 1  # inside the commitment: the signature no longer matches
    await a.send(F.Publish(envelope=bytes(env)))
    await a.expect_error("bad_signature", fatal=False)
    await a.send(F.Publish(envelope=b"\x01\x01short"))
    err = await a.expect(F.Error)
    assert not err.fatal and err.code in ("malformed", "too_large")


async def test_reader_cannot_publish(relay_url: str) -> None:
    space = Space.create(1, role=Role.reader)
    reader = space.members[0]
    r = await authed(relay_url, space, reader)
    await r.send(F.Publish(envelope=space.envelope(reader, seq=1)))
    await r.expect_error("read_only", fatal=False)
    await r.send(F.Subscribe(from_seq=0))
    assert (await r.expect(F.CaughtUp)).head_seq == 0


async def test_too_many_errors_close_the_connection(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(max_errors=3)
    url = url_of(relay)
    space = Space.create(1)
    a = await authed(url, space, space.members[0])
    for _ in range(2):
        await a.send(F.Publish(envelope=space.envelope(space.admin, seq=1)))
        await a.expect_error("wrong_sender", fatal=False)
    await a.send(F.Publish(envelope=space.envelope(space.admin, seq=1)))
    await a.expect_error("wrong_sender", fatal=False)
    await a.expect_error("too_many_errors", fatal=True)
    assert await a.wait_closed() == CloseCode.POLICY_VIOLATION


# --------------------------------------------------------------------------- quota


async def test_quota_exceeded_then_success_after_raising_or_making_room(
    relay_factory: RelayFactory,
) -> None:
    space = Space.create(1)
    alice = space.members[0]
    one = len(space.envelope(alice, seq=1, plaintext=b"q" * 200))
    relay = await relay_factory(space_quota_bytes=one * 3)
    url = url_of(relay)
    a = await authed(url, space, alice)
    for seq in (1, 2, 3):
        await a.send(F.Publish(envelope=space.envelope(alice, seq=seq, plaintext=b"q" * 200)))
        assert (await a.expect(F.Ack)).relay_seq == seq
    env4 = space.envelope(alice, seq=4, plaintext=b"q" * 200)
    await a.send(F.Publish(envelope=env4))
    err = await a.expect_error("quota_exceeded", fatal=False)
    assert "seq 4" in err.message
    assert await relay.store.head_seq(space.space_id) == 3
    # The operator raises the quota: the same envelope now goes through.
    relay.config.space_quota_bytes = one * 4
    await a.send(F.Publish(envelope=env4))
    assert await a.expect(F.Ack) == F.Ack(sender_seq=4, relay_seq=4, duplicate=False)
    env5 = space.envelope(alice, seq=5, plaintext=b"q" * 200)
    await a.send(F.Publish(envelope=env5))
    await a.expect_error("quota_exceeded", fatal=False)
    # Making room: the prefix that reached a snapshot is dropped.
    freed = await relay.store.drop_before(space.space_id, 3)
    assert freed == 2 * one
    await a.send(F.Publish(envelope=env5))
    assert (await a.expect(F.Ack)).relay_seq == 5
    b = await authed(url, space, space.admin)
    # A cursor below the retained log is told so (it restores from a snapshot), never skipped.
    await b.send(F.Subscribe(from_seq=0))
    assert (await b.expect(F.LogTruncated)).before_seq == 3
    await b.send(F.Subscribe(from_seq=2))
    delivers, _ = await b.collect_delivers(3)
    assert [d.relay_seq for d in delivers] == [3, 4, 5]


# --------------------------------------------------------------------------- hostile input


async def _bystander(url: str, space: Space) -> tuple[Client, Client]:
    """Two healthy clients of a space, subscribed, to check the relay keeps serving them."""
    pub = await authed(url, space, space.members[0])
    sub = await authed(url, space, space.admin)
    await sub.send(F.Subscribe(from_seq=0))
    await sub.expect(F.CaughtUp)
    return pub, sub


async def _still_serving(space: Space, pub: Client, sub: Client) -> None:
    env = space.envelope(space.members[0])
    await pub.send(F.Publish(envelope=env))
    assert not (await pub.expect(F.Ack)).duplicate
    assert (await sub.expect(F.Deliver)).envelope == env


async def test_oversized_frame_closes_only_that_connection(
    relay: RelayServer, relay_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    space = Space.create(2)
    pub, sub = await _bystander(relay_url, space)
    bad = await authed(relay_url, space, space.members[1])
    await bad.send_raw(b"\x04" + b"\0" * F.MAX_FRAME)
    assert await bad.wait_closed() == CloseCode.MESSAGE_TOO_BIG
    await _still_serving(space, pub, sub)
    await wait_for(lambda: "closed_oversized_frame" in caplog.text)


async def test_oversized_frame_before_auth(relay_url: str) -> None:
    space = Space.create(1)
    pub, sub = await _bystander(relay_url, space)
    bad = await Client.connect(relay_url)
    await bad.send_raw(b"\x01" + b"\0" * (F.MAX_FRAME + 10))
    assert await bad.wait_closed() == CloseCode.MESSAGE_TOO_BIG
    await _still_serving(space, pub, sub)


async def test_truncated_frame(relay_url: str) -> None:
    space = Space.create(2)
    pub, sub = await _bystander(relay_url, space)
    bad = await authed(relay_url, space, space.members[1])
    frame = F.encode_frame(F.Publish(envelope=space.envelope(space.members[1])))
    await bad.send_raw(frame[: len(frame) // 2])
    await bad.expect_error("malformed", fatal=True)
    assert await bad.wait_closed() == CloseCode.PROTOCOL_ERROR
    await _still_serving(space, pub, sub)


async def test_garbage_bytes(relay_url: str) -> None:
    space = Space.create(1)
    pub, sub = await _bystander(relay_url, space)
    bad = await Client.connect(relay_url)
    await bad.send_raw(b"\xff\x00 this is not a frame \x13\x37")
    await bad.expect_error("malformed", fatal=True)
    await bad.wait_closed()
    # Garbage after authentication too.
    bad2 = await authed(relay_url, space, space.admin)
    await bad2.send_raw(struct.pack(">BI", 0x04, 2**31) + b"xx")
    err = await bad2.expect(F.Error)
    assert err.fatal and err.code in ("malformed", "too_large")
    await bad2.wait_closed()
    await _still_serving(space, pub, sub)


async def test_text_frame(relay_url: str) -> None:
    space = Space.create(1)
    pub, sub = await _bystander(relay_url, space)
    bad = await authed(relay_url, space, space.admin)
    await bad.send_raw('{"hello": "relay"}')
    err = await bad.expect_error("malformed", fatal=True)
    assert "binary" in err.message
    assert await bad.wait_closed() == CloseCode.UNSUPPORTED_DATA
    await _still_serving(space, pub, sub)


async def test_unexpected_frames(relay_url: str) -> None:
    space = Space.create(1)
    c = await Client.connect(relay_url)
    await c.send(F.Subscribe(from_seq=0))  # before Hello
    await c.expect_error("unexpected_frame", fatal=True)
    a = await authed(relay_url, space, space.admin)
    await a.send(F.Hello(space_id=space.space_id, sign_pk=space.admin.public.sign_pk))
    await a.expect_error("unexpected_frame", fatal=False)


async def test_rate_limit_drops_then_closes(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(rate_msgs_per_s=0.5, rate_burst=4, max_rate_strikes=10)
    url = url_of(relay)
    space = Space.create(1)
    a = await authed(url, space, space.members[0])  # Hello + Auth used 2 of the 4 tokens
    await a.send(F.Subscribe(from_seq=0))
    assert (await a.expect(F.CaughtUp)).head_seq == 0
    await a.send(F.Subscribe(from_seq=0))
    assert (await a.expect(F.CaughtUp)).head_seq == 0
    # Bucket empty: the next message is dropped with a non-fatal error.
    await a.send(F.Subscribe(from_seq=0))
    await a.expect_error("rate_limited", fatal=False)
    # Sustained abuse: more than max_rate_strikes consecutive drops closes the connection.
    for _ in range(12):
        await a.send(F.Subscribe(from_seq=0))
    assert await a.wait_closed() == CloseCode.POLICY_VIOLATION
    assert a.ws.close_reason == "rate_limited"
