"""The randomized scenario runner: three devices, concurrent operations, faults, invariants.

    with Scenario(tmp_path, Config(seed=1234)) as sc:
        result = sc.run()
    assert not result.violations, result.report()

Everything random is drawn from ``Config.seed`` (one ``random.Random``): which device does what
to which file, which fault hits when, and the proxies' own choices. Real processes make the
timing differ from run to run, so the same seed attempts the same operations and faults, which
is what reproduces a failure in practice: run ``QMOI_CHAOS_SEED=<seed> pytest tests/chaos`` or
``python bench/soak.py --seed <seed>``.

Topology: one relay; each device reaches it through its own :class:`FaultProxy` (its space's
relay URL points at the proxy), so a network fault can hit one device's link, relay websocket
and blob channel alike. Operations (a shared model of paths, as in tests/e2e): create, edit a
line, append, rename, mv onto another file, delete, binary create/change, settings change. Faults:
network rules (drop / dup / reorder / delay / throttle) for a while, cut, partition (offline
period), SIGKILL + restart of an agent, SIGKILL + restart of the relay. A device's files keep
being edited while its agent is dead or offline. After the last operation every fault heals and
:func:`chaos.invariants.check_all` runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Device, Relay, create_space, invite, join, wait_until
from resource_env import Readings

from chaos.faultproxy import DropMode, FaultProxy
from chaos.invariants import OutsideWatch, Violation, check_all, check_processes, log_tracebacks
from chaos.ledger import BIN_MAGIC, Ledger, lineage_of, tokens_in

FOLDERS = ("", "docs", "docs/deep", "src")
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
FAULTS = ("net", "cut", "partition", "kill_agent", "kill_relay")
NET_KINDS = ("drop", "dup", "reorder", "delay", "throttle")
SETTINGS_DOC = "app"
# Starting an agent or the relay on a machine loaded far beyond its cores (a soak next to other
# work) took more than the harness's default 20 s: not what this runner tests.
START_TIMEOUT = 90.0


@dataclass
class Config:
    seed: int
    ops: int = 40
    # pause between operations (seconds, uniform): a person's pace, so faults land mid-sync
    gap: tuple[float, float] = (0.05, 0.4)
    fault_rate: float = 0.15  # chance of starting a fault before each operation
    faults: tuple[str, ...] = FAULTS
    net_kinds: tuple[str, ...] = NET_KINDS
    fault_len: tuple[int, int] = (2, 8)  # a fault lasts this many operations
    binary: bool = True
    big_binary: bool = False  # > 4 MiB files (slow on a loaded machine: soak only)
    settings: bool = True
    drop_mode: DropMode = "truncate"
    settle_timeout: float = 150.0


@dataclass
class Result:
    seed: int
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    # what the proxies actually did (frames dropped, duplicated, ...; cuts; partitions)
    applied: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    trail: str = ""

    def report(self) -> str:
        vs = "\n".join(str(v) for v in self.violations) or "none"
        return (
            f"QMOI_CHAOS_SEED={self.seed} ({self.seconds:.0f}s)\nops: {dict(self.ops)}\n"
            f"faults: {dict(self.faults)}\nproxies applied: {dict(self.applied)}\n"
            f"violations:\n{vs}\n"
            f"tracebacks in logs: {self.tracebacks[:10]}\nlast ledger entries:\n{self.trail}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "ops": dict(self.ops),
            "faults": dict(self.faults),
            "applied": dict(self.applied),
            "violations": [str(v) for v in self.violations],
            "tracebacks": self.tracebacks,
        }


def _fsync_write(path: Path, data: bytes, mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def set_relay_url(dev: Device, url: str) -> None:
    """Point a stopped device's spaces at ``url`` (its own proxy)."""
    with sqlite3.connect(dev.home / "state.db") as db:
        db.execute("UPDATE spaces SET relay_url=?", (url,))


class Scenario:
    def __init__(self, tmp: Path, cfg: Config, names: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.tmp = tmp
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ledger = Ledger()
        self.result = Result(cfg.seed)
        self.relay = Relay(tmp / "relay-data")
        self.devices = [Device(tmp / f"home-{n}", tmp / f"folder-{n}", n) for n in names]
        # The resource policy reads pinned, idle readings: on a loaded soak machine the real
        # load deferred every file over 1 MiB for the whole run (--big never converged), and
        # the policy is not what this runner tests (tests/e2e/test_resources.py does).
        self.readings: list[Path] = []
        for d in self.devices:
            r = Readings(tmp / f"resources-{d.name}.json")
            r.set()
            d.env["QMOI_SYNC_TEST_RESOURCES"] = str(r.path)
            self.readings.append(r.path)
        self.proxies: dict[str, FaultProxy] = {}
        self.settings_files = {n: tmp / f"config-{n}" / "app.json" for n in names}
        self.known: list[str] = []  # the shared model of paths (as the test believes)
        self.down: set[str] = set()  # devices whose agent the runner killed
        self.relay_down = False
        self.heals: list[tuple[int, str, Callable[[], None]]] = []
        self.watch: OutsideWatch | None = None
        self._step = 0

    # -- setup / teardown -------------------------------------------------------------------
    def __enter__(self) -> Scenario:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _setup(self) -> None:
        self.relay.start(timeout=START_TIMEOUT)
        for i, d in enumerate(self.devices):
            d.init()
            self.proxies[d.name] = FaultProxy(
                self.relay.port, seed=self.cfg.seed * 31 + i, drop_mode=self.cfg.drop_mode
            ).start()
        a = self.devices[0]
        a.folder.mkdir(parents=True, exist_ok=True)
        create_space(a, None)  # the relay URL is set per device below
        set_relay_url(a, self.proxies[a.name].url)
        a.start(START_TIMEOUT)
        for d in self.devices[1:]:
            join(d, invite(a))
            set_relay_url(d, self.proxies[d.name].url)
            d.start(START_TIMEOUT)
        if self.cfg.settings:
            for d in self.devices:
                f = self.settings_files[d.name]
                f.parent.mkdir(parents=True, exist_ok=True)
                if d is a:
                    _fsync_write(f, json.dumps({"init": "x"}).encode())
                d.cli("settings", "add", d.space, str(f), "--as", SETTINGS_DOC)
            wait_until(
                lambda: all(_read_json(f).get("init") == "x" for f in self.settings_files.values()),
                timeout=60,
                what="settings file mapped everywhere",
            )
        allowed = [
            *(d.folder for d in self.devices),
            *(d.home for d in self.devices),
            *(d.log_path for d in self.devices),
            *self.settings_files.values(),
            *self.readings,
            self.relay.data,
        ]
        if self.relay.log_path is not None:
            allowed.append(self.relay.log_path)
        self.watch = OutsideWatch(self.tmp, allowed)

    def _teardown(self) -> None:
        for d in self.devices:
            d.stop()
        self.relay.stop()
        for p in self.proxies.values():
            p.stop()

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> Result:
        t0 = time.monotonic()
        rng = self.rng
        for step in range(self.cfg.ops):
            self._step = step
            self._heal_due()
            self._check_alive()
            if rng.random() < self.cfg.fault_rate:
                self._start_fault()
            self._one_op(rng.choice(self.devices))
            # Pacing the simulated users (not waiting for a condition): faults must land while
            # changes are in flight, not only between fully synced states.
            time.sleep(rng.uniform(*self.cfg.gap))
        self._step = 10**9
        self._heal_due()
        self._check_alive()
        self.result.violations += check_all(
            self.relay,
            self.devices,
            self.ledger,
            watch=self.watch,
            settings_files=self.settings_files if self.cfg.settings else None,
            settle_timeout=self.cfg.settle_timeout,
        )
        for p in self.proxies.values():
            self.result.applied.update(p.counts)
        self.result.tracebacks = log_tracebacks(self.relay, self.devices)
        self.result.seconds = time.monotonic() - t0
        self.result.trail = self.ledger.tail()
        # The whole ledger next to the logs, for a failing seed's post-mortem.
        (self.tmp / "ledger.txt").write_text(self.ledger.dump() + "\n")
        return self.result

    # -- faults -----------------------------------------------------------------------------
    def _fault(self, name: str, detail: str = "") -> None:
        self.result.faults[name] += 1
        self.ledger.fault(f"{name} {detail}".strip())

    def _heal_at(self, what: str, fn: Callable[[], None]) -> None:
        lo, hi = self.cfg.fault_len
        self.heals.append((self._step + self.rng.randint(lo, hi), what, fn))

    def _heal_due(self) -> None:
        due = [h for h in self.heals if h[0] <= self._step]
        self.heals = [h for h in self.heals if h[0] > self._step]
        for _, what, fn in due:
            self.ledger.fault(f"heal {what}")
            fn()

    def _check_alive(self) -> None:
        """A process the runner did not kill must be alive; record and restart it if not, so
        the scenario goes on (and the death is reported)."""
        live_devs = [d for d in self.devices if d.name not in self.down]
        dead = check_processes(None if self.relay_down else self.relay, live_devs)
        for v in dead:
            self.result.violations.append(v)
        if dead:
            if not self.relay_down and (
                self.relay.proc is None or self.relay.proc.poll() is not None
            ):
                self.relay.start(timeout=START_TIMEOUT)
            for d in live_devs:
                if d.proc is None or d.proc.poll() is not None:
                    d.start(START_TIMEOUT)

    def _start_fault(self) -> None:
        rng = self.rng
        kind = rng.choice(self.cfg.faults)
        dev = rng.choice(self.devices)
        proxy = self.proxies[dev.name]
        if kind == "net":
            net = rng.choice(self.cfg.net_kinds)
            direction = rng.choice(("up", "down", "both"))
            if net == "drop":
                proxy.set(direction, drop=rng.uniform(0.05, 0.3))
            elif net == "dup":
                proxy.set(direction, dup=rng.uniform(0.05, 0.5))
            elif net == "reorder":
                proxy.set(direction, reorder=rng.uniform(0.05, 0.5))
            elif net == "delay":
                proxy.set(direction, delay=(0.0, rng.uniform(0.05, 0.5)))
            else:
                proxy.set(direction, throttle_bps=rng.choice((20_000.0, 100_000.0, 500_000.0)))
            self._fault(f"net_{net}", f"{dev.name} {direction}")
            self._heal_at(f"net {dev.name}", proxy.clear)
        elif kind == "cut":
            proxy.cut()
            self._fault("cut", dev.name)
        elif kind == "partition":
            if proxy._partitioned:
                return
            proxy.partition(True)
            self._fault("partition", dev.name)
            self._heal_at(f"partition {dev.name}", lambda: proxy.partition(False))
        elif kind == "kill_agent":
            if dev.name in self.down:
                return
            dev.stop(signal.SIGKILL)
            self.down.add(dev.name)
            self._fault("kill_agent", dev.name)

            def restart(d: Device = dev) -> None:
                d.start(START_TIMEOUT)
                self.down.discard(d.name)

            self._heal_at(f"restart {dev.name}", restart)
        elif kind == "kill_relay":
            if self.relay_down:
                return
            self.relay.stop(signal.SIGKILL)
            self.relay_down = True
            self._fault("kill_relay")

            def restart_relay() -> None:
                self.relay.start(timeout=START_TIMEOUT)
                self.relay_down = False

            self._heal_at("restart relay", restart_relay)

    # -- operations -------------------------------------------------------------------------
    def _line(self, dev: Device) -> bytes:
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 6)))
        tok = self.ledger.token(dev.name)
        return f"{words} {tok}\n".encode()

    def _fresh(self, dev: Device, ext: str) -> str:
        folder = self.rng.choice(FOLDERS)
        name = f"doc-{dev.name}-{self.ledger.next_id()}.{ext}"
        return f"{folder}/{name}" if folder else name

    def _one_op(self, dev: Device) -> None:
        rng = self.rng
        kinds = ["create", "edit", "append", "rename", "replace", "delete", "binary", "setting"]
        weights = [3, 3, 3, 2, 1, 1, 2 if self.cfg.binary else 0, 1 if self.cfg.settings else 0]
        op = rng.choices(kinds, weights=weights)[0]
        texts = [p for p in self.known if p.endswith(".txt")]
        bins = [p for p in self.known if p.endswith(".bin")]
        if op in ("edit", "append") and not texts:
            op = "create"
        if op in ("rename", "replace", "delete") and len(self.known) < 3:
            op = "create"
        try:
            getattr(self, f"_op_{op}")(dev, texts, bins)
            self.result.ops[op] += 1
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A remote change moved or deleted the file under us (or it has not arrived):
            # the operation is skipped, as a person would find the file gone.
            self.result.ops[f"{op}_raced"] += 1

    def _op_create(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        path = self._fresh(dev, "txt")
        lin = self.ledger.lineage()
        lines = [self._line(dev) for _ in range(self.rng.randint(1, 5))]
        _fsync_write(dev.folder / path, f"# lineage {lin}\n".encode() + b"".join(lines))
        self.ledger.text_written(dev.name, "create", path, lin, _toks(lines), [])
        self.known.append(path)

    def _op_edit(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        path = self.rng.choice(texts)
        full = dev.folder / path
        where = self.rng.random()
        new = self._line(dev)
        with full.open("r+b") as f:
            lines = f.read().splitlines(keepends=True)
            if len(lines) < 2:
                lines.append(new)
                removed: set[str] = set()
            else:
                i = 1 + int(where * (len(lines) - 1))  # never the lineage header
                removed = tokens_in(lines[i])
                lines[i] = new
            f.seek(0)
            f.truncate()
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        lin = lineage_of(lines[0]) or "?"
        self.ledger.text_written(dev.name, "edit", path, lin, _toks([new]), sorted(removed))

    def _op_append(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        path = self.rng.choice(texts)
        full = dev.folder / path
        new = self._line(dev)
        with full.open("r+b") as f:  # r+: never recreate a file a remote change deleted
            head = f.readline()
            f.seek(0, os.SEEK_END)
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        lin = lineage_of(head) or "?"
        self.ledger.text_written(dev.name, "append", path, lin, _toks([new]), [])

    def _op_rename(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        path = self.rng.choice(self.known)
        target = self._fresh(dev, path.rsplit(".", 1)[-1])
        dest = dev.folder / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(dev.folder / path, dest)
        self.known.remove(path)
        self.known.append(target)
        self.ledger.moved(dev.name, path, target)

    def _op_replace(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        path = self.rng.choice(self.known)
        ext = path.rsplit(".", 1)[-1]
        others = [p for p in self.known if p != path and p.endswith(ext)]
        if not others:
            raise FileNotFoundError(path)
        target = self.rng.choice(others)
        dest = dev.folder / target
        victim = dest.read_bytes()
        os.rename(dev.folder / path, dest)
        self.known.remove(path)
        self.ledger.overwritten(dev.name, "replace", f"{path} -> {target}", victim)

    def _op_delete(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        path = self.rng.choice(self.known)
        full = dev.folder / path
        victim = full.read_bytes()
        full.unlink()
        self.known.remove(path)
        self.ledger.overwritten(dev.name, "delete", path, victim)

    def _op_binary(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        rng = self.rng
        size = rng.choice((2_000, 40_000, 300_000))
        if self.cfg.big_binary and rng.random() < 0.1:
            size = 5 * 1024 * 1024
        body = rng.randbytes(size)
        if bins and rng.random() < 0.6:
            path = rng.choice(bins)
            full = dev.folder / path
            old = full.read_bytes()
            lin = lineage_of(old) or "?"
            data = BIN_MAGIC + lin.encode() + b"\n" + body
            _fsync_write(full, data)
            self.ledger.binary_written(dev.name, "bin_edit", path, lin, data, old)
        else:
            path = self._fresh(dev, "bin")
            lin = self.ledger.lineage()
            data = BIN_MAGIC + lin.encode() + b"\n" + body
            _fsync_write(dev.folder / path, data)
            self.ledger.binary_written(dev.name, "bin_new", path, lin, data, None)
            self.known.append(path)

    def _op_setting(self, dev: Device, texts: list[str], bins: list[str]) -> None:
        f = self.settings_files[dev.name]
        doc = _read_json(f)
        # Not "key", "token", "secret"...: names that look like credentials stay on the device
        # (settings sync keeps them local on purpose), which a ledger would call lost.
        key = f"chaos-opt-{self.ledger.next_id()}-{dev.name}"
        value = f"val-{self.rng.randrange(10**6)}"
        doc[key] = value
        tmp = f.with_name(f".{f.name}.tmp")  # an editor's atomic save
        _fsync_write(tmp, json.dumps(doc, indent=2).encode())
        os.replace(tmp, f)
        self.ledger.set_key(dev.name, SETTINGS_DOC, key, value)


def _toks(lines: list[bytes]) -> list[str]:
    return sorted(set().union(*(tokens_in(ln) for ln in lines)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_seed(tmp: Path, cfg: Config) -> Result:
    tmp.mkdir(parents=True, exist_ok=True)
    with Scenario(tmp, cfg) as sc:
        return sc.run()


__all__ = ["FAULTS", "Config", "Result", "Scenario", "run_seed", "set_relay_url"]
