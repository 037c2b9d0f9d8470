"""Reading files as chunks, and writing downloaded files, without ever holding a whole file.

Everything here is blocking file I/O plus hashing, meant to run in a worker thread
(``asyncio.to_thread``), one chunk per call, so the event loop stays free for small text edits.
Paths are relative to a space root and opened through ``materialize``'s dirfd walk with
``O_NOFOLLOW``: a symlink planted in the folder is never followed out of it.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path

from qmoi_sync.agent.materialize import TEMP_PREFIX, DiskStat, UnsafePathError, _open_parent
from qmoi_sync.protocol.chunks import MAX_CHUNK, ChunkKeys

#: Download temp files: ``.qmoi-tmp-dl-<fid hex>`` next to the target (ignored by the watcher).
DOWNLOAD_PREFIX = f"{TEMP_PREFIX}dl-"
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _disk_stat(st: os.stat_result) -> DiskStat:
    return DiskStat(st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode & 0o7777)


def open_regular(root: Path, relpath: str) -> tuple[int, DiskStat] | None:
    """An fd on a regular file inside the root (no symlinks followed), or None if absent."""
    try:
        with _open_parent(root, relpath, create=False) as (dfd, name):
            fd = os.open(name, _READ, dir_fd=dfd)
    except (FileNotFoundError, NotADirectoryError, UnsafePathError):
        return None
    except OSError as exc:
        if exc.errno in (40,):  # ELOOP: a symlink
            return None
        raise
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, _disk_stat(st)


class ChunkReader:
    """Cuts an open file into chunks: ``next()`` returns ``(offset, data)`` or None at the end.

    Keeps at most ``MAX_CHUNK`` bytes of look-ahead beyond the chunk it returns.
    """

    def __init__(self, fd: int, keys: ChunkKeys) -> None:
        self.fd = fd
        self.keys = keys
        self.buf = bytearray()
        self.offset = 0
        self.eof = False

    def next(self) -> tuple[int, bytes] | None:
        while not self.eof and len(self.buf) < MAX_CHUNK:
            part = os.read(self.fd, max(MAX_CHUNK - len(self.buf), 1 << 20))
            if not part:
                self.eof = True
            else:
                self.buf += part
        if not self.buf:
            return None
        n = self.keys.cut(memoryview(self.buf), self.eof)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        start = self.offset
        self.offset += n
        return start, data


def read_range(
    root: Path, relpath: str, offset: int, length: int, size: int, mtime_ns: int
) -> bytes | None:
    """``length`` bytes at ``offset`` of a local file, if it still has the recorded size and
    mtime (a cheap check; the caller verifies the chunk id of what it gets)."""
    opened = open_regular(root, relpath)
    if opened is None:
        return None
    fd, st = opened
    try:
        if st.size != size or st.mtime_ns != mtime_ns:
            return None
        data = os.pread(fd, length, offset)
        return data if len(data) == length else None
    finally:
        os.close(fd)


@dataclass
class TempFile:
    """A download in progress: ``.qmoi-tmp-dl-<fid>`` in the target's folder."""

    dfd: int
    name: str
    fd: int

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            with contextlib.suppress(OSError):
                os.close(fd)


def open_download(root: Path, relpath: str, fid_hex: str) -> TempFile:
    """Open (creating folders and the file if needed) the download temp file for ``relpath``."""
    with _open_parent(root, relpath, create=True) as (dfd, _name):
        own = os.dup(dfd)
    name = f"{DOWNLOAD_PREFIX}{fid_hex}"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=own)
    except BaseException:
        os.close(own)
        raise
    return TempFile(own, name, fd)


def verified_prefix(tmp: TempFile, keys: ChunkKeys, chunks: list[tuple[bytes, int]]) -> int:
    """How many leading chunks the temp file already holds intact (resume after a crash or a
    failed transfer); the file is truncated after them."""
    size = os.fstat(tmp.fd).st_size
    offset = 0
    done = 0
    for cid, length in chunks:
        if offset + length > size:
            break
        data = os.pread(tmp.fd, length, offset)
        if len(data) != length or not keys.verify_plain(cid, data):
            break
        offset += length
        done += 1
    os.ftruncate(tmp.fd, offset)
    os.lseek(tmp.fd, offset, os.SEEK_SET)
    return done


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def install_download(tmp: TempFile, relpath: str, mode: int) -> DiskStat:
    """fsync the temp file and rename it over ``relpath`` (same folder: atomic)."""
    os.fchmod(tmp.fd, mode)
    os.fsync(tmp.fd)
    final = relpath.rsplit("/", 1)[-1]
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(final, dir_fd=tmp.dfd, follow_symlinks=False)
        if not stat_mod.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{relpath!r} exists and is not a regular file")
    os.rename(tmp.name, final, src_dir_fd=tmp.dfd, dst_dir_fd=tmp.dfd)
    return _disk_stat(os.stat(final, dir_fd=tmp.dfd, follow_symlinks=False))


def discard_download(tmp: TempFile) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp.name, dir_fd=tmp.dfd)
    tmp.close()
