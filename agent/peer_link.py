"""One LAN peer connection: the websocket, the mutual signed challenge, frame I/O.

Nothing of a space's content flows before both sides have proven a key of the space's
membership (protocol/lan.py has the transcript). The server proves itself first, so a client
reveals its own key only to a member; an announcement pointing at a device outside the
membership, or a peer failing the challenge, gets a close and nothing else.

Websocket settings: compression off (everything after the handshake is ciphertext), frames
limited to protocol.lan.MAX_PEER_FRAME, keepalive pings every PING_INTERVAL_S (their round trip
is the RTT `status` shows; a peer that stops answering is dropped after PING_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity

log = logging.getLogger("qmoi_sync.lan")
# websockets logs every connection at INFO; peers come and go, so only its warnings are kept.
ws_log = logging.getLogger("qmoi_sync.lan.ws")
ws_log.setLevel(logging.WARNING)

PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
# Websocket close codes: 1008 policy violation (refused), 4000+ application codes.
CLOSE_REFUSED = 1008
CLOSE_DUPLICATE = 4001
CLOSE_GONE = 4002

Socket = ServerConnection | ClientConnection


class Refused(Exception):
    """The peer failed authentication or broke the protocol; close without sending anything."""


class SpaceAuth(Protocol):
    """What the handshake needs from a space (agent/peer_sync.SpaceLan implements it)."""

    space_bytes: bytes

    def is_member(self, sign_pk: bytes) -> bool: ...

    def log_bytes(self) -> bytes: ...

    async def adopt_log(self, data: bytes) -> None: ...


@dataclass
class PeerConn:
    """An authenticated peer connection for one space."""

    ws: Socket
    peer_pk: bytes
    address: str
    outbound: bool
    tag: bytes
    handshake_rtt_ms: float | None = None

    async def recv(self) -> L.PeerFrame:
        return await recv_frame(self.ws, timeout=None)

    async def send(self, frame: L.PeerFrame) -> None:
        await self.ws.send(L.encode_peer_frame(frame))

    @property
    def latency_ms(self) -> float | None:
        """Round trip of the last keepalive ping (of the handshake until the first ping)."""
        lat = self.ws.latency
        return round(lat * 1000, 3) if lat else self.handshake_rtt_ms

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await asyncio.wait_for(self.ws.close(code, reason), 2)
        except (TimeoutError, OSError, ConnectionClosed):
            pass


async def recv_frame(ws: Socket, timeout: float | None = HANDSHAKE_TIMEOUT_S) -> L.PeerFrame:
    data = await asyncio.wait_for(ws.recv(), timeout) if timeout else await ws.recv()
    if isinstance(data, str):
        raise Refused("text frame")
    try:
        return L.decode_peer_frame(data)
    except ProtocolError as exc:
        raise Refused(f"malformed frame: {exc}") from exc


def address_of(ws: Socket) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _check_member(space: SpaceAuth, sign_pk: bytes, presented_log: bytes) -> None:
    """A key of the space's membership, possibly after adopting a presented log that extends
    ours (a device invited while we were away presents the log that added it)."""
    if space.is_member(sign_pk):
        return
    if presented_log:
        await space.adopt_log(presented_log)
        if space.is_member(sign_pk):
            return
    raise Refused("not a member of the space")


# -- client side -------------------------------------------------------------------------------


async def dial(
    url: str,
    identity: DeviceIdentity,
    space: SpaceAuth,
    tag: bytes,
) -> PeerConn:
    """Connect to a peer advertising ``tag`` for ``space`` and authenticate both ways.
    Raises Refused, OSError, TimeoutError or a websockets error."""
    ws = await connect(
        url,
        compression=None,
        max_size=L.MAX_PEER_FRAME,
        open_timeout=CONNECT_TIMEOUT_S,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        close_timeout=2,
        proxy=None,
        max_queue=64,
        logger=ws_log,
    )
    try:
        peer_pk, rtt = await _client_handshake(ws, identity, space, tag)
    except BaseException:
        await _abort(ws)
        raise
    return PeerConn(
        ws=ws,
        peer_pk=peer_pk,
        address=address_of(ws),
        outbound=True,
        tag=tag,
        handshake_rtt_ms=rtt,
    )


async def _client_handshake(
    ws: ClientConnection, identity: DeviceIdentity, space: SpaceAuth, tag: bytes
) -> tuple[bytes, float]:
    client_nonce = os.urandom(L.NONCE_LEN)
    sent = time.perf_counter()
    await ws.send(L.encode_peer_frame(L.PeerHello(tag=tag, client_nonce=client_nonce)))
    challenge = await recv_frame(ws)
    rtt = round((time.perf_counter() - sent) * 1000, 3)
    if not isinstance(challenge, L.PeerChallenge):
        raise Refused(f"expected a challenge, got {type(challenge).__name__}")
    if challenge.version != L.LAN_PROTO_VERSION:
        raise Refused(f"peer speaks LAN protocol {challenge.version}")
    server_pk = challenge.sign_pk
    if server_pk == identity.public.sign_pk:
        raise Refused("connected to ourselves")
    try:
        L.verify_peer_signature(
            server_pk,
            challenge.signature,
            L.server_auth_message(
                space.space_bytes, tag, client_nonce, challenge.server_nonce, server_pk
            ),
        )
    except ProtocolError as exc:
        raise Refused(f"server failed the challenge: {exc}") from exc
    # Only a member may learn who we are (and get our log): the server's key must be in ours.
    if not space.is_member(server_pk):
        raise Refused("server is not a member of the space")
    signature = identity.sign(
        L.client_auth_message(
            space.space_bytes,
            tag,
            client_nonce,
            challenge.server_nonce,
            server_pk,
            identity.public.sign_pk,
        )
    )
    await ws.send(
        L.encode_peer_frame(
            L.PeerAuth(sign_pk=identity.public.sign_pk, signature=signature, log=space.log_bytes())
        )
    )
    welcome = await recv_frame(ws)
    if not isinstance(welcome, L.PeerWelcome):
        raise Refused(f"expected welcome, got {type(welcome).__name__}")
    if welcome.log:
        await space.adopt_log(welcome.log)
    return server_pk, rtt


# -- server side -------------------------------------------------------------------------------

ResolveTag = Callable[[bytes], SpaceAuth | None]


async def accept(
    ws: ServerConnection,
    hello: L.PeerHello,
    identity: DeviceIdentity,
    resolve: ResolveTag,
) -> tuple[SpaceAuth, PeerConn]:
    """Server side of the handshake after a PeerHello. Raises Refused."""
    if hello.version != L.LAN_PROTO_VERSION:
        raise Refused(f"client speaks LAN protocol {hello.version}")
    space = resolve(hello.tag)
    if space is None:
        raise Refused("unknown tag")
    server_nonce = os.urandom(L.NONCE_LEN)
    me = identity.public.sign_pk
    sig = identity.sign(
        L.server_auth_message(space.space_bytes, hello.tag, hello.client_nonce, server_nonce, me)
    )
    await ws.send(
        L.encode_peer_frame(L.PeerChallenge(sign_pk=me, server_nonce=server_nonce, signature=sig))
    )
    sent = time.perf_counter()
    auth = await recv_frame(ws)
    rtt = round((time.perf_counter() - sent) * 1000, 3)
    if not isinstance(auth, L.PeerAuth):
        raise Refused(f"expected auth, got {type(auth).__name__}")
    if auth.sign_pk == me:
        raise Refused("a client with our own key")
    try:
        L.verify_peer_signature(
            auth.sign_pk,
            auth.signature,
            L.client_auth_message(
                space.space_bytes, hello.tag, hello.client_nonce, server_nonce, me, auth.sign_pk
            ),
        )
    except ProtocolError as exc:
        raise Refused(f"client failed the challenge: {exc}") from exc
    await _check_member(space, auth.sign_pk, auth.log)
    await ws.send(L.encode_peer_frame(L.PeerWelcome(log=space.log_bytes())))
    conn = PeerConn(
        ws=ws,
        peer_pk=auth.sign_pk,
        address=address_of(ws),
        outbound=False,
        tag=hello.tag,
        handshake_rtt_ms=rtt,
    )
    return space, conn


async def refuse(ws: Socket, why: str) -> None:
    """Close a connection that failed the handshake: no reason text beyond a generic word."""
    log.info("LAN peer %s refused: %s", address_of(ws), why)
    await _abort(ws, CLOSE_REFUSED, "refused")


async def _abort(ws: Socket, code: int = CLOSE_REFUSED, reason: str = "") -> None:
    try:
        await asyncio.wait_for(ws.close(code, reason), 2)
    except (TimeoutError, OSError, ConnectionClosed):
        pass


JoinHandler = Callable[[L.JoinAsk], Awaitable[L.JoinAnswer | None]]
