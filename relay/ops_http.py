"""Operator HTTP endpoints of the relay: ``/healthz`` and ``/metrics``.

Both are answered through websockets' ``process_request`` hook, so no HTTP framework is needed
and the request parsing is websockets' own (bounded header sizes, open timeout).

Where they are served (and why):

* ``/healthz`` on the relay's own port. Load balancers, orchestrators and the container
  HEALTHCHECK then probe the very listener devices use. ``200`` with
  ``{"status": "ok", "spaces", "connections", "uptime_s"}`` while the store answers; ``503`` with
  ``"status": "unavailable"`` (and an ``error``) when it does not, ``"shutting_down"`` once a
  graceful stop began. Every other plain-HTTP request on the relay port gets ``404``; websocket
  upgrades go on as before.
* ``/metrics`` only on a separate listener, opt-in with ``metrics_port`` (``--metrics-port``;
  ``--metrics-host`` defaults to 127.0.0.1), which also answers ``/healthz``. The relay port is
  public, and metrics are traffic metadata (connection counts, bytes per space, timing) that a
  relay meant to learn as little as possible should not publish to the internet; a separate
  listener lets the operator keep them on loopback or a private interface with no proxy rules.
  The metrics listener is plain HTTP (no TLS): bind it to an address only Prometheus reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from .metrics import CONTENT_TYPE, Snapshot, render
from .store import StoreError

if TYPE_CHECKING:
    from .server import RelayServer

log = logging.getLogger("qmoi_sync.relay.ops")

HEALTH_TIMEOUT_S = 5.0
HTTP_LOGGER = "qmoi_sync.relay.ops.http"


class OpsHttp:
    """The relay's operator endpoints; owned by one :class:`RelayServer`."""

    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay
        _install_probe_filter(logging.getLogger("qmoi_sync.relay.ws"), "/healthz")
        _install_probe_filter(logging.getLogger(HTTP_LOGGER), None)
        self.stopping = False
        self._listener: Server | None = None
        self.port: int | None = None

    # -- listeners --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the metrics listener if ``config.metrics_port`` is set."""
        cfg = self.relay.config
        if cfg.metrics_port is None:
            return
        self._listener = await serve(
            _refuse_upgrade,
            cfg.metrics_host,
            cfg.metrics_port,
            process_request=self.process_metrics_port,
            compression=None,
            max_size=1024,
            open_timeout=10,
            ping_interval=None,
            logger=logging.getLogger(HTTP_LOGGER),
            server_header=None,
        )
        sockets = self._listener.sockets
        self.port = sockets[0].getsockname()[1] if sockets else cfg.metrics_port

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await self._listener.wait_closed()
            self._listener = None

    # -- process_request hooks ---------------------------------------------------------------

    async def process_relay_port(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return await self._healthz(connection)
        if _is_upgrade(request):
            return None  # a device: go on with the websocket handshake
        return _text(connection, HTTPStatus.NOT_FOUND, "not found (this is a qmoi-sync relay)\n")

    async def process_metrics_port(
        self, connection: ServerConnection, request: Request
    ) -> Response:
        path = urlsplit(request.path).path
        if path == "/metrics":
            return await self._metrics(connection)
        if path == "/healthz":
            return await self._healthz(connection)
        return _text(connection, HTTPStatus.NOT_FOUND, "not found: try /metrics or /healthz\n")

    # -- endpoints ---------------------------------------------------------------------------

    async def check_store(self) -> str | None:
        """None if the store is usable, else why not."""
        if self.stopping:
            return "shutting down"
        store = self.relay._store
        if store is None:
            return "store not open"
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await store.ping()
        except TimeoutError:
            return f"store did not answer within {HEALTH_TIMEOUT_S:g}s"
        except StoreError as exc:
            return str(exc)
        return None

    async def health(self) -> tuple[int, dict[str, Any]]:
        problem = await self.check_store()
        store = self.relay._store
        body: dict[str, Any] = {
            "status": "ok",
            "spaces": store.space_count if store is not None else 0,
            "connections": len(self.relay._conns),
            "uptime_s": round(self.relay.metrics.uptime_s, 3),
        }
        if problem is None:
            return 200, body
        body["status"] = "shutting_down" if self.stopping else "unavailable"
        body["error"] = problem
        return 503, body

    async def _healthz(self, connection: ServerConnection) -> Response:
        status, body = await self.health()
        response = connection.respond(status, json.dumps(body) + "\n")
        _set_content_type(response, "application/json")
        return response

    def connection_states(self) -> dict[str, int]:
        """Open connections by state (see ``metrics.CONNECTION_STATES``)."""
        relay = self.relay
        joiners = {id(pj.joiner) for sp in relay._spaces.values() for pj in sp.joins.values()}
        counts = dict.fromkeys(("handshake", "joining", "authenticated", "subscribed"), 0)
        for conn in list(relay._conns):
            if id(conn) in joiners:
                counts["joining"] += 1
            elif conn.space is None:
                counts["handshake"] += 1
            elif conn.sub is not None:
                counts["subscribed"] += 1
            else:
                counts["authenticated"] += 1
        return counts

    async def snapshot(self) -> Snapshot:
        relay = self.relay
        store = relay._store
        store_ok = await self.check_store() is None
        usage: list[tuple[bytes, int]] = []
        if store is not None and store_ok:
            try:
                usage = await store.space_usage()
            except StoreError:
                store_ok = False
        return Snapshot(
            connections=self.connection_states(),
            spaces=store.space_count if store is not None else 0,
            space_bytes=usage,
            store_batches=store.stats.batches if store is not None else 0,
            duplicates=store.stats.duplicates if store is not None else 0,
            store_ok=store_ok,
            space_label_mode=relay.config.metrics_space_label,
        )

    async def metrics_text(self) -> str:
        return render(self.relay.metrics, await self.snapshot())

    async def _metrics(self, connection: ServerConnection) -> Response:
        response = connection.respond(HTTPStatus.OK, await self.metrics_text())
        _set_content_type(response, CONTENT_TYPE)
        return response


class _HealthyProbeFilter(logging.Filter):
    """Drops websockets' per-connection INFO lines for successful probes (a HEALTHCHECK or a
    Prometheus scrape every few seconds would otherwise flood the log): on the relay port for
    ``/healthz`` only, on the metrics listener for every path. Failures stay logged."""

    def __init__(self, only_path: str | None) -> None:
        super().__init__()
        self.only_path = only_path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        ws = getattr(record, "websocket", None)
        if ws is None:
            return True
        try:
            request, response = ws.request, ws.response
            return not (
                request is not None
                and (self.only_path in (None, urlsplit(request.path).path))
                and response is not None
                and response.status_code == HTTPStatus.OK
            )
        except (ReferenceError, AttributeError):
            return True


def _install_probe_filter(logger: logging.Logger, only_path: str | None) -> None:
    if not any(isinstance(f, _HealthyProbeFilter) for f in logger.filters):
        logger.addFilter(_HealthyProbeFilter(only_path))


async def _refuse_upgrade(ws: ServerConnection) -> None:
    """The metrics listener never upgrades (process_request answers everything)."""
    await ws.close()


def _is_upgrade(request: Request) -> bool:
    return "websocket" in request.headers.get("Upgrade", "").lower()


def _text(connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
    return connection.respond(status, text)


def _set_content_type(response: Response, value: str) -> None:
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = value
