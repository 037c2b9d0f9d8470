"""Snapshots against a faulty object store: an HTTP proxy in front of moto answering 500/503,
answering slowly or dropping connections (tests/faults/s3faults.py), and the store stopped.

Whatever the store does: a failed snapshot exits 1 with the store's error and shows it in
`status`, never leaves a manifest that references an object the store does not hold, never
loses the previous good snapshot, and the next snapshot succeeds once the store is back. A
restore from a flaky store either succeeds exactly or fails with exit code 1 and a message,
leaving no truncated file and no temp file behind."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultlib import start_armed, stray_temps, wait_planned_death
from harness import Device, cluster, wait_until
from s3faults import S3FaultProxy, is_get, is_manifest_put, is_object_put

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapshots"))
from s3env import CREDS, MotoServer

# S3 retries back off (botocore standard mode): slow on a loaded machine, not stuck.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BUCKET = "faulty"


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("moto", reason="moto[server] is needed for the S3 fault tests")
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[MotoServer, S3FaultProxy]]:
    moto = MotoServer(tmp_path / "moto.log").start()
    proxy = S3FaultProxy(moto.port).start()
    try:
        moto.make_bucket(BUCKET)
        yield moto, proxy
    finally:
        proxy.stop()
        moto.stop()


def snapshot_now(dev: Device) -> tuple[int, dict[str, Any] | None, str]:
    p = dev.cli("snapshot", "now", dev.space, "--json", check=False, timeout=300)
    out = json.loads(p.stdout[p.stdout.index("{") :]) if p.returncode == 0 else None
    return p.returncode, out, p.stderr


def manifests(moto: MotoServer) -> set[str]:
    return {k for k in moto.objects(BUCKET) if "/m/" in k}


def assert_references_stored(dev: Device, moto: MotoServer) -> None:
    """Every object and chunk every listed manifest names is in the bucket."""
    keys = moto.objects(BUCKET)
    out = dev.cli("snapshot", "list", dev.space, "--json").stdout
    for snap in json.loads(out)["snapshots"]:
        missing = [n for n in snap["objects"] if f"space1/o/{n}" not in keys]
        assert not missing, f"snapshot {snap['id']} references missing objects {missing[:3]}"


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".qmoi-tmp")
    }


def write_files(dev: Device, start: int, n: int) -> None:
    for i in range(start, start + n):
        dev.write(f"d{i % 3}/note-{i}.txt", f"note {i}\n" + "some words here\n" * (i + 5))
    wait_until(lambda: dev.space_status()["files"] == start + n, timeout=60, what="ingested")


def last_error(dev: Device) -> str:
    return str(dev.space_status()["snapshot"]["last_error"] or "")


def test_snapshots_against_a_faulty_store(
    tmp_path: Path, store: tuple[MotoServer, S3FaultProxy]
) -> None:
    moto, proxy = store
    with cluster(tmp_path, ("a",)) as (_relay, (a,)):
        write_files(a, 0, 6)
        a.cli(
            "snapshot", "configure", a.space, f"s3://{BUCKET}/space1",
            "--endpoint-url", proxy.url, "--path-style",
        )  # fmt: skip
        rc, first, err = snapshot_now(a)
        assert rc == 0, err
        good = manifests(moto)

        # Every second request answered 503: the retries carry the snapshot through.
        write_files(a, 6, 2)
        proxy.set("status", status=503, every=2)
        rc, _, err = snapshot_now(a)
        assert rc == 0, err
        assert proxy.faulted > 0
        good = manifests(moto)

        # Object uploads always fail: a clear error, in status too; no new manifest.
        write_files(a, 8, 2)
        proxy.set("status", status=500, match=is_object_put)
        rc, _, err = snapshot_now(a)
        assert rc == 1 and "500" in err, err
        assert "500" in last_error(a), last_error(a)
        assert manifests(moto) == good
        assert_references_stored(a, moto)

        # The manifest upload's connection is dropped: objects are up, the manifest is not.
        proxy.set("drop", match=is_manifest_put)
        rc, _, err = snapshot_now(a)
        assert rc == 1 and "snapshot failed" in err, err
        assert manifests(moto) == good
        assert_references_stored(a, moto)

        # A slow store: slower, but it works; the error in status clears.
        proxy.set("slow", delay_s=0.2)
        rc, latest, err = snapshot_now(a)
        assert rc == 0, err
        assert latest is not None and latest["files"] == 10
        wait_until(lambda: not last_error(a), timeout=30, what="status error cleared")
        assert_references_stored(a, moto)

        # Restore through a flaky store (every third GET 503): exact.
        proxy.set("status", status=503, every=3, match=is_get)
        out = tmp_path / "restored-flaky"
        a.cli("restore", a.space, "--to", str(out), timeout=300)
        assert files_of(out) == files_of(a.folder)

        # Restore through a broken store (every GET 500): exit 1, a message, nothing partial.
        proxy.set("status", status=500, match=is_get)
        out = tmp_path / "restored-broken"
        p = a.cli("restore", a.space, "--to", str(out), check=False, timeout=300)
        assert p.returncode == 1 and "500" in p.stderr, (p.returncode, p.stderr)
        assert_no_partial(out, a.folder)

        # The store stopped entirely: both fail with "unreachable", nothing partial.
        proxy.set("pass")
        moto.stop()
        write_files(a, 10, 1)
        rc, _, err = snapshot_now(a)
        assert rc == 1 and "unreachable" in err, err
        out = tmp_path / "restored-down"
        p = a.cli("restore", a.space, "--to", str(out), check=False, timeout=300)
        assert p.returncode == 1 and "unreachable" in p.stderr, (p.returncode, p.stderr)
        assert_no_partial(out, a.folder)

        # It comes back empty (moto keeps nothing): the next snapshot stores everything again
        # rather than trusting objects it remembers uploading, and restores exactly.
        moto.start()
        moto.make_bucket(BUCKET)
        rc, latest, err = snapshot_now(a)
        assert rc == 0, err
        assert_references_stored(a, moto)
        out = tmp_path / "restored-after"
        a.cli("restore", a.space, "--to", str(out), timeout=300)
        assert files_of(out) == files_of(a.folder)
        assert first is not None


def assert_no_partial(out: Path, source: Path) -> None:
    """Whatever a failed restore left in ``out`` is whole: each file equals its source, and no
    temp file is left."""
    if not out.exists():
        return
    assert not stray_temps(out), stray_temps(out)
    src = files_of(source)
    for rel, data in files_of(out).items():
        assert src.get(rel) == data, f"restore left a partial or wrong {rel}"
    assert not [p for p in os.listdir(out) if p.startswith(".qmoi-tmp")]


def test_agent_killed_between_snapshot_objects_and_manifest(
    tmp_path: Path, store: tuple[MotoServer, S3FaultProxy]
) -> None:
    """SIGKILL at the snapshot crash points: after an object, before the manifest, after the
    manifest but before the agent recorded it. The bucket never holds a manifest whose objects
    are missing; the restarted agent snapshots again and the result restores exactly."""
    moto, proxy = store
    with cluster(tmp_path, ("a",)) as (_relay, (a,)):
        write_files(a, 0, 6)
        a.cli(
            "snapshot", "configure", a.space, f"s3://{BUCKET}/space1",
            "--endpoint-url", proxy.url, "--path-style",
        )  # fmt: skip
        rc, _, err = snapshot_now(a)
        assert rc == 0, err
        good = manifests(moto)
        n = 6
        for spec in ("snapshot.object:2", "snapshot.manifest:1", "snapshot.manifest_stored:1"):
            write_files(a, n, 2)
            n += 2
            a.stop()
            assert start_armed(a, spec)
            rc, _, err = snapshot_now(a)
            assert rc != 0, f"snapshot survived {spec}"
            assert wait_planned_death(a).startswith(spec.split(":")[0])
            now = manifests(moto)
            if spec.startswith("snapshot.manifest_stored"):
                assert len(now - good) == 1, (spec, now - good)
            else:
                assert now == good, (spec, now - good)
            good = now
            assert_references_stored(a, moto)
            assert start_armed(a, None)
        rc, latest, err = snapshot_now(a)
        assert rc == 0 and latest is not None and latest["files"] == n, err
        assert_references_stored(a, moto)
        out = tmp_path / "restored"
        a.cli("restore", a.space, "--to", str(out), timeout=300)
        assert files_of(out) == files_of(a.folder)
