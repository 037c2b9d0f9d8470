"""Suite-wide settings.

Agents started by the tests run in this machine's own network namespace, whose interfaces lead
to a real network: their LAN discovery (mDNS multicast on every interface) is switched off with
the `QMOI_SYNC_LAN=off` kill switch, so no test ever sends traffic beyond loopback. The LAN
suite (tests/lan/) runs its agents inside private network namespaces and clears the switch for
them explicitly.
"""

from __future__ import annotations

import os

os.environ.setdefault("QMOI_SYNC_LAN", "off")
