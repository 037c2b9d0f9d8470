"""The agent's own shared configuration: options kept in the space's ``qmoi-sync`` settings doc.

The ``qmoi-sync`` settings document exists in every space (no ``settings add`` needed); it is
edited like any other settings document — ``qmoi-sync settings set SPACE qmoi-sync KEY VALUE``,
or mapped to a JSON file with ``settings add SPACE FILE --as qmoi-sync`` — and every device
applies what it holds. Its keys are option names (``{"relays": [...], "lan": {"enabled": false}}``
or the flat ``{"lan.enabled": false}``); unknown keys are reported, not applied.

Options are a registry (`register`) so other components add their own: each has a parser
(JSON value -> typed value, ValueError when invalid) and an applier called on every device
when the effective value changes (and once at start). Built in:

* ``relays`` — list of relay URLs; the space uses the first. Changing it moves every device of
  the space to that relay (agent/relay_switch.py). Later entries are kept for a future failover.
* ``lan.enabled`` — LAN peer sync for this space on every device (a device's own
  ``config.json`` and ``QMOI_SYNC_LAN=off`` can still switch it off locally).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qmoi_sync.agent.home import UserError

if TYPE_CHECKING:
    from qmoi_sync.agent.daemon import SpaceRuntime

log = logging.getLogger("qmoi_sync.settings")

AGENT_DOC = "qmoi-sync"


@dataclass(frozen=True)
class SharedOption:
    key: str  # dotted name, e.g. "lan.enabled"
    help: str
    parse: Callable[[Any], Any]
    # Called with the parsed value (None: the option is not set) on every device; returns a
    # note for `settings get`, or raises UserError with a readable reason.
    apply: Callable[[SpaceRuntime, Any], Awaitable[str | None]]


OPTIONS: dict[str, SharedOption] = {}


def register(option: SharedOption) -> None:
    """Add an option (another component's): its key must be new."""
    if option.key in OPTIONS:
        raise ValueError(f"shared option {option.key!r} is registered already")
    OPTIONS[option.key] = option


# -- relays ---------------------------------------------------------------------------------
def _parse_relays(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(u, str) and u for u in value):
        raise ValueError("relays must be a list of relay URLs (ws:// or wss://)")
    from urllib.parse import urlparse

    for url in value:
        parsed = urlparse(url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ValueError(f"not a relay URL: {url!r}")
    return list(value)


async def _apply_relays(rt: SpaceRuntime, value: list[str] | None) -> str | None:
    if not value:
        return None  # unset: each device keeps the relay it has
    from qmoi_sync.agent.membership_ops import check_relay_url
    from qmoi_sync.agent.relay_switch import switch_relay

    url = value[0]
    check_relay_url(url, rt.record.insecure)  # UserError: refused on this device
    if url == rt.record.relay_url:
        return None
    await switch_relay(rt, url)
    return f"moved to relay {url}"


# -- lan.enabled ----------------------------------------------------------------------------
def _parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


class _LanService(Protocol):
    async def add_space(self, rt: Any) -> Any: ...

    async def remove_space(self, space_id: str) -> None: ...


async def _apply_lan(rt: SpaceRuntime, value: bool | None) -> str | None:
    lan: _LanService | None = getattr(rt.agent, "lan", None)
    if lan is None:
        return None if value is None else "LAN peers are off on this device"
    if value is False:
        await lan.remove_space(rt.record.space_id)
        rt.lan = None
        return "LAN sync off for this space"
    if rt.lan is None:
        rt.lan = await lan.add_space(rt)  # stays None where the device's own config says off
    return None


register(
    SharedOption(
        "relays",
        "relay URLs of the space, the first one in use (moving every device when it changes)",
        _parse_relays,
        _apply_relays,
    )
)
register(
    SharedOption(
        "lan.enabled",
        "sync directly with peers on the local network (true/false)",
        _parse_bool,
        _apply_lan,
    )
)


async def apply_option(rt: SpaceRuntime, option: SharedOption, raw: Any) -> tuple[Any, str | None]:
    """Parse and apply one option; returns (parsed value, note). Raises ValueError/UserError."""
    value = None if raw is None else option.parse(raw)
    try:
        note = await option.apply(rt, value)
    except UserError:
        raise
    except Exception as exc:
        log.exception("applying shared option %s failed", option.key)
        raise UserError(f"could not apply {option.key}: {exc}") from exc
    return value, note
