"""scale: a space of 100,000 files of 1 KiB (issue 3, item 7), and Syncthing on the same files.

1. N text files of exactly 1 KiB (1,000 per folder) are written into a's folder before a's agent
   starts. a is started: time until its status tracks all N files (**first scan + index**) and
   until its outbox is empty and acked; peak RSS (VmHWM) and RSS when idle; CPU seconds used.
2. **Restart rescan**: a is stopped and started again on the unchanged folder. Time until the
   agent logs "start-up scan done" (the scan's own duration is in that line too). Every file
   folder is watched with inotify for IN_OPEN meanwhile: a rescan that trusts size/mtime/inode
   opens no file; the number of files opened is reported (0 expected).
3. **Sync to a second device**: b joins and starts; time until b's folder holds all N files
   with the right content (every file compared), b's peak RSS.
4. **Syncthing** (if `syncthing` is installed; `--no-syncthing` skips it): two instances on
   loopback, set up by bench/syncthing.py (no global/local discovery, no relays, no NAT, no
   usage reporting, file watcher at its minimum delay; s2 dials s1's static
   `tcp://127.0.0.1:<port>` address). s1 starts on a copy of the same files: time
   until its REST API reports the folder idle with N local files (its first scan); then s2
   starts with an empty folder: time until s2 holds all N files with the right content.

Both agents get a policy.json that never defers bulk work on system load (a start-up scan of
more than 20,000 changed files is bulk work, held back while the machine is busy).

`--quick`: 5,000 files. `--files N` overrides either. Targets (issue 3): first index ≤ 60 s,
RSS ≤ 300 MB over the agent's whole life in every phase (a's first index and upload, its
restart, b receiving: each process's VmHWM; a sampled RSS timeline per phase shows when a peak
happens).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import syncthing
from benchlib import Device, Inotify, Relay, memory_reports, verdict, wait_until, workdir

TARGET_INDEX_S = 60.0
TARGET_RSS_MB = 300.0
PER_DIR = 1000
IN_OPEN = 0x20  # inotify: a file was opened
FILE_SIZE = 1024
SCAN_DONE = re.compile(r"start-up scan done in ([0-9.]+) s \((\d+) files tracked\)")


def _rel(i: int) -> str:
    return f"d{i // PER_DIR:03d}/f{i % PER_DIR:03d}.txt"


def _content(i: int) -> bytes:
    head = f"file {i}\n".encode()
    body = hashlib.sha256(head).hexdigest().encode() * (FILE_SIZE // 64 + 1)
    return (head + body)[: FILE_SIZE - 1] + b"\n"


def _populate(folder: Path, n: int) -> None:
    for d in range((n + PER_DIR - 1) // PER_DIR):
        (folder / f"d{d:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / _rel(i)).write_bytes(_content(i))


def _count_files(folder: Path) -> int:
    n = 0
    for _dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".st")]
        n += sum(
            1 for f in files if f.endswith(".txt") and not f.startswith((".qmoi-tmp", ".syncthing"))
        )
    return n


def _all_match(folder: Path, n: int) -> bool:
    for i in range(n):
        try:
            if (folder / _rel(i)).read_bytes() != _content(i):
                return False
        except OSError:
            return False
    return True


def _wait_synced(folder: Path, n: int, timeout: float, what: str) -> float:
    """Seconds (perf_counter) when all n files were present with the right content."""
    wait_until(lambda: _count_files(folder) >= n, timeout=timeout, what=what, interval=0.25)
    wait_until(
        lambda: _all_match(folder, n), timeout=timeout, what=f"{what} (content)", interval=0.5
    )
    return time.perf_counter()


def _mem(pid: int) -> dict[str, float]:
    out = {"rss_mb": round(psutil.Process(pid).memory_info().rss / 2**20, 1)}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return round(float(t.user + t.system), 2)


def _scan_lines(d: Device) -> list[tuple[float, int]]:
    return [(float(m[1]), int(m[2])) for m in SCAN_DONE.finditer(d.log())]


class RssTimeline:
    """Samples the resident size of the agents every ``interval`` s in a thread: a coarse
    timeline (to see *when* a peak happens: index build, upload, layout, reconcile) and the
    highest sample per phase. The per-process peak itself comes from VmHWM (exact); sampling
    can miss a short spike, so the two are reported side by side."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.phase = "start"
        self.samples: list[tuple[float, str, str, float]] = []  # (s, phase, process, MB)
        self._procs: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self._procs[name] = pid

    def unwatch(self, name: str) -> None:
        self._procs.pop(name, None)

    def __enter__(self) -> RssTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = round(time.perf_counter() - self._t0, 1)
            for name, pid in list(self._procs.items()):
                try:
                    rss = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.samples.append((now, self.phase, name, round(rss, 1)))

    def peaks(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for _t, phase, name, mb in self.samples:
            per = out.setdefault(phase, {})
            per[name] = max(per.get(name, 0.0), mb)
        return out


# ---------------------------------------------------------------------------- qmoi-sync


def _qmoi(tmp: Path, n: int) -> dict[str, Any]:
    with RssTimeline() as timeline:
        out = _qmoi_phases(tmp, n, timeline)
    out["rss_sampled_peak_mb"] = timeline.peaks()
    # One sample a second is enough to see the shape (the JSON stays small at 100,000 files).
    out["rss_timeline"] = [s for i, s in enumerate(timeline.samples) if i % 2 == 0]
    return out


def _qmoi_phases(tmp: Path, n: int, timeline: RssTimeline) -> dict[str, Any]:
    relay = Relay(tmp / "relay-data")
    a = Device(tmp / "home-a", tmp / "folder-a", "a")
    b = Device(tmp / "home-b", tmp / "folder-b", "b")
    out: dict[str, Any] = {}
    try:
        relay.start()
        a.init()
        b.init()
        for d in (a, b):
            # As in scenario_binary: the resource policy would hold a scan of > 20,000 changed
            # files back while the (shared) machine is loaded; measure the agent, not the policy.
            (d.home / "policy.json").write_text(json.dumps({"load_max": 1000.0}))
        a.create_space(relay.url)
        t = time.perf_counter()
        _populate(a.folder, n)
        out["populate_s"] = round(time.perf_counter() - t, 2)

        # -- first scan + index on a
        timeline.phase = "first_index"
        a.start(wait=False)
        timeline.watch("a", a.pid)
        marks: dict[str, float] = {}

        def a_progress() -> bool:
            assert a.proc is not None
            if a.proc.poll() is not None:
                raise RuntimeError(f"agent a exited:\n{a.log()[-3000:]}")
            st = a.status()
            if not st:
                return False
            s = next(x for x in st["spaces"] if x["name"] == a.space)
            now = time.perf_counter() - a.started_at
            if s["files"] >= n:
                marks.setdefault("all_files_tracked_s", now)
                if s["state"] == "idle" and s["pending_out"] == 0:
                    marks["uploaded_and_idle_s"] = now
                    return True
            return False

        wait_until(a_progress, timeout=3600, what="a indexed and idle", interval=0.25)
        memory_reports(a)
        scans = _scan_lines(a)
        out["first_index"] = {
            **{k: round(v, 2) for k, v in marks.items()},
            "scan_logged_s": scans[-1][0] if scans else None,
            "cpu_s": _cpu_s(a.pid),
            "idle": _mem(a.pid),
            "peak_rss_mb": _mem(a.pid).get("peak_rss_mb"),
            "note": "seconds from `qmoi-sync run` on a (process start included); scan_logged_s "
            "is the agent's own measure of its rescan; peak_rss_mb is a's VmHWM over the whole "
            "first index and upload",
        }

        # -- restart: the rescan must not read unchanged files
        timeline.unwatch("a")
        a.stop()
        dirs = sorted(p for p in a.folder.iterdir() if p.is_dir() and p.name.startswith("d"))
        watches = [Inotify(p, IN_OPEN) for p in dirs]
        try:
            before = len(_scan_lines(a))
            timeline.phase = "restart"
            a.start(wait=False)
            timeline.watch("a", a.pid)
            wait_until(
                lambda: len(_scan_lines(a)) > before,
                timeout=1200,
                what="a's restart scan",
                interval=0.1,
            )
            restart_s = time.perf_counter() - a.started_at
            wait_until(a.idle, timeout=600, what="a idle after restart", interval=0.1)
            opened: set[str] = set()
            for w in watches:
                opened.update(name for name in w.read(0) if name.endswith(".txt"))
        finally:
            for w in watches:
                w.close()
        memory_reports(a)
        scan_s, tracked = _scan_lines(a)[-1]
        out["restart"] = {
            "scan_done_s": round(restart_s, 2),
            "scan_logged_s": scan_s,
            "files_tracked": tracked,
            "files_opened": len(opened),
            "cpu_s": _cpu_s(a.pid),
            "idle": _mem(a.pid),
            # The restarted process's VmHWM: load of the index + rescan + its reconcile.
            "peak_rss_mb": _mem(a.pid).get("peak_rss_mb"),
            "note": "seconds from `qmoi-sync run` until the start-up scan is logged done; "
            "files_opened counts IN_OPEN on the unchanged files (0 = nothing rehashed)",
        }

        # -- sync to b
        b.join(a.invite())
        timeline.phase = "sync_to_b"
        b.start(wait=False)
        timeline.watch("b", b.pid)
        t_synced = _wait_synced(b.folder, n, timeout=3600, what="files on b")
        wait_until(b.idle, timeout=600, what="b idle", interval=0.1)
        memory_reports(b)
        out["sync_to_b"] = {
            "all_files_on_b_s": round(t_synced - b.started_at, 2),
            "cpu_s": _cpu_s(b.pid),
            "peak_rss_mb": _mem(b.pid).get("peak_rss_mb"),
            "idle": _mem(b.pid),
            # a (restarted) over its whole life: its restart peak or serving b, if higher.
            "a_peak_rss_mb": _mem(a.pid).get("peak_rss_mb"),
            "note": "seconds from `qmoi-sync run` on b (after join) until every file is on b "
            "with the right content",
        }
        return out
    except BaseException:
        for d in (a, b):
            print(f"--- agent {d.name} log tail ---\n{d.log()[-3000:] if d.proc else ''}")
        raise
    finally:
        b.stop()
        a.stop()
        relay.stop()


# ---------------------------------------------------------------------------- Syncthing


def _syncthing(tmp: Path, n: int) -> dict[str, Any]:
    # s2 dials s1: it starts after s1 has scanned, so its first dial finds s1 listening
    s1, s2 = syncthing.pair(tmp, tmp / "st1-folder", tmp / "st2-folder", dialer="b")
    _populate(s1.folder, n)
    try:
        s1.start()

        def s1_scanned() -> bool:
            assert s1.proc is not None
            if s1.proc.poll() is not None:
                raise RuntimeError("syncthing s1 exited")
            st = s1.folder_status()
            return bool(st.get("state") == "idle" and st.get("localFiles", 0) >= n)

        wait_until(s1_scanned, timeout=3600, what="syncthing s1 scanned", interval=0.25)
        t_scan = time.perf_counter() - s1.started_at
        s2.start()
        t_synced = _wait_synced(s2.folder, n, timeout=3600, what="files on syncthing s2")
        assert s1.proc is not None and s2.proc is not None
        return {
            "version": syncthing.version(),
            "first_scan_s": round(t_scan, 2),
            "s1_peak_rss_mb": _mem(s1.proc.pid).get("peak_rss_mb"),
            "sync_to_s2_s": round(t_synced - s2.started_at, 2),
            "s2_peak_rss_mb": _mem(s2.proc.pid).get("peak_rss_mb"),
            "note": "first_scan_s from starting s1 until its REST API reports the folder idle "
            "with every file; sync_to_s2_s from starting s2 until every file is on s2 with the "
            "right content",
        }
    finally:
        s2.stop()
        s1.stop()


def run(
    quick: bool, keep: bool = False, files: int | None = None, with_syncthing: bool = True
) -> dict[str, Any]:
    n = files or (5_000 if quick else 100_000)
    result: dict[str, Any] = {"files": n, "file_size": FILE_SIZE}
    with workdir("scale", keep) as tmp:
        result["qmoi"] = _qmoi(tmp, n)
    if with_syncthing and syncthing.ensure_installed():
        with workdir("scale-st", keep) as tmp:
            result["syncthing"] = _syncthing(tmp, n)
    else:
        print("syncthing is not installed: the comparison is skipped", flush=True)
        result["syncthing"] = None
    q = result["qmoi"]
    index_s = q["first_index"]["all_files_tracked_s"]
    # The RSS target holds for the agent's whole life in every phase: a's first index and
    # upload, a's restart rescan, b receiving everything.
    phase_peaks = {
        "first_index": q["first_index"]["peak_rss_mb"],
        "restart": q["restart"]["peak_rss_mb"],
        "sync_to_b": q["sync_to_b"]["peak_rss_mb"],
    }
    rss = max(v for v in phase_peaks.values() if v is not None)
    result["targets"] = {
        "first_index_s": {
            "target": TARGET_INDEX_S,
            "value": index_s,
            "verdict": verdict(index_s, TARGET_INDEX_S),
        },
        "peak_rss_mb": {
            "target": TARGET_RSS_MB,
            "value": rss,
            "per_phase": phase_peaks,
            "verdict": verdict(rss, TARGET_RSS_MB),
        },
    }
    return result


def summary(r: dict[str, Any]) -> str:
    q = r["qmoi"]
    fi = q["first_index"]
    t = r["targets"]
    st = r.get("syncthing")
    st_txt = f"; syncthing: scan {st['first_scan_s']} s, to s2 {st['sync_to_s2_s']} s" if st else ""
    return (
        f"scale ({r['files']} x {r['file_size']} B): first index {fi['all_files_tracked_s']} s "
        f"[{t['first_index_s']['verdict']} ≤{TARGET_INDEX_S:g} s] (idle "
        f"{fi.get('uploaded_and_idle_s')} s, {fi['cpu_s']} CPU-s), peak RSS first index "
        f"{fi['peak_rss_mb']} / restart {q['restart']['peak_rss_mb']} / b "
        f"{q['sync_to_b']['peak_rss_mb']} MB [{t['peak_rss_mb']['verdict']} ≤{TARGET_RSS_MB:g} "
        f"MB]; restart scan {q['restart']['scan_done_s']} s ({q['restart']['files_opened']} "
        f"files opened); to b {q['sync_to_b']['all_files_on_b_s']} s{st_txt}"
    )
