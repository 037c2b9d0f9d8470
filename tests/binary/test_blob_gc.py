"""Relay storage garbage collection with real agents: `qmoi-sync gc` drops the chunks of replaced
and deleted file versions, keeps every chunk a current version needs (a device joining after the
collection gets every file), and refuses an unsafe minimum age without --force."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from binhelpers import bin_cluster, file_sha, rand_bytes, sha, wait_file, wait_settled, write_atomic
from harness import invite, join, wait_until
from resource_env import resource_device

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def test_gc_drops_old_versions_keeps_current_ones(tmp_path: Path) -> None:
    with bin_cluster(tmp_path) as c:
        a, b = c.devices
        v1, v2 = rand_bytes(3 * MiB, 1), rand_bytes(3 * MiB, 2)
        gone = rand_bytes(2 * MiB, 3)
        write_atomic(a.folder / "photo.bin", v1)
        write_atomic(a.folder / "gone.bin", gone)
        wait_file(b, "photo.bin", sha(v1))
        wait_file(b, "gone.bin", sha(gone))
        write_atomic(a.folder / "photo.bin", v2)  # every chunk changes
        os.unlink(a.folder / "gone.bin")
        wait_file(b, "photo.bin", sha(v2))
        wait_until(lambda: not (b.folder / "gone.bin").exists(), what="gone.bin deleted on b")
        wait_settled(a)
        wait_settled(b)
        before = c.blob_files()
        stored = sum(p.stat().st_size for p in before)
        assert stored >= 8 * MiB  # v1, v2 and gone.bin are all on the relay

        # The default minimum age (7 days) protects everything uploaded minutes ago.
        out = a.cli("gc", "notes").stdout
        assert "dropped 0 " in out, out
        # Below the one-day upload trust window only with --force, with a readable reason.
        refused = a.cli("gc", "notes", "--min-age", "0", check=False)
        assert refused.returncode != 0 and "--force" in refused.stderr, refused.stderr

        out = a.cli("gc", "notes", "--min-age", "0", "--force").stdout
        after = c.blob_files()
        freed = stored - sum(p.stat().st_size for p in after)
        # v1 and gone.bin (5 MiB of plaintext) are dropped, v2 (3 MiB) stays
        assert 4 * MiB <= freed <= 6 * MiB, (out, freed)
        assert f"({freed} bytes freed)" in out, out
        assert len(after) < len(before)

        # Every current version is still complete on the relay: a new device gets it all.
        new, _r = resource_device(tmp_path, "c")
        join(new, invite(a))
        new.start()
        c.devices.append(new)
        wait_file(new, "photo.bin", sha(v2), timeout=90)
        assert not (new.folder / "gone.bin").exists()
        # The dropped version written again by the device that uploaded it first (and ran the
        # collection): its acks of those chunks were voided, so it uploads them again.
        write_atomic(a.folder / "photo.bin", v1)
        wait_file(b, "photo.bin", sha(v1), timeout=90)
        wait_file(new, "photo.bin", sha(v1), timeout=90)
        assert file_sha(a.folder / "photo.bin") == sha(v1)
