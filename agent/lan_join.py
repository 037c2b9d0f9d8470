"""Joining a space over the LAN (joiner side), and choosing between the relay and the LAN.

The inviting admin's agent advertises every open invite it issued under an invite tag keyed by
the invite's secret (protocol/lan.py). The joiner browses for that tag, connects, sends the
same join request bytes it would send through the relay (`JoinAsk`), and gets the admin's
answer (`JoinAnswer`: the membership log that adds it, or the reason for a refusal). The admin
checks the request exactly as on the relay path (membership_ops.answer_join). Nothing but the
token's holder can recognize the advertisement.

With an invite that names a relay, both paths are tried at once and the first acceptance wins
(the invite is single use: the admin refuses the second copy, which is then ignored).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from qmoi_sync.agent.home import Home, UserError
from qmoi_sync.agent.lan_config import lan_killed, load_settings
from qmoi_sync.agent.lan_discovery import Discovery, Found
from qmoi_sync.agent.membership_ops import Joined, join_via_relay, local_expiry_note
from qmoi_sync.agent.peer_link import CONNECT_TIMEOUT_S, Refused, recv_frame, ws_log
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.errors import InviteError, ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.invite import Invite, build_join_request, decode_invite
from qmoi_sync.protocol.membership import MembershipLog, Role

log = logging.getLogger("qmoi_sync.lan")

#: How long the admin may take to answer once connected (it may be busy).
ANSWER_TIMEOUT_S = 30.0


async def join_via_lan(
    identity: DeviceIdentity,
    device_name: str,
    invite: Invite,
    timeout: float,
    interfaces: list[str],
) -> Joined:
    tag = L.invite_tag(invite.secret)
    request = build_join_request(invite, identity.public, device_name)
    candidates: asyncio.Queue[Found] = asyncio.Queue()

    def on_found(found: Found) -> None:
        if found.advert.kind == "invite" and hmac.compare_digest(found.advert.tag, tag):
            candidates.put_nowait(found)

    discovery = Discovery(interfaces, on_found=on_found)
    await discovery.start()
    last_error = "no device advertising this invite was found on the LAN"
    try:
        async with asyncio.timeout(timeout):
            while True:
                found = await candidates.get()
                for address in found.addresses:
                    try:
                        answer = await _ask(address, found.port, tag, request)
                    except (OSError, TimeoutError, WebSocketException, Refused) as exc:
                        last_error = f"{address}: {exc}"
                        log.info("LAN join: %s did not answer: %s", address, exc)
                        continue
                    return _accept(answer, invite, identity)
    except TimeoutError as exc:
        raise UserError(f"LAN join failed within {timeout:.0f}s: {last_error}") from exc
    finally:
        await discovery.close()


async def _ask(address: str, port: int, tag: bytes, request: bytes) -> L.JoinAnswer:
    async with connect(
        f"ws://{address}:{port}/",
        compression=None,
        max_size=L.MAX_PEER_FRAME,
        open_timeout=CONNECT_TIMEOUT_S,
        proxy=None,
        logger=ws_log,
    ) as ws:
        await ws.send(L.encode_peer_frame(L.JoinAsk(invite_tag=tag, request=request)))
        answer = await recv_frame(ws, ANSWER_TIMEOUT_S)
    if not isinstance(answer, L.JoinAnswer):
        raise Refused(f"expected a join answer, got {type(answer).__name__}")
    return answer


def _accept(answer: L.JoinAnswer, invite: Invite, identity: DeviceIdentity) -> Joined:
    """The same checks as the relay path (membership_ops.join_via_relay)."""
    if not answer.ok:
        raise UserError(f"join refused: {answer.reason}{local_expiry_note(invite.expires_at)}")
    try:
        mlog = MembershipLog.from_bytes(answer.log, expected_space_id=invite.space_id)
    except ProtocolError as exc:
        raise UserError(f"the membership log we received is invalid: {exc}") from exc
    if mlog.role_of(invite.inviter) is not Role.admin:
        raise UserError("the membership log does not list the inviter as an admin")
    if not mlog.is_member(identity.public.sign_pk):
        raise UserError("the membership log does not include this device")
    return Joined(invite=invite, log=mlog)


async def join_any(
    home: Home, identity: DeviceIdentity, device_name: str, token: str, timeout: float
) -> Joined:
    """Join through the invite's relay and/or the LAN, whichever answers first."""
    try:
        invite = decode_invite(token)
    except InviteError as exc:
        raise UserError(f"cannot use this invite: {exc}") from exc
    # No refusal on this device's clock: the admin's decides (see membership_ops.join_via_relay).
    settings = load_settings(home.root)
    lan = settings.lan.enabled and not lan_killed()
    attempts: list[Coroutine[Any, Any, Joined]] = []
    if invite.relay_url:
        attempts.append(join_via_relay(identity, device_name, token, timeout))
    if lan:
        attempts.append(
            join_via_lan(identity, device_name, invite, timeout, settings.lan.interfaces)
        )
    if not attempts:
        raise UserError(
            "this invite names no relay and LAN peers are disabled on this device "
            "(qmoi-sync config set lan.enabled true)"
        )
    if len(attempts) == 1:
        return await attempts[0]
    tasks = [asyncio.create_task(a) for a in attempts]
    errors: list[UserError] = []
    try:
        for next_done in asyncio.as_completed(tasks):
            try:
                return await next_done
            except UserError as exc:
                errors.append(exc)
    finally:
        await cancel_and_wait(*tasks)
    raise UserError("; ".join(str(e) for e in errors))
