"""`snapshot configure|now|list`, `restore`, `history`, `restore-file` (wired into agent/cli.py).

Reading commands (list, history, restore into another folder, restore-file) open the device's
database read-only, so they work while the agent runs. `snapshot configure` and `snapshot now`
go through the running agent when there is one (the change syncs at once; the agent draws the
progress), else they run here under the agent lock. Restoring a whole space *into its own
folder* needs the agent stopped: it writes the sync state.

Exit codes: 0 ok, 1 bucket or unexpected failure, 2 usage, 4 integrity: something in the bucket
is missing, tampered, swapped or not signed by a member device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qmoi_sync.agent.home import AgentLock, Home, UserError

EXIT_INTEGRITY = 4
COMMANDS = ("snapshot", "restore", "history", "restore-file")
T = TypeVar("T")


def _duration(text: str) -> int:
    from qmoi_sync.agent.cli import parse_duration

    return parse_duration(text)


def _target_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    what = "the bucket (default: the space's configured snapshot target)"
    p.add_argument("--from", dest="source", required=required, metavar="S3_URL", help=what)
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument("--region", help="bucket region (default from the AWS config, or us-east-1)")
    p.add_argument("--path-style", action="store_true", help="path-style addressing (MinIO…)")


def add_parsers(sub: Any) -> None:
    sp = sub.add_parser("snapshot", help="encrypted S3 snapshots of a space").add_subparsers(
        dest="snapshot_cmd", required=True
    )
    s = sp.add_parser("configure", help="set the space's snapshot bucket and policy (shared)")
    s.add_argument("space")
    s.add_argument("url", metavar="s3://bucket/prefix")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    s.add_argument("--region")
    s.add_argument("--path-style", action="store_true")
    s.add_argument("--every", type=_duration, default=3600, help="interval, e.g. 1h (default)")
    s.add_argument("--keep-last", type=int, default=24, help="newest snapshots kept (24)")
    s.add_argument("--keep-daily", type=int, default=30, help="days with a daily one kept (30)")
    s.add_argument(
        "--gc-grace",
        type=_duration,
        default=3600,
        help="never delete unreferenced objects younger than this (1h)",
    )
    s = sp.add_parser("now", help="take a snapshot now")
    s.add_argument("space")
    s.add_argument("--json", action="store_true")
    s = sp.add_parser("list", help="list the snapshots in the bucket")
    s.add_argument("space")
    s.add_argument("--json", action="store_true")
    _target_options(s)

    s = sub.add_parser("restore", help="restore a whole space from a snapshot")
    s.add_argument("space")
    s.add_argument(
        "--to",
        required=True,
        help="a new or empty folder; the space's own folder restores this device's sync state",
    )
    s.add_argument("--at", default="latest", help="snapshot id, number or ISO time (latest)")
    s.add_argument("--json", action="store_true")
    _target_options(s)

    s = sub.add_parser("history", help="the versions of one file in the retained snapshots")
    s.add_argument("space")
    s.add_argument("path", help="path inside the space")
    s.add_argument("--json", action="store_true")
    _target_options(s)

    s = sub.add_parser("restore-file", help="bring one file back as of a snapshot")
    s.add_argument("space")
    s.add_argument("path", help="path inside the space")
    s.add_argument("--at", required=True, help="snapshot id, number or ISO time")
    s.add_argument("--to", help="write it here instead of into the space (where it syncs)")
    _target_options(s)


# -- space context --------------------------------------------------------------------------------
@dataclass
class _Space:
    space_id: str
    name: str
    folder: Path
    log: bytes
    index_blobs: list[bytes]


def _read_space(home: Home, ref: str) -> _Space:
    """The space's record, membership log and index document, read-only (agent may run)."""
    from qmoi_sync.agent.space import INDEX_DOC_ID

    if not home.db_path.exists():
        raise UserError(f"no spaces on this device ({home.root})")
    db = sqlite3.connect(f"file:{home.db_path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        rows = db.execute("SELECT space_id, name, folder FROM spaces").fetchall()
        match = [r for r in rows if ref in (r[0], r[1])]
        if not match:
            raise UserError(f"no space named {ref!r} on this device")
        sid, name, folder = match[0]
        log = db.execute("SELECT log FROM membership WHERE space_id=?", (sid,)).fetchone()
        if log is None:
            raise UserError(f"space {name} has no membership log; the database is damaged")
        blobs = [
            bytes(r[0])
            for r in db.execute(
                "SELECT state FROM docs WHERE space_id=? AND doc_id=?", (sid, INDEX_DOC_ID)
            )
        ]
        blobs += [
            bytes(r[0])
            for r in db.execute(
                "SELECT data FROM doc_updates WHERE space_id=? AND doc_id=? ORDER BY id",
                (sid, INDEX_DOC_ID),
            )
        ]
    finally:
        db.close()
    return _Space(str(sid), str(name), Path(folder), bytes(log[0]), blobs)


def _shared_config(space: _Space) -> Any:
    from pycrdt import Doc

    from qmoi_sync.agent.snapshot_config import read_config

    doc: Doc[Any] = Doc()
    for b in space.index_blobs:
        doc.apply_update(b)
    return read_config(doc)


def _target(args: argparse.Namespace, shared: Any) -> Any:
    from qmoi_sync.agent.snapshot_s3 import TargetConfig

    if getattr(args, "source", None):
        return TargetConfig.parse(args.source, args.endpoint_url, args.region, args.path_style)
    if shared.target is None:
        raise UserError(
            f"no snapshot bucket configured for space {args.space!r} on this device: run "
            "`qmoi-sync snapshot configure SPACE s3://bucket/prefix ...`, or pass "
            "--from s3://bucket/prefix [--endpoint-url URL]"
        )
    return shared.target


def _context(home: Home, space: _Space, target: Any) -> Any:
    from qmoi_sync.agent.keyring import Keyring
    from qmoi_sync.agent.snapshot_local import LocalRecords
    from qmoi_sync.agent.snapshotter import SnapshotContext
    from qmoi_sync.protocol.membership import MembershipLog

    identity = home.load_identity()
    keyring = Keyring.build(MembershipLog.from_bytes(space.log), identity)
    return SnapshotContext(
        space_id=space.space_id,
        identity=identity,
        keyring=keyring,
        target=target,
        local=LocalRecords(home.root),
        db_path=home.db_path,
    )


def _agent_running(home: Home) -> bool:
    return AgentLock(home.lock_path).is_held_by_other()


def _control(home: Home, payload: dict[str, Any]) -> Any:
    from qmoi_sync.agent.control import request

    return asyncio.run(request(home.control_path, payload))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a snapshot coroutine, turning its errors into readable ones."""
    from qmoi_sync.agent.snapshot_format import IntegrityError, SnapshotError

    try:
        return asyncio.run(coro)
    except IntegrityError as exc:
        raise UserError(f"integrity check failed: {exc}", exit_code=EXIT_INTEGRITY) from None
    except SnapshotError as exc:
        raise UserError(str(exc), exit_code=1) from None


# -- progress ------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class ProgressView:
    """A rich progress bar on a terminal (stderr), plain lines (at most one a second) otherwise."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = 0.0
        self._bar: Any = None
        self._task: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[objects]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=None, objects="")

    def update(self, p: dict[str, Any]) -> None:
        total, done = p.get("total_bytes") or 0, p.get("done_bytes") or 0
        objs = f"{p.get('done_objects', 0)}/{p.get('total_objects', 0)} objects"
        if self._bar is not None:
            self._bar.update(
                self._task,
                total=total or None,
                completed=done,
                objects=objs,
                description=f"{self.label}: {p.get('phase', '')}",
            )
            return
        now = time.monotonic()
        if now - self._last_line < 1.0 and not p.get("finished"):
            return
        self._last_line = now
        elapsed = max(1e-6, float(p.get("elapsed_s") or 0))
        rate = done / elapsed
        eta = f", ETA {max(0.0, (total - done) / rate):.0f}s" if rate > 0 and total > done else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        print(
            f"{self.label}: {p.get('phase', '')} {_mib(done)}/{_mib(total)}{pct}, {objs}, "
            f"{_mib(rate)}/s{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


async def _with_progress(work: Awaitable[T], progress: Any, view: ProgressView) -> T:
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            view.update(progress.to_json())
            await asyncio.wait({task}, timeout=0.2)
        view.update({**progress.to_json(), "finished": True})
        return task.result()
    finally:
        view.close()


# -- offline helpers (agent stopped) --------------------------------------------------------------
async def _offline_sync(home: Home, space: _Space) -> tuple[Any, Any]:
    """(store, SpaceSync) for a space, loaded; the caller holds the agent lock."""
    from qmoi_sync.agent.keyring import Keyring
    from qmoi_sync.agent.space import SpaceSync
    from qmoi_sync.agent.store import Store
    from qmoi_sync.protocol.membership import MembershipLog

    identity = home.load_identity()
    store = await Store.open(home.db_path)
    rec = next(r for r in await store.spaces() if r.space_id == space.space_id)
    data = await store.load_membership(space.space_id)
    keyring = Keyring.build(MembershipLog.from_bytes(data), identity)
    sync = SpaceSync(store, identity, rec, keyring)
    await sync.load()
    return store, sync


def _locked(home: Home, fn: Callable[[], T]) -> T:
    lock = AgentLock(home.lock_path)
    if not lock.try_acquire():
        raise UserError("the agent is running; this command needs it stopped (qmoi-sync stop)")
    try:
        return fn()
    finally:
        lock.release()


# -- commands ------------------------------------------------------------------------------------
def dispatch(home: Home, args: argparse.Namespace) -> int:
    if args.cmd == "snapshot":
        if args.snapshot_cmd == "configure":
            return _configure(home, args)
        if args.snapshot_cmd == "now":
            return _now(home, args)
        return _list(home, args)
    if args.cmd == "restore":
        return _restore(home, args)
    if args.cmd == "history":
        return _history(home, args)
    return _restore_file(home, args)


def _configure(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.snapshot_config import SnapshotPolicy
    from qmoi_sync.agent.snapshot_format import SnapshotError
    from qmoi_sync.agent.snapshot_s3 import TargetConfig

    try:
        target = TargetConfig.parse(args.url, args.endpoint_url, args.region, args.path_style)
    except SnapshotError as exc:
        raise UserError(str(exc)) from None
    if args.keep_last < 1 or args.keep_daily < 0:
        raise UserError("--keep-last must be at least 1 and --keep-daily at least 0")
    policy = SnapshotPolicy(args.every, args.keep_last, args.keep_daily, args.gc_grace)
    fields = {"target": target.to_json(), "policy": policy.to_json()}
    space = _read_space(home, args.space)
    if _agent_running(home):
        _control(home, {"cmd": "snapshot_configure", "space": space.space_id, "fields": fields})
    else:

        async def go() -> bool:
            from qmoi_sync.agent.snapshot_config import set_fields

            store, sync = await _offline_sync(home, space)
            try:
                return bool(await sync.update_shared(lambda doc: set_fields(doc, fields)))
            finally:
                await store.close()

        if not _locked(home, lambda: asyncio.run(go())):
            raise UserError("this device may not change the space's configuration (read-only)")
    print(
        f"space {space.name}: snapshots to {target.url}"
        + (f" via {target.endpoint_url}" if target.endpoint_url else "")
        + f" every {args.every}s, keeping the last {args.keep_last} and {args.keep_daily} "
        "daily; shared with every device of the space (credentials stay on each device)"
    )
    _check_bucket(target)
    return 0


def _check_bucket(target: Any) -> None:
    from qmoi_sync.agent.snapshot_s3 import Bucket, BucketError

    bucket = Bucket(target, concurrency=1)

    async def go() -> None:
        await bucket.check()

    try:
        asyncio.run(go())
    except BucketError as exc:
        print(f"warning: this device cannot use the bucket yet: {exc}", file=sys.stderr)
    finally:
        bucket.close()


def _print_result(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"snapshot {res['id']}: {res['files']} file(s), {_mib(res['total_bytes'])} in total; "
        f"uploaded {res['uploaded_objects']} object(s) ({res['uploaded_bytes']} bytes), "
        f"reused {res['reused_objects']}, in {res['duration_s']:.2f}s"
    )


def _now(home: Home, args: argparse.Namespace) -> int:
    space = _read_space(home, args.space)
    view = ProgressView(f"snapshot {space.name}")
    if _agent_running(home):
        from qmoi_sync.agent.control import AgentNotRunning

        try:
            p = _control(home, {"cmd": "snapshot_now", "space": space.space_id})
            while not p.get("finished"):
                view.update(p)
                time.sleep(0.2)
                p = _control(home, {"cmd": "snapshot_progress", "space": space.space_id})
        except AgentNotRunning:
            view.close()
            raise UserError("the agent stopped while the snapshot was running") from None
        view.update(p)
        view.close()
        if p.get("error"):
            raise UserError(f"snapshot failed: {p['error']}", exit_code=1)
        _print_result(p["result"], args.json)
        return 0
    shared = _shared_config(space)
    target = _target(args, shared)

    async def go() -> dict[str, Any]:
        from qmoi_sync.agent.snapshot_s3 import Bucket
        from qmoi_sync.agent.snapshot_service import snapshot_and_retain
        from qmoi_sync.agent.snapshotter import Progress

        store, sync = await _offline_sync(home, space)
        ctx = _context(home, space, target)
        bucket = Bucket(target)
        progress = Progress()
        try:
            cfg = _live_config(sync)
            result, kept = await _with_progress(
                snapshot_and_retain(ctx, sync, bucket, cfg, progress, None), progress, view
            )
            if kept.note:
                print(f"warning: retention: {kept.note}", file=sys.stderr)
            return result.to_json()
        finally:
            bucket.close()
            ctx.local.close()
            await store.close()

    res = _locked(home, lambda: _run(go()))
    _print_result(res, args.json)
    return 0


def _live_config(sync: Any) -> Any:
    from qmoi_sync.agent.snapshot_config import read_config

    return read_config(sync.index.doc)


def _list(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.restore import iso
    from qmoi_sync.agent.snapshot_format import IntegrityError
    from qmoi_sync.agent.snapshot_s3 import Bucket
    from qmoi_sync.agent.snapshotter import list_manifests, load_manifest
    from qmoi_sync.protocol.identity import DevicePublic

    space = _read_space(home, args.space)
    target = _target(args, _shared_config(space))
    ctx = _context(home, space, target)
    members = {pk: m.public for pk, m in ctx.keyring.log.members().items()}

    async def go() -> list[dict[str, Any]]:
        bucket = Bucket(target)
        try:
            rows = []
            for e in await list_manifests(bucket):
                try:
                    lm = await load_manifest(ctx, bucket, e)
                except IntegrityError as exc:
                    rows.append({"id": e.id, "error": str(exc), "kind": exc.kind})
                    continue
                m = lm.manifest
                pub: DevicePublic | None = members.get(m.signer)
                rows.append(
                    {
                        "id": e.id,
                        "seq": m.seq,
                        "created_at": iso(m.created_at),
                        "files": sum(1 for f in m.files if f.kind != "dir"),
                        "bytes": sum(f.size for f in m.files),
                        "stored_bytes": m.total_bytes(),
                        "device": pub.short_id if pub is not None else m.signer.hex()[:8],
                        "cursor": m.cursor,
                        "interval": m.interval,
                        "signer": m.signer.hex(),
                        "objects": sorted(n.hex() for n in m.object_names()),
                        "chunks": sorted(c.hex() for c in m.chunk_sizes()),
                    }
                )
            return rows
        finally:
            bucket.close()
            ctx.local.close()

    rows = _run(go())
    if args.json:
        print(json.dumps({"space": space.name, "target": target.url, "snapshots": rows}, indent=2))
        return 0
    if not rows:
        print(f"no snapshots in {target.url}")
    for r in rows:
        if "error" in r:
            print(f"{r['id']:<20} ERROR {r['error']}")
        else:
            print(
                f"{r['id']:<20} {r['created_at']}  {r['files']:>6} file(s)  "
                f"{_mib(r['bytes']):>10}  by {r['device']}"
            )
    return 0


def _restore(home: Home, args: argparse.Namespace) -> int:
    space = _read_space(home, args.space)
    shared = _shared_config(space)
    target = _target(args, shared)
    dest = Path(args.to).expanduser().resolve()
    install = dest == space.folder.resolve()
    view = ProgressView(f"restore {space.name}")
    shared_last = shared.last.seq if shared.last is not None else None

    async def export() -> Any:
        from qmoi_sync.agent.restore import restore_export, select_manifest
        from qmoi_sync.agent.snapshot_s3 import RESTORE_CONCURRENCY, Bucket
        from qmoi_sync.agent.snapshotter import Progress

        ctx = _context(home, space, target)
        bucket = Bucket(target, concurrency=RESTORE_CONCURRENCY)
        progress = Progress(op="restore")
        try:
            sel = await select_manifest(ctx, bucket, args.at, shared_last)
            for w in sel.warnings:
                print(f"warning: {w}", file=sys.stderr)
            return await _with_progress(
                restore_export(ctx, bucket, sel, dest, progress), progress, view
            )
        finally:
            bucket.close()
            ctx.local.close()

    async def install_into() -> Any:
        from qmoi_sync.agent.restore import restore_into, select_manifest
        from qmoi_sync.agent.snapshot_s3 import RESTORE_CONCURRENCY, Bucket
        from qmoi_sync.agent.snapshotter import Progress

        store, sync = await _offline_sync(home, space)
        ctx = _context(home, space, target)
        bucket = Bucket(target, concurrency=RESTORE_CONCURRENCY)
        progress = Progress(op="restore")
        try:
            sel = await select_manifest(ctx, bucket, args.at, shared_last)
            for w in sel.warnings:
                print(f"warning: {w}", file=sys.stderr)
            result = await _with_progress(
                restore_into(ctx, bucket, sel, sync, progress), progress, view
            )
            async with store.transaction():
                await store.set_space_seeded(space.space_id)
            return result
        finally:
            bucket.close()
            ctx.local.close()
            await store.close()

    if install:
        if _agent_running(home):
            raise UserError(
                "restoring into the space's own folder needs the agent stopped (qmoi-sync "
                "stop); or restore into another folder with --to"
            )
        result = _locked(home, lambda: _run(install_into()))
    else:
        result = _run(export())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        rate = result.bytes / max(result.duration_s, 1e-6)
        where = "this device's copy of the space" if install else str(dest)
        print(
            f"restored snapshot {result.snapshot} into {where}: {result.files} file(s), "
            f"{_mib(result.bytes)} in {result.duration_s:.2f}s ({_mib(rate)}/s)"
        )
        if install:
            print("start the agent (qmoi-sync run) to resume syncing from that snapshot")
    return 0


def _history(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.restore import history, iso
    from qmoi_sync.agent.snapshot_s3 import Bucket

    space = _read_space(home, args.space)
    target = _target(args, _shared_config(space))
    ctx = _context(home, space, target)

    async def go() -> Any:
        bucket = Bucket(target)
        try:
            return await history(ctx, bucket, args.path)
        finally:
            bucket.close()
            ctx.local.close()

    versions, problems = _run(go())
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if args.json:
        print(
            json.dumps({"path": args.path, "versions": [v.to_json() for v in versions]}, indent=2)
        )
        return 0
    if not versions:
        print(f"{args.path}: in no retained snapshot")
        return 0
    for v in versions:
        mark = "changed" if v.changed else "same"
        print(f"{v.snapshot:<20} {iso(v.created_at)}  {v.size:>10} bytes  {v.sha256[:12]}  {mark}")
    return 0


def _restore_file(home: Home, args: argparse.Namespace) -> int:
    from qmoi_sync.agent.restore import restore_file, select_manifest
    from qmoi_sync.agent.snapshot_s3 import Bucket
    from qmoi_sync.agent.snapshotter import Progress
    from qmoi_sync.protocol.errors import PathError
    from qmoi_sync.protocol.paths import validate_relpath

    space = _read_space(home, args.space)
    shared = _shared_config(space)
    target = _target(args, shared)
    ctx = _context(home, space, target)
    try:
        validate_relpath(args.path)
    except PathError as exc:
        raise UserError(f"not a path inside the space: {exc}") from None

    if args.to:
        out = Path(args.to).expanduser().resolve()
        root, relpath = out.parent, out.name
        root.mkdir(parents=True, exist_ok=True)
        where = str(out)
    else:
        root, relpath = space.folder, args.path
        where = str(space.folder / args.path)

    async def go() -> tuple[Any, int, str]:
        bucket = Bucket(target)
        try:
            sel = await select_manifest(ctx, bucket, args.at)
            for w in sel.warnings:
                print(f"warning: {w}", file=sys.stderr)
            f, n = await restore_file(
                ctx, bucket, sel, args.path, root, relpath, Progress(op="restore")
            )
            return f, n, f"{sel.manifest.seq}-{sel.loaded.entry.tag}"
        finally:
            bucket.close()
            ctx.local.close()

    _f, n, sid = _run(go())
    print(f"restored {args.path} as of snapshot {sid} ({n} bytes) to {where}")
    return 0
