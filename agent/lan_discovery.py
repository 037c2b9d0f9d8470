"""mDNS / DNS-SD advertisement and browsing of `_qmoi-sync._tcp.local.` (python-zeroconf).

`Discovery` owns one AsyncZeroconf. It advertises any number of service instances (one per
LAN-enabled space, one per open invite), each with a random instance name and a random host
name so nothing about the device or the space is in clear, and browses for the instances of
others, handing each parsed advertisement to a callback.

Interfaces come and go (laptops roam, VPNs start, namespaces lose their link): every
INTERFACE_POLL_S the current IPv4 addresses of the selected interfaces (`lan.interfaces`, or
every non-loopback interface) are compared with the previous ones; on a change zeroconf rebinds
its sockets (`async_update_interfaces`) and every registration is re-announced with the new
addresses. Only IPv4 is used for mDNS and for peer connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from qmoi_sync.agent.tasks import cancel_and_wait
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.errors import ProtocolError

log = logging.getLogger("qmoi_sync.lan")
# zeroconf logs a traceback for every send on an interface that just went away; interface
# changes are reported by this module instead.
logging.getLogger("zeroconf").setLevel(logging.ERROR)

INTERFACE_POLL_S = 2.0
RESOLVE_TIMEOUT_MS = 3000
# TTLs of our records: host records 30 s (so a vanished peer ages out of caches quickly),
# others zeroconf's default.
HOST_TTL = 30


@dataclass(frozen=True)
class LocalAddress:
    interface: str
    ip: str
    network: ipaddress.IPv4Network


def local_addresses(interfaces: list[str]) -> list[LocalAddress]:
    """IPv4 addresses of the selected interfaces (all but loopback when none are named)."""
    out: list[LocalAddress] = []
    for adapter in ifaddr.get_adapters():
        name = str(adapter.nice_name or adapter.name)
        if interfaces and name not in interfaces:
            continue
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str):
                continue
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_loopback or (addr.is_link_local and not interfaces):
                continue
            net = ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False)
            out.append(LocalAddress(name, ip.ip, net))
    out.sort(key=lambda a: (a.interface, a.ip))
    return out


@dataclass(frozen=True)
class Found:
    """A resolved advertisement of another agent."""

    instance: str
    advert: L.Advert
    addresses: list[str]
    port: int


FoundHandler = Callable[[Found], None]
LostHandler = Callable[[str], None]


def _random_label() -> str:
    return os.urandom(10).hex()


class Discovery:
    def __init__(
        self,
        interfaces: list[str],
        on_found: FoundHandler | None = None,
        on_lost: LostHandler | None = None,
        browse: bool = True,
    ) -> None:
        self.interfaces = list(interfaces)
        self.on_found = on_found
        self.on_lost = on_lost
        self.browse = browse
        self.azc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.addresses: list[LocalAddress] = []
        self._ads: dict[str, AsyncServiceInfo] = {}  # key -> registered info
        self._wanted: dict[str, tuple[dict[str, str], int]] = {}  # key -> (txt, port)
        self._own: set[str] = set()
        self._host = f"{_random_label()}.local."
        self._task: asyncio.Task[None] | None = None
        self._resolving: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.started = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._refresh_interfaces()
        self._task = asyncio.create_task(self._watch_interfaces())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        for t in list(self._resolving):
            t.cancel()
        async with self._lock:
            await self._stop_zeroconf()

    async def _stop_zeroconf(self) -> None:
        if self.browser is not None:
            with contextlib.suppress(Exception):
                await self.browser.async_cancel()
            self.browser = None
        if self.azc is not None:
            with contextlib.suppress(Exception):
                await self.azc.async_unregister_all_services()
            with contextlib.suppress(Exception):
                await self.azc.async_close()
            self.azc = None
            self._ads.clear()

    async def _watch_interfaces(self) -> None:
        while True:
            await asyncio.sleep(INTERFACE_POLL_S)
            try:
                await self._refresh_interfaces()
            except Exception:  # keep watching: a transient netlink/socket error is not fatal
                log.exception("LAN discovery: interface refresh failed")

    async def _refresh_interfaces(self) -> None:
        current = await asyncio.to_thread(local_addresses, self.interfaces)
        async with self._lock:
            if current == self.addresses and self.azc is not None:
                return
            before = self.addresses
            self.addresses = current
            ips = sorted({a.ip for a in current})
            if not ips:
                if self.azc is not None:
                    log.info("LAN discovery: no usable interface left; waiting for one")
                    await self._stop_zeroconf()
                return
            if self.azc is None:
                self.azc = AsyncZeroconf(interfaces=ips, ip_version=IPVersion.V4Only)
                if self.browse:
                    self.browser = AsyncServiceBrowser(
                        self.azc.zeroconf, [L.SERVICE_TYPE], handlers=[self._on_change]
                    )
                log.info("LAN discovery on %s", ", ".join(f"{a.interface} {a.ip}" for a in current))
            else:
                log.info(
                    "LAN discovery: interfaces changed (%s -> %s)",
                    ", ".join(a.ip for a in before) or "none",
                    ", ".join(ips),
                )
                await self.azc.async_update_interfaces(ips)
            for key, (txt, port) in list(self._wanted.items()):
                await self._publish(key, txt, port)
        self.started.set()

    # -- advertising ---------------------------------------------------------------------------
    async def advertise(self, key: str, txt: dict[str, str], port: int) -> None:
        """Register (or update) the advertisement known as ``key``."""
        async with self._lock:
            self._wanted[key] = (txt, port)
            if self.azc is not None:
                await self._publish(key, txt, port)

    async def withdraw(self, key: str) -> None:
        async with self._lock:
            self._wanted.pop(key, None)
            info = self._ads.pop(key, None)
            if info is not None and self.azc is not None:
                self._own.discard(info.name)
                with contextlib.suppress(Exception):
                    await self.azc.async_unregister_service(info)

    async def _publish(self, key: str, txt: dict[str, str], port: int) -> None:
        assert self.azc is not None
        addresses = [socket.inet_aton(a.ip) for a in self.addresses]
        old = self._ads.get(key)
        if old is not None and (old.port, old.addresses, _txt_of(old)) == (port, addresses, txt):
            return
        name = old.name if old is not None else f"{_random_label()}.{L.SERVICE_TYPE}"
        info = AsyncServiceInfo(
            L.SERVICE_TYPE,
            name,
            port=port,
            properties=txt,
            server=self._host,
            addresses=addresses,
            host_ttl=HOST_TTL,
        )
        self._own.add(name)
        self._ads[key] = info
        if old is None:
            # Instance names are 80 random bits: skip the 1.5 s uniqueness probing.
            await self.azc.async_register_service(info, cooperating_responders=True)
        else:
            await self.azc.async_update_service(info)

    # -- browsing ------------------------------------------------------------------------------
    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if name in self._own:
            return
        if state_change is ServiceStateChange.Removed:
            if self.on_lost is not None:
                self.on_lost(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            return
        try:
            advert = L.parse_txt(info.properties or {})
        except ProtocolError:
            return  # someone else's service type clash, or junk: not ours to care about
        port = info.port
        if not port or not 0 < port < 65536:
            return
        addresses = [a for a in info.parsed_addresses(IPVersion.V4Only) if self.on_link(a)]
        if not addresses:
            return
        if self.on_found is not None:
            self.on_found(Found(name, advert, addresses, port))

    def on_link(self, address: str) -> bool:
        """Only addresses on one of our own networks are dialed: a LAN advertisement never
        sends us anywhere else."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        return any(ip in a.network for a in self.addresses)


def _txt_of(info: AsyncServiceInfo) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (info.properties or {}).items():
        if isinstance(k, bytes) and isinstance(v, bytes):
            out[k.decode("ascii", "replace")] = v.decode("ascii", "replace")
    return out
