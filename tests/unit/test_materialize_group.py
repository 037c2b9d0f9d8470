"""materialize.write_files_atomic: a group of atomic writes with shared fsyncs (real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmoi_sync.agent.materialize import (
    DiskStat,
    UnsafePathError,
    WriteJob,
    write_file_atomic,
    write_files_atomic,
)


def _temps(root: Path) -> list[str]:
    return [
        os.path.join(d, n) for d, _dirs, names in os.walk(root) for n in names if ".qmoi-tmp" in n
    ]


def test_group_writes_content_mode_mtime_and_reports_each_stat(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "old.txt").write_bytes(b"before")
    jobs = [
        WriteJob("a.txt", b"alpha\n"),
        WriteJob("deep/er/b.sh", b"#!/bin/sh\n", 0o755, 1_600_000_000_123_456_789),
        WriteJob("deep/c.txt", b""),
        WriteJob("old.txt", b"after"),
    ]
    results = write_files_atomic(root, jobs)
    assert len(results) == len(jobs)
    for job, res in zip(jobs, results, strict=True):
        assert isinstance(res, DiskStat), res
        path = root / job.relpath
        assert path.read_bytes() == job.data
        st = os.stat(path)
        assert (res.size, res.inode, res.mtime_ns) == (st.st_size, st.st_ino, st.st_mtime_ns)
        assert st.st_mode & 0o777 == job.mode
        if job.mtime_ns is not None:
            assert st.st_mtime_ns == job.mtime_ns
    assert _temps(root) == []
    assert write_files_atomic(root, []) == []


def test_a_bad_job_fails_alone_and_leaves_no_temp(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "taken").mkdir()  # a folder where a file should go
    (root / "link").symlink_to(outside)  # a symlinked folder must never be followed
    jobs = [
        WriteJob("ok-1.txt", b"one"),
        WriteJob("taken", b"not a file"),
        WriteJob("link/escape.txt", b"nope"),
        WriteJob("../escape.txt", b"nope"),
        WriteJob("sub/ok-2.txt", b"two"),
    ]
    results = write_files_atomic(root, jobs)
    assert isinstance(results[0], DiskStat)
    assert isinstance(results[1], UnsafePathError)
    assert isinstance(results[2], UnsafePathError)
    assert isinstance(results[3], UnsafePathError)
    assert isinstance(results[4], DiskStat)
    assert (root / "ok-1.txt").read_bytes() == b"one"
    assert (root / "sub/ok-2.txt").read_bytes() == b"two"
    assert (root / "taken").is_dir()
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()
    assert _temps(root) == []


def test_single_write_raises_what_the_group_reports(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    st = write_file_atomic(root, "x/y.txt", b"hello", 0o644)
    assert (root / "x/y.txt").read_bytes() == b"hello"
    assert st.size == 5
    (root / "dir").mkdir()
    with pytest.raises(UnsafePathError):
        write_file_atomic(root, "dir", b"no")
    assert _temps(root) == []
