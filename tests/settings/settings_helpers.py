"""Helpers for the settings end-to-end tests (real agents through tests/harness.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import Device, wait_until

from qmoi_sync.agent.settings_formats import KeyPath, format_handler

SLOW_POLL = 0.2  # status/CLI polls start a Python process each time


def leaves(path: Path, fmt: str) -> dict[KeyPath, Any] | None:
    """The file's leaves, or None while it is missing or does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return format_handler(fmt, style_hint=path.name).parse(text).tree().leaves
    except ValueError:
        return None


def wait_value(path: Path, fmt: str, key: KeyPath, value: Any, timeout: float = 30) -> None:
    def ok() -> bool:
        got = leaves(path, fmt)
        return got is not None and key in got and json.dumps(got[key]) == json.dumps(value)

    wait_until(ok, timeout=timeout, what=f"{path.name}: {key} == {value!r}")


def settings_doc(dev: Device, name: str) -> dict[str, Any]:
    for doc in dev.space_status()["settings"]:
        if doc["name"] == name:
            return doc  # type: ignore[no-any-return]
    raise KeyError(name)


def shared_values(dev: Device, name: str) -> dict[str, Any]:
    out = json.loads(dev.cli("settings", "get", dev.space, name, "--json").stdout)
    return {v["key"]: v["value"] for v in out["values"]}


def wait_shared(dev: Device, name: str, key: str, value: Any, timeout: float = 30) -> None:
    wait_until(
        lambda: key in (vals := shared_values(dev, name)) and vals[key] == value,
        timeout=timeout,
        interval=SLOW_POLL,
        what=f"{dev.name}: shared {name}.{key} == {value!r}",
    )


def conflicts(dev: Device) -> list[dict[str, Any]]:
    out = json.loads(dev.cli("conflicts", "--json").stdout)
    return [c for sp in out["spaces"] for c in sp["conflicts"]]


def add(dev: Device, path: Path, name: str, *extra: str) -> str:
    return dev.cli("settings", "add", dev.space, str(path), "--as", name, *extra).stdout
