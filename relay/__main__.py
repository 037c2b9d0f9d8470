"""``python -m qmoi_sync.relay --host 127.0.0.1 --port 8765 --data ./relay-data``.

Prints ``relay listening on ws://HOST:PORT`` (``wss://`` with TLS) once the socket is bound, then
serves until SIGTERM/SIGINT, which close every connection and the database cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .limits import (
    DEFAULT_BLOB_QUOTA_BYTES,
    DEFAULT_MAX_SPACES,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_BYTES_PER_S,
    DEFAULT_RATE_MSGS_PER_S,
    DEFAULT_SPACE_QUOTA_BYTES,
)
from .metrics import SPACE_LABEL_MODES
from .server import RelayConfig, run_relay


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qmoi_sync.relay",
        description="qmoi-sync relay: stores and forwards end-to-end encrypted envelopes.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to bind, 0 = any (default 8765)")
    p.add_argument("--data", type=Path, default=Path("relay-data"), help="data directory")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (enables wss://)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    p.add_argument(
        "--space-quota", type=int, default=DEFAULT_SPACE_QUOTA_BYTES, help="bytes per space"
    )
    p.add_argument(
        "--blob-quota",
        type=int,
        default=DEFAULT_BLOB_QUOTA_BYTES,
        help="bytes of file chunks per space",
    )
    p.add_argument("--max-spaces", type=int, default=DEFAULT_MAX_SPACES)
    p.add_argument("--rate-msgs", type=float, default=DEFAULT_RATE_MSGS_PER_S, help="msgs/s/conn")
    p.add_argument("--rate-burst", type=int, default=DEFAULT_RATE_BURST)
    p.add_argument(
        "--rate-bytes", type=float, default=DEFAULT_RATE_BYTES_PER_S, help="bytes/s/conn"
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_metrics_arguments(p)
    return p


def add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    """--metrics-host/--metrics-port/--metrics-space-label (shared with `qmoi-sync relay serve`)."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics (and /healthz) over plain HTTP on this port "
        "(default: off; /healthz is always on the relay port)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)"
    )
    p.add_argument(
        "--metrics-space-label",
        choices=SPACE_LABEL_MODES,
        default="hash",
        help="per-space series label: hash of the space id (default), raw id, or none",
    )


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    return RelayConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        space_quota_bytes=args.space_quota,
        blob_quota_bytes=args.blob_quota,
        max_spaces=args.max_spaces,
        rate_msgs_per_s=args.rate_msgs,
        rate_burst=args.rate_burst,
        rate_bytes_per_s=args.rate_bytes,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        metrics_space_label=args.metrics_space_label,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    config = config_from_args(args)
    scheme = "wss" if config.tls_cert else "ws"

    def ready(port: int) -> None:
        print(f"relay listening on {scheme}://{config.host}:{port}", flush=True)

    try:
        asyncio.run(run_relay(config, ready=ready))
    except KeyboardInterrupt:  # a second Ctrl-C before the handlers were installed
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
