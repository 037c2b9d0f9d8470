"""The agent's snapshot task for one space: duty, schedule, retention, log compaction,
automatic restore when the relay's log was truncated past this device's cursor.

Runs beside the space's other tasks (``SpaceRuntime``). Every bucket call goes through
agent/snapshot_s3.py worker threads; a bucket that is unreachable or refuses the credentials is
a status line (``snapshot.last_error``) and a retry with backoff, never a crash loop — syncing
goes on regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from qmoi_sync.agent.restore import restore_into, select_manifest
from qmoi_sync.agent.snapshot_config import (
    SharedConfig,
    lease_json,
    read_config,
    set_fields,
)
from qmoi_sync.agent.snapshot_duty import Candidate, decide, interval_of, rank
from qmoi_sync.agent.snapshot_format import SnapshotError
from qmoi_sync.agent.snapshot_local import LocalRecords
from qmoi_sync.agent.snapshot_s3 import Bucket, TargetConfig
from qmoi_sync.agent.snapshotter import (
    Progress,
    RetentionResult,
    SnapshotContext,
    SnapshotResult,
    apply_retention,
    take_snapshot,
)
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.status import SnapshotStatus
from qmoi_sync.protocol.membership import Role

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime
    from qmoi_sync.agent.index import IndexDoc

log = logging.getLogger("qmoi_sync.snapshot")

#: How often duty and schedule are re-evaluated (at most; shorter for short intervals).
TICK_MAX_S = 30.0
#: After claiming the lease, wait this long and re-read it before snapshotting (concurrent
#: claims converge to one winner through the relay meanwhile).
SETTLE_S = 3.0
RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0


class SnapshotService:
    def __init__(self, rt: SpaceRuntime) -> None:
        self.rt = rt
        self.local = LocalRecords(rt.agent.home.root)
        self.progress: Progress | None = None
        self.last_result: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.duty: str = "no snapshot target configured"
        self.holder = False
        self.retention_note: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._bucket: Bucket | None = None
        self._claimed_at: float | None = None
        self._vacant_since: float | None = None  # since when this device sees no valid lease
        # (index, its version when read, the configuration): see config()
        self._config: tuple[IndexDoc, int, SharedConfig] | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S
        self._wake = asyncio.Event()
        self.clock = time.time
        # Set before the relay link starts: its first Subscribe may already be answered with
        # LogTruncated.
        rt.sync.on_log_truncated = self.on_log_truncated

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def me(self) -> bytes:
        return self.rt.agent.identity.public.sign_pk

    def config(self) -> SharedConfig:
        """The shared configuration, re-read only when the index may have changed: the tick
        asks every few seconds, and reading the index document would load it again after the
        agent unloaded it while idle (IndexDoc.unload)."""
        index = self.rt.sync.index
        cached = self._config
        if cached is not None and cached[0] is index and cached[1] == index.version:
            return cached[2]
        cfg = read_config(index.doc)
        self._config = (index, index.version, cfg)
        return cfg

    def bucket_for(self, target: TargetConfig) -> Bucket:
        if self._bucket is None or self._bucket.target != target:
            if self._bucket is not None:
                self._bucket.close()
            self._bucket = Bucket(target)
        return self._bucket

    def context(self, target: TargetConfig) -> SnapshotContext:
        return SnapshotContext(
            space_id=self.rt.record.space_id,
            identity=self.rt.agent.identity,
            keyring=self.rt.keyring,
            target=target,
            local=self.local,
            db_path=self.rt.agent.home.db_path,
        )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._bucket is not None:
            self._bucket.close()
        self.local.close()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the task -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        saved = await self.local.status(self.rt.record.space_id)
        self.last_result = saved.get("last")
        self.last_error = saved.get("error")
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("snapshot tick failed for space %s", self.rt.record.name)
            cfg = self.config()
            # Unconfigured: look again soon (the configuration may arrive from another device).
            tick = min(TICK_MAX_S, max(1.0, cfg.policy.every_s / 4)) if cfg.target else 2.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()

    async def _candidates(self) -> list[Candidate]:
        store = self.rt.agent.store
        space = self.rt.record.space_id
        infos = await store.device_infos(space)
        seen = await store.device_seen(space)
        out = []
        for pk, member in self.rt.keyring.log.members().items():
            if member.role is Role.reader:
                continue
            if pk == self.me:
                caps: dict[str, Any] | None = asdict(
                    self.rt.agent.policy.capabilities(self.rt.record.folder)
                )
                out.append(Candidate(pk, caps, self.clock()))
                continue
            info = infos.get(pk, {})
            caps = info.get("capabilities")
            at = (caps or {}).get("measured_at") or seen.get(pk)
            out.append(Candidate(pk, caps, float(at) if at else None))
        return out

    async def tick(self) -> None:
        cfg = self.config()
        now = self.clock()
        if cfg.target is None:
            self.duty, self.holder = "no snapshot target configured", False
            return
        if self.rt.sync.send_block is not None:
            self.duty, self.holder = "this device cannot take snapshot duty (read-only)", False
            return
        ranked = rank(self.me, await self._candidates(), now)
        vacant = cfg.lease is None or cfg.lease.until <= now
        if not vacant:
            self._vacant_since = None
        elif self._vacant_since is None:
            self._vacant_since = now
        d = decide(self.me, cfg, ranked, now, vacant_since=self._vacant_since)
        self.duty, self.holder = d.reason, d.holder
        if d.write_lease is not None:
            lease = d.write_lease
            await self.rt.sync.update_shared(
                lambda doc: set_fields(doc, {"lease": lease_json(lease.device, lease.until)})
            )
            if not d.holder:
                self._claimed_at = now
                return
        if not d.holder or not d.due or self.busy:
            return
        if self._claimed_at is not None and now - self._claimed_at < SETTLE_S:
            return
        if now < self._retry_at:
            return
        await self._run_snapshot(cfg, interval_of(now, cfg.policy.every_s))

    # -- snapshot -----------------------------------------------------------------------------
    def snapshot_now(self) -> Progress:
        """Start a snapshot at once (whatever the duty); returns its progress."""
        if self.busy and self.progress is not None:
            return self.progress
        cfg = self.config()
        if cfg.target is None:
            raise SnapshotError(
                f"no snapshot target configured for space {self.rt.record.name}: run "
                "`qmoi-sync snapshot configure` first"
            )
        progress = Progress()
        self.progress = progress
        self._task = asyncio.create_task(self._run_snapshot(cfg, None, progress))
        return progress

    async def _run_snapshot(
        self, cfg: SharedConfig, interval: int | None, progress: Progress | None = None
    ) -> None:
        assert cfg.target is not None
        progress = progress or Progress()
        self.progress = progress
        try:
            result = await self.snapshot_once(cfg, progress, interval)
        except SnapshotError as exc:
            self._failed(str(exc), progress)
        except Exception as exc:  # unexpected: reported, retried, never fatal to the agent
            log.exception("snapshot of space %s failed", self.rt.record.name)
            self._failed(f"snapshot failed: {exc!r}", progress)
        else:
            self.last_error = None
            self._retry_delay = RETRY_MIN_S
            self._retry_at = 0.0
            self.last_result = {"id": result.id, "at": result.created_at, "seq": result.seq}
            progress.result = result.to_json()
        finally:
            progress.finished = True
            await self.local.set_status(
                self.rt.record.space_id, {"last": self.last_result, "error": self.last_error}
            )

    def _failed(self, message: str, progress: Progress) -> None:
        self.last_error = message
        progress.error = message
        self._retry_at = self.clock() + self._retry_delay
        self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
        log.warning("snapshot of space %s failed: %s", self.rt.record.name, message)

    async def snapshot_once(
        self, cfg: SharedConfig, progress: Progress, interval: int | None
    ) -> SnapshotResult:
        """Snapshot, record it in the shared config, apply retention, compact the relay log."""
        assert cfg.target is not None
        ctx = self.context(cfg.target)
        bucket = self.bucket_for(cfg.target)
        result, kept = await snapshot_and_retain(
            ctx, self.rt.sync, bucket, cfg, progress, interval, self.clock
        )
        self.retention_note = kept.note
        await self._compact_log(result, ctx, bucket)
        progress.phase = "done"
        return result

    async def _compact_log(
        self, result: SnapshotResult, ctx: SnapshotContext, bucket: Bucket
    ) -> None:
        """Tell the relay it may drop the log before the oldest cursor still needed: that of
        the snapshot before this one (devices a little behind keep following the log), or this
        one's if it is the only one left. Admin devices only."""
        link = self.rt.link
        if link is None or self.rt.keyring.role_of(self.me) is not Role.admin:
            return
        from qmoi_sync.agent.snapshotter import list_manifests, load_manifest

        entries = [e for e in await list_manifests(bucket) if e.seq < result.seq]
        cursor = result.cursor
        for e in reversed(entries):
            try:
                cursor = min(cursor, (await load_manifest(ctx, bucket, e)).manifest.cursor)
                break
            except SnapshotError:
                continue
        if cursor > 0:
            link.request_truncate(cursor + 1)

    # -- automatic restore after the relay dropped what this device still needed -----------
    async def on_log_truncated(self, before_seq: int) -> None:
        """The relay's log starts at ``before_seq`` but this device's cursor is below it: merge
        the newest snapshot that covers the gap, then follow the log from its cursor. Raises
        (the relay link retries later) when no snapshot can do it."""
        name = self.rt.record.name
        cfg = self.config()
        if cfg.target is None:
            msg = (
                f"the relay dropped the log before seq {before_seq}, which this device has not "
                f"synced, and no snapshot target is known here: run `qmoi-sync restore {name} "
                f"--to {self.rt.record.folder} --from s3://BUCKET/PREFIX ...` with the agent "
                "stopped"
            )
            self.rt.sync.warnings["snapshot-restore"] = msg
            raise SnapshotError(msg)
        ctx = self.context(cfg.target)
        bucket = self.bucket_for(cfg.target)
        progress = Progress(op="restore")
        self.progress = progress
        try:
            sel = await select_manifest(
                ctx, bucket, None, cfg.last.seq if cfg.last is not None else None
            )
            if sel.manifest.cursor + 1 < before_seq:
                raise SnapshotError(
                    f"the newest snapshot covers the log up to seq {sel.manifest.cursor}, but the "
                    f"relay dropped it up to {before_seq - 1}"
                )
            result = await restore_into(ctx, bucket, sel, self.rt.sync, progress)
        except SnapshotError as exc:
            msg = f"automatic restore after the relay log was truncated failed: {exc}"
            self.rt.sync.warnings["snapshot-restore"] = msg
            progress.error = msg
            raise
        finally:
            progress.finished = True
        self.rt.sync.warnings.pop("snapshot-restore", None)
        for w in result.warnings:
            log.warning("space %s: %s", name, w)
        log.info(
            "space %s: restored snapshot %s (the relay log was truncated before seq %d)",
            name,
            result.snapshot,
            before_seq,
        )

    # -- configuration ------------------------------------------------------------------------
    async def configure(self, fields: dict[str, Any]) -> bool:
        ok = await self.rt.sync.update_shared(lambda doc: set_fields(doc, fields))
        self._wake.set()
        return ok

    # -- status -------------------------------------------------------------------------------
    def status(self) -> SnapshotStatus:
        cfg = self.config()
        running = self.busy or (self.progress is not None and not self.progress.finished)
        last = self.last_result or {}
        shared_last = cfg.last
        return SnapshotStatus(
            target=cfg.target.url if cfg.target is not None else None,
            every_s=cfg.policy.every_s if cfg.target is not None else None,
            duty=self.duty,
            holder=self.holder,
            running=running,
            progress=self.progress.to_json() if running and self.progress else None,
            last_id=shared_last.id if shared_last is not None else last.get("id"),
            last_at=_iso(shared_last.at if shared_last is not None else last.get("at")),
            last_error=self.last_error,
            retention_note=self.retention_note,
        )


async def snapshot_and_retain(
    ctx: SnapshotContext,
    sync: SpaceSync,
    bucket: Bucket,
    cfg: SharedConfig,
    progress: Progress,
    interval: int | None,
    clock: Callable[[], float] = time.time,
) -> tuple[SnapshotResult, RetentionResult]:
    """Take a snapshot, record it as the space's latest in the shared config, apply the
    retention policy (used by the agent and by `snapshot now` without a running agent)."""
    min_seq = cfg.last.seq if cfg.last is not None else 0
    result = await take_snapshot(ctx, sync, bucket, progress, interval=interval, min_seq=min_seq)
    last = {"seq": result.seq, "id": result.id, "at": result.created_at, "hash": result.hash}
    await sync.update_shared(lambda doc: set_fields(doc, {"last": last}))
    progress.phase = "retention"
    p = cfg.policy
    kept = await apply_retention(ctx, bucket, p.keep_last, p.keep_daily, p.gc_grace_s, now=clock())
    return result, kept


def _iso(ts: float | None) -> str | None:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
