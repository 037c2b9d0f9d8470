"""A text file shows up on the receiver only with its content, never empty or partial first.

Regression (tests/faults finding of the previous session): a batch larger than one envelope
(6 MiB) was sealed index first, documents after, so the receiver could apply the envelope with
the new index entries before the one with their text and write the new files as they stood:
empty. Here a creates many files at once plus one just under the text threshold, then edits
them; an inotify watch on b's folder reads every file the moment it lands there and records what
b showed. Every state b shows must be one a saved (whole), and an edited file must never go
back to an older version.

Real relay and agent processes; the watch is Linux inotify through ctypes (no timing asserts:
whatever b shows at any moment is checked, however fast or slow the machine is)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
from pathlib import Path

from harness import wait_until
from resource_env import resource_cluster

KiB = 1024
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


class LandingWatch(threading.Thread):
    """Reads each file of one folder as soon as it is written or renamed into place, and keeps
    every content seen per name (b writes temp + rename, so a read sees a whole file)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = libc.inotify_add_watch(self.fd, str(folder).encode(), IN_CLOSE_WRITE | IN_MOVED_TO)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.folder = folder
        self.seen: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            buf = os.read(self.fd, 1 << 16)
            names = []
            pos = 0
            while pos < len(buf):
                _wd, _mask, _cookie, size = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size : pos + _EVENT.size + size]
                names.append(raw.rstrip(b"\x00").decode())
                pos += _EVENT.size + size
            for name in names:
                if name.startswith(".qmoi-tmp"):
                    continue
                try:
                    data = (self.folder / name).read_bytes()
                except FileNotFoundError:
                    continue
                with self.lock:
                    self.seen.setdefault(name, []).append(data)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.join(timeout=10)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)

    def states(self, name: str) -> list[bytes]:
        with self.lock:
            return list(self.seen.get(name, []))


def _save(path: Path, data: bytes) -> None:
    """Save like an editor (temp outside the watched names, then rename): a only ever holds
    whole versions, so every version b could show is one of them."""
    tmp = path.parent.parent / f"{path.name}.part"
    tmp.write_bytes(data)
    tmp.replace(path)


def _body(tag: str, size: int) -> bytes:
    line = f"{tag}: a line of text to make the file this big\n".encode()
    return (line * (size // len(line) + 1))[:size]


def _describe(states: list[bytes], versions: list[bytes]) -> str:
    out = []
    for s in states:
        idx = versions.index(s) if s in versions else None
        out.append(f"v{idx}" if idx is not None else f"<{len(s)} bytes, no version of a>")
    return ", ".join(out)


def test_new_text_file_never_appears_empty_before_its_content(tmp_path: Path) -> None:
    # Readings of an idle machine (test hook): the real load must not defer the big file.
    with resource_cluster(tmp_path, {"a": {}, "b": {}}) as (_relay, (a, b), _readings):
        watch = LandingWatch(b.folder)
        watch.start()
        try:
            # 160 files of 48 KiB and one of 3.9 MiB, created at once: 11.5 MiB, two envelopes
            # at least. The big one sorts last, so its document came in the last envelope.
            versions: dict[str, list[bytes]] = {}
            for i in range(160):
                versions[f"note-{i:03}.txt"] = [_body(f"note {i} v0", 48 * KiB)]
            versions["zz-big.txt"] = [_body("big v0", 3900 * KiB)]
            for name, vs in versions.items():
                _save(a.folder / name, vs[0])

            def landed() -> bool:
                return all(watch.states(k)[-1:] == vs[-1:] for k, vs in versions.items())

            def wait_landed(what: str) -> None:
                try:
                    wait_until(landed, timeout=120, what=what)
                except AssertionError as exc:
                    late = [
                        f"{k}: b showed {_describe(watch.states(k), vs)}"
                        for k, vs in versions.items()
                        if watch.states(k)[-1:] != vs[-1:]
                    ]
                    raise AssertionError(f"{exc}\n" + "\n".join(late[:10])) from None

            wait_landed("b has every new file")

            # Edits of every file b already shows, again more than one envelope per commit
            # (128 files x 56 KiB, and 1 MiB of the big one): b shows each file's versions in
            # order, whole, never an older one after a newer.
            for name, vs in versions.items():
                cut, new = (1024, 1024) if name == "zz-big.txt" else (40, 56)
                vs.append(vs[-1][: -cut * KiB] + _body(f"{name} v1", new * KiB))
                _save(a.folder / name, vs[-1])
            wait_landed("b has every edit")
        finally:
            watch.close()

        problems = []
        for name, vs in versions.items():
            states = watch.states(name)
            order = [vs.index(s) if s in vs else -1 for s in states]
            if -1 in order or order != sorted(order):
                problems.append(f"{name}: b showed {_describe(states, vs)}")
        assert not problems, "\n".join(problems[:10])
