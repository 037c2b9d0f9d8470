"""The two systems under comparison, behind one interface: a pair of synced folders a and b.

`QmoiPair`: a relay and two agents, driven through the `qmoi-sync` CLI exactly as a user would
(benchlib's Relay/Device). `SyncthingPair`: two Syncthing instances (bench/syncthing.py). Both
run on loopback in a temporary directory; every scenario writes into `a_folder` and observes
`b_folder` on disk, so both systems are timed from the same event to the same end state.

`settled()` is each system's own "nothing left to do": for qmoi-sync both agents idle with an
empty outbox (control socket); for Syncthing both instances' REST API report the folder idle,
nothing needed and the peer 100 % complete. With `proxy=True` all sync traffic goes through a
byte-counting TCP proxy (bench/proxy.py): `wire_bytes()` gives what side a sent and the total.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import psutil
import syncthing
from benchlib import Device, Relay, wait_until
from proxy import CountingProxy

QMOI = "qmoi-sync"
SYNCTHING = "syncthing"
SYSTEMS = (QMOI, SYNCTHING)


class Pair(ABC):
    system: str
    a_folder: Path
    b_folder: Path
    proxy: CountingProxy | None = None

    @abstractmethod
    def start(self) -> None:
        """Both sides running, connected and settled."""

    @abstractmethod
    def settled(self) -> bool: ...

    @abstractmethod
    def stop_side(self, side: str) -> None: ...

    @abstractmethod
    def start_side(self, side: str) -> None:
        """Start one side again (without waiting for it)."""

    @abstractmethod
    def pids(self) -> dict[str, int]:
        """Role -> pid of every running process of the system (sides a, b; qmoi's relay)."""

    @abstractmethod
    def check_alive(self) -> None:
        """Raise if a process of the pair died."""

    @abstractmethod
    def wire_bytes(self) -> tuple[int, int]:
        """(bytes side a sent to its peer/relay, bytes on every link in both directions)."""

    @abstractmethod
    def close(self) -> None: ...

    def wait_settled(self, timeout: float = 120.0) -> None:
        wait_until(self.settled, timeout=timeout, what=f"{self.system} settled", interval=0.02)

    def __enter__(self) -> Pair:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _no_load_policy(home: Path) -> None:
    # The resource policy defers bulk work while the (shared) bench machine is loaded; Syncthing
    # has no such policy, so both are measured doing the work right away.
    home.mkdir(parents=True, exist_ok=True)
    (home / "policy.json").write_text(json.dumps({"load_max": 1000.0}))


class QmoiPair(Pair):
    system = QMOI

    def __init__(self, tmp: Path, proxy: bool = False) -> None:
        self.relay = Relay(tmp / "relay-data")
        self.a = Device(tmp / "home-a", tmp / "folder-a", "a")
        self.b = Device(tmp / "home-b", tmp / "folder-b", "b")
        self.a_folder, self.b_folder = self.a.folder, self.b.folder
        self._want_proxy = proxy

    def _dev(self, side: str) -> Device:
        return {"a": self.a, "b": self.b}[side]

    def start(self) -> None:
        self.relay.start()
        url = self.relay.url
        if self._want_proxy:
            self.proxy = CountingProxy("127.0.0.1", self.relay.port).start()
            url = self.proxy.url  # the invite carries it to b as well
        for d in (self.a, self.b):
            d.init()
            _no_load_policy(d.home)
        self.a.create_space(url)
        self.a.start()
        self.b.join(self.a.invite())
        self.b.start()
        self.wait_settled()

    def settled(self) -> bool:
        self.check_alive()
        return self.a.idle() and self.b.idle()

    def stop_side(self, side: str) -> None:
        self._dev(side).stop()

    def start_side(self, side: str) -> None:
        self._dev(side).start(wait=False)

    def pids(self) -> dict[str, int]:
        out = {}
        for role, proc in (("a", self.a.proc), ("b", self.b.proc), ("relay", self.relay.proc)):
            if proc is not None and proc.poll() is None:
                out[role] = proc.pid
        return out

    def check_alive(self) -> None:
        for d in (self.a, self.b):
            if d.proc is not None and d.proc.poll() is not None:
                raise RuntimeError(f"agent {d.name} exited:\n{d.log()[-3000:]}")

    def wire_bytes(self) -> tuple[int, int]:
        assert self.proxy is not None and self.a.proc is not None
        a_ports = {
            c.laddr.port
            for c in psutil.Process(self.a.pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == self.proxy.port
        }
        up, _down = self.proxy.totals(a_ports)
        total_up, total_down = self.proxy.totals()
        return up, total_up + total_down

    def close(self) -> None:
        for d in (self.b, self.a):
            d.stop()
        self.relay.stop()
        if self.proxy is not None:
            self.proxy.stop()


class SyncthingPair(Pair):
    system = SYNCTHING

    def __init__(self, tmp: Path, proxy: bool = False, dialer: str = "b") -> None:
        """`dialer`: the side that dials (the other only listens). Syncthing redials a lost
        peer only every 60 s (reconnectionIntervalS), so scenarios that restart one side make
        that side the dialer: it dials as soon as it is up, as a restarted qmoi agent does."""
        self.a_folder, self.b_folder = tmp / "st-folder-a", tmp / "st-folder-b"
        self.dialer = dialer
        if proxy:
            self.proxy = CountingProxy("127.0.0.1", 0)
        self.a, self.b = syncthing.pair(
            tmp, self.a_folder, self.b_folder, dialer=dialer, route=self._route if proxy else None
        )

    def _route(self, listener: syncthing.Syncthing) -> str:
        assert self.proxy is not None
        self.proxy.upstream = ("127.0.0.1", listener.port)
        self.proxy.start()
        return f"tcp://127.0.0.1:{self.proxy.port}"

    def _inst(self, side: str) -> syncthing.Syncthing:
        return {"a": self.a, "b": self.b}[side]

    def start(self) -> None:
        # the listener first, so the dialer's first dial (at its start) finds it up
        first, second = (self.b, self.a) if self.dialer == "a" else (self.a, self.b)
        first.start()
        wait_until(lambda: first.rest("/rest/system/ping"), timeout=60, what="syncthing up")
        second.start()
        self.wait_settled(timeout=120)

    def settled(self) -> bool:
        return self.a.in_sync() and self.b.in_sync()

    def stop_side(self, side: str) -> None:
        self._inst(side).stop()

    def start_side(self, side: str) -> None:
        self._inst(side).start()

    def pids(self) -> dict[str, int]:
        return {
            role: inst.proc.pid
            for role, inst in (("a", self.a), ("b", self.b))
            if inst.proc is not None and inst.proc.poll() is None
        }

    def check_alive(self) -> None:
        self.a.check_alive()
        self.b.check_alive()

    def wire_bytes(self) -> tuple[int, int]:
        assert self.proxy is not None
        up, down = self.proxy.totals()  # one connection: the dialer's ("up" = dialer -> listener)
        return (up if self.dialer == "a" else down), up + down

    def close(self) -> None:
        self.b.stop()
        self.a.stop()
        if self.proxy is not None:
            self.proxy.stop()


def make_pair(system: str, tmp: Path, proxy: bool = False, dialer: str = "b") -> Pair:
    """A not yet started pair (use it as a context manager). `dialer` only matters to
    Syncthing (qmoi-sync agents both dial the relay)."""
    if system == QMOI:
        return QmoiPair(tmp, proxy=proxy)
    if system == SYNCTHING:
        return SyncthingPair(tmp, proxy=proxy, dialer=dialer)
    raise ValueError(f"unknown system {system!r}")


def describe_setup() -> dict[str, Any]:
    return {
        QMOI: "relay + 2 agents on loopback via the qmoi-sync CLI; LAN discovery off (relay "
        "path); policy.json load_max 1000 (no deferral of bulk work on machine load)",
        SYNCTHING: "2 instances on loopback (bench/syncthing.py): no discovery/relays/NAT/"
        "usage+crash reporting/upgrades; one send-receive folder, fsWatcherDelayS=1; only "
        "one side dials",
    }
