"""S3 snapshots end to end: real relay and agent processes, a moto S3 server over HTTP.

The code under test only ever sees an endpoint URL. Every wait has a deadline (no bare sleeps).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Device,
    Relay,
    cluster,
    create_space,
    invite,
    join,
    wait_converged,
    wait_until,
)
from s3env import MotoServer, Proxy, restore_from_bucket

from qmoi_sync.agent.control import request

pytestmark = pytest.mark.slow

EXIT_INTEGRITY = 4


def configure(dev: Device, endpoint: str, bucket: str, *extra: str) -> None:
    dev.cli(
        "snapshot",
        "configure",
        dev.space,
        f"s3://{bucket}/space1",
        "--endpoint-url",
        endpoint,
        "--path-style",
        *extra,
    )


def snapshot(dev: Device) -> dict[str, Any]:
    out = dev.cli("snapshot", "now", dev.space, "--json", timeout=300).stdout
    return json.loads(out[out.index("{") :])


def listing(dev: Device, *extra: str) -> list[dict[str, Any]]:
    out = dev.cli("snapshot", "list", dev.space, "--json", *extra).stdout
    return list(json.loads(out)["snapshots"])


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".qmoi-tmp")
    }


def sample_files(rng: random.Random, n: int = 12) -> dict[str, str]:
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "日本語", "naïve"]
    files = {}
    for i in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(rng.randint(1, 40))]
        files[f"dir{i % 3}/secretname-{i}.txt"] = "\n".join(lines) + f"\nUNIQUE-CONTENT-{i}\n"
    return files


def test_snapshot_restore_history_integrity(tmp_path: Path, moto: MotoServer) -> None:
    bucket = "snaps-1"
    moto.make_bucket(bucket)
    rng = random.Random(7)
    files = sample_files(rng)
    with cluster(tmp_path) as (_relay, (a, b)):
        for rel, text in files.items():
            a.write(rel, text)
        (a.folder / "dir0" / "run.sh").write_text("#!/bin/sh\necho hi\n")
        os.chmod(a.folder / "dir0" / "run.sh", 0o755)
        (a.folder / "empty" / "deeper").mkdir(parents=True)  # folders are part of the tree
        wait_converged([a, b])
        wait_until(lambda: (b.folder / "empty" / "deeper").is_dir(), what="empty folder on b")
        configure(a, moto.url, bucket)
        first = snapshot(a)
        assert first["files"] == len(files) + 1
        at_first = tree(a.folder)

        # Nothing in the bucket names or holds a file name or content.
        blob = b"".join(moto.get(bucket, k) for k in moto.objects(bucket))
        blob += "".join(moto.objects(bucket)).encode()
        for rel, text in files.items():
            assert rel.encode() not in blob and rel.rsplit("/", 1)[-1].encode() not in blob
            assert text.splitlines()[0].encode() not in blob
        assert b"UNIQUE-CONTENT" not in blob and b"secretname" not in blob

        # One small change: the next snapshot uploads that file's objects and a manifest.
        before = moto.objects(bucket)
        a.write("dir1/secretname-1.txt", files["dir1/secretname-1.txt"] + "one more line\n")
        wait_converged([a, b])
        second = snapshot(a)
        at_second = tree(a.folder)
        after = moto.objects(bucket)
        new = {k: v for k, v in after.items() if k not in before}
        assert sum(new.values()) < 1024 * 1024, new
        assert len(new) <= 4, new  # the file's delta, the index's delta, the manifest
        assert second["uploaded_bytes"] == sum(new.values())

        # History of the changed file, then bring the first version back on b: it syncs to a.
        out = b.cli("history", "notes", "dir1/secretname-1.txt", "--json").stdout
        versions = json.loads(out)["versions"]
        assert [v["snapshot"] for v in versions] == [first["id"], second["id"]]
        assert all(v["changed"] for v in versions)
        b.cli("restore-file", "notes", "dir1/secretname-1.txt", "--at", first["id"])
        wait_until(
            lambda: a.read("dir1/secretname-1.txt") == files["dir1/secretname-1.txt"],
            what="restored file synced to a",
        )
        # --to writes elsewhere, leaving the space alone.
        b.cli(
            "restore-file",
            "notes",
            "dir1/secretname-1.txt",
            "--at",
            second["id"],
            "--to",
            str(tmp_path / "one.txt"),
        )
        assert (tmp_path / "one.txt").read_text().endswith("one more line\n")

        # Whole space as of the first snapshot, into a new folder: byte-identical, modes kept.
        out_dir = tmp_path / "restored"
        b.cli("restore", "notes", "--to", str(out_dir), "--at", first["id"])
        assert tree(out_dir) == at_first
        assert os.stat(out_dir / "dir0" / "run.sh").st_mode & 0o111
        assert (out_dir / "empty" / "deeper").is_dir()
        assert list((out_dir / "empty" / "deeper").iterdir()) == []

        # -- integrity ------------------------------------------------------------------------
        # One flipped bit in an object the restores read. (The bucket may also hold objects of
        # a snapshot that is neither the first nor the newest — the agent's own scheduled
        # ones — which these two restores never open: try objects in order until one is used.)
        objs = sorted(k for k in moto.objects(bucket) if "/o/" in k)
        victim = None
        for n, cand in enumerate(objs):
            good = moto.get(bucket, cand)
            bad = bytearray(good)
            bad[len(bad) // 2] ^= 0x01
            moto.put(bucket, cand, bytes(bad))
            r = b.cli(
                "restore", "notes", "--to", str(tmp_path / f"r1-{n}"), "--at", first["id"],
                check=False,
            )  # fmt: skip
            r2 = b.cli("restore", "notes", "--to", str(tmp_path / f"r1b-{n}"), check=False)
            moto.put(bucket, cand, good)
            if EXIT_INTEGRITY in (r.returncode, r2.returncode):
                assert "fails authentication" in (r.stderr + r2.stderr)
                victim = cand
                break
            assert r.returncode == 0 and r2.returncode == 0, (r.stderr, r2.stderr)
        assert victim is not None, "no tampered object was ever noticed"
        good = moto.get(bucket, victim)

        # A truncated object.
        moto.put(bucket, victim, good[:100])
        r = b.cli(
            "restore", "notes", "--to", str(tmp_path / "r2"), "--at", first["id"], check=False
        )
        r2 = b.cli("restore", "notes", "--to", str(tmp_path / "r2b"), check=False)
        assert EXIT_INTEGRITY in (r.returncode, r2.returncode)
        moto.put(bucket, victim, good)

        # A missing object.
        moto.delete(bucket, victim)
        r = b.cli(
            "restore", "notes", "--to", str(tmp_path / "r3"), "--at", first["id"], check=False
        )
        r2 = b.cli("restore", "notes", "--to", str(tmp_path / "r3b"), check=False)
        assert EXIT_INTEGRITY in (r.returncode, r2.returncode)
        assert "missing" in (r.stderr + r2.stderr)
        moto.put(bucket, victim, good)

        # Another object's (authentic) bytes under this name: swapped.
        moto.put(bucket, victim, moto.get(bucket, next(o for o in objs if o != victim)))
        r = b.cli(
            "restore", "notes", "--to", str(tmp_path / "r4"), "--at", first["id"], check=False
        )
        r2 = b.cli("restore", "notes", "--to", str(tmp_path / "r4b"), check=False)
        assert EXIT_INTEGRITY in (r.returncode, r2.returncode)
        moto.put(bucket, victim, good)

        # The newest manifest replaced by the older one: refused (name and content disagree).
        mans = sorted(k for k in moto.objects(bucket) if "/m/" in k)
        newest = moto.get(bucket, mans[-1])
        moto.put(bucket, mans[-1], moto.get(bucket, mans[0]))
        r = b.cli("restore", "notes", "--to", str(tmp_path / "r5"), check=False)
        assert r.returncode == EXIT_INTEGRITY and "replaced" in r.stderr, r.stderr
        # The newest manifest deleted (rolled back to the older one): restore warns.
        moto.delete(bucket, mans[-1])
        r = b.cli("restore", "notes", "--to", str(tmp_path / "r6"))
        assert "older than snapshot" in r.stderr, r.stderr
        moto.put(bucket, mans[-1], newest)
        # Everything back in place: restores cleanly again.
        r = b.cli("restore", "notes", "--to", str(tmp_path / "r7"))
        assert "warning" not in r.stderr
        assert tree(tmp_path / "r7") == at_second

        status = a.space_status()["snapshot"]
        assert status["target"] == f"s3://{bucket}/space1"
        assert status["last_id"] == second["id"]
        assert status["last_error"] is None


def test_new_device_restores_with_relay_down_then_syncs(tmp_path: Path, moto: MotoServer) -> None:
    bucket = "snaps-2"
    moto.make_bucket(bucket)
    files = sample_files(random.Random(11), 20)
    relay = Relay(tmp_path / "relay-data").start()
    a = Device(tmp_path / "home-a", tmp_path / "folder-a", "a").init()
    c = Device(tmp_path / "home-c", tmp_path / "folder-c", "c").init()
    try:
        create_space(a, relay)
        a.start()
        for rel, text in files.items():
            a.write(rel, text)
        wait_until(lambda: len(a.tree()) == len(files), what="a ingested")
        join(c, invite(a))  # c has its membership only: it never ran
        configure(a, moto.url, bucket)
        snapshot(a)
        expected = tree(a.folder)
        a.stop()
        relay.stop()  # relay down: c can only use the bucket

        r = restore_from_bucket(c, moto.url, bucket)
        assert "restored snapshot" in r.stdout
        assert tree(c.folder) == expected

        # Back online: c resumes from the snapshot's cursor, nothing is re-ingested or doubled.
        relay.start()
        a.start()
        c.start()
        a.write("after.txt", "written after the restore\n")
        c.write("from-c.txt", "c writes too\n")
        wait_converged([a, c])
        final = tree(a.folder)
        for rel, text in files.items():
            assert final[rel] == text.encode()
        assert len(final) == len(files) + 2
        st = c.space_status()
        assert st["pending_out"] == 0 or wait_until(
            lambda: c.space_status()["pending_out"] == 0, what="c outbox empty"
        )
    finally:
        a.stop()
        c.stop()
        relay.stop()


def _write_big(dev: Device, n: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        line = "".join(rng.choice("abcdefghijklmnop qrstuvwxyz") for _ in range(99)) + "\n"
        dev.write(f"big/file-{i:03d}.txt", line * (size // 100))


def test_kill_mid_snapshot_leaves_no_dangling_manifest(tmp_path: Path, moto: MotoServer) -> None:
    bucket = "snaps-3"
    moto.make_bucket(bucket)
    slow = Proxy(moto.port, rate=2 * 1024 * 1024).start()  # a slow link to the bucket
    try:
        with cluster(tmp_path, ("a",)) as (_relay, (a,)):
            _write_big(a, 12, 1024 * 1024, seed=3)
            wait_until(lambda: a.space_status()["files"] == 12, timeout=120, what="a ingested")
            configure(a, slow.url, bucket)
            # Start the snapshot through the agent; kill the agent once objects are going up.
            asyncio.run(request(a.home / "control.sock", {"cmd": "snapshot_now", "space": "notes"}))
            wait_until(
                lambda: any("/o/" in k for k in moto.objects(bucket)),
                timeout=60,
                interval=0.01,
                what="first objects uploaded",
            )
            a.kill()
            objs = moto.objects(bucket)
            assert not any("/m/" in k for k in objs), "a manifest was written before its objects"
            assert any("/o/" in k for k in objs)
            a.start()
            done = snapshot(a)
            assert done["files"] == 12
            # Every object every manifest references exists; restore verifies them all.
            keys = moto.objects(bucket)
            for snap in listing(a):
                assert all(f"space1/o/{n}" in keys for n in snap["objects"])
            a.cli("restore", "notes", "--to", str(tmp_path / "out"))
            assert tree(tmp_path / "out") == tree(a.folder)
    finally:
        slow.stop()


def test_unreachable_bucket_then_scheduled_snapshot(tmp_path: Path, moto: MotoServer) -> None:
    bucket = "snaps-4"
    moto.make_bucket(bucket)
    proxy = Proxy(moto.port).start()
    try:
        with cluster(tmp_path) as (_relay, (a, b)):
            a.write("x.txt", "x\n")
            wait_converged([a, b])
            proxy.stop()
            configure(a, proxy.url, bucket, "--every", "2s")

            def failing() -> bool:
                st = a.space_status()["snapshot"]
                return bool(st["last_error"]) or bool(b.space_status()["snapshot"]["last_error"])

            wait_until(failing, timeout=90, what="snapshot error in status")
            err = (a.space_status()["snapshot"]["last_error"] or "") + (
                b.space_status()["snapshot"]["last_error"] or ""
            )
            assert "unreachable" in err, err
            # Sync goes on meanwhile.
            a.write("y.txt", "while the bucket is down\n")
            wait_converged([a, b])
            assert moto.objects(bucket) == {}
            # The bucket comes back: the duty device snapshots by itself.
            proxy = Proxy(moto.port, port=proxy.port).start()

            def snapshotted() -> bool:
                return any("/m/" in k for k in moto.objects(bucket))

            wait_until(snapshotted, timeout=120, what="scheduled snapshot after recovery")
            wait_until(
                lambda: (
                    a.space_status()["snapshot"]["last_id"] is not None
                    and not a.space_status()["snapshot"]["last_error"]
                    and not b.space_status()["snapshot"]["last_error"]
                ),
                timeout=120,
                what="snapshot error cleared",
            )
    finally:
        proxy.stop()


def test_retention_keeps_referenced_objects(tmp_path: Path, moto: MotoServer) -> None:
    bucket = "snaps-5"
    moto.make_bucket(bucket)
    with cluster(tmp_path, ("a",)) as (_relay, (a,)):
        configure(a, moto.url, bucket, "--keep-last", "2", "--keep-daily", "0", "--gc-grace", "0s")
        ids = []
        for i in range(5):
            a.write(f"f{i}.txt", f"file {i}\n" * (i + 1))
            a.write("shared.txt", f"version {i}\n")
            wait_until(lambda i=i: a.read(f"f{i}.txt") is not None, what="write")
            wait_until(lambda i=i: a.space_status()["files"] == i + 2, what="ingested")
            ids.append(snapshot(a)["id"])
        snaps = listing(a)
        assert [s["id"] for s in snaps] == ids[-2:]
        keys = moto.objects(bucket)
        referenced = {f"space1/o/{n}" for s in snaps for n in s["objects"]}
        assert referenced <= set(keys)
        assert {k for k in keys if "/o/" in k} == referenced  # the rest was collected
        for s in snaps:
            out = tmp_path / f"r-{s['id']}"
            a.cli("restore", "notes", "--to", str(out), "--at", s["id"])
        assert tree(tmp_path / f"r-{ids[-1]}") == tree(a.folder)


def _resources(dev: Device, tmp: Path, **readings: Any) -> None:
    path = tmp / f"res-{dev.name}.json"
    path.write_text(json.dumps(readings))
    dev.env["QMOI_SYNC_TEST_RESOURCES"] = str(path)


def test_duty_goes_to_the_server_then_moves_when_it_leaves(
    tmp_path: Path, moto: MotoServer
) -> None:
    bucket = "snaps-6"
    moto.make_bucket(bucket)
    relay = Relay(tmp_path / "relay-data").start()
    laptop = Device(tmp_path / "home-l", tmp_path / "folder-l", "laptop").init()
    server = Device(tmp_path / "home-s", tmp_path / "folder-s", "server").init()
    _resources(laptop, tmp_path, on_ac=False, battery_percent=55.0, headless=False, cpu_count=8)
    _resources(server, tmp_path, on_ac=True, headless=True, cpu_count=2)
    try:
        create_space(laptop, relay)
        laptop.start()
        join(server, invite(laptop, "notes", "--role", "admin"))
        server.start()
        laptop.write("a.txt", "a\n")
        wait_converged([laptop, server])
        configure(laptop, moto.url, bucket, "--every", "3s", "--keep-last", "100")
        server_pk = None

        def by_server() -> bool:
            nonlocal server_pk
            snaps = listing(laptop)
            signers = {s["signer"] for s in snaps}
            if len(snaps) >= 2 and len(signers) == 1:
                server_pk = signers.pop()
                return server.space_status()["snapshot"]["holder"]
            return False

        wait_until(by_server, timeout=120, what="the headless server takes snapshot duty")
        assert not laptop.space_status()["snapshot"]["holder"]
        server.kill()
        count = len(listing(laptop))

        def laptop_took_over() -> bool:
            snaps = listing(laptop)
            return len(snaps) > count and snaps[-1]["signer"] != server_pk

        wait_until(laptop_took_over, timeout=180, what="the laptop takes over")
        snaps = listing(laptop)
        intervals = [s["interval"] for s in snaps if s["interval"] is not None]
        assert len(intervals) == len(set(intervals)), "two snapshots of one interval"
    finally:
        laptop.stop()
        server.stop()
        relay.stop()


def test_truncated_relay_log_restores_from_snapshot(tmp_path: Path, moto: MotoServer) -> None:
    bucket = "snaps-7"
    moto.make_bucket(bucket)
    with cluster(tmp_path) as (relay, (a, b)):
        assert relay is not None
        a.write("base.txt", "base\n")
        wait_converged([a, b])
        configure(a, moto.url, bucket)
        b.stop()  # offline longer than the relay keeps the log
        for i in range(3):
            a.write(f"while-away-{i}.txt", f"{i}\n")
            wait_until(lambda i=i: a.space_status()["files"] == i + 2, what="a ingested")
            snapshot(a)
        # The log before the second snapshot's cursor is gone from the relay now.
        wait_until(lambda: "log_truncated" in relay.log(), what="relay truncated its log")
        b.start()
        wait_converged([a, b], timeout=60)
        assert b.read("while-away-2.txt") == "2\n"
        a.write("later.txt", "later\n")
        wait_converged([a, b])
        b.write("from-b.txt", "b\n")
        wait_converged([a, b])


def test_unused_dirs_are_cleaned(tmp_path: Path) -> None:
    """Restore refuses a non-empty target folder (nothing is overwritten)."""
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    from qmoi_sync.agent.restore import _prepare_dest
    from qmoi_sync.agent.snapshot_format import SnapshotError

    with pytest.raises(SnapshotError):
        _prepare_dest(target)
    shutil.rmtree(target)
    assert _prepare_dest(target) == target.resolve()
