"""Device settings in `<home>/config.json` (next to device.json): today the LAN section.

```
{"lan": {"enabled": true, "port": 47700, "interfaces": []},
 "spaces": {"<space id>": {"lan": {"enabled": false}}}}
```

- `lan.enabled` (default true): advertise, browse and accept LAN peers. Per space it can only be
  switched off (or back on) for that space; the global switch wins.
- `lan.port` (default 47700): the TCP port peers connect to. If it is taken, the agent listens on
  an ephemeral port instead (advertised the same way). 0 means always ephemeral.
- `lan.interfaces` (default empty = every interface): interface names (e.g. `["eth0"]`) that mDNS
  advertises and browses on, and whose addresses are advertised.

`QMOI_SYNC_LAN=off` in the environment switches LAN off whatever the file says (the test suite
sets it for agents in the host's network namespace).

**Test hook** `QMOI_SYNC_TEST_LAN_DIAL="<host>:<port>=<host>:<port>,..."`: when this agent dials
a LAN peer found at the left address, it dials the right one instead (tests/lan puts a
fault-injecting proxy there, tests/lan/lan_faults.py). Authentication is end to end (the peer
proves its key over the connection), so a proxy in between can delay, drop or cut, never
impersonate. Not a user setting: malformed entries are ignored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from qmoi_sync.agent.home import UserError

CONFIG_FILE = "config.json"
DEFAULT_LAN_PORT = 47700
KILL_SWITCH_ENV = "QMOI_SYNC_LAN"
TEST_DIAL_ENV = "QMOI_SYNC_TEST_LAN_DIAL"
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


class LanConfig(BaseModel):
    enabled: bool = True
    port: int = Field(default=DEFAULT_LAN_PORT, ge=0, le=65535)
    interfaces: list[str] = Field(default_factory=list)


class SpaceLanConfig(BaseModel):
    enabled: bool | None = None  # None: follow the global setting


class SpaceConfig(BaseModel):
    lan: SpaceLanConfig = Field(default_factory=SpaceLanConfig)


class DeviceSettings(BaseModel):
    lan: LanConfig = Field(default_factory=LanConfig)
    spaces: dict[str, SpaceConfig] = Field(default_factory=dict)

    def lan_enabled_for(self, space_id: str) -> bool:
        if not self.lan.enabled or lan_killed():
            return False
        per = self.spaces.get(space_id)
        return per is None or per.lan.enabled is not False


def lan_killed() -> bool:
    return os.environ.get(KILL_SWITCH_ENV, "").strip().lower() in ("0", "off", "false", "no")


def dial_address(host: str, port: int) -> tuple[str, int]:
    """Where to dial a peer advertised at ``host:port`` (itself, unless the test hook
    :data:`TEST_DIAL_ENV` redirects it)."""
    for entry in os.environ.get(TEST_DIAL_ENV, "").split(","):
        seen, _, instead = entry.strip().partition("=")
        h, _, p = seen.rpartition(":")
        h2, _, p2 = instead.rpartition(":")
        if h == host and p == str(port) and h2 and p2.isdigit():
            return h2, int(p2)
    return host, port


def settings_path(home_root: Path) -> Path:
    return home_root / CONFIG_FILE


def load_settings(home_root: Path) -> DeviceSettings:
    path = settings_path(home_root)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return DeviceSettings()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    try:
        return DeviceSettings.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise UserError(f"{path} is not a valid config file: {exc}") from exc


def save_settings(home_root: Path, settings: DeviceSettings) -> None:
    path = settings_path(home_root)
    tmp = path.with_name(path.name + ".tmp")
    data = settings.model_dump_json(indent=2, exclude_defaults=False) + "\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


GLOBAL_KEYS = ("lan.enabled", "lan.port", "lan.interfaces")
SPACE_KEYS = ("lan.enabled",)


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "on", "yes"):
        return True
    if t in ("0", "false", "off", "no"):
        return False
    raise UserError(f"expected true or false, got {text!r}")


def _parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UserError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise UserError(f"port {port} is out of range (0-65535; 0 = any free port)")
    return port


def _parse_interfaces(text: str) -> list[str]:
    t = text.strip()
    if t.lower() in ("", "all", "*"):
        return []
    names = [n.strip() for n in t.split(",") if n.strip()]
    for n in names:
        if not _IFNAME.match(n):
            raise UserError(f"{n!r} is not an interface name")
    return names


def set_value(settings: DeviceSettings, key: str, value: str, space_id: str | None) -> Any:
    """Set one key (CLI syntax) and return the parsed value; raises UserError."""
    if space_id is not None:
        if key not in SPACE_KEYS:
            raise UserError(f"per-space keys: {', '.join(SPACE_KEYS)} (got {key!r})")
        per = settings.spaces.setdefault(space_id, SpaceConfig())
        per.lan.enabled = _parse_bool(value)
        return per.lan.enabled
    if key == "lan.enabled":
        settings.lan.enabled = _parse_bool(value)
        return settings.lan.enabled
    if key == "lan.port":
        settings.lan.port = _parse_port(value)
        return settings.lan.port
    if key == "lan.interfaces":
        settings.lan.interfaces = _parse_interfaces(value)
        return settings.lan.interfaces
    raise UserError(f"unknown key {key!r} (known: {', '.join(GLOBAL_KEYS)})")


def get_values(settings: DeviceSettings, space_id: str | None) -> dict[str, Any]:
    if space_id is not None:
        per = settings.spaces.get(space_id, SpaceConfig())
        return {
            "lan.enabled": per.lan.enabled,
            "effective lan.enabled": settings.lan_enabled_for(space_id),
        }
    return {
        "lan.enabled": settings.lan.enabled,
        "lan.port": settings.lan.port,
        "lan.interfaces": list(settings.lan.interfaces),
    }
