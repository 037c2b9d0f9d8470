"""A private test LAN made of Linux network namespaces (needs root and iproute2).

    hub namespace:  bridge "lan" (10.213.1.0/24, multicast: mDNS)
                    bridge "wan" (10.213.2.0/24; the hub itself is 10.213.2.254: a relay runs here)
    node namespace: lo, lan0 (10.213.1.N), wan0 (10.213.2.N), a multicast route on lan0

Nothing leaves these namespaces: no route to the host, no default route. Agents run inside a
node with `ip netns exec`, each one a separate test host. Everything is removed by `destroy()`
(namespaces first killed of every process left in them: only ours can be there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import PY, Device, Relay, wait_until

LAN_NET = "10.213.1"
WAN_NET = "10.213.2"
HUB_WAN_IP = f"{WAN_NET}.254"


class NetnsUnavailable(Exception):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def lan_env() -> dict[str, str]:
    """The environment of processes in the test LAN: LAN discovery on (the suite's kill switch
    only protects the host namespace)."""
    env = dict(os.environ)
    env.pop("QMOI_SYNC_LAN", None)
    return env


@dataclass
class LanNet:
    prefix: str
    nodes: dict[str, int] = field(default_factory=dict)  # node name -> host number

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def lan_ip(self, node: str) -> str:
        return f"{LAN_NET}.{self.nodes[node]}"

    # -- setup / teardown ----------------------------------------------------------------------
    def create_hub(self) -> None:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2 (`ip`) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        r = _ip("netns", "add", self.hub, check=False)
        if r.returncode != 0:
            raise NetnsUnavailable(f"cannot create a network namespace: {r.stderr.strip()}")
        h = self.hub
        _ip("-n", h, "link", "set", "lo", "up")
        for br in ("lan", "wan"):
            _ip("-n", h, "link", "add", br, "type", "bridge")
            _ip("-n", h, "link", "set", br, "up")
        _ip("-n", h, "addr", "add", f"{HUB_WAN_IP}/24", "dev", "wan")

    def add_node(self, node: str) -> None:
        n = len(self.nodes) + 1
        self.nodes[node] = n
        ns, h = self.ns(node), self.hub
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        for net, subnet in (("lan", LAN_NET), ("wan", WAN_NET)):
            hub_end = f"{net[0]}{n}-{node}"[:15]
            _ip(
                "-n",
                h,
                "link",
                "add",
                hub_end,
                "type",
                "veth",
                "peer",
                "name",
                f"{net}0",
                "netns",
                ns,
            )
            _ip("-n", h, "link", "set", hub_end, "master", net)
            _ip("-n", h, "link", "set", hub_end, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{n}/24", "dev", f"{net}0")
            _ip("-n", ns, "link", "set", f"{net}0", "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "lan0")

    def link(self, node: str, up: bool) -> None:
        """Unplug (or plug back) a node's LAN cable, losing (regaining) its address as with
        DHCP; its relay network stays."""
        ns = self.ns(node)
        if up:
            _ip("-n", ns, "addr", "add", f"{self.lan_ip(node)}/24", "dev", "lan0")
            _ip("-n", ns, "link", "set", "lan0", "up")
            _ip("-n", ns, "route", "replace", "224.0.0.0/4", "dev", "lan0")
        else:
            _ip("-n", ns, "link", "set", "lan0", "down")
            _ip("-n", ns, "addr", "flush", "dev", "lan0")

    def destroy(self) -> None:
        for name in [*(self.ns(n) for n in self.nodes), self.hub]:
            r = _ip("netns", "pids", name, check=False)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)

    def cmd(self, node: str | None, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hub if node is None else self.ns(node), *argv]


@contextlib.contextmanager
def lan_net(nodes: list[str]) -> Iterator[LanNet]:
    net = LanNet(prefix=f"qs{os.getpid() % 100000}")
    try:
        net.create_hub()
        for node in nodes:
            net.add_node(node)
        yield net
    finally:
        net.destroy()


@dataclass
class NsRelay(Relay):
    """A relay process in the hub namespace, on the relay network."""

    net: LanNet | None = None

    @property
    def url(self) -> str:
        return f"ws://{HUB_WAN_IP}:{self.port}"

    def start(self, extra: tuple[str, ...] = ()) -> NsRelay:
        assert self.net is not None
        if not self.port:
            self.port = 18765
        self.log_path = self.data.parent / f"relay-{self.port}.log"
        logf = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        argv = [
            PY,
            "-m",
            "qmoi_sync.agent",
            "relay",
            "serve",
            "--host",
            HUB_WAN_IP,
            "--port",
            str(self.port),
            "--data",
            str(self.data),
            *extra,
        ]
        self.proc = subprocess.Popen(
            self.net.cmd(None, argv),
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
            env=lan_env(),
        )
        wait_until(lambda: "relay listening" in self.log(), what="relay listening")
        return self


class NsDevice(Device):
    """An agent (and its CLI) inside one node namespace."""

    def __init__(self, net: LanNet, node: str, home: Path, folder: Path) -> None:
        super().__init__(home=home, folder=folder, name=node)
        self.net = net
        self.node = node

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = self.net.cmd(
            self.node, [PY, "-m", "qmoi_sync.agent", "--home", str(self.home), *args]
        )
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=lan_env())
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.node}: {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def start(self) -> NsDevice:
        logf = open(self.log_path, "a")  # noqa: SIM115
        argv = self.net.cmd(
            self.node, [PY, "-m", "qmoi_sync.agent", "--home", str(self.home), "run"]
        )
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, text=True, env={**lan_env(), **self.env}
        )
        wait_until(self._ready, what=f"agent {self.node} ready")
        return self

    def peer(self, space: str, other: NsDevice) -> dict[str, Any] | None:
        """The status row of device `other` in `space`, as this device sees it."""
        for dev in self.space_status(space)["devices"]:
            if dev["name"] == other.node or dev["short_id"] == other.short_id:
                return dev  # type: ignore[no-any-return]
        return None

    @property
    def short_id(self) -> str:
        st = self.status() or {}
        return str(st.get("device", {}).get("short_id", ""))


def python_in(net: LanNet, node: str, script: Path, *args: str, log: Path) -> subprocess.Popen[str]:
    logf = open(log, "a")  # noqa: SIM115
    return subprocess.Popen(
        net.cmd(node, [sys.executable, str(script), *args]),
        stdout=logf,
        stderr=subprocess.STDOUT,
        text=True,
        env=lan_env(),
    )
