"""A real relay process under fuzzed websocket frames, before and after authentication.

The relay (`qmoi-sync relay serve`) is started once for the module with one registered space.
Each example opens a websocket and sends:

* pre-auth: one fuzzed first frame (random bytes, mutated client frames, or a text frame);
* post-auth: after a real Hello / Challenge / Auth as a member, 1-3 fuzzed frames (mutations
  of valid Publish / Subscribe / PushMembership / chunk / truncate / join-reply frames), then a
  ListChunks whose ChunkList answer (or the connection's close) ends the example.

The contract: everything the relay sends is a binary frame that decodes; an Error frame has a
code and a message; a close is a protocol / policy / data close (never 1011, an internal error);
after all examples the relay is still up, serves a healthy client, and its log has no traceback.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest
from fuzz.fuzzlib import examples, mutated
from harness import Relay
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog, Role

ADMIN = DeviceIdentity.from_private_bytes(bytes(range(1, 65)))
MEMBER = DeviceIdentity.from_private_bytes(bytes(range(65, 129)))
_LOG, _S0 = MembershipLog.create(ADMIN, 1000)
_LOG.add_member(ADMIN, MEMBER.public, Role.member, {0: _S0}, 1001)
SPACE = _LOG.space_id
LOG_BYTES = _LOG.to_bytes()
MSG_KEY = derive_epoch_keys(SPACE, 0, _S0).msg

#: Close codes a misbehaving client may get: normal, going away, protocol error, unsupported
#: data, policy violation, too big, try again later. Never 1011 (internal error).
ALLOWED_CLOSE = {1000, 1001, 1002, 1003, 1005, 1006, 1008, 1009, 1013}
TIMEOUT = 60.0  # generous: the CI machine is 2 loaded cores


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    root = tmp_path_factory.mktemp("fuzzrelay")
    r = Relay(root / "relay-data").start(timeout=90)
    try:
        with _auth(r.url, ADMIN, LOG_BYTES):  # registers the space
            pass
        yield r
    finally:
        r.stop()


def _recv_frame(ws: ClientConnection, timeout: float = TIMEOUT) -> F.Frame:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, bytes), "relay sent a text frame"
    frame = F.decode_frame(data)  # everything the relay sends must decode
    if isinstance(frame, F.Error):
        assert frame.code and frame.message, frame
    return frame


@contextlib.contextmanager
def _auth(url: str, dev: DeviceIdentity, log: bytes = b"") -> Iterator[ClientConnection]:
    """An authenticated connection (Welcome received)."""
    with connect(url, compression=None, max_size=None, open_timeout=TIMEOUT) as ws:
        ws.send(F.encode_frame(F.Hello(SPACE, dev.public.sign_pk, F.PROTO_VERSION)))
        while not isinstance(ch := _recv_frame(ws), F.Challenge):
            pass
        sig = dev.sign(F.auth_message(ch.nonce, SPACE, dev.public.sign_pk))
        ws.send(F.encode_frame(F.Auth(sig, log)))
        while not isinstance(frame := _recv_frame(ws), F.Welcome):
            assert isinstance(frame, F.Presence), frame
        yield ws


def _check_close(exc: ConnectionClosed) -> None:
    rcvd = exc.rcvd
    if rcvd is not None:
        assert rcvd.code in ALLOWED_CLOSE, f"relay closed with {rcvd.code} {rcvd.reason}"


def _seq() -> int:
    return time.time_ns() // 1000


def _client_frames() -> list[bytes]:
    env = seal(MEMBER, SPACE, 0, MSG_KEY, _seq(), b"payload")
    frames: list[F.Frame] = [
        F.Hello(SPACE, MEMBER.public.sign_pk, F.PROTO_VERSION),
        F.Auth(b"\x00" * 64, LOG_BYTES),
        F.Publish(env),
        F.Subscribe(0),
        F.PushMembership(LOG_BYTES),
        F.JoinRequest(SPACE, b"i" * 16, b"request"),
        F.JoinReply(1, True, "ok", LOG_BYTES),
        F.PutChunk(os.urandom(32), b"x" * 100),
        F.GetChunk(b"c" * 32),
        F.Truncate(1),
        F.ListChunks(bytes(32)),
        F.DropChunks(86400, (b"a" * 32,)),
    ]
    return [F.encode_frame(f) for f in frames]


_FRAMES = _client_frames()
_FUZZ_FRAME = st.one_of(st.binary(max_size=300), mutated(_FRAMES), mutated(_FRAMES))


@examples(50)
@given(first=st.one_of(_FUZZ_FRAME, st.text(max_size=50)))
def test_first_frame(relay: Relay, first: bytes | str) -> None:
    with connect(relay.url, compression=None, max_size=None, open_timeout=TIMEOUT) as ws:
        try:
            ws.send(first)
            expect_join = False
            if isinstance(first, bytes):
                try:
                    expect_join = isinstance(F.decode_frame(first), F.JoinRequest)
                except ProtocolError:
                    pass
            # A JoinRequest legitimately waits for an admin: read only what comes at once.
            deadline = time.monotonic() + (1.0 if expect_join else TIMEOUT)
            while (left := deadline - time.monotonic()) > 0:
                try:
                    frame = _recv_frame(ws, timeout=left)
                except TimeoutError:
                    assert expect_join, "the relay neither answered nor closed"
                    return
                if isinstance(frame, F.Challenge):
                    return  # a well-formed Hello: the handshake goes on
        except ConnectionClosed as exc:
            _check_close(exc)


@examples(60)
@given(frames=st.lists(_FUZZ_FRAME, min_size=1, max_size=3))
def test_frames_after_auth(relay: Relay, frames: list[bytes]) -> None:
    with _auth(relay.url, MEMBER) as ws:
        try:
            for data in frames:
                ws.send(data)
            ws.send(F.encode_frame(F.ListChunks(bytes(32))))
            while not isinstance(_recv_frame(ws), F.ChunkList):
                pass
        except ConnectionClosed as exc:
            _check_close(exc)


def test_relay_survives_and_serves(relay: Relay) -> None:
    """Runs after the fuzz tests of this module (file order): the relay is up, serves a
    healthy member end to end, and logged no traceback or internal error."""
    assert relay.proc is not None and relay.proc.poll() is None
    with _auth(relay.url, MEMBER) as ws:
        seq = _seq()
        ws.send(F.encode_frame(F.Publish(seal(MEMBER, SPACE, 0, MSG_KEY, seq, b"ok"))))
        while not isinstance(frame := _recv_frame(ws), F.Ack):
            pass
        assert frame.sender_seq == seq and not frame.duplicate
    log = relay.log()
    for bad in ("Traceback", "handler failed", "task failed", "internal_error"):
        assert bad not in log, f"relay log has {bad!r}:\n{log[-3000:]}"
