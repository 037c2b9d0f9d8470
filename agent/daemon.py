"""The running agent: every space of this device, its watcher and its relay link.

`Agent` wires components together and owns their lifecycles; it holds no sync logic itself.
Each `SpaceRuntime` starts its watcher first, waits until the watch is provably live, rescans
(so nothing changed while the agent was down is missed), then follows the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from qmoi_sync.agent import (
    blob_gc,  # also registers the `gc` control request
    file_conflicts,  # noqa: F401 - registers the `file` conflicts provider and `conflict_resolve`
    membership_ops,
    memtrim,
    settings_control,  # noqa: F401 - registers its control requests
    snapshot_control,  # noqa: F401 - registers its control requests
)
from qmoi_sync.agent.binary_sync import BinarySync, attach, status_fields
from qmoi_sync.agent.clock import wall
from qmoi_sync.agent.control import ControlServer
from qmoi_sync.agent.home import AgentLock, Home, UserError
from qmoi_sync.agent.keyring import Keyring
from qmoi_sync.agent.lan import LanService, lan_status, path_fields
from qmoi_sync.agent.offenders import LAN, RELAY
from qmoi_sync.agent.peer_sync import SpaceLan
from qmoi_sync.agent.policy import POLICY_FILE, Policy, PolicyConfig, PolicyMonitor, wait_for_scan
from qmoi_sync.agent.relay_link import RelayLink
from qmoi_sync.agent.resources import ProcessUsage, make_probe
from qmoi_sync.agent.settings_sync import SettingsService
from qmoi_sync.agent.snapshot_service import SnapshotService
from qmoi_sync.agent.space import SpaceSync
from qmoi_sync.agent.status import (
    CapabilitiesStatus,
    DeviceStatus,
    GapStatus,
    MemberStatus,
    OffenderStatus,
    RelayStatus,
    RepairedGapStatus,
    SpaceState,
    SpaceStatus,
    StatusReport,
)
from qmoi_sync.agent.store import SpaceRecord, Store
from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.agent.watcher import watch_folder
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity, device_id
from qmoi_sync.protocol.membership import MembershipLog
from qmoi_sync.protocol.version import __version__

log = logging.getLogger("qmoi_sync.agent")

WATCH_READY_TIMEOUT = 10.0
# How long `revoke` waits for the relay to confirm it holds the new membership log.
REVOKE_CONFIRM_S = 10.0
# A device joining a space without a relay waits this long for a first sync with a LAN peer
# before it scans its own folder (as a relay joiner waits for its first catch-up).
LAN_FIRST_SYNC_S = 15.0
# Offline CLI commands (`status`, `devices`, … while no agent runs) hold the agent lock for a
# moment; an agent starting meanwhile waits this long for it before concluding another agent runs.
LOCK_WAIT_S = 5.0
LOCK_POLL_S = 0.05


class SpaceRuntime:
    def __init__(self, agent: Agent, record: SpaceRecord, keyring: Keyring) -> None:
        self.agent = agent
        self.record = record
        self.keyring = keyring
        self.sync = SpaceSync(agent.store, agent.identity, record, keyring)
        self.sync.gate = agent.policy
        self.sync.capabilities_source = agent.policy.capabilities
        self.stop = asyncio.Event()
        self.link: RelayLink | None = None
        # A paused space keeps watching and ingesting locally but its relay link is stopped:
        # nothing is sent (the outbox grows) and nothing is applied (deliveries wait at the relay).
        self.link_stop = asyncio.Event()
        self.link_task: asyncio.Task[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.revoked = False
        self.scanned = asyncio.Event()
        # Serializes changes of the membership log (relay updates, joins we accept, revocations)
        # so two of them never fork it.
        self.membership_lock = asyncio.Lock()
        self.lan: SpaceLan | None = None  # LAN peers (agent/lan.py), when enabled
        self.settings = SettingsService(self)  # settings files (agent/settings_sync.py)
        self.snapshots = SnapshotService(self)  # S3 snapshots (agent/snapshot_service.py)
        self.binary: BinarySync | None = None  # binary and large files (agent/binary_sync.py)
        # Loaded text documents are dropped when the agent goes quiet after a large batch.
        self._unregister_quiet = memtrim.trimmer.on_quiet(self.sync.drop_loaded_docs)

    async def start(self) -> None:
        await self.sync.load()
        self.binary = await attach(self)
        if self.agent.lan is not None:
            self.lan = await self.agent.lan.add_space(self)
        await self.settings.start()  # after LAN: the shared lan.enabled option may stop it
        watch_ready = asyncio.Event()
        self.tasks.append(
            asyncio.create_task(
                watch_folder(self.record.folder, self._on_paths, self.stop, watch_ready)
            )
        )
        if self.record.relay_url:
            self.link = RelayLink(
                self.sync,
                self.record.relay_url,
                membership_log=lambda: self.keyring.log.to_bytes(),
                on_membership=self.on_membership,
                on_join_forward=self.on_join_forward,
            )
            if not self.record.paused:
                self._start_link()
        await asyncio.wait_for(watch_ready.wait(), WATCH_READY_TIMEOUT)
        self.tasks.append(asyncio.create_task(self._initial_scan()))
        self.tasks.append(
            asyncio.create_task(self.sync.read_retry.run(self.stop, self._retry_reads))
        )
        self.tasks.append(asyncio.create_task(self.snapshots.run(self.stop)))
        if self.record.relay_url:
            self.tasks.append(asyncio.create_task(blob_gc.run_periodically(self, self.stop)))
        await self.sync.send_device_info(
            self.agent.device_name, f"{platform.system()}-{platform.machine()}", __version__
        )

    async def _initial_scan(self) -> None:
        # A device that joined an existing space learns the remote state before it ingests its
        # own folder, so files already present on both sides are recognized, not duplicated.
        # A first state-vector sync with a LAN peer counts as that catch-up too.
        if not self.record.seeded and self.link is not None:
            waits = [asyncio.ensure_future(self.link.caught_up.wait())]
            if self.lan is not None:
                waits.append(asyncio.ensure_future(self.lan.first_sync.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        elif not self.record.seeded and self.lan is not None:
            await self.lan.wait_first_sync(LAN_FIRST_SYNC_S)
        await wait_for_scan(self.agent.policy, self.sync)
        t0 = time.monotonic()
        await self.sync.rescan()
        if not self.record.seeded:
            async with self.agent.store.transaction():
                await self.agent.store.set_space_seeded(self.record.space_id)
        self.scanned.set()
        # Loading the index and scanning N files leaves freed memory behind even when nothing
        # changed (a restart on 10,000 files: peak 147 MB): count it as work to trim after.
        memtrim.trimmer.note(len(self.sync.files))
        # bench/scenario_scale.py times restart rescans by this line.
        log.info(
            "space %s: start-up scan done in %.2f s (%d files tracked)",
            self.record.name,
            time.monotonic() - t0,
            len(self.sync.files),
        )

    async def _retry_reads(self, paths: set[str]) -> None:
        await self.scanned.wait()
        await self.sync.handle_local(paths)

    async def _on_paths(self, abspaths: set[str]) -> None:
        if not self.scanned.is_set():
            # Changes before the first scan are covered by that scan.
            return
        rel = {r for p in abspaths if (r := self.sync.relpath_of(p)) is not None}
        if rel:
            await self.sync.handle_local(rel)

    def _set_keyring(self, keyring: Keyring) -> None:
        """Switch to a grown membership log: content sealed from now on uses its epoch."""
        self.keyring = keyring
        self.sync.set_keyring(keyring)
        if not keyring.is_member(self.agent.identity.public.sign_pk):
            self.revoked = True
            self.sync.warnings["membership"] = (
                "this device was removed from the space: it can no longer sync it (local "
                "changes stay on disk, unsynced)"
            )

    async def on_membership(self, data: bytes) -> None:
        try:
            new = MembershipLog.from_bytes(data, expected_space_id=self.keyring.space_id)
        except ProtocolError as exc:
            self.sync.warnings["membership"] = f"ignored an invalid membership log: {exc}"
            return
        async with self.membership_lock:
            current = self.keyring.log
            if len(new) <= len(current):
                return
            if not new.is_extension_of(current):
                self.sync.warnings["membership"] = "ignored a membership log that rewrites history"
                return
            async with self.agent.store.transaction():
                await self.agent.store.save_membership(self.record.space_id, new.to_bytes())
            self._set_keyring(Keyring.build(new, self.agent.identity))

    async def on_join_forward(self, request_id: int, request: bytes) -> F.JoinReply | None:
        async with self.membership_lock:
            reply, new_log = await membership_ops.answer_join(
                self.agent.store,
                self.agent.identity,
                self.keyring.log,
                self.record,
                request_id,
                request,
            )
            if new_log is not None:
                self._set_keyring(Keyring.build(new_log, self.agent.identity))
        return reply

    async def revoke(self, ref: str) -> dict[str, Any]:
        """Remove a device (admin only): new key epoch, switched to at once; the new log goes to
        the relay on the live connection (or with the next Auth), which closes the removed
        device's connections and tells the other members."""
        agent = self.agent
        async with self.membership_lock, self.sync.lock:
            # Under the owner's lock: nothing is being sealed while the epoch changes, and the
            # push is queued ahead of every envelope sealed with the new epoch.
            done = await membership_ops.revoke_device(
                agent.store, agent.identity, agent.device_name, self.keyring.log, self.record, ref
            )
            self._set_keyring(Keyring.build(done.log, agent.identity))
            if self.link is not None:
                self.link.push_membership()
        # A first envelope of the new epoch: once a device has seen it in relay order, it
        # refuses anything the removed device still seals with its old key.
        await self.sync.send_device_info(
            agent.device_name, f"{platform.system()}-{platform.machine()}", __version__
        )
        confirmed = False
        if self.link is not None and not self.revoked and not self.record.paused:
            confirmed = await self.link.wait_relay_log(done.log.to_bytes(), REVOKE_CONFIRM_S)
        return {
            "space": self.record.name,
            "device": done.device.model_dump(mode="json"),
            "epoch": done.epoch,
            "relay_confirmed": confirmed,
        }

    # -- pause / resume --------------------------------------------------------------------------
    def _start_link(self) -> None:
        assert self.link is not None
        self.link_stop = asyncio.Event()
        self.link_task = asyncio.create_task(self.link.run(self.link_stop))
        self.tasks.append(self.link_task)

    async def set_paused(self, paused: bool) -> bool:
        """Pause or resume this space (persisted). Returns False if it already was."""
        if paused == self.record.paused:
            return False
        async with self.agent.store.transaction():
            await self.agent.store.set_space_paused(self.record.space_id, paused)
        self.record = dataclasses.replace(self.record, paused=paused)
        if self.binary is not None:
            self.binary.set_paused(paused)
        if self.link is None:
            return True
        if paused:
            # Under the owner's lock no batch is half-applied when the link stops.
            async with self.sync.lock:
                self.link_stop.set()
            task, self.link_task = self.link_task, None
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                self.tasks.remove(task)
        elif self.link_task is None:
            self._start_link()  # catches up: drains the outbox, follows the log from the cursor
        log.info("space %s %s", self.record.name, "paused" if paused else "resumed")
        return True

    async def replace_relay(self, url: str, prepare: Callable[[], Awaitable[None]]) -> None:
        """Move this space to another relay (agent/relay_switch.py): the link stops (under the
        owner's lock, as for pause), ``prepare`` hands over (cursor, full state), then a link to
        ``url`` starts unless the space is paused."""
        if self.link is not None:
            async with self.sync.lock:
                self.link_stop.set()
            task, self.link_task = self.link_task, None
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                if task in self.tasks:
                    self.tasks.remove(task)
        await prepare()
        self.record = dataclasses.replace(self.record, relay_url=url)
        if self.binary is not None and self.binary.link is not None:
            self.binary.link.url = url
        self.link = RelayLink(
            self.sync,
            url,
            membership_log=lambda: self.keyring.log.to_bytes(),
            on_membership=self.on_membership,
            on_join_forward=self.on_join_forward,
        )
        if not self.record.paused:
            self._start_link()

    async def close(self) -> None:
        # Take the owner's lock *before* setting stop: the batch in progress (local or remote)
        # finishes and commits; setting stop first would let the relay link cancel its applier
        # mid-batch. No new batch starts while we hold the lock, so cancelling is clean.
        async with self.sync.lock:
            self.stop.set()
            self.link_stop.set()
            if self.lan is not None:
                self.lan.cancel()
            for t in self.tasks:
                t.cancel()
        await cancel_and_wait(*self.tasks)  # cancelled under the lock above: no second cancel
        if self.agent.lan is not None:
            await self.agent.lan.remove_space(self.record.space_id)
        self.snapshots.close()
        self._unregister_quiet()

    async def status(self) -> SpaceStatus:
        store = self.agent.store
        pending = await store.outbox_count(self.record.space_id)
        link = self.link
        connected = bool(link and link.state.connected)
        refused = link.state.refused if link is not None else None
        state: SpaceState
        if self.revoked or refused:
            state = "error"
        elif self.record.paused:
            state = "paused"
        elif link is not None and not connected:
            state = "offline"
        elif (
            pending
            or (link is not None and not link.state.caught_up)
            or self.sync.lock.locked()
            or any(self.binary.pending() if self.binary else ())
        ):
            state = "syncing"
        else:
            state = "idle"
        warnings = list(self.sync.warnings.values())
        if refused and not self.revoked:
            warnings.insert(
                0,
                f"the relay refuses this device ({refused}): it was removed from the space or "
                "never added; local changes are not synced",
            )
        if link is not None and link.state.quota_exceeded:
            warnings.append(
                "relay quota exceeded: changes are kept in the outbox until room is made"
            )
        if self.sync.stats.quarantined:
            warnings.append(
                f"{self.sync.stats.quarantined} envelope(s) quarantined (malformed or unverifiable)"
            )
        infos = await store.device_infos(self.record.space_id)
        seen = await store.device_seen(self.record.space_id)
        me = self.agent.identity.public.sign_pk
        mine = self.agent.policy.capabilities(self.record.folder)
        lan_peers = self.agent.lan.peers(self.record.space_id) if self.agent.lan else {}
        devices = []
        for pk, member in sorted(self.keyring.log.members().items()):
            info = infos.get(pk, {})
            caps = dataclasses.asdict(mine) if pk == me else info.get("capabilities")
            last_seen = None
            if pk != me:
                # When it last published its info (by its clock, which is capped at ours).
                at = (caps or {}).get("measured_at") or seen.get(pk)
                last_seen = _iso(min(at, wall())) if at else None
            devices.append(
                MemberStatus(
                    id=device_id(pk),
                    short_id=member.public.short_id,
                    name=self.agent.device_name if pk == me else info.get("name"),
                    role=member.role.value,
                    platform=self.agent.policy.probe.platform if pk == me else info.get("platform"),
                    this_device=pk == me,
                    last_seen=last_seen,
                    capabilities=CapabilitiesStatus.model_validate(caps) if caps else None,
                    online=pk == me
                    or pk in lan_peers
                    or (connected and link is not None and pk in link.online),
                    **path_fields(self, pk, lan_peers),
                )
            )
        last = self.sync.stats.last_sync
        role = self.keyring.role_of(me)
        return SpaceStatus(
            id=self.record.space_id,
            name=self.record.name,
            folder=str(self.record.folder),
            role=role.value if role else None,
            state=state,
            relay=RelayStatus(
                url=self.record.relay_url,
                connected=connected,
                last_error=link.state.last_error if link else None,
            ),
            pending_out=pending,
            pending_out_bytes=await store.outbox_bytes(self.record.space_id),
            pending_in=link.pending_in if link is not None else 0,
            pending_in_bytes=link.pending_in_bytes if link is not None else 0,
            rate_up_bps=round(self.sync.rates.up.rate(), 1),
            rate_down_bps=round(self.sync.rates.down.rate(), 1),
            last_sync=_iso(last),
            conflicts=self.sync.conflicts,
            quarantined=self.sync.stats.quarantined,
            files=len(self.sync.files),
            warnings=warnings,
            devices=devices,
            lan=lan_status(self),
            duplicates=self.sync.stats.duplicates,
            settings=self.settings.status_items(),
            snapshot=self.snapshots.status(),
            offenders=self._offenders(infos),
            gaps=self._gaps(infos),
            repaired_gaps=self._repaired(infos),
            repair_requests=self.sync.repair.requests_sent,
            repair_replies=self.sync.repair.replies_sent,
            repair_ignored=self.sync.repair.requests_ignored + self.sync.repair.replies_ignored,
            **status_fields(self.binary),
        )

    def _offenders(self, infos: dict[bytes, dict[str, Any]]) -> list[OffenderStatus]:
        out = []
        for e in self.sync.offenders.entries():
            if e.offender in (RELAY, LAN):
                ids: dict[str, Any] = {"id": e.offender.decode()}
            else:
                ids = {
                    "id": device_id(e.offender),
                    "short_id": device_id(e.offender)[:7],
                    "name": infos.get(e.offender, {}).get("name"),
                }
            out.append(OffenderStatus(**ids, what=e.what, count=e.count, last=_iso(e.last) or ""))
        return out

    def _gaps(self, infos: dict[bytes, dict[str, Any]]) -> list[GapStatus]:
        return [
            GapStatus(
                id=device_id(g.sender),
                short_id=device_id(g.sender)[:7],
                name=infos.get(g.sender, {}).get("name"),
                first_missing=g.first_missing,
                missing=g.missing,
                held=g.held,
                since=_iso(g.since) or "",
                repairs=g.repairs,
            )
            for g in self.sync.order.gaps(self.sync.windows)
            if g.reported
        ]

    def _repaired(self, infos: dict[bytes, dict[str, Any]]) -> list[RepairedGapStatus]:
        return [
            RepairedGapStatus(
                id=device_id(r.sender),
                short_id=device_id(r.sender)[:7],
                name=infos.get(r.sender, {}).get("name"),
                first_missing=r.first_missing,
                missing=r.missing,
                since=_iso(r.since) or "",
                repaired_at=_iso(r.at) or "",
                repairs=r.repairs,
                how=r.how,
                by=device_id(r.by) if r.by is not None else None,
            )
            for r in self.sync.order.repaired
        ]


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


class Agent:
    def __init__(self, home: Home, headless: bool = False) -> None:
        self.home = home
        self.identity: DeviceIdentity = home.load_identity()
        self.device_name = home.load_config().name
        self.lock = AgentLock(home.lock_path)
        self.store: Store
        self.spaces: dict[str, SpaceRuntime] = {}
        self.control: ControlServer | None = None
        self.stop = asyncio.Event()
        self.started_at = wall()
        self.policy = Policy(make_probe(headless), PolicyConfig.load(home.root / POLICY_FILE))
        self.monitor = PolicyMonitor(
            self.policy,
            ProcessUsage(os.getpid(), started_at=self.started_at),
            spaces=lambda: [rt.sync for rt in self.spaces.values()],
            publish=self.publish_device_info,
        )
        self.running = asyncio.Event()  # set once every space started and control listens
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.lan: LanService | None = None

    async def _acquire_lock(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT_S
        while not self.lock.try_acquire():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(LOCK_POLL_S)  # flock has no async wait; poll briefly
        return True

    async def run(self) -> None:
        if not await self._acquire_lock():
            raise UserError(f"an agent is already running for {self.home.root}")
        try:
            self.store = await Store.open(self.home.db_path)
            unregister_shrink = memtrim.trimmer.on_quiet(self._shrink_store)
            try:
                self.lan = LanService(self)
                await self.lan.start()
                for record in await self.store.spaces():
                    await self.start_space(record)
                self.control = ControlServer(self.home.control_path, self)
                await self.control.start()
                log.info(
                    "agent running: device %s (%s), %d space(s)",
                    self.identity.public.short_id,
                    self.device_name,
                    len(self.spaces),
                )
                self.running.set()
                monitor = asyncio.create_task(self.monitor.run(self.stop))
                self._background.add(monitor)
                monitor.add_done_callback(self._background.discard)
                await self.stop.wait()
            finally:
                unregister_shrink()
                await self.shutdown()
        finally:
            self.lock.release()

    def _shrink_store(self) -> None:
        """The agent went quiet after a large batch (agent/memtrim.py): SQLite's page cache
        goes back too, then the heap is trimmed again (the trim itself ran before this
        asynchronous step could finish)."""
        task = asyncio.create_task(self._shrink_store_now())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shrink_store_now(self) -> None:
        try:
            await self.store.shrink_memory()
        except Exception as exc:  # e.g. the store closed at shutdown meanwhile: nothing to free
            log.debug("sqlite shrink_memory skipped: %s", exc)
            return
        memtrim.malloc_trim()

    async def start_space(self, record: SpaceRecord) -> SpaceRuntime:
        data = await self.store.load_membership(record.space_id)
        if data is None:
            raise UserError(f"space {record.name} has no membership log; the database is damaged")
        keyring = Keyring.build(MembershipLog.from_bytes(data), self.identity)
        if record.space_id in self.spaces:
            # Started meanwhile (a control `add_space` racing a SIGHUP reload).
            return self.spaces[record.space_id]
        runtime = SpaceRuntime(self, record, keyring)
        self.spaces[record.space_id] = runtime
        await runtime.start()
        return runtime

    async def shutdown(self) -> None:
        if self.control is not None:
            await self.control.close()
        async with self._reload_lock:  # a reload in progress finishes first
            for runtime in self.spaces.values():
                await runtime.close()
        if self.lan is not None:
            await self.lan.close()
        await self.store.close()
        log.info("agent stopped: every batch finished, database closed")

    # -- SIGHUP ----------------------------------------------------------------------------
    def request_reload(self) -> None:
        """Signal-handler entry point: reload once the agent is up (a SIGHUP during start-up
        is not lost)."""
        task = asyncio.get_running_loop().create_task(self._reload_when_running())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_when_running(self) -> None:
        await self.running.wait()
        try:
            await self.reload()
        except Exception:
            log.exception("reload failed; the agent keeps running with what it had")

    async def reload(self) -> list[str]:
        """Re-read device.json and the spaces table without dropping any connection: a new
        device name is announced to every space, spaces added to the database are started."""
        changes: list[str] = []
        async with self._reload_lock:
            if self.stop.is_set():
                return changes
            try:
                config = self.home.load_config()
            except UserError as exc:
                log.warning("reload: %s; keeping device name %r", exc, self.device_name)
            else:
                if config.name != self.device_name:
                    old, self.device_name = self.device_name, config.name
                    changes.append(f"device name {old!r} -> {config.name!r}")
                    await self.publish_device_info()
            for record in await self.store.spaces():
                if record.space_id in self.spaces:
                    continue
                try:
                    await self.start_space(record)
                except Exception as exc:
                    failed = self.spaces.pop(record.space_id, None)
                    if failed is not None:
                        await failed.close()
                    log.error(
                        "reload: space %s (%s) not started: %s",
                        record.name,
                        record.space_id[:8],
                        exc,
                    )
                    continue
                changes.append(f"started space {record.name} ({record.space_id[:8]})")
        log.info("reloaded configuration: %s", "; ".join(changes) if changes else "nothing changed")
        return changes

    async def status(self) -> StatusReport:
        spaces = [await rt.status() for rt in self.spaces.values()]
        pub = self.identity.public
        return StatusReport(
            device=DeviceStatus(id=pub.device_id, short_id=pub.short_id, name=self.device_name),
            agent_running=True,
            spaces=spaces,
            agent=self.monitor.agent_status(),
        )

    async def publish_device_info(self) -> None:
        """Announce this device (name, platform, current capabilities) to every space."""
        for rt in list(self.spaces.values()):
            await rt.sync.send_device_info(
                self.device_name, self.policy.probe.platform, __version__
            )

    async def set_paused(self, space: str | None, paused: bool) -> list[str]:
        """Pause/resume one space, or every space when `space` is None; returns changed names."""
        runtimes = [self.find_space(space)] if space else list(self.spaces.values())
        return [rt.record.name for rt in runtimes if await rt.set_paused(paused)]

    def find_space(self, name_or_id: str) -> SpaceRuntime:
        for rt in self.spaces.values():
            if name_or_id in (rt.record.name, rt.record.space_id):
                return rt
        raise UserError(f"no space named {name_or_id!r} on this device")
