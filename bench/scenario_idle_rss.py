"""idle_rss: an agent holding a space of 10,000 small files, once everything is synced.

1. 10,000 small text files (100 folders x 100 files, 60-200 bytes each) are written into a's
   folder *before* a's agent starts; the space already exists (created with the CLI).
2. a is started; its status (control socket, polled every 50 ms) gives the time until it tracks
   all files ("first index") and until its outbox is empty and the relay has acked everything.
3. b joins (invite from the running a) and starts; the time until b's folder holds all 10,000
   files with the right content is the sync to a second device.
4. with both idle, RSS (and peak RSS, VmHWM) of each agent and of the relay is read with psutil,
   and CPU time is measured over an idle window (10 s; nothing polls the agents meanwhile).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from benchlib import Device, Relay, memory_reports, verdict, wait_until, workdir

TARGET_RSS_MB = 80.0
TARGET_IDLE_CPU_PCT = 1.0  # "near zero"


def _content(i: int) -> bytes:
    return (f"note {i}\n" + "some words in a small file. " * (2 + i % 6)).encode() + b"\n"


def _rel(i: int) -> str:
    return f"d{i // 100:03d}/note-{i % 100:02d}.txt"


def _populate(folder: Path, n: int) -> None:
    for i in range(n):
        p = folder / _rel(i)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_content(i))


def _count_files(folder: Path) -> int:
    n = 0
    for _dirpath, _dirs, files in os.walk(folder):
        n += sum(1 for f in files if not f.startswith(".qmoi-tmp"))
    return n


def _mem(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    out = {"rss_mb": round(p.memory_info().rss / 2**20, 1)}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        out["uss_mb"] = round(p.memory_full_info().uss / 2**20, 1)
    except (psutil.AccessDenied, AttributeError):
        pass
    return out


def _safe_status(d: Device) -> Any:
    try:
        return d.space_status() if d.proc is not None else "not running"
    except Exception as exc:
        return repr(exc)


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def run(quick: bool, keep: bool = False) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    idle_window = 3.0 if quick else 10.0
    with workdir("idle-rss", keep) as tmp:
        relay = Relay(tmp / "relay-data")
        a = Device(tmp / "home-a", tmp / "folder-a", "a")
        b = Device(tmp / "home-b", tmp / "folder-b", "b")
        try:
            relay.start()
            a.init()
            b.init()
            a.create_space(relay.url)
            _populate(a.folder, n)

            # -- first index on a
            a.start(wait=False)
            marks: dict[str, float] = {}

            def a_progress() -> bool:
                assert a.proc is not None
                if a.proc.poll() is not None:
                    raise RuntimeError(f"agent a exited:\n{a.log()[-3000:]}")
                st = a.status()
                if not st:
                    return False
                now = time.perf_counter() - a.started_at
                marks.setdefault("control_socket_up_s", now)
                s = next(x for x in st["spaces"] if x["name"] == a.space)
                if s["files"] >= n:
                    marks.setdefault("all_files_tracked_s", now)
                    if s["state"] == "idle" and s["pending_out"] == 0:
                        marks["uploaded_and_idle_s"] = now
                        return True
                return False

            wait_until(a_progress, timeout=600, what="a indexed and idle", interval=0.05)
            a_after_index = _mem(a.pid)

            # -- sync to b
            b.join(a.invite())
            b.start(wait=False)
            expected = {_rel(i): _content(i) for i in range(n)}
            wait_until(
                lambda: _count_files(b.folder) >= n, timeout=600, what="files on b", interval=0.1
            )
            for rel, data in expected.items():
                wait_until(
                    lambda r=rel, d=data: (b.folder / r).read_bytes() == d,
                    timeout=60,
                    what=f"{rel} content on b",
                )
            t_b_synced = time.perf_counter() - b.started_at
            wait_until(b.idle, timeout=600, what="b idle", interval=0.05)
            t_b_idle = time.perf_counter() - b.started_at
            wait_until(a.idle, timeout=60, what="a idle")
            b_status = b.space_status()

            # -- idle window: nobody talks to the agents
            pids = {"a": a.pid, "b": b.pid}
            assert relay.proc is not None
            pids["relay"] = relay.proc.pid
            mem_before = {k: _mem(p) for k, p in pids.items()}
            cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
            t0 = time.perf_counter()
            time.sleep(idle_window)
            elapsed = time.perf_counter() - t0
            cpu1 = {k: _cpu_s(p) for k, p in pids.items()}
            mem_after = {k: _mem(p) for k, p in pids.items()}
            memory_reports(a, b)
        except BaseException:
            for d in (a, b):
                print(f"--- agent {d.name} status: {_safe_status(d)}", file=sys.stderr)
                print(f"--- agent {d.name} log tail ---\n{d.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            b.stop()
            a.stop()
            relay.stop()

    procs = {}
    for k in pids:
        procs[k] = {
            **mem_after[k],
            "rss_mb_before_window": mem_before[k]["rss_mb"],
            "idle_cpu_s": round(cpu1[k] - cpu0[k], 4),
            "idle_cpu_pct": round(100 * (cpu1[k] - cpu0[k]) / elapsed, 3),
        }
    rss = max(procs["a"]["rss_mb"], procs["b"]["rss_mb"])
    cpu = max(procs["a"]["idle_cpu_pct"], procs["b"]["idle_cpu_pct"])
    return {
        "files": n,
        "idle_window_s": round(elapsed, 2),
        "first_index": {
            **{k: round(v, 3) for k, v in marks.items()},
            "note": "seconds from starting `qmoi-sync run` on a (process start included)",
            "rss_after_index": a_after_index,
        },
        "sync_to_b": {
            "all_files_on_b_s": round(t_b_synced, 3),
            "b_idle_s": round(t_b_idle, 3),
            "b_files_tracked": b_status["files"],
            "note": "seconds from starting `qmoi-sync run` on b (after join)",
        },
        "processes": procs,
        "targets": {
            "rss_mb": {
                "target": TARGET_RSS_MB,
                "value": rss,
                "verdict": verdict(rss, TARGET_RSS_MB),
            },
            "idle_cpu_pct": {
                "target": TARGET_IDLE_CPU_PCT,
                "value": cpu,
                "verdict": verdict(cpu, TARGET_IDLE_CPU_PCT),
            },
        },
    }


def summary(r: dict[str, Any]) -> str:
    p = r["processes"]
    t = r["targets"]
    fi = r["first_index"]
    return (
        f"idle_rss ({r['files']} files): RSS a {p['a']['rss_mb']} MB "
        f"(peak {p['a'].get('peak_rss_mb')}), "
        f"b {p['b']['rss_mb']} MB (peak {p['b'].get('peak_rss_mb')}) [{t['rss_mb']['verdict']} "
        f"≤{TARGET_RSS_MB:g} MB]; idle CPU a {p['a']['idle_cpu_pct']}% b {p['b']['idle_cpu_pct']}% "
        f"relay {p['relay']['idle_cpu_pct']}% [{t['idle_cpu_pct']['verdict']}]; "
        f"first index {fi.get('all_files_tracked_s')} s (idle {fi.get('uploaded_and_idle_s')} s); "
        f"to b {r['sync_to_b']['all_files_on_b_s']} s"
    )
