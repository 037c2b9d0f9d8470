"""Creating spaces, issuing invites, answering join requests (admin side) and joining (joiner
side). Everything here is a short, explicit step of the membership protocol in protocol/."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel
from websockets.asyncio.client import connect

from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.store import InviteRecord, SpaceRecord, Store
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.errors import InviteError, ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.invite import (
    Invite,
    build_join_request,
    decode_invite,
    invite_id,
    parse_join_request,
    verify_join_proof,
)
from qmoi_sync.protocol.membership import MembershipLog, Role

log = logging.getLogger("qmoi_sync.membership")

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def local_expiry_note(expires_at: float) -> str:
    """A note for a failed join when this device's own clock says the invite expired ("" if
    not): the joiner does not refuse on its own clock, but a refusal or silence is then
    likely explained by it."""
    now = wall()
    if now <= expires_at:
        return ""
    return f" (note: {invite_expired_message(expires_at, now)})"


def invite_expired_message(expires_at: float, now: float, whose: str = "this device's") -> str:
    """Why an invite counts as expired, with both times: a clock that is wrong makes good
    invites look expired, and the times show it."""

    def utc(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    return (
        f"this invite expired at {utc(expires_at)} and {whose} clock says {utc(now)}; "
        "ask for a new invite (or, if this clock is wrong, correct it)"
    )


def check_relay_url(url: str, insecure: bool) -> str:
    """`wss://` everywhere; `ws://` only to loopback or with an explicit --insecure."""
    parsed = urlparse(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        raise UserError(f"relay URL must look like wss://host:port (got {url!r})")
    if parsed.scheme == "ws" and not insecure:
        host = parsed.hostname
        if host not in LOOPBACK_HOSTS and not host.startswith("127."):
            raise UserError(
                f"refusing unencrypted ws:// to {host}: use wss:// (or --insecure if you must)"
            )
    return url


def check_folder(folder: Path, home: Path, existing: list[SpaceRecord]) -> Path:
    folder = folder.expanduser().resolve()
    if folder == home or home in folder.parents or folder in home.parents:
        raise UserError(f"{folder} overlaps the device home {home}; pick another folder")
    for rec in existing:
        other = rec.folder
        if folder == other or other in folder.parents or folder in other.parents:
            raise UserError(f"{folder} overlaps the folder of space {rec.name!r} ({other})")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def create_space(
    store: Store,
    identity: DeviceIdentity,
    home: Path,
    name: str,
    folder: Path,
    relay_url: str | None,
    insecure: bool,
) -> SpaceRecord:
    spaces = await store.spaces()
    if any(s.name == name for s in spaces):
        raise UserError(f"a space named {name!r} already exists on this device")
    if relay_url:
        check_relay_url(relay_url, insecure)
    folder = check_folder(folder, home, spaces)
    mlog, _secret = MembershipLog.create(identity, wall())
    record = SpaceRecord(
        space_id=mlog.space_id.hex(),
        name=name,
        folder=folder,
        relay_url=relay_url,
        insecure=insecure,
        created_at=wall(),
        seeded=True,
        paused=False,
    )
    async with store.transaction():
        await store.add_space(record)
        await store.save_membership(record.space_id, mlog.to_bytes())
    return record


async def create_invite(
    store: Store,
    identity: DeviceIdentity,
    mlog: MembershipLog,
    record: SpaceRecord,
    role: str,
    expires_s: int,
) -> str:
    if mlog.role_of(identity.public.sign_pk) is not Role.admin:
        raise UserError("only an admin device of this space can invite")
    secret = os.urandom(32)
    expires_at = int(wall() + expires_s)
    invite = Invite(
        space_id=mlog.space_id,
        relay_url=record.relay_url,
        inviter=identity.public.sign_pk,
        secret=secret,
        expires_at=expires_at,
        role=Role(role),
        space_name=record.name.encode()[:128].decode("utf-8", "ignore"),
    )
    async with store.transaction():
        await store.add_invite(
            InviteRecord(
                space_id=record.space_id,
                invite_id=invite_id(secret),
                secret=secret,
                role=role,
                expires_at=expires_at,
                used_at=None,
            )
        )
    return invite.encode()


async def answer_join(
    store: Store,
    identity: DeviceIdentity,
    mlog: MembershipLog,
    record: SpaceRecord,
    request_id: int,
    request: bytes,
) -> tuple[F.JoinReply | None, MembershipLog | None]:
    """Admin side: check the joiner's proof against an invite we issued; add it on success.

    Every admin online gets the request. An invite this device did not issue is refused only
    if it is the sole admin; otherwise it does not answer (``(None, None)``) and leaves the
    request to the admin that issued it (the relay answers the joiner at the first reply).
    """

    def refuse(reason: str) -> tuple[F.JoinReply, None]:
        log.warning("refused a join request for space %s: %s", record.space_id[:8], reason)
        return F.JoinReply(request_id=request_id, accepted=False, reason=reason), None

    try:
        body = parse_join_request(request)
    except ProtocolError as exc:
        return refuse(f"malformed join request: {exc}")
    if mlog.role_of(identity.public.sign_pk) is not Role.admin:
        return refuse("this device is not an admin")
    inv = await store.get_invite(record.space_id, body.invite_id)
    if inv is None:
        if len(mlog.admins()) > 1:
            log.info(
                "join request for space %s names an invite another admin issued; not answering",
                record.space_id[:8],
            )
            return None, None
        return refuse("invite_invalid: unknown invite")
    if inv.used_at is not None:
        return refuse("invite_used: this invite was already used")
    if inv.expires_at < (now := wall()):
        why = invite_expired_message(inv.expires_at, now, "the admin device's")
        return refuse(f"invite_expired: {why}")
    if body.space_id != mlog.space_id:
        return refuse("invite_invalid: join request is for another space")
    try:
        verify_join_proof(body, inv.secret)
    except InviteError as exc:
        return refuse(f"invite_invalid: {exc}")
    if mlog.is_member(body.joiner.sign_pk):
        return refuse("device is already a member")
    new = mlog.copy()
    secrets = new.unwrap_epoch_secrets(identity)
    new.add_member(identity, body.joiner, Role(inv.role), secrets, wall())
    async with store.transaction():
        await store.mark_invite_used(record.space_id, body.invite_id)
        await store.save_membership(record.space_id, new.to_bytes())
        await store.put_device_info(
            record.space_id, body.joiner.sign_pk, {"name": body.name, "platform": None}
        )
    log.info("added device %s to space %s", body.joiner.short_id, record.space_id[:8])
    return (
        F.JoinReply(request_id=request_id, accepted=True, reason="", log=new.to_bytes()),
        new,
    )


@dataclass(frozen=True)
class Joined:
    invite: Invite
    log: MembershipLog


async def join_via_relay(
    identity: DeviceIdentity, device_name: str, token: str, timeout: float
) -> Joined:
    """Joiner side: prove the invite secret to an admin device through the relay and receive the
    membership log that adds us (with the epoch secrets wrapped to our key)."""
    try:
        invite = decode_invite(token)
    except InviteError as exc:
        raise UserError(f"cannot use this invite: {exc}") from exc
    # The admin's clock decides (it refuses expired invites): refusing here on this device's
    # clock would lock out a joiner whose clock runs ahead by more than the invite's lifetime.
    own_view = local_expiry_note(invite.expires_at)
    if not invite.relay_url:
        raise UserError("this invite names no relay; LAN joining is not available yet")
    request = build_join_request(invite, identity.public, device_name)
    frame = F.JoinRequest(
        space_id=invite.space_id, invite_id=invite_id(invite.secret), request=request
    )
    try:
        async with asyncio.timeout(timeout):
            async with connect(
                invite.relay_url, compression=None, max_size=F.MAX_FRAME, proxy=None
            ) as ws:
                await ws.send(F.encode_frame(frame))
                while True:
                    data = await ws.recv()
                    if isinstance(data, str):
                        raise UserError("the relay sent something unexpected (text frame)")
                    msg = F.decode_frame(data)
                    if isinstance(msg, F.Error):
                        raise UserError(f"the relay refused the join: {msg.code}: {msg.message}")
                    if isinstance(msg, F.JoinResult):
                        break
    except TimeoutError as exc:
        raise UserError(
            f"no admin device of this space came online within {timeout:.0f}s; try again" + own_view
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot reach the relay {invite.relay_url}: {exc}") from exc
    if not msg.ok:
        raise UserError(f"join refused: {msg.reason}{own_view}")
    try:
        mlog = MembershipLog.from_bytes(msg.log, expected_space_id=invite.space_id)
    except ProtocolError as exc:
        raise UserError(f"the membership log we received is invalid: {exc}") from exc
    if mlog.role_of(invite.inviter) is not Role.admin:
        raise UserError("the membership log does not list the inviter as an admin")
    if not mlog.is_member(identity.public.sign_pk):
        raise UserError("the membership log does not include this device")
    return Joined(invite=invite, log=mlog)


# -- devices and revocation ------------------------------------------------------------------


class DeviceRow(BaseModel):
    """One member of a space, as `qmoi-sync devices` shows it."""

    name: str | None
    short_id: str
    id: str
    role: str
    this_device: bool = False


class SpaceDevices(BaseModel):
    space: str
    space_id: str
    devices: list[DeviceRow]


async def list_devices(
    store: Store,
    identity: DeviceIdentity,
    device_name: str,
    mlog: MembershipLog,
    record: SpaceRecord,
) -> SpaceDevices:
    """Every current member of the space. Names come from the devices' own (encrypted)
    announcements and from the join requests this device accepted; readers never publish, so
    only the admin that let one in knows its name."""
    rows = [row for _pk, row in await _device_rows(store, identity, device_name, mlog, record)]
    return SpaceDevices(space=record.name, space_id=record.space_id, devices=rows)


async def _device_rows(
    store: Store,
    identity: DeviceIdentity,
    device_name: str,
    mlog: MembershipLog,
    record: SpaceRecord,
) -> list[tuple[bytes, DeviceRow]]:
    infos = await store.device_infos(record.space_id)
    me = identity.public.sign_pk
    rows = []
    for pk, member in mlog.members().items():
        name = device_name if pk == me else infos.get(pk, {}).get("name")
        row = DeviceRow(
            name=name if isinstance(name, str) else None,
            short_id=member.public.short_id,
            id=member.public.device_id,
            role=member.role.value,
            this_device=pk == me,
        )
        rows.append((pk, row))
    rows.sort(key=lambda r: (not r[1].this_device, (r[1].name or "").lower(), r[1].id))
    return rows


def _canon_id(text: str) -> str:
    return text.replace("-", "").replace(" ", "").upper()


def resolve_device(mlog: MembershipLog, names: dict[bytes, str | None], ref: str) -> bytes:
    """A current member's key from a short id, a full id (dashes optional, any case) or a
    device name. Ambiguity is an error, never a guess."""
    ref = ref.strip()
    if not ref:
        raise UserError("name the device to revoke (its name, short id or id)")
    members = mlog.members()
    want = _canon_id(ref)
    by_id = [
        pk
        for pk, m in members.items()
        if _canon_id(m.public.device_id) == want
        or (len(want) >= 7 and _canon_id(m.public.device_id).startswith(want))
    ]
    by_name = [pk for pk in members if names.get(pk) == ref]
    found = set(by_id) | set(by_name)
    if not found:
        raise UserError(f"no device {ref!r} in this space (see `qmoi-sync devices`)")
    if len(found) > 1:
        ids = ", ".join(sorted(members[pk].public.short_id for pk in found))
        raise UserError(f"{ref!r} matches several devices ({ids}); use the short id")
    return found.pop()


@dataclass(frozen=True)
class Revoked:
    log: MembershipLog
    device: DeviceRow
    epoch: int


async def revoke_device(
    store: Store,
    identity: DeviceIdentity,
    device_name: str,
    mlog: MembershipLog,
    record: SpaceRecord,
    ref: str,
) -> Revoked:
    """Admin side: remove a device from the space's log (new key epoch, its secret wrapped to
    every remaining member) and save the new log. The caller pushes it to the relay."""
    me = identity.public.sign_pk
    if mlog.role_of(me) is not Role.admin:
        raise UserError("only an admin device of this space can revoke devices")
    rows = dict(await _device_rows(store, identity, device_name, mlog, record))
    subject = resolve_device(mlog, {pk: row.name for pk, row in rows.items()}, ref)
    member = mlog.members()[subject]
    row = rows[subject]
    if member.role is Role.admin and len(mlog.admins()) <= 1:
        raise UserError(
            f"{row.name or row.short_id} is the last admin of space {record.name!r} and cannot "
            "be removed (invite another admin first)"
        )
    new = mlog.copy()
    try:
        new.remove_member(identity, subject, wall())
    except ProtocolError as exc:
        raise UserError(f"cannot revoke {row.name or row.short_id}: {exc}") from exc
    async with store.transaction():
        await store.save_membership(record.space_id, new.to_bytes())
    log.info(
        "removed device %s from space %s (epoch %d)",
        member.public.short_id,
        record.space_id[:8],
        new.current_epoch,
    )
    return Revoked(log=new, device=row, epoch=new.current_epoch)
