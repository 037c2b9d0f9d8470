"""snapshot: snapshot a mixed space to a local S3-compatible server, then restore it.

1. A moto S3 server (``python -m moto.server``) runs on 127.0.0.1; the agent only sees its URL.
2. Files totalling 1 GiB (``--quick``: 64 MiB) are written into a's folder before its agent
   starts: half text files of mixed sizes (1 KiB to 4 MiB), half binary files of random bytes
   (256 KiB to 48 MiB, chunked); a ingests them (measured: "ingest"). The agent's policy never
   defers bulk work on system load (the bench machine is shared).
3. ``snapshot now`` (measured: time, upload throughput), a one-file change and a second
   ``snapshot now`` (bytes uploaded), then ``restore --to`` a new folder (measured: time and
   throughput; target ≥ 100 MiB/s on loopback), checked byte-identical.
4. The ceiling: every object of the bucket fetched with plain boto3 ``get_object`` from the same
   server at the restore's concurrency (8 threads), so the restore rate can be read against
   what the server itself delivers. Load averages are recorded with each phase.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import Device, Relay, verdict, wait_until, workdir

MiB = 1024 * 1024
TARGET_RESTORE_MIBS = 100.0
CREDS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _populate_binary(folder: Path, total: int, seed: int = 2) -> dict[str, int]:
    rng = random.Random(seed)
    sizes = [256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB, 48 * MiB]
    written = 0
    i = 0
    files: dict[str, int] = {}
    while written < total:
        size = min(rng.choice(sizes), total - written)
        rel = f"b{i % 8:02d}/blob{i:04d}.bin"
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            left = size
            while left:
                n = min(left, 4 * MiB)
                fh.write(rng.randbytes(n))
                left -= n
        files[rel] = size
        written += size
        i += 1
    return files


def _get_ceiling(endpoint: str, bucket: str, concurrency: int = 8) -> dict[str, Any]:
    """Fetch every object of the bucket with plain boto3 at ``concurrency`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(max_pool_connections=concurrency * 2, s3={"addressing_style": "path"}),
    )
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def get(key: str) -> int:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return len(body.read())
        finally:
            body.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(get, keys))
    dt = time.perf_counter() - t0
    return {
        "objects": len(keys),
        "bytes": total,
        "s": round(dt, 2),
        "mibs": round(total / MiB / dt, 1),
        "load": os.getloadavg(),
    }


def _populate(folder: Path, total: int, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    sizes = [1024, 16 * 1024, 256 * 1024, 1 * MiB, 4 * MiB - 4096]
    written = 0
    i = 0
    files: dict[str, int] = {}
    alphabet = "abcdefghijklmnopqrstuvwxyz     \n"
    block = "".join(rng.choice(alphabet) for _ in range(64 * 1024))
    while written < total:
        size = min(rng.choice(sizes), total - written)
        rel = f"d{i % 32:02d}/f{i:05d}.txt"
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        off = rng.randrange(len(block))
        text = (block[off:] + block[:off]) * (size // len(block) + 1)
        p.write_text(f"{i}\n" + text[: max(0, size - 16)])
        files[rel] = p.stat().st_size
        written += files[rel]
        i += 1
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".qmoi-tmp")
    }


def run(quick: bool, keep: bool = False) -> dict[str, Any]:
    total = 64 * MiB if quick else 1024 * MiB
    os.environ.update(CREDS)
    port = _free_port()
    with workdir("snapshot", keep) as tmp:
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        relay = Relay(tmp / "relay-data")
        a = Device(tmp / "home-a", tmp / "folder-a", "a")
        try:
            endpoint = f"http://127.0.0.1:{port}"

            def up() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    return True
                except OSError:
                    return False

            wait_until(up, timeout=60, what="moto server")
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket="bench"
            )
            relay.start()
            a.init()
            a.create_space(relay.url)
            (a.home / "policy.json").write_text(json.dumps({"load_max": 1000.0}))
            files = _populate(a.folder, total // 2)
            files.update(_populate_binary(a.folder, total - total // 2))
            t0 = time.perf_counter()
            a.start()
            wait_until(
                lambda: a.space_status()["files"] == len(files),
                timeout=3600,
                what="a ingested the files",
            )
            ingest_s = time.perf_counter() - t0
            a.cli(
                "snapshot",
                "configure",
                a.space,
                "s3://bench/space",
                "--endpoint-url",
                endpoint,
                "--path-style",
            )
            load_ingest = os.getloadavg()
            t0 = time.perf_counter()
            first = json.loads(a.cli("snapshot", "now", a.space, "--json", timeout=3600))
            snap_s = time.perf_counter() - t0
            load_snapshot = os.getloadavg()
            victim = sorted(files)[len(files) // 2]
            with open(a.folder / victim, "a") as fh:
                fh.write("one more line\n")
            wait_until(
                lambda: a.space_status()["pending_out"] == 0, timeout=120, what="edit ingested"
            )
            second = json.loads(a.cli("snapshot", "now", a.space, "--json", timeout=3600))
            expected = _tree(a.folder)
            out = tmp / "restored"
            a.stop()  # the restore alone on the machine (as on a device being rebuilt)
            load_before_restore = os.getloadavg()
            t0 = time.perf_counter()
            restored = json.loads(
                a.cli("restore", a.space, "--to", str(out), "--json", timeout=3600)
            )
            restore_s = time.perf_counter() - t0
            load_restore = os.getloadavg()
            identical = _tree(out) == expected
            ceiling = _get_ceiling(endpoint, "bench")
            data = sum(len(v) for v in expected.values())
            return {
                "files": len(files),
                "bytes": data,
                "ingest_s": round(ingest_s, 2),
                "snapshot_s": round(snap_s, 2),
                "snapshot_mibs": round(data / MiB / snap_s, 1),
                "snapshot_uploaded_bytes": first["uploaded_bytes"],
                "second_snapshot_uploaded_bytes": second["uploaded_bytes"],
                "second_snapshot_s": second["duration_s"],
                "restore_s": round(restore_s, 2),
                "restore_mibs": round(data / MiB / restore_s, 1),
                # The restore itself, without the CLI's interpreter start and imports (which
                # compile every module when no bytecode cache may be written, e.g. with
                # PYTHONDONTWRITEBYTECODE=1 as on the bench machine).
                "restore_inprocess_s": restored["duration_s"],
                "restore_inprocess_mibs": round(data / MiB / restored["duration_s"], 1),
                "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
                "restore_identical": identical,
                "target_restore_mibs": TARGET_RESTORE_MIBS,
                "s3_get_ceiling": ceiling,
                "load": {
                    "after_ingest": load_ingest,
                    "after_snapshot": load_snapshot,
                    "before_restore": load_before_restore,
                    "after_restore": load_restore,
                },
            }
        finally:
            a.stop()
            relay.stop()
            moto.terminate()
            moto.wait(timeout=10)


def summary(r: dict[str, Any]) -> str:
    return (
        f"snapshot: {r['files']} files, {r['bytes'] / MiB:.0f} MiB; ingest {r['ingest_s']}s; "
        f"snapshot {r['snapshot_s']}s ({r['snapshot_mibs']} MiB/s); one-file change uploads "
        f"{r['second_snapshot_uploaded_bytes']} bytes; restore {r['restore_s']}s "
        f"({r['restore_mibs']} MiB/s wall; {r['restore_inprocess_mibs']} MiB/s in-process, "
        f"identical={r['restore_identical']}); plain boto3 GETs "
        f"of the same objects {r['s3_get_ceiling']['mibs']} MiB/s "
        f"{verdict(-r['restore_mibs'], -r['target_restore_mibs'])}"
    )
