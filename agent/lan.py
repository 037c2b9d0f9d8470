"""The agent's LAN side: one listening port, mDNS discovery, one SpaceLan per space.

- Listens on `lan.port` (TCP, websocket) on every address; peers select the space by the
  discovery tag in their first frame (protocol/lan.py), so one port serves every space.
- Advertises each LAN-enabled space as its own service instance with a rotating keyed tag
  (re-published when the window or the epoch changes), and each open invite this device issued
  with an invite tag, so a joiner finds it without a relay.
- Browses for other agents; an advertisement whose tag is one of a space's current tags is
  handed to that space's SpaceLan, which dials it, authenticates and syncs (agent/peer_sync.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException

from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.lan_config import DeviceSettings, lan_killed, load_settings
from qmoi_sync.agent.peer_link import (
    HANDSHAKE_TIMEOUT_S,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    Refused,
    accept,
    recv_frame,
    refuse,
    ws_log,
)
from qmoi_sync.agent.peer_sync import PeerSession, SpaceLan, Target
from qmoi_sync.agent.status import LanStatus
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.identity import DeviceIdentity

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import Agent, SpaceRuntime
    from qmoi_sync.agent.lan_discovery import Discovery, Found

log = logging.getLogger("qmoi_sync.lan")

ROTATE_CHECK_S = 5.0
INVITE_REFRESH_S = 30.0


class LanService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.identity: DeviceIdentity = agent.identity
        self.settings: DeviceSettings = load_settings(agent.home.root)
        self.enabled = self.settings.lan.enabled and not lan_killed()
        self.spaces: dict[str, SpaceLan] = {}
        self.server: Server | None = None
        self.port: int | None = None
        self.discovery: Discovery | None = None
        self._advertised: dict[str, bytes] = {}  # space id -> tag in its current advertisement
        self._invites: dict[bytes, str] = {}  # invite tag -> space id
        self._tasks: list[asyncio.Task[None]] = []
        self._found: dict[str, Found] = {}
        self._invite_refresh = asyncio.Event()
        self.refused = 0  # incoming connections refused (any space)

    def enabled_for(self, space_id: str) -> bool:
        return self.enabled and self.settings.lan_enabled_for(space_id)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled:
            why = "QMOI_SYNC_LAN is off" if lan_killed() else "lan.enabled is false"
            log.info("LAN peers disabled (%s)", why)
            return
        self.server = await self._listen(self.settings.lan.port)
        # Imported here: zeroconf + ifaddr cost ~4 MB resident in an agent with LAN off.
        from qmoi_sync.agent.lan_discovery import Discovery

        self.discovery = Discovery(
            self.settings.lan.interfaces, on_found=self._on_found, on_lost=self._on_lost
        )
        await self.discovery.start()
        self._tasks.append(asyncio.create_task(self._rotate_loop()))
        self._tasks.append(asyncio.create_task(self._invite_loop()))
        log.info(
            "LAN peers: listening on port %d (interfaces: %s)",
            self.port,
            ", ".join(self.settings.lan.interfaces) or "all",
        )

    async def _listen(self, port: int) -> Server:
        kwargs = {
            "compression": None,
            "max_size": L.MAX_PEER_FRAME,
            "ping_interval": PING_INTERVAL_S,
            "ping_timeout": PING_TIMEOUT_S,
            "close_timeout": 2,
            "max_queue": 64,
            "logger": ws_log,
        }
        try:
            server = await serve(self._handle, None, port, **kwargs)  # type: ignore[arg-type]
        except OSError as exc:
            if port == 0 or exc.errno != errno.EADDRINUSE:
                raise
            log.warning("LAN port %d is taken; listening on an ephemeral port instead", port)
            server = await serve(self._handle, None, 0, **kwargs)  # type: ignore[arg-type]
        self.port = next(iter(server.sockets)).getsockname()[1]
        return server

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        for space in list(self.spaces.values()):
            await space.close()
        self.spaces.clear()
        if self.discovery is not None:
            await self.discovery.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def add_space(self, rt: SpaceRuntime) -> SpaceLan | None:
        space_id = rt.record.space_id
        if not self.enabled_for(space_id) or space_id in self.spaces:
            return self.spaces.get(space_id)
        space = SpaceLan(rt, self.identity.public.sign_pk)
        self.spaces[space_id] = space
        space.start()
        await self._advertise(space_id)
        for found in list(self._found.values()):
            self._match(found)
        self._invite_refresh.set()
        return space

    async def remove_space(self, space_id: str) -> None:
        space = self.spaces.pop(space_id, None)
        if space is not None:
            await space.close()
        self._advertised.pop(space_id, None)
        if self.discovery is not None:
            await self.discovery.withdraw(f"space:{space_id}")

    # -- advertising -----------------------------------------------------------------------------
    async def _advertise(self, space_id: str) -> None:
        space = self.spaces.get(space_id)
        if space is None or self.discovery is None or self.port is None:
            return
        tag = space.current_tag(space.lan_time()) if space.active else None
        if tag is None:
            if self._advertised.pop(space_id, None) is not None:
                await self.discovery.withdraw(f"space:{space_id}")
            return
        if self._advertised.get(space_id) == tag:
            return
        self._advertised[space_id] = tag
        await self.discovery.advertise(f"space:{space_id}", L.space_txt(tag), self.port)

    async def _rotate_loop(self) -> None:
        """Re-publish tags when the window turns or a space's epoch changes; re-match what was
        discovered (our set of accepted tags moves with the window)."""
        windows = self._windows()
        while True:
            await asyncio.sleep(ROTATE_CHECK_S)
            for space_id in list(self.spaces):
                await self._advertise(space_id)
            now_windows = self._windows()
            if now_windows != windows:
                # A window turned, or a space follows the relay's clock now (lan_time).
                windows = now_windows
                for found in list(self._found.values()):
                    self._match(found)

    def _windows(self) -> dict[str, int]:
        return {sid: L.tag_window(s.lan_time()) for sid, s in self.spaces.items()}

    def request_invite_refresh(self) -> None:
        self._invite_refresh.set()

    async def _invite_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._invite_refresh.wait(), INVITE_REFRESH_S)
            self._invite_refresh.clear()
            try:
                await self._refresh_invites()
            except Exception:
                log.exception("LAN: refreshing invite advertisements failed")

    async def _refresh_invites(self) -> None:
        """Advertise every open invite this device issued for a LAN-enabled space."""
        assert self.discovery is not None and self.port is not None
        now = wall()
        wanted: dict[bytes, str] = {}
        store = self.agent.store
        for space_id in list(self.spaces):
            # Read directly: the invites table is small and this is the only query we need.
            async with store.db.execute(
                "SELECT secret FROM invites WHERE space_id=? AND used_at IS NULL AND expires_at>?",
                (space_id, now),
            ) as cur:
                for (secret,) in await cur.fetchall():
                    wanted[L.invite_tag(bytes(secret))] = space_id
        for tag in set(self._invites) - set(wanted):
            await self.discovery.withdraw(f"invite:{tag.hex()}")
        for tag in set(wanted) - set(self._invites):
            await self.discovery.advertise(f"invite:{tag.hex()}", L.invite_txt(tag), self.port)
        self._invites = wanted

    # -- discovery ---------------------------------------------------------------------------------
    def _on_found(self, found: Found) -> None:
        if found.advert.kind != "space":
            return
        self._found[found.instance] = found
        self._match(found)

    def _match(self, found: Found) -> None:
        for space in self.spaces.values():
            if found.advert.tag in space.accepted_tags(space.lan_time()):
                space.found(Target(found.instance, found.addresses, found.port, found.advert.tag))
            elif found.instance in space.targets:
                space.lost(found.instance)

    def _on_lost(self, instance: str) -> None:
        self._found.pop(instance, None)
        for space in self.spaces.values():
            space.lost(instance)

    def resolve_tag(self, tag: bytes) -> SpaceLan | None:
        for space in self.spaces.values():
            if space.active and tag in space.accepted_tags(space.lan_time()):
                return space
        return None

    # -- incoming connections ------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        try:
            first = await recv_frame(ws, HANDSHAKE_TIMEOUT_S)
            if isinstance(first, L.PeerHello):
                space, conn = await accept(ws, first, self.identity, self.resolve_tag)
                assert isinstance(space, SpaceLan)
                await space.run_session(conn)
            elif isinstance(first, L.JoinAsk):
                await self._answer_join(ws, first)
            else:
                raise Refused(f"unexpected first frame {type(first).__name__}")
        except Refused as exc:
            self.refused += 1
            await refuse(ws, str(exc))
        except (ConnectionClosed, TimeoutError, OSError, WebSocketException) as exc:
            log.debug("LAN: incoming connection ended: %r", exc)

    async def _answer_join(self, ws: ServerConnection, ask: L.JoinAsk) -> None:
        space_id = self._invites.get(ask.invite_tag)
        rt = self.agent.spaces.get(space_id) if space_id else None
        if rt is None:
            raise Refused("unknown invite tag")
        reply = await rt.on_join_forward(0, ask.request)
        if reply is None:
            answer = L.JoinAnswer(ok=False, reason="invite_invalid: unknown invite")
        else:
            answer = L.JoinAnswer(ok=reply.accepted, reason=reply.reason, log=reply.log)
        await ws.send(L.encode_peer_frame(answer))
        with contextlib.suppress(TimeoutError, OSError, ConnectionClosed):
            await asyncio.wait_for(ws.close(), 2)
        if answer.ok:
            log.info("LAN: a device joined space %s over the LAN", rt.record.name)
            if rt.link is not None:
                rt.link.push_membership()
            self._invite_refresh.set()

    # -- status ------------------------------------------------------------------------------------
    def peers(self, space_id: str) -> dict[bytes, PeerSession]:
        """Connected LAN peers of a space."""
        space = self.spaces.get(space_id)
        if space is None:
            return {}
        return space.peer_status()


def path_fields(rt: SpaceRuntime, pk: bytes, lan_peers: dict[bytes, PeerSession]) -> dict[str, Any]:
    """`status` fields saying how this device reaches device ``pk`` of the space right now."""
    if pk == rt.agent.identity.public.sign_pk:
        return {}
    peer = lan_peers.get(pk)
    if peer is not None:
        chunks = peer.chunks.counters
        return {
            "path": "lan",
            "address": peer.conn.address,
            "rtt_ms": peer.conn.latency_ms,
            "lan_chunk_bytes_in": chunks.received_bytes,
            "lan_chunk_bytes_out": chunks.served_bytes,
        }
    link = rt.link
    if link is not None and link.state.connected:
        return {"path": "relay", "address": link.url, "rtt_ms": link.latency_ms}
    return {}


def lan_status(rt: SpaceRuntime) -> LanStatus:
    service = rt.agent.lan
    space = rt.lan
    if service is None or space is None:
        return LanStatus(enabled=False)
    st = space.stats
    return LanStatus(
        enabled=True,
        port=service.port,
        peers=len(space.peer_status()),
        received=st.received,
        sent=st.sent,
        resyncs=st.resyncs,
        refused=st.refused + service.refused,
        chunks_served=space.chunk_counters.served,
        chunk_bytes_served=space.chunk_counters.served_bytes,
        chunks_received=space.chunk_counters.received,
        chunk_bytes_received=space.chunk_counters.received_bytes,
    )
