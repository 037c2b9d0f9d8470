"""qmoi-sync websocket relay: stores and forwards ciphertext it cannot read."""
