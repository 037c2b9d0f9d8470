"""`qmoi-sync settings …` and `qmoi-sync conflicts` (wired into agent/cli.py).

```
qmoi-sync settings add SPACE PATH [--as NAME] [--format json|jsonc|toml|ini] [--prefer shared|local]
qmoi-sync settings list [SPACE] [--json]
qmoi-sync settings remove SPACE NAME [--everywhere]
qmoi-sync settings local SPACE NAME [PATTERN ...] [--remove P ...] [--allow-secret P ...]
                                    [--disallow-secret P ...]
qmoi-sync settings get SPACE NAME [--json]
qmoi-sync settings set SPACE NAME KEY VALUE | --delete
qmoi-sync conflicts [SPACE] [--json]
```
Every command talks to the running agent; `settings list` also works without one (mappings
read from disk).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmoi_sync.agent.home import Home, UserError

COMMANDS = ("settings", "conflicts")
EXIT_NOT_RUNNING = 3


def add_parsers(sub: Any) -> None:
    sp = sub.add_parser(
        "settings", help="sync settings files (JSON/JSONC, TOML, INI) key by key"
    ).add_subparsers(dest="settings_cmd", required=True)

    s = sp.add_parser("add", help="sync a settings file as a settings document of a space")
    s.add_argument("space", help="space name or id")
    s.add_argument("path", help="the settings file on this device (may not exist yet)")
    s.add_argument(
        "--as", dest="name", help="the document's name in the space (default: the file's stem)"
    )
    s.add_argument("--format", choices=["json", "jsonc", "toml", "ini"], help="override")
    s.add_argument(
        "--prefer",
        choices=["shared", "local"],
        default="shared",
        help="first sync of a file whose keys differ from the space's: whose values win "
        "(default shared; the other values are listed by `qmoi-sync conflicts`)",
    )

    s = sp.add_parser("list", help="settings documents of every space (or of one)")
    s.add_argument("space", nargs="?")
    s.add_argument("--json", action="store_true")

    s = sp.add_parser("remove", help="stop syncing a settings document on this device")
    s.add_argument("space")
    s.add_argument("name")
    s.add_argument(
        "--everywhere",
        action="store_true",
        help="remove the document from the space: every device stops syncing it (files stay)",
    )

    s = sp.add_parser(
        "local",
        help="keys kept per device (glob patterns, e.g. 'window.zoomLevel' 'terminal.*'); "
        "without patterns: show them",
    )
    s.add_argument("space")
    s.add_argument("name")
    s.add_argument("patterns", nargs="*", help="keys to keep on each device, never synced")
    s.add_argument("--remove", nargs="+", default=[], metavar="PATTERN", help="sync them again")
    s.add_argument(
        "--allow-secret",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="sync these keys although their name looks like a credential",
    )
    s.add_argument(
        "--disallow-secret",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="undo --allow-secret",
    )

    s = sp.add_parser("get", help="the shared values of a settings document")
    s.add_argument("space")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")

    s = sp.add_parser(
        "set",
        help="set a shared key (e.g. `settings set notes qmoi-sync lan.enabled false`)",
    )
    s.add_argument("space")
    s.add_argument("name")
    s.add_argument("key", help="dotted key (lan.enabled) or JSON pointer (/a/b)")
    s.add_argument("value", nargs="?", help="a JSON value; anything else is taken as a string")
    s.add_argument("--delete", action="store_true", help="remove the key")

    s = sub.add_parser(
        "conflicts",
        help="values and files that lost to concurrent changes on other devices; "
        "`conflicts resolve PATH --keep mine|theirs|both` settles a file conflict copy",
    )
    s.add_argument("space", nargs="?", help="space name or id (default: every space)")
    s.add_argument("path", nargs="?", help="with `resolve`: the conflict copy (path or file)")
    s.add_argument("--keep", choices=["mine", "theirs", "both"], help="with `resolve`")
    s.add_argument("--space", dest="in_space", help="with `resolve`: the space")
    s.add_argument("--json", action="store_true")


def _control(home: Home, payload: dict[str, Any]) -> Any:
    import asyncio

    from qmoi_sync.agent.control import AgentNotRunning, request

    try:
        return asyncio.run(request(home.control_path, payload, timeout=60))
    except AgentNotRunning as exc:
        raise UserError(
            "the agent is not running (start it with `qmoi-sync run`)", exit_code=EXIT_NOT_RUNNING
        ) from exc


def _default_name(path: Path) -> str:
    stem = path.name.lstrip(".").split(".")[0] or "settings"
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem)[:64]


def _fmt(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float) or ts <= 0:
        return "first import"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def dispatch(home: Home, args: argparse.Namespace) -> int:
    if args.cmd == "conflicts":
        return _conflicts(home, args)
    cmd = args.settings_cmd
    if cmd == "add":
        path = Path(args.path).expanduser().absolute()
        name = args.name or _default_name(path)
        result = _control(
            home,
            {
                "cmd": "settings_add",
                "space": args.space,
                "path": str(path),
                "name": name,
                "format": args.format,
                "prefer": args.prefer,
            },
        )
        st = result["status"] or {}
        print(
            f"settings {name} ({st.get('format', '?')}) of space {result['space']} <- {path}: "
            f"{st.get('state', '?')}, {st.get('keys', 0)} key(s) synced"
        )
        _print_kept(result)
        if st.get("error"):
            print(f"warning: {st['error']}", file=sys.stderr)
        return 0
    if cmd == "list":
        return _list(home, args)
    if cmd == "remove":
        result = _control(
            home,
            {
                "cmd": "settings_remove",
                "space": args.space,
                "name": args.name,
                "everywhere": args.everywhere,
            },
        )
        if result["unmapped"]:
            print(f"{args.name}: no longer synced with {result['unmapped']} (the file is kept)")
        if result["removed_from_space"]:
            print(f"{args.name}: removed from space {result['space']} on every device")
        return 0
    if cmd == "local":
        result = _control(
            home,
            {
                "cmd": "settings_local",
                "space": args.space,
                "name": args.name,
                "add": args.patterns,
                "remove": args.remove,
                "allow": args.allow_secret,
                "disallow": args.disallow_secret,
            },
        )
        pats = result["local_patterns"]
        print(f"device-local keys of {args.name}: {', '.join(pats) if pats else '(none)'}")
        allow = result["allow_patterns"]
        if allow:
            print(f"synced although they look like credentials: {', '.join(allow)}")
        _print_kept(result)
        if args.patterns:
            print(
                "note: values synced before a key became device-local stay in the space's "
                "history; from now on every device keeps its own",
                file=sys.stderr,
            )
        return 0
    if cmd == "get":
        result = _control(home, {"cmd": "settings_get", "space": args.space, "name": args.name})
        if args.json:
            print(json.dumps(result, indent=2, ensure_ascii=False))
            return 0
        for item in result["values"]:
            print(f"{item['key']} = {_fmt(item['value'])}")
        for key, opt in (result.get("options") or {}).items():
            note = f"  ({opt['note']})" if opt.get("note") else ""
            print(f"# option {key}: {_fmt(opt['value'])} — {opt['help']}{note}")
        if result.get("conflicts"):
            print(f"# {result['conflicts']} conflict(s): qmoi-sync conflicts {args.space}")
        return 0
    if cmd == "set":
        if args.delete == (args.value is not None):
            raise UserError("give either a VALUE or --delete")
        value: Any = None
        if args.value is not None:
            try:
                value = json.loads(args.value)
            except ValueError:
                value = args.value
        _control(
            home,
            {
                "cmd": "settings_set",
                "space": args.space,
                "name": args.name,
                "key": args.key,
                "value": value,
                "delete": args.delete,
            },
        )
        print(f"{args.name}: {args.key} {'removed' if args.delete else '= ' + _fmt(value)}")
        return 0
    raise UserError(f"unknown settings command {cmd}")


def _print_kept(result: dict[str, Any]) -> None:
    if result.get("local_keys"):
        print(f"kept on this device (device-local): {', '.join(result['local_keys'])}")
    if result.get("secret_keys"):
        print(
            "kept on this device because they look like credentials: "
            f"{', '.join(result['secret_keys'])} (sync one with: qmoi-sync settings local "
            f"{result['space']} {result['name']} --allow-secret KEY)",
            file=sys.stderr,
        )


def _list(home: Home, args: argparse.Namespace) -> int:
    import asyncio

    from qmoi_sync.agent.control import AgentNotRunning, request

    try:
        result = asyncio.run(
            request(home.control_path, {"cmd": "settings_list", "space": args.space})
        )
        spaces = result["spaces"]
        running = True
    except AgentNotRunning:
        spaces = _offline_list(home, args.space)
        running = False
    if args.json:
        print(json.dumps({"agent_running": running, "spaces": spaces}, indent=2))
        return 0
    for i, sp in enumerate(spaces):
        if i:
            print()
        print(f"space {sp['space']}")
        if not sp["settings"]:
            print("  (no settings documents)")
        for d in sp["settings"]:
            extra = []
            if d.get("local_patterns"):
                extra.append(f"local: {', '.join(d['local_patterns'])}")
            if d.get("conflicts"):
                extra.append(f"{d['conflicts']} conflict(s)")
            if d.get("error"):
                extra.append(d["error"])
            tail = f"  [{'; '.join(extra)}]" if extra else ""
            print(
                f"  {d['name']:<16} {d['format']:<5} {d['state']:<8} "
                f"{d.get('path') or '(not mapped on this device)'}{tail}"
            )
    if not running:
        print("(agent not running: this device's mappings, read from disk)", file=sys.stderr)
    return 0


def _offline_list(home: Home, space: str | None) -> list[dict[str, Any]]:
    from qmoi_sync.agent.cli import _with_offline_store
    from qmoi_sync.agent.settings_sync import load_mappings

    if not home.db_path.exists():
        return []

    async def go(store: Any) -> list[dict[str, Any]]:
        out = []
        rows = await load_mappings(store)
        for rec in await store.spaces():
            if space not in (None, rec.name, rec.space_id):
                continue
            docs = [
                {"name": r.name, "format": r.format, "state": "stopped", "path": r.path}
                for r in rows
                if r.space_id == rec.space_id
            ]
            out.append({"space": rec.name, "space_id": rec.space_id, "settings": docs})
        if space is not None and not out:
            raise UserError(f"no space named {space!r} on this device")
        return out

    result: list[dict[str, Any]] = _with_offline_store(home, go)
    return result


def _render_setting(item: dict[str, Any]) -> list[str]:
    def who(side: dict[str, Any]) -> str:
        name = side.get("device_name") or "?"
        return f"{name} ({side['device']}, {_when(side.get('at'))})"

    def what(side: dict[str, Any]) -> str:
        return "(deleted)" if side.get("deleted") else _fmt(side.get("value"))

    win = item["winner"]
    lines = [f"  settings {item['document']}: {item['key']}"]
    lines.append(f"    kept:  {what(win)}  from {who(win)}")
    for loser in item["losers"]:
        lines.append(f"    lost:  {what(loser)}  from {who(loser)}")
    return lines


# Renderers per conflict kind (agent/conflicts.py): other kinds register theirs here.
RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {"setting": _render_setting}


def _render_file(item: dict[str, Any]) -> list[str]:
    from qmoi_sync.agent.file_conflicts import render_file

    return render_file(item)


RENDERERS["file"] = _render_file


def _resolve(home: Home, args: argparse.Namespace) -> int:
    if not args.path or not args.keep:
        raise UserError("usage: qmoi-sync conflicts resolve PATH --keep mine|theirs|both")
    payload = {"cmd": "conflict_resolve", "path": args.path, "keep": args.keep}
    result = _control(home, {**payload, "space": args.in_space})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.keep == "theirs":
        print(f"deleted the conflict copy {result['path']}")
    else:
        print(f"resolved {result['path']}: kept as {result['file']}")
    return 0


def _conflicts(home: Home, args: argparse.Namespace) -> int:
    if args.space == "resolve":
        return _resolve(home, args)
    result = _control(home, {"cmd": "conflicts", "space": args.space})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    total = 0
    for sp in result["spaces"]:
        items = sp["conflicts"]
        total += len(items)
        if not items:
            continue
        print(f"space {sp['space']}: {len(items)} conflict(s)")
        for item in items:
            render = RENDERERS.get(str(item.get("kind")))
            lines = render(item) if render else ["  " + json.dumps(item, ensure_ascii=False)]
            for line in lines:
                print(line)
    if not total:
        print("no conflicts")
    else:
        print(
            "(a settings conflict is settled by changing that key again, on any device, or with "
            "`qmoi-sync settings set`)"
        )
    return 0
