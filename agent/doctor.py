"""`qmoi-sync doctor`: check what this device needs to sync, say what is wrong and how to fix it.

Every check yields one `Check(name, status, message, fix)`; status is ok, warn or fail. Warnings
never change the exit code (0 unless some check failed). Nothing here needs the agent lock: the
spaces table is read through a read-only SQLite connection and the agent, if any, is asked
through its control socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import ssl
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from qmoi_sync.agent.clock import CLOCK_OFF_S, offset_from_date, wall
from qmoi_sync.agent.home import Home, UserError

Status = Literal["ok", "warn", "fail"]

SCHEMA_VERSION = 1
DISK_WARN_BYTES = 1 << 30
DISK_WARN_FRACTION = 0.05
DISK_FAIL_BYTES = 64 << 20
CLOCK_SKEW_WARN_S = CLOCK_OFF_S
INOTIFY_HEADROOM = 0.5  # warn when our directories alone use more than half the user's watches
TCP_SAMPLES = 3


@dataclass
class Check:
    name: str
    status: Status
    message: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpaceInfo:
    space_id: str
    name: str
    folder: Path
    relay_url: str | None


# -- device home ------------------------------------------------------------------------------
def check_home(home: Home) -> list[Check]:
    root = home.root
    init_fix = f"qmoi-sync --home {root} init --name NAME"
    if not root.exists():
        return [Check("home", "fail", f"{root} does not exist", f"create a device: {init_fix}")]
    if not root.is_dir():
        return [Check("home", "fail", f"{root} is not a directory", "point --home elsewhere")]
    if not home.is_initialized():
        return [Check("home", "fail", f"{root} holds no device identity", init_fix)]
    checks: list[Check] = []
    try:
        config = home.load_config()
    except UserError as exc:
        return [Check("home", "fail", str(exc), f"restore {home.config_path} from a backup")]
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode & 0o077:
        checks.append(
            Check(
                "home",
                "warn",
                f"{root} (device {config.name}) is accessible by other users (mode {mode:o})",
                f"chmod 700 {root}",
                {"path": str(root), "mode": f"{mode:o}"},
            )
        )
    else:
        checks.append(
            Check("home", "ok", f"{root} (device {config.name})", data={"path": str(root)})
        )
    key_mode = stat.S_IMODE(home.key_path.stat().st_mode)
    if key_mode & 0o077:
        checks.append(
            Check(
                "device key",
                "fail",
                f"{home.key_path} is readable by others (mode {key_mode:o}); the agent refuses it",
                f"chmod 600 {home.key_path}",
                {"mode": f"{key_mode:o}"},
            )
        )
    elif not os.access(home.key_path, os.R_OK):
        checks.append(
            Check(
                "device key",
                "fail",
                f"{home.key_path} is not readable by this user (mode {key_mode:o})",
                f"chown $USER {home.key_path} && chmod 600 {home.key_path}",
            )
        )
    else:
        checks.append(
            Check("device key", "ok", f"{home.key_path} mode {key_mode:o}", data={"mode": "600"})
        )
    return checks


def read_spaces(home: Home) -> list[SpaceInfo]:
    """The spaces table, read-only (works while the agent runs: WAL readers never block it)."""
    if not home.db_path.exists():
        return []
    uri = home.db_path.absolute().as_uri() + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=5)
    try:
        rows = db.execute("SELECT space_id, name, folder, relay_url FROM spaces ORDER BY name")
        return [SpaceInfo(r[0], r[1], Path(r[2]), r[3]) for r in rows.fetchall()]
    finally:
        db.close()


# -- folders, disk, inotify -------------------------------------------------------------------
def count_dirs(root: Path) -> int:
    """Directories under root, root included (inotify needs one watch per directory)."""
    count = 0
    stack = [str(root)]
    while stack:
        path = stack.pop()
        count += 1
        try:
            with os.scandir(path) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue
    return count


def check_folder(space: SpaceInfo) -> tuple[Check, int]:
    name = f"folder {space.name}"
    folder = space.folder
    if not folder.exists():
        return (
            Check(
                name,
                "fail",
                f"{folder} does not exist (moved, deleted, or an unmounted drive?)",
                f"mkdir -p {folder} (or mount it) and restart the agent; the agent re-downloads "
                "the space's files into it",
            ),
            0,
        )
    if not folder.is_dir():
        return (
            Check(name, "fail", f"{folder} is not a directory", f"move that file away: {folder}"),
            0,
        )
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        return (
            Check(
                name,
                "fail",
                f"{folder} is not readable and writable by this user",
                f"chown -R $USER {folder} && chmod u+rwx {folder}",
            ),
            0,
        )
    dirs = count_dirs(folder)
    return (
        Check(
            name,
            "ok",
            f"{folder} ({dirs} director{'y' if dirs == 1 else 'ies'}, read/write)",
            data={"path": str(folder), "dirs": dirs},
        ),
        dirs,
    )


def check_disks(paths: list[Path]) -> list[Check]:
    seen: set[int] = set()
    checks = []
    for path in paths:
        try:
            dev = path.stat().st_dev
            vfs = os.statvfs(path)
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        free = vfs.f_bavail * vfs.f_frsize
        total = vfs.f_blocks * vfs.f_frsize
        frac = free / total if total else 0.0
        text = f"{_bytes(free)} free of {_bytes(total)} ({frac:.0%}) on the filesystem of {path}"
        data = {"path": str(path), "free_bytes": free, "total_bytes": total}
        if free < DISK_FAIL_BYTES:
            checks.append(
                Check("disk", "fail", text, "free space now: the database cannot commit", data)
            )
        elif free < DISK_WARN_BYTES or frac < DISK_WARN_FRACTION:
            checks.append(
                Check("disk", "warn", text, "free some space (less than 1 GiB or 5% left)", data)
            )
        else:
            checks.append(Check("disk", "ok", text, data=data))
    return checks


def check_inotify(dirs: int, spaces: int, proc: Path = Path("/proc/sys/fs/inotify")) -> Check:
    try:
        watches = int((proc / "max_user_watches").read_text())
        instances = int((proc / "max_user_instances").read_text())
    except (OSError, ValueError) as exc:
        return Check("inotify", "warn", f"cannot read inotify limits: {exc}")
    data = {"dirs": dirs, "max_user_watches": watches, "max_user_instances": instances}
    suggest = max(524288, 1 << max(0, 2 * dirs - 1).bit_length())
    fix = (
        f"sudo sysctl fs.inotify.max_user_watches={suggest}; to keep it after a reboot: echo "
        f"fs.inotify.max_user_watches={suggest} | sudo tee /etc/sysctl.d/90-qmoi-sync.conf"
    )
    text = f"{dirs} director{'y' if dirs == 1 else 'ies'} to watch, max_user_watches {watches}"
    if dirs > watches:
        return Check(
            "inotify",
            "fail",
            f"{text}: changes in some folders go unnoticed (one watch per directory)",
            fix,
            data,
        )
    if spaces > instances:
        return Check(
            "inotify",
            "fail",
            f"{spaces} spaces but max_user_instances {instances} (one per space)",
            f"sudo sysctl fs.inotify.max_user_instances={max(1024, 2 * spaces)}",
            data,
        )
    if dirs > watches * INOTIFY_HEADROOM:
        return Check(
            "inotify",
            "warn",
            f"{text}: little headroom (other programs of this user share the limit)",
            fix,
            data,
        )
    return Check("inotify", "ok", text, data=data)


# -- relay -----------------------------------------------------------------------------------
@dataclass
class RelayProbe:
    rtt_s: float | None = None
    handshake_s: float | None = None
    skew_s: float | None = None
    skew_uncertainty_s: float | None = None
    error: str | None = None
    fix: str | None = None


async def probe_relay(url: str, timeout: float) -> RelayProbe:
    """TCP connect (the round-trip time), then a websocket handshake (TLS verified for wss://);
    the handshake response's Date header gives the relay's clock."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    parsed = urlparse(url)
    host = parsed.hostname
    if parsed.scheme not in ("ws", "wss") or not host:
        return RelayProbe(error=f"not a relay URL: {url!r}", fix="expected wss://host:port")
    try:
        port = parsed.port or (443 if parsed.scheme == "wss" else 80)
    except ValueError:
        return RelayProbe(error=f"bad port in {url!r}", fix="expected wss://host:port")
    where = f"{host}:{port}"
    probe = RelayProbe()
    try:
        rtts = []
        for _ in range(TCP_SAMPLES):
            t0 = time.perf_counter()
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            rtts.append(time.perf_counter() - t0)
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        probe.rtt_s = min(rtts)
        ctx = ssl.create_default_context() if parsed.scheme == "wss" else None
        wall0, t0 = wall(), time.perf_counter()
        async with connect(
            url, ssl=ctx, open_timeout=timeout, proxy=None, compression=None, close_timeout=2
        ) as ws:
            elapsed = time.perf_counter() - t0
            probe.handshake_s = elapsed
            date = ws.response.headers.get("Date") if ws.response is not None else None
        offset = offset_from_date(date, wall0, elapsed)
        if offset is not None:
            probe.skew_s, probe.skew_uncertainty_s = offset
    except socket.gaierror as exc:
        probe.error = f"cannot resolve {host}: {exc.strerror or exc}"
        probe.fix = "check the relay URL (`qmoi-sync space list`) and this machine's DNS"
    except ConnectionRefusedError:
        probe.error = f"connection refused by {where}"
        probe.fix = (
            "is the relay running? start it (`qmoi-sync relay serve ...` or its service); if it "
            f"runs, check its --host/--port and that a firewall lets TCP port {port} through"
        )
    except TimeoutError:
        probe.error = f"no answer from {where} within {timeout:g} s"
        probe.fix = f"a firewall may be dropping TCP port {port}; check the relay host and network"
    except ssl.SSLCertVerificationError as exc:
        probe.error = f"TLS certificate of {host} is not trusted: {exc.verify_message}"
        probe.fix = (
            f"give the relay a certificate for {host} from a trusted CA (e.g. Let's Encrypt); "
            "for a private CA, point SSL_CERT_FILE at its bundle for the agent too"
        )
    except ssl.SSLError as exc:
        probe.error = f"TLS handshake with {where} failed: {exc.reason or exc}"
        probe.fix = "check that the relay serves TLS on this port (wss://) and the URL's scheme"
    except InvalidStatus as exc:
        probe.error = (
            f"{where} answered HTTP {exc.response.status_code} instead of a websocket upgrade"
        )
        probe.fix = "check the URL path and that a reverse proxy forwards websocket upgrades"
    except (InvalidHandshake, EOFError) as exc:
        probe.error = f"{where} does not speak the websocket protocol: {exc or type(exc).__name__}"
        probe.fix = "check the port and the scheme (wss:// for a TLS relay, ws:// for plain)"
    except OSError as exc:
        probe.error = f"cannot reach {where}: {exc.strerror or exc}"
        probe.fix = "check this machine's network connection and routes to the relay"
    return probe


def relay_checks(url: str, probe: RelayProbe) -> list[Check]:
    if probe.error is not None:
        return [Check(f"relay {url}", "fail", probe.error, probe.fix)]
    assert probe.rtt_s is not None and probe.handshake_s is not None
    data = {
        "rtt_ms": round(probe.rtt_s * 1000, 2),
        "handshake_ms": round(probe.handshake_s * 1000, 2),
    }
    checks = [
        Check(
            f"relay {url}",
            "ok",
            f"reachable, round trip {_ms(probe.rtt_s)}, "
            f"websocket handshake {_ms(probe.handshake_s)}"
            + (" (TLS verified)" if url.startswith("wss://") else ""),
            data=data,
        )
    ]
    if probe.skew_s is None:
        checks.append(
            Check(
                f"clock {url}",
                "warn",
                "the relay sent no Date header; clock skew not measured",
                "check the clocks by hand (timedatectl / date -u on both hosts)",
            )
        )
    else:
        skew = probe.skew_s
        unc = probe.skew_uncertainty_s or 0.0
        text = (
            f"relay clock {'ahead' if skew >= 0 else 'behind'} by {abs(skew):.1f} s (±{unc:.1f} s)"
        )
        cdata = {"skew_s": round(skew, 3), "uncertainty_s": round(unc, 3)}
        if abs(skew) > CLOCK_SKEW_WARN_S:
            checks.append(
                Check(
                    f"clock {url}",
                    "warn",
                    text + ": invite expiry and timestamps will be off; LAN discovery follows "
                    "the relay's clock once the agent has reached the relay (a device off by "
                    "more than 10 min that never reached it finds no LAN peers)",
                    "turn on time sync on both hosts: sudo timedatectl set-ntp true",
                    cdata,
                )
            )
        else:
            checks.append(Check(f"clock {url}", "ok", text, data=cdata))
    return checks


# -- the agent -------------------------------------------------------------------------------
async def agent_checks(home: Home, timeout: float) -> list[Check]:
    from qmoi_sync.agent.control import AgentNotRunning, request

    try:
        report = await request(home.control_path, {"cmd": "status"}, timeout=timeout)
    except AgentNotRunning:
        return [
            Check(
                "agent",
                "fail",
                "not running: nothing syncs",
                f"start it: `qmoi-sync --home {home.root} run`, or as a service: "
                f"`qmoi-sync --home {home.root} service install`",
                {"running": False},
            )
        ]
    except (TimeoutError, OSError, UserError, ValueError) as exc:
        return [
            Check(
                "agent",
                "fail",
                f"does not answer on {home.control_path}: {exc or type(exc).__name__}",
                "look at its log; restart it (`qmoi-sync stop`, then start it again)",
                {"running": None},
            )
        ]
    spaces = report.get("spaces", [])
    checks = [
        Check(
            "agent",
            "ok",
            f"running, device {report['device']['name']}, {len(spaces)} space(s)",
            data={"running": True},
        )
    ]
    for s in spaces:
        name = f"sync {s['name']}"
        relay = s.get("relay") or {}
        detail = f"{s['state']}, {s['files']} files, {s['pending_out']} pending"
        if s["state"] == "error":
            checks.append(
                Check(name, "fail", f"{detail}: {'; '.join(s['warnings']) or 'error'}", None)
            )
        elif relay.get("url") and not relay.get("connected"):
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{detail}: agent not connected to its relay "
                    f"({relay.get('last_error') or 'connecting'})",
                    "see the relay check above; the agent retries with backoff",
                )
            )
        elif s.get("quarantined"):
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{detail}: {s['quarantined']} envelope(s) quarantined",
                    "a member sent malformed data; see `qmoi-sync status`",
                )
            )
        else:
            checks.append(Check(name, "ok", detail))
    return checks


# -- orchestration ---------------------------------------------------------------------------
async def run_checks(home: Home, timeout: float = 5.0) -> list[Check]:
    checks = check_home(home)
    if any(c.status == "fail" and c.name == "home" for c in checks):
        return checks
    try:
        spaces = await asyncio.to_thread(read_spaces, home)
    except sqlite3.Error as exc:
        checks.append(
            Check(
                "database",
                "fail",
                f"cannot read {home.db_path}: {exc}",
                "check its permissions; restore it from a backup if it is damaged",
            )
        )
        spaces = []
    else:
        if not spaces:
            checks.append(
                Check(
                    "spaces",
                    "warn",
                    "this device has no spaces yet",
                    "qmoi-sync space create NAME --folder DIR --relay URL, or qmoi-sync join TOKEN",
                )
            )
    urls = sorted({s.relay_url for s in spaces if s.relay_url})
    probes = asyncio.gather(*(probe_relay(u, timeout) for u in urls))
    folder_results = await asyncio.gather(*(asyncio.to_thread(check_folder, s) for s in spaces))
    total_dirs = 0
    for check, dirs in folder_results:
        checks.append(check)
        total_dirs += dirs
    checks.extend(check_disks([home.root, *(s.folder for s in spaces if s.folder.is_dir())]))
    if sys.platform.startswith("linux") and spaces:
        checks.append(check_inotify(total_dirs, len(spaces)))
    for url, probe in zip(urls, await probes, strict=True):
        checks.extend(relay_checks(url, probe))
    checks.extend(await agent_checks(home, timeout))
    return checks


def doctor(
    home: Home, as_json: bool = False, timeout: float = 5.0, out: Callable[[str], None] = print
) -> int:
    checks = asyncio.run(run_checks(home, timeout))
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        out(
            json.dumps(
                {
                    "schema_version": SCHEMA_VERSION,
                    "home": str(home.root),
                    "ok": not failed,
                    "checks": [asdict(c) for c in checks],
                },
                indent=2,
            )
        )
    else:
        for c in checks:
            out(f"{c.status.upper():<4}  {c.name}: {c.message}")
            if c.fix and c.status != "ok":
                out(f"      fix: {c.fix}")
        counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
        out(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)")
    return 1 if failed else 0


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
