"""`qmoi-sync` command line. User mistakes print one readable line (no traceback).

Exit codes: 0 ok, 1 unexpected failure, 2 usage or user error, 3 agent not running (status).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.home import AgentLock, Home, UserError, resolve_home
from qmoi_sync.protocol.version import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30m, 1h, 7d)")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmoi-sync", description="CRDT folder sync over an E2E relay")
    p.add_argument("--home", help="device home (default: $QMOI_SYNC_HOME or platform data dir)")
    p.add_argument("--version", action="version", version=f"qmoi-sync {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("init", help="create this device's identity")
    s.add_argument("--name", required=True)

    sp = sub.add_parser("space", help="manage spaces").add_subparsers(
        dest="space_cmd", required=True
    )
    s = sp.add_parser("create", help="create a space (prints its id)")
    s.add_argument("name")
    s.add_argument("--folder", required=True)
    s.add_argument("--relay", help="relay URL (wss://…; ws:// only to loopback)")
    s.add_argument("--insecure", action="store_true", help="allow ws:// to a non-loopback relay")
    sp.add_parser("list", help="list spaces")

    s = sub.add_parser("invite", help="print a one-time invite token")
    s.add_argument("space")
    s.add_argument("--role", choices=["admin", "member", "reader"], default="member")
    s.add_argument("--expires", type=parse_duration, default=3600, help="e.g. 30m, 1h (default)")

    s = sub.add_parser("devices", help="list the devices of every space (or of one)")
    s.add_argument("space", nargs="?", help="space name or id (default: every space)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "revoke", help="remove a device from a space (admin only; starts a new key epoch)"
    )
    s.add_argument("space", help="space name or id")
    s.add_argument("device", help="device name, short id or id (see `qmoi-sync devices`)")

    s = sub.add_parser("join", help="join a space with an invite token")
    s.add_argument("token")
    s.add_argument("--folder", required=True)
    s.add_argument("--name", help="local name for the space (default: the inviter's name for it)")
    s.add_argument("--timeout", type=parse_duration, default=600)
    s.add_argument("--insecure", action="store_true")

    cp = sub.add_parser("config", help="device settings (<home>/config.json)").add_subparsers(
        dest="config_cmd", required=True
    )
    s = cp.add_parser(
        "set", help="set lan.enabled | lan.port | lan.interfaces (per space: lan.enabled)"
    )
    s.add_argument("key")
    s.add_argument("value")
    s.add_argument("--space", help="set it for one space only (name or id)")
    s = cp.add_parser("get", help="show the settings (of one space with --space)")
    s.add_argument("--space", help="space name or id")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("run", help="run the agent in the foreground")
    s.add_argument(
        "--headless",
        action="store_true",
        help="no desktop: JSON log lines on stdout, and the device is announced as headless",
    )

    s = sub.add_parser("tray", help="show a tray icon (starts the agent if none runs)")
    s.add_argument(
        "--no-start", action="store_true", help="only attach to a running agent; never start one"
    )
    # Test hook: action ids read from this file drive the real menu callbacks (agent/tray.py).
    s.add_argument("--test-actions-file", type=Path, help=argparse.SUPPRESS)

    s = sub.add_parser("status", help="show this device, its spaces and peers")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("stop", help="ask the running agent to stop")

    for verb, what in (("pause", "stop sending and applying"), ("resume", "sync again")):
        s = sub.add_parser(verb, help=f"{what}: one space, or every space when none is given")
        s.add_argument("space", nargs="?", help="space name or id (default: every space)")

    s = sub.add_parser(
        "gc", help="free relay storage: drop chunks no file version of the space references"
    )
    s.add_argument("space", help="space name or id")
    s.add_argument(
        "--min-age",
        type=int,
        default=None,
        metavar="SECONDS",
        help="only chunks nobody uploaded for this long (default: 7 days)",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="allow a --min-age below one day (safe only while no other device is uploading)",
    )

    rp = sub.add_parser("relay", help="relay server").add_subparsers(
        dest="relay_cmd", required=True
    )
    s = rp.add_parser("serve", help="run a relay")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--data", required=True)
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--quota-mb", type=int, default=1024, help="per-space storage quota")
    s.add_argument(
        "--blob-quota-mb",
        type=int,
        default=20 * 1024,
        help="per-space quota on stored file chunks (binary/large files), MiB",
    )
    # Per-connection envelope rate limit (relay/limits.py defaults: 1000 msgs/s, burst 2000).
    s.add_argument("--rate-msgs", type=float, default=1000.0, help="messages/s per connection")
    s.add_argument("--rate-burst", type=int, default=2000, help="messages above the rate")
    # Same as `python -m qmoi_sync.relay` (relay/__main__.py); not imported from there because
    # importing qmoi_sync.relay loads the whole server for every CLI command.
    s.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics (and /healthz) over plain HTTP on this port "
        "(default: off; /healthz is always on the relay port)",
    )
    s.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    s.add_argument(
        "--metrics-space-label",
        choices=["hash", "raw", "none"],
        default="hash",
        help="per-space series label: hash of the space id (default), raw id, or none",
    )

    sv = sub.add_parser("service", help="run the agent as a user service").add_subparsers(
        dest="service_cmd", required=True
    )
    for verb, what in (("install", "install and start"), ("uninstall", "stop and remove")):
        s = sv.add_parser(verb, help=f"{what} the systemd user unit / launchd agent")
        s.add_argument("--dry-run", action="store_true", help="print what would be done")

    s = sub.add_parser("doctor", help="check this device's setup and say how to fix problems")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=5.0, help="network timeout in seconds")

    from qmoi_sync.agent import settings_cli

    settings_cli.add_parsers(sub)  # `settings …`, `conflicts`

    from qmoi_sync.agent import snapshot_cli

    snapshot_cli.add_parsers(sub)  # `snapshot …`, `restore`, `history`, `restore-file`

    s = sub.add_parser("demo", help="watch two local devices sync through an embedded relay")
    s.add_argument("--keep", action="store_true", help="keep the temporary folders")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return int(_dispatch(args) or 0)
    except UserError as exc:
        print(f"qmoi-sync: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    if getattr(args, "headless", False):
        from qmoi_sync.agent.logjson import JsonFormatter

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
    elif args.cmd in ("run", "relay"):
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
    else:
        logging.basicConfig(level=logging.WARNING if not args.verbose else logging.DEBUG)


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "relay":
        return _relay_serve(args)
    if args.cmd == "demo":
        from qmoi_sync.agent.demo import run_demo

        return run_demo(keep=args.keep)
    home = Home(resolve_home(args.home))
    if args.cmd == "init":
        identity = home.init(args.name)
        print(f"device {identity.public.device_id} ({args.name}) initialized in {home.root}")
        return EXIT_OK
    if args.cmd == "run":
        return _run_agent(home, headless=args.headless)
    if args.cmd == "service":
        from qmoi_sync.agent import service

        if args.service_cmd == "install":
            return service.install(home, dry_run=args.dry_run)
        return service.uninstall(dry_run=args.dry_run)
    if args.cmd == "doctor":
        from qmoi_sync.agent.doctor import doctor

        return doctor(home, as_json=args.json, timeout=args.timeout)
    if args.cmd == "status":
        return _status(home, as_json=args.json)
    if args.cmd == "tray":
        from qmoi_sync.agent.tray import run_tray

        return run_tray(
            home, start_agent=not args.no_start, test_actions_file=args.test_actions_file
        )
    if args.cmd == "stop":
        return _control_or_fail(home, {"cmd": "stop"}, lambda r: print("agent stopping"))
    if args.cmd == "space":
        if args.space_cmd == "create":
            return _space_create(home, args)
        return _space_list(home)
    if args.cmd == "invite":
        return _invite(home, args)
    if args.cmd == "join":
        return _join(home, args)
    if args.cmd == "devices":
        return _devices(home, args)
    if args.cmd == "revoke":
        return _revoke(home, args)
    if args.cmd == "config":
        return _config(home, args)
    if args.cmd in ("pause", "resume"):
        return _pause(home, args.space, paused=args.cmd == "pause")
    if args.cmd == "gc":
        return _control_or_fail(
            home,
            {"cmd": "gc", "space": args.space, "min_age_s": args.min_age, "force": args.force},
            _show_gc,
        )
    if args.cmd in ("settings", "conflicts"):
        from qmoi_sync.agent import settings_cli

        return settings_cli.dispatch(home, args)
    if args.cmd in ("snapshot", "restore", "history", "restore-file"):
        from qmoi_sync.agent import snapshot_cli

        return snapshot_cli.dispatch(home, args)
    raise UserError(f"unknown command {args.cmd}")


# -- helpers ---------------------------------------------------------------------------------
def _agent_running(home: Home) -> bool:
    return AgentLock(home.lock_path).is_held_by_other()


def _with_offline_store(home: Home, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run fn(store) while holding the agent lock, so no agent writes concurrently."""
    from qmoi_sync.agent.store import Store

    lock = AgentLock(home.lock_path)
    if not lock.try_acquire():
        raise UserError("the agent is running; this command needs it stopped")

    async def go() -> Any:
        store = await Store.open(home.db_path)
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    finally:
        lock.release()


def _show_gc(result: dict[str, int]) -> None:
    print(
        f"{result['listed']} chunks on the relay, {result['referenced']} referenced by this "
        f"device's index, {result['unreferenced']} unreferenced; dropped {result['dropped']} "
        f"({result['freed_bytes']} bytes freed)"
    )


def _control(home: Home, payload: dict[str, Any]) -> Any:
    from qmoi_sync.agent.control import request

    return asyncio.run(request(home.control_path, payload))


def _control_or_fail(home: Home, payload: dict[str, Any], show: Callable[[Any], None]) -> int:
    from qmoi_sync.agent.control import AgentNotRunning

    try:
        show(_control(home, payload))
    except AgentNotRunning as exc:
        raise UserError("the agent is not running", exit_code=EXIT_NOT_RUNNING) from exc
    return EXIT_OK


# -- commands --------------------------------------------------------------------------------
def _run_agent(home: Home, headless: bool = False) -> int:
    from qmoi_sync.agent.daemon import Agent

    agent = Agent(home, headless=headless)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop.set)
        loop.add_signal_handler(signal.SIGHUP, agent.request_reload)
        await agent.run()

    asyncio.run(go())
    return EXIT_OK


def _pause(home: Home, space: str | None, paused: bool) -> int:
    """Through the running agent, else straight in the database (applies at the next start)."""
    from qmoi_sync.agent.control import AgentNotRunning

    verb = "paused" if paused else "resumed"
    try:
        changed = _control(home, {"cmd": "pause" if paused else "resume", "space": space})[verb]
    except AgentNotRunning:

        async def go(store: Any) -> list[str]:
            records = [r for r in await store.spaces() if space in (None, r.name, r.space_id)]
            if space is not None and not records:
                raise UserError(f"no space named {space!r} on this device")
            todo = [r for r in records if r.paused != paused]
            async with store.transaction():
                for r in todo:
                    await store.set_space_paused(r.space_id, paused)
            return [r.name for r in todo]

        changed = _with_offline_store(home, go)
    if changed:
        print(f"{verb}: {', '.join(changed)}")
    else:
        print(f"nothing to do: {'that space is' if space else 'every space is'} already {verb}")
    return EXIT_OK


def _space_create(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.membership_ops import create_space

    identity = home.load_identity()
    running = _agent_running(home)
    if running:
        raise UserError("stop the agent before creating a space (qmoi-sync stop)")

    async def go(store: Any) -> Any:
        return await create_space(
            store, identity, home.root, args.name, Path(args.folder), args.relay, args.insecure
        )

    record = _with_offline_store(home, go)
    print(record.space_id)
    return EXIT_OK


def _space_list(home: Home) -> int:
    from qmoi_sync.agent.control import AgentNotRunning

    try:
        report = _control(home, {"cmd": "status"})
        spaces = report["spaces"]
    except AgentNotRunning:
        spaces = [s.model_dump(mode="json") for s in _offline_status(home).spaces]
    for s in spaces:
        print(f"{s['name']}\t{s['id']}\t{s['folder']}\t{s['relay']['url'] or '(LAN only)'}")
    return EXIT_OK


def _invite(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.control import AgentNotRunning

    payload = {"cmd": "invite", "space": args.space, "role": args.role, "expires_s": args.expires}
    try:
        token = _control(home, payload)["token"]
    except AgentNotRunning:
        token = _offline_invite(home, args)
    print(
        f"Invite for space {args.space!r} (role {args.role}, single use, expires in "
        f"{args.expires}s). On the new device run: qmoi-sync join <token> --folder DIR",
        file=sys.stderr,
    )
    print(token)
    return EXIT_OK


def _offline_invite(home: Home, args: argparse.Namespace) -> str:
    from qmoi_sync.agent.membership_ops import create_invite
    from qmoi_sync.protocol.membership import MembershipLog

    identity = home.load_identity()

    async def go(store: Any) -> str:
        for rec in await store.spaces():
            if args.space in (rec.name, rec.space_id):
                data = await store.load_membership(rec.space_id)
                mlog = MembershipLog.from_bytes(data)
                return await create_invite(store, identity, mlog, rec, args.role, args.expires)
        raise UserError(f"no space named {args.space!r} on this device")

    return str(_with_offline_store(home, go))


def _join(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.lan_join import join_any
    from qmoi_sync.agent.membership_ops import check_folder
    from qmoi_sync.agent.store import SpaceRecord

    identity = home.load_identity()
    name = home.load_config().name
    if _agent_running(home):
        raise UserError("stop the agent before joining a space (qmoi-sync stop)")
    print("waiting for an admin device of the space to accept…", file=sys.stderr)
    joined = asyncio.run(join_any(home, identity, name, args.token, float(args.timeout)))
    space_id = joined.log.space_id.hex()
    space_name = args.name or joined.invite.space_name or f"space-{space_id[:8]}"

    async def go(store: Any) -> SpaceRecord:
        existing = await store.spaces()
        if any(s.space_id == space_id for s in existing):
            raise UserError("this device is already in that space")
        if any(s.name == space_name for s in existing):
            raise UserError(f"a space named {space_name!r} exists here; pass --name")
        folder = check_folder(Path(args.folder), home.root, existing)
        record = SpaceRecord(
            space_id=space_id,
            name=space_name,
            folder=folder,
            relay_url=joined.invite.relay_url,
            insecure=args.insecure,
            created_at=wall(),
            seeded=False,
            paused=False,
        )
        async with store.transaction():
            await store.add_space(record)
            await store.save_membership(space_id, joined.log.to_bytes())
        return record

    record = _with_offline_store(home, go)
    role = joined.log.role_of(identity.public.sign_pk)
    print(
        f"joined space {record.name} ({record.space_id}) into {record.folder} as "
        f"{role.value if role else '?'}"
    )
    if role is not joined.invite.role:
        print(
            f"note: the invite said {joined.invite.role.value}, the admin granted "
            f"{role.value if role else 'nothing'}",
            file=sys.stderr,
        )
    return EXIT_OK


def _space_ids(home: Home) -> dict[str, str]:
    """name -> id of every space of this device (via the agent, else from disk)."""
    from qmoi_sync.agent.control import AgentNotRunning

    try:
        spaces = _control(home, {"cmd": "status"})["spaces"]
        return {s["name"]: s["id"] for s in spaces}
    except AgentNotRunning:

        async def go(store: Any) -> dict[str, str]:
            return {r.name: r.space_id for r in await store.spaces()}

        return dict(_with_offline_store(home, go)) if home.db_path.exists() else {}


def _config(home: Home, args: argparse.Namespace) -> int:
    import json

    from qmoi_sync.agent import lan_config as C

    space_id = None
    if args.space:
        ids = _space_ids(home)
        space_id = ids.get(args.space) or (args.space if args.space in ids.values() else None)
        if space_id is None:
            raise UserError(f"no space named {args.space!r} on this device")
    settings = C.load_settings(home.root)
    if args.config_cmd == "set":
        value = C.set_value(settings, args.key, args.value, space_id)
        C.save_settings(home.root, settings)
        where = f" for space {args.space}" if args.space else ""
        print(f"{args.key} = {json.dumps(value)}{where}")
        if _agent_running(home):
            print("restart the agent to apply it (qmoi-sync stop, then run)", file=sys.stderr)
        return EXIT_OK
    values = C.get_values(settings, space_id)
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}")
        if C.lan_killed():
            print(f"note: {C.KILL_SWITCH_ENV} in the environment switches LAN off", file=sys.stderr)
    return EXIT_OK


def _space_matches(rec: Any, ref: str | None) -> bool:
    return ref is None or ref in (rec.name, rec.space_id)


def _devices(home: Home, args: argparse.Namespace) -> int:
    """Every device of every space (or of one): via the agent, else from disk."""
    import json

    from qmoi_sync.agent.control import AgentNotRunning
    from qmoi_sync.agent.membership_ops import SpaceDevices, list_devices
    from qmoi_sync.agent.status_view import printable
    from qmoi_sync.protocol.membership import MembershipLog

    try:
        result = _control(home, {"cmd": "devices", "space": args.space})
        listings = [SpaceDevices.model_validate(x) for x in result["spaces"]]
        running = True
    except AgentNotRunning:
        identity = home.load_identity()
        device_name = home.load_config().name

        async def go(store: Any) -> list[SpaceDevices]:
            out = []
            for rec in await store.spaces():
                if _space_matches(rec, args.space):
                    mlog = MembershipLog.from_bytes(await store.load_membership(rec.space_id))
                    out.append(await list_devices(store, identity, device_name, mlog, rec))
            return out

        listings = _with_offline_store(home, go) if home.db_path.exists() else []
        running = False
        if args.space and not listings:
            raise UserError(f"no space named {args.space!r} on this device") from None
    if args.json:
        doc = {"agent_running": running, "spaces": [x.model_dump(mode="json") for x in listings]}
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    for i, listing in enumerate(listings):
        if i:
            print()
        print(f"space {listing.space}  {listing.space_id}")
        # Names come from the devices themselves: never send their control characters raw.
        names = [printable(d.name or "?") for d in listing.devices]
        width = max((len(n) for n in names), default=1)
        for d, name in zip(listing.devices, names, strict=True):
            mark = "*" if d.this_device else " "
            me = "  (this device)" if d.this_device else ""
            print(f"  {mark} {name:<{width}}  {d.short_id}  {d.role:<6}  {d.id}{me}")
    if not running:
        print("(agent not running: read from disk)", file=sys.stderr)
    return EXIT_OK


def _revoke(home: Home, args: argparse.Namespace) -> int:
    """Remove a device: via the running agent (which pushes the new log to the relay at once),
    else on disk (pushed when the agent next connects)."""
    from qmoi_sync.agent.control import AgentNotRunning
    from qmoi_sync.agent.membership_ops import revoke_device
    from qmoi_sync.protocol.membership import MembershipLog

    payload = {"cmd": "revoke", "space": args.space, "device": args.device}
    try:
        result = _control(home, payload)
        running = True
    except AgentNotRunning:
        identity = home.load_identity()
        device_name = home.load_config().name

        async def go(store: Any) -> dict[str, Any]:
            for rec in await store.spaces():
                if _space_matches(rec, args.space):
                    mlog = MembershipLog.from_bytes(await store.load_membership(rec.space_id))
                    done = await revoke_device(store, identity, device_name, mlog, rec, args.device)
                    return {
                        "space": rec.name,
                        "device": done.device.model_dump(mode="json"),
                        "epoch": done.epoch,
                        "relay_confirmed": False,
                    }
            raise UserError(f"no space named {args.space!r} on this device")

        result = _with_offline_store(home, go)
        running = False
    dev = result["device"]
    print(
        f"revoked {dev['name'] or '?'} ({dev['short_id']}) from space {result['space']}: "
        f"new key epoch {result['epoch']}"
    )
    if result["relay_confirmed"]:
        print("the relay holds the new membership and has disconnected that device")
    elif running:
        print("the relay has not confirmed yet; the agent pushes the new membership when connected")
    else:
        print("the agent is not running: the relay learns of it when the agent next connects")
    return EXIT_OK


def _status(home: Home, as_json: bool) -> int:
    from qmoi_sync.agent.control import AgentNotRunning
    from qmoi_sync.agent.status import StatusReport

    try:
        report = StatusReport.model_validate(_control(home, {"cmd": "status"}))
        code = EXIT_OK
    except AgentNotRunning:
        report = _offline_status(home)
        code = EXIT_NOT_RUNNING
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        from qmoi_sync.agent.status_view import render_status

        render_status(report)
    return code


def _offline_status(home: Home) -> Any:
    """What can be shown from disk when no agent runs (read-only, under the agent lock)."""
    from qmoi_sync.agent.status import (
        DeviceStatus,
        RelayStatus,
        SpaceStatus,
        StatusReport,
    )

    identity = home.load_identity()
    config = home.load_config()
    pub = identity.public

    async def go(store: Any) -> list[SpaceStatus]:
        out = []
        for rec in await store.spaces():
            out.append(
                SpaceStatus(
                    id=rec.space_id,
                    name=rec.name,
                    folder=str(rec.folder),
                    role=None,
                    state="offline",
                    relay=RelayStatus(url=rec.relay_url, connected=False),
                    pending_out=await store.outbox_count(rec.space_id),
                    last_sync=None,
                    conflicts=0,
                    quarantined=await store.quarantine_count(rec.space_id),
                    files=len(await store.files(rec.space_id)),
                    warnings=["agent not running"],
                    devices=[],
                )
            )
        return out

    spaces = _with_offline_store(home, go) if home.db_path.exists() else []
    return StatusReport(
        device=DeviceStatus(id=pub.device_id, short_id=pub.short_id, name=config.name),
        agent_running=False,
        spaces=spaces,
    )


def _relay_serve(args: argparse.Namespace) -> int:
    from qmoi_sync.relay.server import RelayConfig, run_relay

    config = RelayConfig(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        space_quota_bytes=args.quota_mb * 1024 * 1024,
        blob_quota_bytes=args.blob_quota_mb * 1024 * 1024,
        rate_msgs_per_s=args.rate_msgs,
        rate_burst=args.rate_burst,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        metrics_space_label=args.metrics_space_label,
    )

    def ready(port: int) -> None:
        scheme = "wss" if config.tls_cert else "ws"
        print(f"relay listening on {scheme}://{args.host}:{port}", flush=True)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_relay(config, ready=ready, stop=stop)

    asyncio.run(go())
    return EXIT_OK


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
    os._exit(0)
