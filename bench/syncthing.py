"""Syncthing as the yardstick: one instance (generated keys, config.xml, process, REST API).

Set up fairly and safely (issue 8): loopback listen address only; global and local discovery,
relays, NAT traversal, usage and crash reporting and upgrades all off; one shared send-receive
folder (id `bench`) with the file-system watcher on at its minimum delay (`fsWatcherDelayS=1`);
only one side dials: the dialer knows its peer's static `tcp://` address, the other side has
`dynamic`, which resolves to nothing with discovery off. "In sync" is judged from the REST API:
`/rest/db/status` idle with nothing needed and `/rest/db/completion` of the peer at 100.

Used by scenario_scale.py and the side-by-side comparison (bench/versus/).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from benchlib import BenchError, free_port

FOLDER_ID = "bench"

_CONFIG = """<configuration version="36">
    <folder id="{folder_id}" label="bench" path="{folder}" type="sendreceive"
            rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="1"
            ignorePerms="false" autoNormalize="true">
        <filesystemType>basic</filesystemType>
        <!-- Syncthing's defaults, spelled out: a folder element that omits them gets Go's zero
             values, and maxConflicts=0 silently drops the losing side of a conflict -->
        <maxConflicts>10</maxConflicts>
        <minDiskFree unit="%">1</minDiskFree>
        <device id="{me}"></device>
        <device id="{peer}"></device>
    </folder>
    <device id="{me}" name="self" compression="metadata" introducer="false">
        <address>dynamic</address>
    </device>
    <device id="{peer}" name="peer" compression="metadata" introducer="false">
        <address>{peer_address}</address>
    </device>
    <gui enabled="true" tls="false">
        <address>127.0.0.1:{gui_port}</address>
        <apikey>{apikey}</apikey>
    </gui>
    <options>
        <listenAddress>tcp://127.0.0.1:{port}</listenAddress>
        <globalAnnounceEnabled>false</globalAnnounceEnabled>
        <localAnnounceEnabled>false</localAnnounceEnabled>
        <relaysEnabled>false</relaysEnabled>
        <natEnabled>false</natEnabled>
        <announceLANAddresses>false</announceLANAddresses>
        <urAccepted>-1</urAccepted>
        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
        <startBrowser>false</startBrowser>
        <crashReportingEnabled>false</crashReportingEnabled>
        <setLowPriority>false</setLowPriority>
    </options>
</configuration>
"""


def ensure_installed() -> bool:
    """The Debian package, installed on first use (root + apt-get); False if still missing."""
    if shutil.which("syncthing") is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing syncthing (apt-get) for the comparison …", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "syncthing"], check=False)
    return shutil.which("syncthing") is not None


def version() -> str:
    out = subprocess.run(["syncthing", "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


class Syncthing:
    """One Syncthing instance with its own home (keys, config, database) and folder."""

    def __init__(self, home: Path, folder: Path, name: str = "st") -> None:
        self.home = home
        self.folder = folder
        self.name = name
        self.port = free_port()
        self.gui_port = free_port()
        self.apikey = "bench-" + os.urandom(8).hex()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.peer: Syncthing | None = None
        home.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            ["syncthing", "generate", f"--home={home}", "--no-default-folder"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        m = re.search(r"Device ID: ([A-Z0-9-]{63})", out.stdout + out.stderr)
        if m is None:
            raise BenchError(f"no device id from syncthing generate: {out.stdout}{out.stderr}")
        self.device_id = m[1]

    @property
    def log_path(self) -> Path:
        return self.home / "syncthing.log"

    def configure(self, peer: Syncthing, dial: str | None = None) -> None:
        """Share the folder with `peer`; dial it at `dial` (tcp://host:port) or never."""
        self.peer = peer
        (self.home / "config.xml").write_text(
            _CONFIG.format(
                folder_id=FOLDER_ID,
                folder=self.folder,
                me=self.device_id,
                peer=peer.device_id,
                peer_address=dial or "dynamic",
                gui_port=self.gui_port,
                apikey=self.apikey,
                port=self.port,
            )
        )

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "STNOUPGRADE": "1", "STNODEFAULTFOLDER": "1"}
        with open(self.log_path, "ab") as logf:
            self.started_at = time.perf_counter()
            # As its systemd unit runs it: a monitor process and Syncthing proper (its child);
            # CPU and memory are measured over the process tree (versus/procs.py).
            self.proc = subprocess.Popen(
                ["syncthing", "serve", f"--home={self.home}", "--no-browser", "--no-restart"],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"syncthing {self.name} is not running")
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise BenchError(f"syncthing {self.name} exited {self.proc.returncode}:\n{tail}")

    def rest(self, path: str) -> Any:
        """GET a REST endpoint; None while the API does not answer (starting, stopping)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.gui_port}{path}", headers={"X-API-Key": self.apikey}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def folder_status(self) -> dict[str, Any]:
        return self.rest(f"/rest/db/status?folder={FOLDER_ID}") or {}

    def peer_completion(self) -> float:
        assert self.peer is not None
        r = self.rest(f"/rest/db/completion?folder={FOLDER_ID}&device={self.peer.device_id}")
        return float(r["completion"]) if r else -1.0

    def connected(self) -> bool:
        assert self.peer is not None
        conns = (self.rest("/rest/system/connections") or {}).get("connections", {})
        return bool(conns.get(self.peer.device_id, {}).get("connected"))

    def in_sync(self) -> bool:
        """Idle, nothing needed locally, the peer connected and 100 % complete as seen here."""
        self.check_alive()
        st = self.folder_status()
        return bool(
            st.get("state") == "idle"
            and st.get("needTotalItems", 1) == 0
            and self.connected()
            and self.peer_completion() >= 100.0
        )

    def stop(self) -> None:
        """SIGTERM, and wait until Syncthing proper (the monitor's child) has exited too: the
        monitor exits first, and a scenario that edits the folder of a "stopped" instance must
        not race the child's shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            _gone, alive = psutil.wait_procs(children, timeout=30)
            for c in alive:
                with contextlib.suppress(psutil.Error):
                    c.kill()
            psutil.wait_procs(alive, timeout=10)
        self.proc = None


def pair(
    tmp: Path,
    a_folder: Path,
    b_folder: Path,
    dialer: str = "b",
    route: Callable[[Syncthing], str] | None = None,
) -> tuple[Syncthing, Syncthing]:
    """Two configured (not started) instances sharing the folder; only `dialer` ("a"/"b")
    dials, at `route(listener)` if given (e.g. a byte-counting proxy), else its address."""
    a = Syncthing(tmp / "st-home-a", a_folder, "a")
    b = Syncthing(tmp / "st-home-b", b_folder, "b")
    dial, listen = (a, b) if dialer == "a" else (b, a)
    dial.configure(listen, dial=route(listen) if route else listen.address)
    listen.configure(dial, dial=None)
    return a, b
