"""Fault injection between LAN peers, inside the test LAN's network namespaces (tests/lan/netns.py).

The proxies run in the test process, on their own thread, but that thread first joins a node's
network namespace (``setns(2)``: a network namespace is per thread), so what they listen on and
dial is inside the test LAN — no process to manage, and the test drives them directly:

* :class:`NsFaultProxy` — tests/chaos/faultproxy.py's websocket-frame-aware proxy (delay, drop,
  duplicate, reorder at message boundaries, cut, partition, throttle), listening on the node's
  127.0.0.1 and forwarding to a peer's LAN address. An agent is pointed at it with the test hook
  ``QMOI_SYNC_TEST_LAN_DIAL`` (agent/lan_config.py): "when you dial the peer found at
  10.213.1.2:47700, dial 127.0.0.1:<proxy port> instead". One proxy per dialing direction
  (each peer may dial the other), both under the same faults: :class:`LinkFaults`.
* :class:`NsInjectingProxy` — tests/security's relay man in the middle (``rewrite`` plays a
  hostile relay), in a node's namespace, between that node's agent and the relay in the hub.
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from chaos.faultproxy import FaultProxy
from lan.netns import LanNet
from security.sec_helpers import InjectingProxy

CLONE_NEWNET = 0x40000000
#: The LAN handshake (hello, challenge, proof, welcome and the first frames after it) is spared,
#: as the chaos proxy spares the relay's: a fault there only costs a handshake timeout.
SPARE_FRAMES = 4


def enter_netns(ns: str) -> None:
    """Move the calling thread into network namespace ``ns`` (``ip netns`` name)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NsFaultProxy(FaultProxy):
    def __init__(self, ns: str, upstream_host: str, upstream_port: int, seed: int) -> None:
        super().__init__(upstream_port, upstream_host, seed=seed, spare_frames=SPARE_FRAMES)
        self.ns = ns

    def _run(self) -> None:
        enter_netns(self.ns)
        super()._run()


class NsInjectingProxy(InjectingProxy):
    def __init__(self, ns: str, upstream: str) -> None:
        super().__init__(upstream)
        self.ns = ns

    def _run(self) -> None:
        enter_netns(self.ns)
        super()._run()


@dataclass
class LinkFaults:
    """The LAN link between two nodes, through one proxy per dialing direction."""

    proxies: list[NsFaultProxy]

    @classmethod
    def between(cls, net: LanNet, one: str, two: str, port: int, seed: int) -> LinkFaults:
        """Proxies in ``one`` (to ``two``'s LAN port) and in ``two`` (to ``one``'s)."""
        return cls(
            [
                NsFaultProxy(net.ns(one), net.lan_ip(two), port, seed).start(),
                NsFaultProxy(net.ns(two), net.lan_ip(one), port, seed + 1).start(),
            ]
        )

    def dial_env(self, net: LanNet, node: str, other: str, port: int) -> str:
        """The ``QMOI_SYNC_TEST_LAN_DIAL`` value for ``node``'s agent (dialing ``other``)."""
        proxy = next(p for p in self.proxies if p.ns == net.ns(node))
        return f"{net.lan_ip(other)}:{port}=127.0.0.1:{proxy.port}"

    def set(self, **rules: Any) -> None:
        for p in self.proxies:
            p.set("both", **rules)

    def clear(self) -> None:
        for p in self.proxies:
            p.clear()

    def cut(self) -> int:
        return sum(p.cut() for p in self.proxies)

    def partition(self, on: bool) -> None:
        for p in self.proxies:
            p.partition(on)

    @property
    def live(self) -> int:
        return sum(p.live_connections for p in self.proxies)

    @property
    def connections(self) -> int:
        return sum(p.connections_total for p in self.proxies)

    @property
    def counts(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for p in self.proxies:
            out.update(p.counts)
        return out

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()
