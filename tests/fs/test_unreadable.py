"""Files the agent cannot read are shown in status, retried with backoff, and synced once they
can be read; nothing else waits for them.

The tests run as root, which reads any file whatever its mode; device a's agent runs under
`setpriv` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from its bounding set, so a
mode-000 file is really unreadable to it (EACCES from the kernel, no simulation).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from harness import Device, Relay, create_space, invite, join, wait_until

pytestmark = pytest.mark.slow

NO_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def _unreadable_warning(dev: Device, rel: str) -> str | None:
    for w in dev.space_status()["warnings"]:
        if rel in w and "cannot read" in w:
            return str(w)
    return None


def _write_mode_000(path: Path, data: bytes) -> None:
    """Create the file already unreadable (mode 000), as a program holding it would leave it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root + setpriv"
)
def test_unreadable_files_warned_retried_then_synced(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay-data").start()
    a = Device(tmp_path / "home-a", tmp_path / "folder-a", "a", wrap=NO_DAC).init()
    b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b").init()
    try:
        create_space(a, relay)
        a.start()
        join(b, invite(a))
        b.start()

        _write_mode_000(a.folder / "locked.txt", b"text the agent cannot read yet\n")
        _write_mode_000(a.folder / "locked.bin", b"\x00\x01binary" * 1000)
        a.write("free.txt", "readable\n")

        # The readable file is not held up by the unreadable ones.
        wait_until(lambda: b.read("free.txt") == "readable\n", what="free.txt on b")
        for rel in ("locked.txt", "locked.bin"):
            wait_until(lambda rel=rel: _unreadable_warning(a, rel), what=f"warning for {rel}")
        assert "Permission denied" in (_unreadable_warning(a, "locked.txt") or "")
        assert not (b.folder / "locked.txt").exists()
        assert not (b.folder / "locked.bin").exists()
        # Retried by the timer (no file event happens meanwhile): the backoff shows in the log.
        wait_until(
            lambda: len(re.findall(r"retrying \d+ unreadable file", a.log())) >= 2,
            timeout=30,
            what="two timed retries of the unreadable files",
        )

        os.chmod(a.folder / "locked.txt", 0o644)
        os.chmod(a.folder / "locked.bin", 0o644)
        wait_until(
            lambda: b.read("locked.txt") == "text the agent cannot read yet\n",
            timeout=60,
            what="locked.txt on b",
        )
        wait_until(
            lambda: (
                (b.folder / "locked.bin").exists()
                and (b.folder / "locked.bin").read_bytes() == b"\x00\x01binary" * 1000
            ),
            timeout=60,
            what="locked.bin on b",
        )
        wait_until(
            lambda: (
                not _unreadable_warning(a, "locked.txt")
                and not _unreadable_warning(a, "locked.bin")
            ),
            what="warnings cleared",
        )
        assert a.proc is not None and a.proc.poll() is None
    finally:
        a.stop()
        b.stop()
        relay.stop()
