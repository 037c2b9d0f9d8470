"""An HTTP proxy in front of the S3-compatible test server (moto) that injects the faults a real
object store has: 500/503 answers, slow answers, connections dropped mid-request — for every
request or every n-th one, optionally only for requests whose method and path match.

The agent sees only an endpoint URL (the proxy's), exactly as with a real provider; moto keeps
the state behind it, so what a faulty request did or did not store is checked on moto directly.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import free_port

# What a fault applies to: (method, path incl. query) -> bool
Match = Callable[[str, str], bool]

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Faults:
    mode: str = "pass"  # pass | status | drop | slow
    status: int = 503
    delay_s: float = 0.0
    every: int = 1  # fault the n-th, 2n-th, ... matching request (1: every one)
    match: Match | None = None


@dataclass
class S3FaultProxy:
    upstream: int
    port: int = 0
    faults: Faults = field(default_factory=Faults)
    seen: int = 0  # requests that matched the fault's filter
    faulted: int = 0
    passed: int = 0
    log: list[str] = field(default_factory=list)  # "METHOD path -> what" per request
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str = "pass", **kw: object) -> None:
        with self._lock:
            self.faults = Faults(mode=mode, **kw)  # type: ignore[arg-type]
            self.seen = 0

    def start(self) -> S3FaultProxy:
        self.port = self.port or free_port()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # requests are recorded in proxy.log instead

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- one request ----------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> Faults | None:
        with self._lock:
            f = self.faults
            if f.mode == "pass" or (f.match is not None and not f.match(method, path)):
                return None
            self.seen += 1
            return f if self.seen % max(1, f.every) == 0 else None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._decide(h.command, h.path)
        what = "pass"
        if fault is not None and fault.mode == "drop":
            self._note(h, "dropped")
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.mode == "status":
            code = "ServiceUnavailable" if fault.status == 503 else "InternalError"
            err = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                "<Message>injected by the test proxy</Message></Error>"
            ).encode()
            self._note(h, f"status {fault.status}")
            h.send_response(fault.status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(err)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(err)
            return
        if fault is not None and fault.mode == "slow":
            # Not a wait for a condition: the delay is the fault being injected.
            threading.Event().wait(fault.delay_s)
            what = f"slow {fault.delay_s}s"
        try:
            status, headers, data = self._forward(h, body)
        except OSError as exc:  # upstream gone: what a dead store looks like through a proxy
            self._note(h, f"upstream error {exc}")
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._note(h, what)
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _forward(
        self, h: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in _HOP:
                    conn.putheader(k, v)  # Host included: it is part of the signature
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def _note(self, h: BaseHTTPRequestHandler, what: str) -> None:
        with self._lock:
            if what == "pass" or what.startswith("slow"):
                self.passed += 1
            else:
                self.faulted += 1
            self.log.append(f"{h.command} {h.path} -> {what}")


def is_manifest_put(method: str, path: str) -> bool:
    return method == "PUT" and "/m/" in path


def is_object_put(method: str, path: str) -> bool:
    return method == "PUT" and "/o/" in path


def is_get(method: str, path: str) -> bool:
    return method == "GET" and ("/o/" in path or "/m/" in path or "/c/" in path)
