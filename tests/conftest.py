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

# Hypothesis's per-example deadline is a timing assert: on a loaded 2-core machine a property
# test that is correct fails with DeadlineExceeded. Speed is measured in bench/, not here.
from hypothesis import HealthCheck, settings

settings.register_profile("qmoi", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("qmoi")
