"""qmoi-sync wire contract: identities, membership, keys, envelopes, frames (sans-I/O)."""
