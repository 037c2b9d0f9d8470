"""Where a device keeps its identity, database and control socket.

`--home` wins, then `QMOI_SYNC_HOME`, then the platform's data directory (platformdirs). The device
key file is written 0600 and never logged.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from pydantic import BaseModel, Field

from qmoi_sync.agent.clock import wall
from qmoi_sync.protocol.identity import DeviceIdentity

APP_NAME = "qmoi-sync"


class UserError(Exception):
    """A mistake the user can fix; the CLI prints the message without a traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DeviceConfig(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    created_at: float
    version: int = 1


def resolve_home(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("QMOI_SYNC_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_data_dir(APP_NAME)).resolve()


@dataclass
class Home:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "device.json"

    @property
    def key_path(self) -> Path:
        return self.root / "device.key"

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    @property
    def control_path(self) -> Path:
        return self.root / "control.sock"

    @property
    def lock_path(self) -> Path:
        return self.root / "agent.lock"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    def is_initialized(self) -> bool:
        return self.config_path.exists() and self.key_path.exists()

    def init(self, name: str) -> DeviceIdentity:
        if self.is_initialized():
            raise UserError(f"{self.root} already holds a device identity; refusing to replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        identity = DeviceIdentity.generate()
        _write_private(self.key_path, identity.to_private_bytes())
        config = DeviceConfig(name=name, created_at=wall())
        self.config_path.write_text(config.model_dump_json(indent=2) + "\n")
        return identity

    def load_identity(self) -> DeviceIdentity:
        if not self.is_initialized():
            raise UserError(
                f"no device identity in {self.root}: "
                f"run `qmoi-sync --home {self.root} init --name NAME`"
            )
        mode = self.key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise UserError(f"{self.key_path} is readable by others (mode {mode:o}); chmod 600 it")
        return DeviceIdentity.from_private_bytes(self.key_path.read_bytes())

    def load_config(self) -> DeviceConfig:
        if not self.config_path.exists():
            raise UserError(f"no device config in {self.root}: run `qmoi-sync init` first")
        try:
            return DeviceConfig.model_validate(json.loads(self.config_path.read_text()))
        except (ValueError, OSError) as exc:
            raise UserError(f"{self.config_path} is not a valid device config: {exc}") from exc


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class AgentLock:
    """An exclusive flock held by the running agent, so offline CLI commands never race it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def is_held_by_other(self) -> bool:
        if not self.path.exists():
            return False
        if self.try_acquire():
            self.release()
            return False
        return True
