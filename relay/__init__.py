"""qmoi-sync websocket relay: stores and forwards ciphertext it cannot read."""

from .server import RelayConfig, RelayServer, run_relay

__all__ = ["RelayConfig", "RelayServer", "run_relay"]
