"""``python -m qmoi_sync.relay.healthcheck [--port 8765]``: exit 0 if the local relay's
``/healthz`` answers 200, else 1 (one line on stderr saying why).

Made for container HEALTHCHECKs, which cannot see the relay's arguments: it probes plain HTTP
first and, if the port speaks TLS (the relay runs with ``--tls-cert``), HTTPS without
certificate verification — the probe goes to the loopback address, where the certificate's name
cannot match anyway, and it reads nothing but the status.
"""

from __future__ import annotations

import argparse
import http.client
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def probe(url: str, timeout: float, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return int(resp.status), resp.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 503 and friends: the relay answered
        return int(exc.code), exc.read(4096).decode("utf-8", "replace")


def check(host: str, port: int, timeout: float) -> tuple[bool, str]:
    url = f"http://{host}:{port}/healthz"
    try:
        status, body = probe(url, timeout)
    except (http.client.HTTPException, ConnectionResetError) as exc:
        # Not HTTP on that port: probably TLS. Try HTTPS (loopback probe, no verification).
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            status, body = probe(f"https://{host}:{port}/healthz", timeout, ctx)
        except (OSError, http.client.HTTPException) as exc2:
            return False, f"{url}: {exc!r}; https: {exc2!r}"
    except OSError as exc:
        return False, f"{url}: {exc}"
    return status == 200, f"{status} {body.strip()}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoi_sync.relay.healthcheck")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    ok, detail = check(args.host, args.port, args.timeout)
    if not ok:
        print(f"unhealthy: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
