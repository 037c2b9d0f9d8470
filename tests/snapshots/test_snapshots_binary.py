"""Snapshots of binary and large files, end to end: real relay and agents, a moto S3 server.

Binary files are stored as their encrypted chunks (``c/<chunk id>``); these tests check that a
restore (whole space, one file, a new device with the relay down) is byte-identical, that a
small change uploads one chunk, that a damaged chunk is reported and never restored wrong, and
that retention keeps every chunk a kept snapshot references.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from harness import Device, Relay, create_space, invite, join, wait_converged, wait_until
from resource_env import resource_cluster, resource_device
from s3env import MotoServer, restore_from_bucket
from test_snapshots_e2e import EXIT_INTEGRITY, configure, listing, snapshot, tree

from qmoi_sync.agent.snapshot_format import padded_size

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def chunk_rows(dev: Device, path: str | None = None) -> list[tuple[int, int, str]]:
    """(offset, length, chunk id hex) of the chunks the agent recorded for a local file (or
    every file) in its chunk_index."""
    db = sqlite3.connect(f"file:{dev.home / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT offset, length, hex(chunk_id) FROM chunk_index WHERE ? IS NULL OR path=?"
            " ORDER BY path, offset",
            (path, path),
        ).fetchall()
    finally:
        db.close()
    return [(int(o), int(n), str(c).lower()) for o, n, c in rows]


def write_bin(dev: Device, rel: str, data: bytes) -> None:
    p = dev.folder / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def big_text(n: int) -> str:
    rng = random.Random(5)
    lines = []
    size = 0
    while size < n:
        line = f"line {len(lines)} BIGTEXT-{rng.getrandbits(64):016x}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def mixed_space(a: Device) -> tuple[bytes, bytes]:
    """A few text files, a text file over the 4 MiB text limit, and two binary files that
    share their first chunk; ``data.bin`` ends with a small chunk (cut points depend only on
    the bytes since the previous cut, so a prefix of ``probe.bin`` ending 300 000 bytes after
    one of its cuts has the same cuts)."""
    for i in range(4):
        a.write(f"docs/secretname-{i}.txt", f"UNIQUE-CONTENT-{i}\n" * (i + 3))
    a.write("big.txt", big_text(4 * MiB + 300_000))
    probe = random.Random(21).randbytes(4 * MiB)
    write_bin(a, "bin/probe.bin", probe)
    rows = wait_until(lambda: chunk_rows(a, "bin/probe.bin") or None, what="probe.bin chunked")
    first_cut = rows[0][1]
    data = probe[: first_cut + 300_000]
    write_bin(a, "bin/data.bin", data)
    return probe, data


def test_binary_snapshot_restore_dedup_integrity_retention(
    tmp_path: Path, moto: MotoServer
) -> None:
    bucket = "snaps-bin-1"
    moto.make_bucket(bucket)
    # Pinned idle readings: the shared test machine's load must not defer binary transfers.
    with resource_cluster(tmp_path, {"a": {}, "b": {}}) as (_relay, (a, b), _r):
        probe, data = mixed_space(a)
        wait_converged([a, b], timeout=90)
        configure(a, moto.url, bucket, "--keep-last", "2", "--keep-daily", "0", "--gc-grace", "0s")
        first = snapshot(a)
        assert first["files"] == 7
        at_first = tree(a.folder)
        chunks_first = {k: v for k, v in moto.objects(bucket).items() if "/c/" in k}
        # Each distinct chunk once (data.bin's first chunk is probe.bin's), under its id.
        assert set(chunks_first) == {f"space1/c/{c}" for _o, _n, c in chunk_rows(a)}
        assert chunk_rows(a, "bin/data.bin")[0][2] == chunk_rows(a, "bin/probe.bin")[0][2]
        blob = b"".join(moto.get(bucket, k) for k in moto.objects(bucket))
        for pos in range(0, len(probe), 512 * 1024):
            assert probe[pos : pos + 64] not in blob
        assert b"BIGTEXT" not in blob and b"probe" not in blob and b"data.bin" not in blob

        # One byte changed in data.bin: one new chunk (its last, small one), index delta and
        # manifest; nothing else.
        before = moto.objects(bucket)
        changed = bytearray(data)
        changed[-1000] ^= 0xFF
        write_bin(a, "bin/data.bin", bytes(changed))
        wait_converged([a, b], timeout=60)
        second = snapshot(a)
        new = {k: v for k, v in moto.objects(bucket).items() if k not in before}
        new_chunks = [v for k, v in new.items() if "/c/" in k]
        assert new_chunks == [padded_size(300_000 + 16)], new
        assert sum(new.values()) < MiB, new
        assert second["uploaded_bytes"] == sum(new.values())
        at_second = tree(a.folder)

        # History, then bring the first version back on b: it syncs to a as a normal edit.
        out = b.cli("history", "notes", "bin/data.bin", "--json").stdout
        versions = json.loads(out)["versions"]
        assert [v["snapshot"] for v in versions] == [first["id"], second["id"]]
        assert [v["size"] for v in versions] == [len(data), len(data)]
        assert all(v["changed"] for v in versions)
        b.cli("restore-file", "notes", "bin/data.bin", "--at", first["id"])
        assert (b.folder / "bin" / "data.bin").read_bytes() == data
        wait_until(
            lambda: (a.folder / "bin" / "data.bin").read_bytes() == data,
            timeout=60,
            what="restored binary file synced to a",
        )
        b.cli(
            "restore-file",
            "notes",
            "bin/data.bin",
            "--at",
            second["id"],
            "--to",
            str(tmp_path / "one.bin"),
        )
        assert (tmp_path / "one.bin").read_bytes() == bytes(changed)

        # Whole space as of each snapshot, into new folders: byte-identical.
        b.cli("restore", "notes", "--to", str(tmp_path / "r-first"), "--at", first["id"])
        assert tree(tmp_path / "r-first") == at_first
        b.cli("restore", "notes", "--to", str(tmp_path / "r-second"), "--at", second["id"])
        assert tree(tmp_path / "r-second") == at_second

        # -- a damaged chunk is reported; the file is never written wrong ------------------
        # The first chunk of probe.bin, shared with data.bin.
        shared = f"space1/c/{chunk_rows(a, 'bin/probe.bin')[0][2]}"
        good = moto.get(bucket, shared)

        def broken_restore(name: str, *expect: str) -> None:
            out_dir = tmp_path / name
            r = b.cli("restore", "notes", "--to", str(out_dir), "--at", first["id"], check=False)
            assert r.returncode == EXIT_INTEGRITY, (r.stdout, r.stderr)
            assert any(e in r.stderr for e in expect), r.stderr
            got = tree(out_dir) if out_dir.exists() else {}
            for rel, content in got.items():
                assert at_first[rel] == content, rel  # only correct files, nothing wrong
            leftovers = [p.name for p in out_dir.rglob(".qmoi-tmp*")] if out_dir.exists() else []
            assert leftovers == []

        bad = bytearray(good)
        bad[len(bad) // 3] ^= 0x01
        moto.put(bucket, shared, bytes(bad))
        broken_restore("t-flip", "fails authentication")
        moto.put(bucket, shared, good[: len(good) // 2])
        broken_restore("t-trunc", "truncated")
        others = sorted(k for k in chunks_first if k != shared)
        moto.put(bucket, shared, moto.get(bucket, others[0]))  # another authentic chunk
        broken_restore("t-swap", "fails authentication", "truncated or replaced")
        moto.delete(bucket, shared)
        broken_restore("t-missing", "missing")
        # restore-file of a file using that chunk: refused, the file in the space untouched.
        keep = (b.folder / "bin" / "data.bin").read_bytes()
        r = b.cli("restore-file", "notes", "bin/probe.bin", "--at", first["id"], check=False)
        assert r.returncode == EXIT_INTEGRITY and "missing" in r.stderr, r.stderr
        assert (b.folder / "bin" / "probe.bin").read_bytes() == probe
        assert (b.folder / "bin" / "data.bin").read_bytes() == keep
        moto.put(bucket, shared, good)

        # -- retention (keep the last 2): a third snapshot drops the first; chunks only it
        # referenced are collected, every chunk a kept snapshot references stays.
        write_bin(a, "bin/data.bin", bytes(changed[:-10]))
        wait_converged([a, b], timeout=60)
        third = snapshot(a)
        snaps = listing(a)
        assert [s["id"] for s in snaps] == [second["id"], third["id"]]
        referenced = {f"space1/c/{c}" for s in snaps for c in s["chunks"]}
        stored = {k for k in moto.objects(bucket) if "/c/" in k}
        assert stored == referenced  # nothing referenced deleted, the rest collected
        assert set(chunks_first) - stored  # data.bin's first last-chunk is gone
        for s in snaps:
            b.cli("restore", "notes", "--to", str(tmp_path / f"k-{s['id']}"), "--at", s["id"])
        assert tree(tmp_path / f"k-{third['id']}") == tree(a.folder)


def test_new_device_restores_binary_files_and_settings_with_relay_down(
    tmp_path: Path, moto: MotoServer
) -> None:
    bucket = "snaps-bin-2"
    moto.make_bucket(bucket)
    relay = Relay(tmp_path / "relay-data").start()
    a, _ra = resource_device(tmp_path, "a")
    c, _rc = resource_device(tmp_path, "c")
    try:
        create_space(a, relay)
        a.start()
        probe, data = mixed_space(a)
        a.cli("settings", "set", "notes", "qmoi-sync", "lan.enabled", "false")
        wait_until(lambda: len(a.tree()) == 7, what="a ingested")
        wait_until(
            lambda: a.space_status()["files"] == 7 and a.space_status()["pending_up_files"] == 0,
            what="binaries uploaded",
        )
        join(c, invite(a))  # c has its membership only: it never ran
        configure(a, moto.url, bucket)
        snapshot(a)
        expected = tree(a.folder)
        a.stop()
        relay.stop()  # relay down: c can only use the bucket

        r = restore_from_bucket(c, moto.url, bucket)
        assert "restored snapshot" in r.stdout
        assert tree(c.folder) == expected
        assert (c.folder / "bin" / "probe.bin").read_bytes() == probe
        assert [p.name for p in c.folder.rglob(".qmoi-tmp*")] == []

        # Back online: c holds the binary files as synced versions (nothing re-ingested or
        # split into conflicts), and the shared settings came back with the snapshot.
        relay.start()
        a.start()
        c.start()

        def lan_setting() -> Any:
            out = json.loads(c.cli("settings", "get", "notes", "qmoi-sync", "--json").stdout)
            return out["options"]["lan.enabled"]["value"]

        assert lan_setting() is False
        c.write("from-c.txt", "c writes too\n")
        wait_converged([a, c], timeout=60)
        final = tree(a.folder)
        assert final["bin/data.bin"] == data
        assert len(final) == len(expected) + 1
        st = c.space_status()
        assert st["pending_up_files"] == 0 and st["pending_down_files"] == 0
    finally:
        a.stop()
        c.stop()
        relay.stop()


def test_chunk_found_nowhere_fails_the_snapshot_without_a_manifest(
    tmp_path: Path, moto: MotoServer
) -> None:
    """The version the index holds cannot be read back (the file changed on disk and its new
    version is held back by the resource policy; the relay lost the old chunks): the snapshot
    fails with a clear error and writes no manifest; once the new version is published, the
    next snapshot holds it."""
    bucket = "snaps-bin-3"
    moto.make_bucket(bucket)
    with resource_cluster(tmp_path, {"a": {}}) as (relay, (a,), readings):
        old = random.Random(31).randbytes(3 * MiB)
        write_bin(a, "v.bin", old)
        wait_until(
            lambda: a.space_status()["files"] == 1 and a.space_status()["pending_up_files"] == 0,
            what="v.bin published",
        )
        configure(a, moto.url, bucket)
        readings["a"].set(on_ac=False, battery_percent=10.0)  # big uploads wait
        wait_until(
            lambda: (a.status() or {})["agent"]["policy"]["state"] == "deferring_bulk",
            what="the policy defers bulk work",
        )
        new = random.Random(32).randbytes(3 * MiB)
        write_bin(a, "v.bin", new)
        wait_until(
            lambda: any("wait until bulk work" in w for w in a.space_status()["warnings"]),
            what="the new version is held back",
        )
        blobs = [p for p in (relay.data / "blobs").rglob("*") if p.is_file()]
        assert blobs
        for p in blobs:
            p.unlink()  # the relay lost the old version's chunks

        r = a.cli("snapshot", "now", a.space, "--json", check=False, timeout=300)
        assert r.returncode != 0
        assert "snapshot not written" in r.stdout + r.stderr, (r.stdout, r.stderr)
        assert not [k for k in moto.objects(bucket) if "/m/" in k]

        readings["a"].set(on_ac=True, battery_percent=100.0)
        wait_until(
            lambda: a.space_status()["pending_up_files"] == 0, timeout=60, what="v.bin published"
        )
        snapshot(a)
        a.cli("restore", "notes", "--to", str(tmp_path / "r"))
        assert (tmp_path / "r" / "v.bin").read_bytes() == new
