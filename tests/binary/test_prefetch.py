"""Prefetch hints (agent/prefetch.py, protocol/hints.py) between real agent processes through a
real relay: the receiver fetches chunks of a file the sender is still writing and uploading,
before any manifest exists; hostile or useless hints are refused or bounded and never
materialize anything."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

from binhelpers import (
    MiB,
    bin_cluster,
    log_excerpt,
    rand_bytes,
    sha,
    space,
    tree_digests,
    wait_file,
    write_atomic,
)
from harness import Device, wait_until
from security.sec_helpers import Wire, device_identity, device_log_bytes

from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.envelope import seal
from qmoi_sync.protocol.hints import HintEntry, PrefetchHint, encode_hint, hint_key, seal_hint
from qmoi_sync.protocol.keys import derive_epoch_keys
from qmoi_sync.protocol.membership import MembershipLog

_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _first_time(dev: Device, pattern: str) -> str | None:
    """The log timestamp of the first line matching ``pattern`` (same clock for both agents;
    the format sorts as text)."""
    for line in dev.log().splitlines():
        if re.search(pattern, line):
            m = _TS.match(line)
            return m.group(1) if m else None
    return None


def _stages(dev: Device) -> list[str]:
    return sorted(p.name for p in dev.folder.iterdir() if p.name.startswith(".qmoi-tmp-pf-"))


def test_receiver_prefetches_a_file_still_being_written(tmp_path: Path) -> None:
    with bin_cluster(tmp_path) as c:
        a, b = c.devices
        data = rand_bytes(32 * MiB, 5)
        stop = threading.Event()

        def writer() -> None:
            # 20 MiB (a follow pass uploads them: agent/binary_sync.py FOLLOW_*), then appends
            # every 50 ms, well inside the stable-read window (0.25 s): a uploads what is there
            # but cannot publish a manifest while this goes on.
            with (a.folder / "grow.bin").open("wb") as f:
                f.write(data[: 20 * MiB])
                f.flush()
                pos = 20 * MiB
                while not stop.is_set() and pos < len(data) - 4096:
                    f.write(data[pos : pos + 4096])
                    f.flush()
                    pos += 4096
                    time.sleep(0.05)
                f.write(data[pos:])

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            # b stages chunks meanwhile: it can only know them from a's hints
            wait_until(
                lambda: space(b)["chunks_prefetched"] >= 1, timeout=120, what="b prefetching"
            )
        finally:
            stop.set()
            thread.join()
        wait_file(b, "grow.bin", sha(data), timeout=120)
        staged = _first_time(b, r"prefetch \w+: staging chunks")
        published = _first_time(a, r"binary up grow\.bin: \d+ bytes")
        assert staged is not None and published is not None, log_excerpt(c)
        assert staged < published, (staged, published)
        st = space(b)
        assert st["chunks_prefetch_used"] >= 1, st
        assert re.search(r"binary down grow\.bin: .* [1-9]\d* prefetched", b.log()), log_excerpt(c)
        assert _stages(b) == []  # the stage became the download's temp file, renamed into place


def test_hostile_hints_are_refused_or_bounded_and_materialize_nothing(tmp_path: Path) -> None:
    """A member's own connection (its key and secrets, as a compromised device would have them)
    sends b hints that are malformed, stale, replayed, sealed with the wrong key, beyond the
    staged extent, for chunks the relay does not have, and for a chunk whose content does not
    match its id; then an oversized one. b refuses, stages no byte, keeps its files, syncs on."""
    with bin_cluster(tmp_path) as c:
        a, b = c.devices
        write_atomic(a.folder / "before.bin", rand_bytes(3 * MiB, 1))
        wait_file(b, "before.bin", sha(rand_bytes(3 * MiB, 1)))
        before = tree_digests(b)
        ident = device_identity(a)
        log = MembershipLog.from_bytes(device_log_bytes(a))
        epoch = log.current_epoch
        msg = derive_epoch_keys(log.space_id, epoch, log.unwrap_epoch_secrets(ident)[epoch]).msg
        sid = log.space_id
        seq = time.time_ns() // 1000

        def hint(entries: tuple[HintEntry, ...], at: int, transfer: bytes = b"h" * 16) -> bytes:
            return seal_hint(ident, sid, epoch, msg, at, PrefetchHint(transfer, epoch, entries))

        forged = os.urandom(32)  # a chunk id whose stored content will not match it

        async def attack() -> tuple[int | None, str]:
            wire = await Wire.open(c.relay.url)
            try:
                assert isinstance(await wire.auth(ident, sid), F.Welcome)
                await wire.send(F.PutChunk(forged, os.urandom(5000)))
                assert isinstance(await wire.recv_skipping(), F.ChunkAck)
                bad_body = bytes([1]) + b"h" * 16 + bytes(6)  # names no chunk
                one = PrefetchHint(b"h" * 16, epoch, (HintEntry(0, os.urandom(32), 9),))
                wrong_key = seal(ident, sid, epoch, msg, seq + 2, encode_hint(one))
                frames = [
                    seal(ident, sid, epoch, hint_key(msg), seq + 1, bad_body),  # malformed
                    hint((HintEntry(0, os.urandom(32), MiB),), seq - 3600 * 10**6),  # stale
                    wrong_key,  # sealed with the envelope key, not the hint key
                    hint((HintEntry(0, os.urandom(32), MiB),), seq + 3),  # never at the relay
                    hint((HintEntry(0, os.urandom(32), MiB),), seq + 3),  # replayed seq
                    hint((HintEntry(2048 * MiB, os.urandom(32), MiB),), seq + 4),  # beyond
                    hint((HintEntry(MiB, forged, 4984),), seq + 5),  # content != id
                ]
                for sealed in frames:
                    await wire.send(F.Hint(sealed))
                # over MAX_HINT: the relay refuses the frame itself and closes the connection
                await wire.send_raw(b"\x0d" + (40_000).to_bytes(4, "big") + bytes(40_000))
                return await wire.wait_closed()
            finally:
                await wire.close()

        code, _reason = asyncio.run(attack())
        assert code is not None
        wait_until(lambda: space(b)["hints_refused"] >= 4, what="b refuses 4 hints")
        wait_until(lambda: space(b)["chunks_refused"] >= 1, what="b refuses the forged chunk")
        st = space(b)
        assert st["hints_refused"] == 4, st  # malformed, stale, wrong key, replayed
        assert st["chunks_prefetched"] == 0, st
        assert "prefetch hint refused" in b.log()
        assert tree_digests(b) == before
        # at most the (empty) stage of the one well-formed transfer, at the root, never a folder
        assert all(os.path.getsize(b.folder / s) <= 0 for s in _stages(b)), _stages(b)
        assert [p.name for p in b.folder.iterdir() if p.is_dir()] == []
        # and b syncs on
        after = rand_bytes(2 * MiB, 2)
        write_atomic(a.folder / "after.bin", after)
        wait_file(b, "after.bin", sha(after))


def test_file_written_without_pauses_uploads_while_written_and_ships_final_bytes(
    tmp_path: Path,
) -> None:
    """A large file written with no pause long enough for a normal pass is followed (uploaded
    as it grows, agent/binary_sync.py FOLLOW_*); its header is rewritten at the end, as media
    writers do: b must get the final bytes, never the ones the follow passes read first."""
    with bin_cluster(tmp_path) as c:
        a, b = c.devices
        body = rand_bytes(48 * MiB, 8)
        header = rand_bytes(MiB, 9)
        with (a.folder / "media.bin").open("wb") as f:
            for i in range(0, len(body), MiB):
                f.write(body[i : i + MiB])
                f.flush()
                time.sleep(0.02)  # never quiet for MIN_QUIET_S (50 ms)
            deadline = time.monotonic() + 60
            while _first_time(a, "binary up media.bin: uploading as it is written") is None:
                assert time.monotonic() < deadline, log_excerpt(c)
                f.write(b"\0" * MiB)  # keep it growing until a follow pass has started
                f.flush()
                time.sleep(0.02)
            tail = f.tell() - len(body)
            f.seek(0)
            f.write(header)
        final = header + body[MiB:] + b"\0" * tail
        wait_file(b, "media.bin", sha(final), timeout=120)
        # followed, and published only after the header was rewritten (once the file was quiet)
        assert len(re.findall(r"binary up media\.bin: \d+ bytes", a.log())) == 1, log_excerpt(c)
