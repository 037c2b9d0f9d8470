"""Bad input on the relay's wire, against a real relay process.

Each test opens a legitimate publisher + subscriber of a space *before* the attack, attacks on a
separate connection, then proves: the bad input was refused with a readable error (stable code,
plain message), nothing was stored, the relay process is alive and the legitimate clients still
publish and receive.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from harness import Relay
from security.sec_helpers import LegitPair, Space, Wire, assert_readable, resign
from websockets.frames import CloseCode

from qmoi_sync.protocol import _codec as c
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import MAX_ENVELOPE
from qmoi_sync.protocol.identity import SIGNATURE_LEN, DeviceIdentity
from qmoi_sync.protocol.membership import MembershipLog, Role

pytestmark = pytest.mark.timeout(60)

# Byte offsets in an envelope (protocol/envelope.py): version 0, suite 1, ..., ct_len 78, ct 82.
OFF_VERSION = 0
OFF_SUITE = 1
OFF_CIPHERTEXT = 82


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    r = Relay(tmp_path_factory.mktemp("wire") / "relay-data").start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
async def space() -> Space:
    # admin + two legitimate members (the pair) + one more member who turns hostile.
    return Space.create(n_members=3)


@pytest.fixture
async def pair(relay: Relay, space: Space) -> AsyncIterator[LegitPair]:
    p = await LegitPair.open(relay, space)
    try:
        yield p
    finally:
        await p.close()


async def attacker(relay: Relay, space: Space, dev: DeviceIdentity | None = None) -> Wire:
    """An authenticated connection of the space's third member."""
    w = await Wire.open(relay.url)
    welcome = await w.auth(dev or space.members[2], space.space_id)
    assert isinstance(welcome, F.Welcome), welcome
    return w


async def assert_nothing_stored(pair: LegitPair) -> None:
    await pair.check()
    assert await pair.stored() == pair.published
    assert pair.seen == []


# -- frames that are not frames ---------------------------------------------------------------
async def test_oversized_frame_closes_only_that_connection(relay: Relay, pair: LegitPair) -> None:
    w = await attacker(relay, pair.space)
    await w.send_raw(b"\x04" + bytes(F.MAX_FRAME))  # one byte over the limit
    code, reason = await w.wait_closed()
    assert code == CloseCode.MESSAGE_TOO_BIG, (code, reason)
    assert "limit" in reason or "too big" in reason.lower(), reason
    await assert_nothing_stored(pair)


async def test_oversized_envelope_inside_a_frame(relay: Relay, pair: LegitPair) -> None:
    # The frame fits in MAX_FRAME but its envelope blob is over MAX_ENVELOPE (encode_frame would
    # refuse to build it, so it is framed by hand).
    w = await attacker(relay, pair.space)
    await w.send_raw(b"\x04" + c.u32(MAX_ENVELOPE + 1) + bytes(MAX_ENVELOPE + 1))
    err = await w.expect_error("too_large", fatal=True)
    assert str(MAX_ENVELOPE) in err.message
    code, _ = await w.wait_closed()
    assert code == CloseCode.PROTOCOL_ERROR
    await assert_nothing_stored(pair)


@pytest.mark.parametrize("when", ["before_auth", "after_auth"])
async def test_truncated_frame(relay: Relay, pair: LegitPair, when: str) -> None:
    space = pair.space
    if when == "before_auth":
        w = await Wire.open(relay.url)
        hello = F.encode_frame(F.Hello(space.space_id, space.members[2].public.sign_pk))
        await w.send_raw(hello[:20])
    else:
        w = await attacker(relay, space)
        full = F.encode_frame(F.Publish(space.seal(space.members[2])))
        await w.send_raw(full[: len(full) // 2])
    err = await w.expect_error("malformed", fatal=True)
    assert "undecodable frame" in err.message and "truncated" in err.message.lower(), err
    code, _ = await w.wait_closed()
    assert code == CloseCode.PROTOCOL_ERROR
    await assert_nothing_stored(pair)


@pytest.mark.parametrize("when", ["before_auth", "after_auth"])
async def test_garbage_bytes(relay: Relay, pair: LegitPair, when: str) -> None:
    w = await Wire.open(relay.url) if when == "before_auth" else await attacker(relay, pair.space)
    await w.send_raw(b"\x42" + os.urandom(511))
    err = await w.expect_error("malformed", fatal=True)
    assert "unknown frame type 0x42" in err.message, err
    code, _ = await w.wait_closed()
    assert code == CloseCode.PROTOCOL_ERROR
    await assert_nothing_stored(pair)


async def test_text_frame(relay: Relay, pair: LegitPair) -> None:
    w = await attacker(relay, pair.space)
    await w.send_raw('{"type": "publish"}')
    err = await w.expect_error("malformed", fatal=True)
    assert "text frames are not accepted" in err.message, err
    code, _ = await w.wait_closed()
    assert code == CloseCode.UNSUPPORTED_DATA
    await assert_nothing_stored(pair)


async def test_publish_before_auth(relay: Relay, pair: LegitPair) -> None:
    w = await Wire.open(relay.url)
    await w.send(F.Publish(pair.space.seal(pair.space.members[2])))
    err = await w.expect_error("unexpected_frame", fatal=True)
    assert "expected Hello" in err.message
    await w.wait_closed()
    await assert_nothing_stored(pair)


# -- envelopes that do not verify -------------------------------------------------------------
async def test_tampered_ciphertext_is_refused_by_signature(relay: Relay, pair: LegitPair) -> None:
    space = pair.space
    w = await attacker(relay, space)
    env = bytearray(space.seal(space.members[2], b"original text"))
    env[OFF_CIPHERTEXT + 3] ^= 0x01
    err = await w.publish(bytes(env))
    assert isinstance(err, F.Error) and err.code == "bad_signature" and not err.fatal, err
    await pair.check()
    # The connection stays usable for well-formed envelopes (a non-fatal refusal).
    good = space.seal(space.members[2], b"a good one")
    ack = await w.publish(good)
    assert isinstance(ack, F.Ack) and not ack.duplicate, ack
    await pair.check()
    assert bytes(env) not in await pair.stored()
    assert pair.seen == [good]


@pytest.mark.parametrize("how", ["other_key", "random_bytes", "zeroed"])
async def test_wrong_signature(relay: Relay, pair: LegitPair, how: str) -> None:
    space = pair.space
    w = await attacker(relay, space)
    env = space.seal(space.members[2])
    body = env[:-SIGNATURE_LEN]
    sig = {
        "other_key": DeviceIdentity.generate().sign(body),
        "random_bytes": os.urandom(SIGNATURE_LEN),
        "zeroed": bytes(SIGNATURE_LEN),
    }[how]
    err = await w.publish(body + sig)
    assert isinstance(err, F.Error) and err.code == "bad_signature" and not err.fatal, err
    await assert_nothing_stored(pair)


async def test_envelope_of_another_member_is_refused(relay: Relay, pair: LegitPair) -> None:
    # Validly signed by member 1, published on member 2's connection: a member may only publish
    # its own envelopes (or it could replay others' under its own rate limits).
    space = pair.space
    w = await attacker(relay, space)
    err = await w.publish(space.seal(space.members[1]))
    assert isinstance(err, F.Error) and err.code == "wrong_sender" and not err.fatal, err
    await assert_nothing_stored(pair)


@pytest.mark.parametrize(("offset", "value"), [(OFF_VERSION, 2), (OFF_SUITE, 7), (OFF_SUITE, 0)])
async def test_unknown_version_or_suite(
    relay: Relay, pair: LegitPair, offset: int, value: int
) -> None:
    space = pair.space
    dev = space.members[2]
    w = await attacker(relay, space)
    env = bytearray(space.seal(dev))
    env[offset] = value
    err = await w.publish(resign(dev, bytes(env)))  # correctly signed: only the suite is wrong
    assert isinstance(err, F.Error) and err.code == "unknown_suite" and not err.fatal, err
    assert "not supported" in err.message
    await assert_nothing_stored(pair)


async def test_envelope_moved_to_another_space(relay: Relay, pair: LegitPair) -> None:
    # One device in two spaces X and Y; a valid envelope of X published on its Y connection.
    dev = pair.space.members[2]
    other = Space.create(n_members=1, extra=(dev,))
    setup = await Wire.open(relay.url)  # register X at the relay
    assert isinstance(await setup.auth(other.admin, other.space_id, other.log_bytes), F.Welcome)
    w = await attacker(relay, pair.space, dev)
    err = await w.publish(other.seal(dev, b"meant for X"))
    assert isinstance(err, F.Error) and err.code == "wrong_space" and not err.fatal, err
    await assert_nothing_stored(pair)
    assert await setup.read_log() == [], "the moved envelope must not land in its own space either"
    await setup.close()


# -- replays ----------------------------------------------------------------------------------
async def test_replayed_sequence_numbers(relay: Relay, pair: LegitPair) -> None:
    space = pair.space
    dev = space.members[2]
    w = await attacker(relay, space)
    env1 = space.seal(dev, b"one", seq=1)
    first = await w.publish(env1)
    assert isinstance(first, F.Ack) and not first.duplicate, first
    again = await w.publish(env1)
    assert isinstance(again, F.Ack), again
    assert again.duplicate and again.relay_seq == first.relay_seq, again

    env5 = space.seal(dev, b"five", seq=5)
    ack5 = await w.publish(env5)
    assert isinstance(ack5, F.Ack) and not ack5.duplicate, ack5
    # A seq below the sender's highest that was never stored is a late envelope (its first
    # publish was rate-limited or lost): stored once (relay/store.py); again, a duplicate.
    env3 = space.seal(dev, b"three (older than five)", seq=3)
    ack3 = await w.publish(env3)
    assert isinstance(ack3, F.Ack) and not ack3.duplicate, f"a late seq is stored: {ack3!r}"
    again3 = await w.publish(env3)
    assert isinstance(again3, F.Ack) and again3.duplicate, again3
    assert again3.relay_seq == ack3.relay_seq, again3

    # Replays on a *new* connection are caught too (the relay persists what it stored).
    w2 = await attacker(relay, space)
    again2 = await w2.publish(env1)
    assert isinstance(again2, F.Ack) and again2.duplicate, again2

    await pair.check()
    assert pair.seen == [env1, env5, env3], "the live subscriber gets each envelope exactly once"
    assert await pair.stored() == [env1, env5, env3, *pair.published]


# -- authentication ---------------------------------------------------------------------------
@pytest.mark.parametrize("offered", ["no_log", "real_log", "forged_log"])
async def test_auth_with_a_key_not_in_the_membership(
    relay: Relay, pair: LegitPair, offered: str
) -> None:
    space = pair.space
    outsider = DeviceIdentity.generate()
    log = b""
    if offered == "real_log":
        log = space.log_bytes
    elif offered == "forged_log":
        # A self-made genesis for the same space id, naming the outsider as its admin.
        forged, _ = MembershipLog.create(outsider, now=time.time(), space_id=space.space_id)
        log = forged.to_bytes()
    w = await Wire.open(relay.url)
    res = await w.auth(outsider, space.space_id, log)
    assert isinstance(res, F.Error) and res.code == "not_a_member" and res.fatal, res
    await w.wait_closed()
    await assert_nothing_stored(pair)
    # The relay's membership did not change: the real members still authenticate.
    w2 = await attacker(relay, space)
    await w2.close()


@pytest.mark.parametrize("how", ["random", "other_key", "reused_from_another_connection"])
async def test_auth_with_a_bad_signature(relay: Relay, pair: LegitPair, how: str) -> None:
    space = pair.space
    dev = space.members[2]
    pk = dev.public.sign_pk
    w = await Wire.open(relay.url)
    await w.send(F.Hello(space.space_id, pk))
    ch = await w.recv()
    assert isinstance(ch, F.Challenge)
    msg = F.auth_message(ch.nonce, space.space_id, pk)
    if how == "random":
        sig = os.urandom(SIGNATURE_LEN)
    elif how == "other_key":
        sig = DeviceIdentity.generate().sign(msg)
    else:
        # A genuine signature captured from another connection (another nonce).
        w0 = await Wire.open(relay.url)
        await w0.send(F.Hello(space.space_id, pk))
        ch0 = await w0.recv()
        assert isinstance(ch0, F.Challenge) and ch0.nonce != ch.nonce
        sig = dev.sign(F.auth_message(ch0.nonce, space.space_id, pk))
        await w0.close()
    await w.send(F.Auth(signature=sig))
    err = await w.expect_error("bad_signature", fatal=True)
    assert "challenge signature" in err.message
    await w.wait_closed()
    await assert_nothing_stored(pair)


async def test_unsupported_protocol_version(relay: Relay, pair: LegitPair) -> None:
    w = await Wire.open(relay.url)
    await w.send(F.Hello(pair.space.space_id, pair.space.members[2].public.sign_pk, 99))
    err = await w.expect_error("unsupported_version", fatal=True)
    assert "99" in err.message
    await w.wait_closed()
    await assert_nothing_stored(pair)


async def test_garbage_membership_log_in_auth(relay: Relay, pair: LegitPair) -> None:
    space = pair.space
    w = await Wire.open(relay.url)
    res = await w.auth(space.members[2], space.space_id, b"\x01" + os.urandom(500))
    assert isinstance(res, F.Error) and res.fatal, res
    assert_readable(res)
    assert "membership log refused" in res.message, res
    await w.wait_closed()
    await assert_nothing_stored(pair)


async def test_reader_may_not_publish(relay: Relay, pair: LegitPair) -> None:
    space = pair.space
    reader = DeviceIdentity.generate()
    space.add(reader, Role.reader)
    admin = await Wire.open(relay.url)  # the relay learns the longer log from the admin
    assert isinstance(await admin.auth(space.admin, space.space_id, space.log_bytes), F.Welcome)
    w = await attacker(relay, space, reader)
    err = await w.publish(space.seal(reader, b"a reader's write"))
    assert isinstance(err, F.Error) and err.code == "read_only" and not err.fatal, err
    await assert_nothing_stored(pair)


def test_relay_log_has_no_traceback(relay: Relay) -> None:
    """Runs last in this module: every refusal above was handled, none crashed a handler."""
    assert relay.proc is not None and relay.proc.poll() is None
    assert "Traceback" not in relay.log(), relay.log()[-4000:]
