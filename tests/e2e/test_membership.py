"""Membership management end to end (real relay and agent processes): invite roles, `devices`,
`revoke` (new key epoch, relay disconnects the device, its old key opens nothing written after,
its forged writes are refused), read-only members, and the last-admin rule.

Forged envelopes are planted straight into the relay's SQLite (a relay colluding with the
revoked device, or a reader that got past the relay's own check): the relay protocol itself gives
a removed device or a reader no way to publish.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from harness import Device, Relay, create_space, invite, join, wait_until
from websockets.asyncio.client import connect

from qmoi_sync.agent.store import Store
from qmoi_sync.agent.textdoc import ingest_disk_text, load_text_doc, new_text_doc, text_of
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import open_envelope, parse_header, seal
from qmoi_sync.protocol.errors import DecryptError, UnknownEpochError
from qmoi_sync.protocol.identity import DeviceIdentity
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog
from qmoi_sync.protocol.payload import DocUpdate, Updates, encode_payload

RELAY_DB = "relay.sqlite3"


# -- helpers ------------------------------------------------------------------------------------
def devices_json(dev: Device) -> dict[str, Any]:
    return json.loads(dev.cli("devices", "--json").stdout)  # type: ignore[no-any-return]


def roles_seen_by(dev: Device) -> dict[str, str]:
    """{device id: role} of space `notes` as `dev` sees it."""
    (space,) = devices_json(dev)["spaces"]
    return {d["id"]: d["role"] for d in space["devices"]}


def my_id(dev: Device) -> tuple[str, str]:
    """(full id, short id) of a device, from its own `devices` listing."""
    for space in devices_json(dev)["spaces"]:
        for d in space["devices"]:
            if d["this_device"]:
                return d["id"], d["short_id"]
    raise AssertionError(f"{dev.name} lists no device of its own")


def identity_of(dev: Device) -> DeviceIdentity:
    return DeviceIdentity.from_private_bytes((dev.home / "device.key").read_bytes())


def own_log(dev: Device) -> MembershipLog:
    with sqlite3.connect(f"file:{dev.home / 'state.db'}?mode=ro", uri=True) as db:
        (data,) = db.execute("SELECT log FROM membership").fetchone()
    return MembershipLog.from_bytes(bytes(data))


def relay_rows(relay: Relay) -> list[tuple[int, bytes, bytes]]:
    """(relay_seq, sender, envelope) of everything the relay stores, in relay order."""
    with sqlite3.connect(f"file:{relay.data / RELAY_DB}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT relay_seq, sender, data FROM envelopes ORDER BY relay_seq")
        return [(int(s), bytes(sender), bytes(data)) for s, sender, data in rows]


def relay_log(relay: Relay) -> MembershipLog:
    with sqlite3.connect(f"file:{relay.data / RELAY_DB}?mode=ro", uri=True) as db:
        (data,) = db.execute("SELECT log FROM spaces").fetchone()
    return MembershipLog.from_bytes(bytes(data))


def plant_envelope(relay: Relay, envelope: bytes) -> None:
    """Append an envelope to the stopped relay's log, as a colluding relay would."""
    assert relay.proc is None, "stop the relay first"
    h = parse_header(envelope)
    with sqlite3.connect(relay.data / RELAY_DB) as db:
        (head,) = db.execute(
            "SELECT head_seq FROM spaces WHERE space_id=?", (h.space_id,)
        ).fetchone()
        db.execute(
            "INSERT INTO envelopes(space_id, relay_seq, sender, sender_seq, size, data)"
            " VALUES (?,?,?,?,?,?)",
            (h.space_id, head + 1, h.sender, h.seq, len(envelope), envelope),
        )
        db.execute(
            "UPDATE spaces SET head_seq=?, bytes_used=bytes_used+? WHERE space_id=?",
            (head + 1, len(envelope), h.space_id),
        )
        db.execute(
            "INSERT INTO senders(space_id, sender, max_seq) VALUES (?,?,?)"
            " ON CONFLICT(space_id, sender) DO UPDATE SET max_seq=excluded.max_seq",
            (h.space_id, h.sender, h.seq),
        )


def forge_edit(dev: Device, path: str, new_text: str) -> bytes:
    """An Updates envelope that `dev` signs and seals with its own newest epoch key, changing
    `path` to `new_text` — built from the device's own stored state (its agent is stopped)."""
    ident = identity_of(dev)
    mlog = own_log(dev)
    secrets = mlog.unwrap_epoch_secrets(ident)
    epoch = max(secrets)
    space_hex = mlog.space_id.hex()

    async def go() -> bytes:
        store = await Store.open(dev.home / "state.db")
        try:
            fid = (await store.files(space_hex))[path].fid
            state, updates = await store.load_doc(space_hex, fid)
            seq = await store.get_counter(space_hex, "seq")
        finally:
            await store.close()
        doc = load_text_doc(state) if state else new_text_doc()
        for u in updates:
            doc.apply_update(u)
        update = ingest_disk_text(doc, new_text)
        assert update is not None and text_of(doc) == new_text
        payload = encode_payload(Updates(items=[DocUpdate(doc_id=fid, update=update)]))
        msg_key = derive_epoch_keys(mlog.space_id, epoch, secrets[epoch]).msg
        return seal(ident, mlog.space_id, epoch, msg_key, seq + 1000, payload)

    return asyncio.run(go())


def raw_auth(relay: Relay, dev: Device) -> F.Frame:
    """Authenticate to the relay with the device's own key and log; the relay's answer."""
    ident = identity_of(dev)
    mlog = own_log(dev)

    async def go() -> F.Frame:
        async with connect(relay.url, compression=None, max_size=F.MAX_FRAME, proxy=None) as ws:
            pk = ident.public.sign_pk
            await ws.send(F.encode_frame(F.Hello(space_id=mlog.space_id, sign_pk=pk)))
            challenge = F.decode_frame(await asyncio.wait_for(ws.recv(), 10))
            assert isinstance(challenge, F.Challenge), challenge
            sig = ident.sign(F.auth_message(challenge.nonce, mlog.space_id, pk))
            await ws.send(F.encode_frame(F.Auth(signature=sig, membership_log=mlog.to_bytes())))
            return F.decode_frame(await asyncio.wait_for(ws.recv(), 10))

    return asyncio.run(go())


def quarantined(dev: Device) -> int:
    return int(dev.space_status()["quarantined"])


def restart_relay(relay: Relay, devices: list[Device]) -> None:
    relay.start()
    for dev in devices:
        wait_until(
            lambda d=dev: d.space_status()["relay"]["connected"],  # type: ignore[misc]
            what=f"{dev.name} reconnected",
        )


def start_cluster(tmp: Path, roles: dict[str, str]) -> tuple[Relay, list[Device]]:
    """Relay + admin `a` + one device per entry of `roles` (name -> role), all running."""
    relay = Relay(tmp / "relay-data").start()
    a = Device(tmp / "home-a", tmp / "folder-a", "a").init()
    devices = [a]
    create_space(a, relay)
    a.start()
    for name, role in roles.items():
        dev = Device(tmp / f"home-{name}", tmp / f"folder-{name}", name).init()
        devices.append(dev)
        join(dev, invite(a, "notes", "--role", role))
        dev.start()
    return relay, devices


def stop_all(relay: Relay, devices: list[Device]) -> None:
    for dev in devices:
        dev.stop()
    relay.stop()


# -- tests ----------------------------------------------------------------------------------------
def test_invite_roles_are_shown_on_every_device(tmp_path: Path) -> None:
    relay, devices = start_cluster(tmp_path, {"b": "admin", "m": "member", "r": "reader"})
    a, b, m, r = devices
    try:
        want = {my_id(a)[0]: "admin", my_id(b)[0]: "admin"}
        want |= {my_id(m)[0]: "member", my_id(r)[0]: "reader"}
        for dev in devices:
            wait_until(lambda d=dev: roles_seen_by(d) == want, what=f"roles on {dev.name}")  # type: ignore[misc]
            assert dev.space_status()["role"] == want[my_id(dev)[0]]
        listing = devices_json(a)
        assert listing["agent_running"] is True
        rows = listing["spaces"][0]["devices"]
        assert [d["name"] for d in rows if d["this_device"]] == ["a"]
        # The admin that let everyone in knows every name; the plain listing shows them all.
        assert {d["name"] for d in rows} == {"a", "b", "m", "r"}
        text = a.cli("devices").stdout
        for d in rows:
            assert d["short_id"] in text and d["id"] in text and d["role"] in text
        assert "(this device)" in text

        # From disk when the agent is stopped.
        r.stop()
        offline = devices_json(r)
        assert offline["agent_running"] is False
        assert roles_seen_by(r) == want
        assert a.cli("devices", "no-such-space", check=False).returncode == 2
    finally:
        stop_all(relay, devices)


def test_revoke_cuts_the_device_off(tmp_path: Path) -> None:
    relay, devices = start_cluster(tmp_path, {"b": "member", "c": "member"})
    a, b, c = devices
    try:
        c.write("c.txt", "written by c before its removal\n")
        for dev in (a, b):
            wait_until(lambda d=dev: d.read("c.txt") is not None, what=f"c.txt on {dev.name}")  # type: ignore[misc]
        c_id, c_short = my_id(c)

        out = a.cli("revoke", "notes", c_short)
        assert "new key epoch 1" in out.stdout, out.stdout
        assert "relay holds the new membership" in out.stdout, out.stdout

        # The removed device: state error with a clear warning; the relay refuses it.
        wait_until(lambda: c.space_status()["state"] == "error", what="c in state error")
        warnings = " ".join(c.space_status()["warnings"])
        assert "removed from the space" in warnings, warnings
        refusal = raw_auth(relay, c)
        assert isinstance(refusal, F.Error) and refusal.code in ("not_a_member", "revoked"), refusal

        # Everyone else switched to the new membership (and epoch).
        for dev in (a, b):
            wait_until(lambda d=dev: c_id not in roles_seen_by(d), what=f"c gone on {dev.name}")  # type: ignore[misc]
        assert relay_log(relay).current_epoch == 1

        # Edits between the remaining members keep flowing, both ways.
        a.write("after-a.txt", "SECRET-A written after the revocation\n")
        wait_until(lambda: b.read("after-a.txt") is not None, what="a→b after revocation")
        b.write("after-b.txt", "SECRET-B written after the revocation\n")
        wait_until(lambda: a.read("after-b.txt") is not None, what="b→a after revocation")
        assert c.read("after-a.txt") is None and c.read("after-b.txt") is None

        # Nothing written after the revocation opens with any key the removed device holds.
        ident_c = identity_of(c)
        c_secrets = own_log(c).unwrap_epoch_secrets(ident_c)
        c_secrets |= relay_log(relay).unwrap_epoch_secrets(ident_c)
        assert set(c_secrets) == {0}
        space_id = relay_log(relay).space_id
        c_keys = {e: derive_epoch_keys(space_id, e, s).msg for e, s in c_secrets.items()}
        rows = relay_rows(relay)
        old = [data for _s, _snd, data in rows if parse_header(data).epoch == 0]
        new = [(snd, data) for _s, snd, data in rows if parse_header(data).epoch >= 1]
        assert {snd for snd, _ in new} >= {
            identity_of(a).public.sign_pk,
            identity_of(b).public.sign_pk,
        }
        open_envelope(old[0], space_id, c_keys, lambda _pk: True)  # c's keys do open epoch 0
        for _snd, data in new:
            try:
                open_envelope(data, space_id, c_keys, lambda _pk: True)
            except UnknownEpochError:
                pass
            else:
                raise AssertionError("a post-revocation envelope opened with the removed key")
            epoch = parse_header(data).epoch
            for key in c_keys.values():  # even trying its old key as the new epoch's key
                try:
                    open_envelope(data, space_id, {epoch: key}, lambda _pk: True)
                except DecryptError:
                    continue
                raise AssertionError("a post-revocation envelope opened with an old key")

        # Its further writes, forged with its old key and planted by a colluding relay, are
        # refused (quarantined) by everyone — while its earlier writes stay part of the space.
        c.stop()
        forged = forge_edit(c, "c.txt", "FORGED after the revocation\n")
        before = {d.name: quarantined(d) for d in (a, b)}
        relay.stop()
        plant_envelope(relay, forged)
        restart_relay(relay, [a, b])
        for dev in (a, b):
            wait_until(
                lambda d=dev: quarantined(d) > before[d.name],  # type: ignore[misc]
                what=f"forged envelope quarantined on {dev.name}",
            )
            assert dev.read("c.txt") == "written by c before its removal\n"

        # A device that joins later gets c's earlier writes, not the forged one.
        d = Device(tmp_path / "home-d", tmp_path / "folder-d", "d").init()
        devices.append(d)
        join(d, invite(a, "notes"))
        d.start()
        wait_until(lambda: d.read("after-b.txt") is not None, what="late joiner caught up")
        wait_until(lambda: quarantined(d) >= 1, what="late joiner refused the forged envelope")
        assert d.read("c.txt") == "written by c before its removal\n"
        assert d.read("after-a.txt") == "SECRET-A written after the revocation\n"
    finally:
        stop_all(relay, devices)


def test_revoke_while_the_agent_is_stopped_is_pushed_at_next_connect(tmp_path: Path) -> None:
    relay, devices = start_cluster(tmp_path, {"b": "member", "c": "member"})
    a, b, c = devices
    try:
        c_id, _short = my_id(c)
        a.stop()
        out = a.cli("revoke", "notes", "c")  # by name
        assert "new key epoch 1" in out.stdout and "next connects" in out.stdout, out.stdout
        assert relay_log(relay).current_epoch == 0  # the relay does not know yet
        assert c.space_status()["state"] != "error"

        a.start()
        wait_until(lambda: c.space_status()["state"] == "error", what="c refused after a's push")
        wait_until(lambda: c_id not in roles_seen_by(b), what="b learned the new membership")
        assert relay_log(relay).current_epoch == 1
        a.write("x.txt", "after an offline revocation\n")
        wait_until(lambda: b.read("x.txt") is not None, what="a→b in the new epoch")
        assert c.read("x.txt") is None
    finally:
        stop_all(relay, devices)


def test_reader_receives_but_never_sends(tmp_path: Path) -> None:
    relay, devices = start_cluster(tmp_path, {"r": "reader"})
    a, r = devices
    try:
        a.write("x.txt", "from the admin\n")
        wait_until(lambda: r.read("x.txt") == "from the admin\n", what="a→reader")

        r.write("x.txt", "the reader's own edit\n")
        r.write("mine.txt", "a reader's new file\n")

        def flagged() -> bool:
            text = " ".join(r.space_status()["warnings"])
            return (
                "read-only member: local change to x.txt not synced" in text
                and "read-only member: local change to mine.txt not synced" in text
            )

        wait_until(flagged, what="reader flags its local changes")
        assert r.space_status()["pending_out"] == 0
        assert r.space_status()["role"] == "reader"

        # It still receives; by the time it has a later change, its own would have arrived.
        a.write("y.txt", "later, from the admin\n")
        wait_until(lambda: r.read("y.txt") is not None, what="a→reader again")
        assert a.read("x.txt") == "from the admin\n" and a.read("mine.txt") is None
        r_pk = identity_of(r).public.sign_pk
        assert not [seq for seq, sender, _ in relay_rows(relay) if sender == r_pk]

        # A remote change to a file the reader edited: the remote version lands, the reader's
        # edit is kept aside under a conflict name (still not synced).
        a.write("x.txt", "the admin's second version\n")
        wait_until(lambda: r.read("x.txt") == "the admin's second version\n", what="remote wins")
        kept = [p for p in r.folder.iterdir() if p.name.startswith("x.sync-conflict-")]
        assert len(kept) == 1 and kept[0].read_text() == "the reader's own edit\n", kept
        assert not [p for p in a.folder.iterdir() if "sync-conflict" in p.name]

        # Defence in depth: a content envelope from a reader that got past the relay is
        # quarantined, not applied.
        r.stop()
        forged = forge_edit(r, "x.txt", "FORGED by the reader\n")
        before = quarantined(a)
        relay.stop()
        plant_envelope(relay, forged)
        restart_relay(relay, [a])
        wait_until(lambda: quarantined(a) > before, what="reader's envelope quarantined")
        assert a.read("x.txt") == "the admin's second version\n"
    finally:
        stop_all(relay, devices)


def test_last_admin_cannot_be_revoked(tmp_path: Path) -> None:
    relay, devices = start_cluster(tmp_path, {"b": "member"})
    a, b = devices
    try:
        a_id, a_short = my_id(a)
        proc = a.cli("revoke", "notes", a_short, check=False)  # through the running agent
        assert proc.returncode == 2, proc
        assert "last admin" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

        proc = b.cli("revoke", "notes", a_short, check=False)
        assert proc.returncode == 2 and "only an admin" in proc.stderr, proc.stderr

        proc = a.cli("revoke", "notes", "no-such-device", check=False)
        assert proc.returncode == 2 and "no device" in proc.stderr, proc.stderr

        a.stop()
        proc = a.cli("revoke", "notes", a_id, check=False)  # on disk
        assert proc.returncode == 2 and "last admin" in proc.stderr, proc.stderr
        assert roles_seen_by(a)[a_id] == "admin"
        assert len(own_log(a)) == 2  # genesis + b's add: nothing was appended
    finally:
        stop_all(relay, devices)
