"""Package and wire-protocol versions."""

from __future__ import annotations

__all__ = ["PROTO_VERSION", "__version__"]

__version__ = "0.1.0"

#: Version of the relay wire protocol (``Hello.proto_version``). Bumped on incompatible changes.
PROTO_VERSION = 1
