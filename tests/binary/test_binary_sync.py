"""Binary and large files end to end: arrival, small edits, switches, ordering, stable reads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from binhelpers import (
    BinCluster,
    MiB,
    bin_cluster,
    file_sha,
    rand_bytes,
    sha,
    space,
    tree_digests,
    wait_file,
    wait_settled,
    write_atomic,
)
from harness import grep_bytes, wait_until


def test_binary_files_end_to_end(tmp_path: Path) -> None:
    """Random files 0 B..10 MiB both ways, a large text file; then text<->binary switches, a
    slowly written file, rename and delete, on the same cluster."""
    sizes = {
        "empty.bin": 0,
        "one.bin": 1,
        "zeros.dat": 1000,
        "photos/p.jpg": 3 * MiB + 17,
        "big/edge.bin": 2 * 1024 * 1024 - 1,
        "ten.iso": 10 * MiB + 5,
    }
    with bin_cluster(tmp_path) as c:
        a, b = c.devices
        want: dict[str, str] = {}
        for i, (rel, n) in enumerate(sorted(sizes.items())):
            data = rand_bytes(n, i) if n != 1000 else b"\x00" * 1000
            write_atomic(a.folder / rel, data)
            want[rel] = sha(data)
        # a large file that is valid UTF-8 but over the text limit is chunked too
        text = ("line of text %d\n" * 400_000).encode()
        write_atomic(a.folder / "large.txt", text)
        want["large.txt"] = sha(text)
        # and one the other way
        back = rand_bytes(5 * MiB, 99)
        write_atomic(b.folder / "from-b.bin", back)
        want["from-b.bin"] = sha(back)
        for rel, digest in want.items():
            for dev in (a, b):
                wait_file(dev, rel, digest)
        assert tree_digests(a) == tree_digests(b)
        st = wait_settled(b)
        assert st["pending_down_bytes"] == 0 and st["chunks_refused"] == 0
        # the relay's blob store holds ciphertext only
        assert not grep_bytes(c.relay.data, [b"line of text 12345", text[-64:]])
        # more behaviours on the same running cluster (starting one costs seconds)
        _switch_both_ways(c)
        _slow_write_never_half_materialized(c)
        _rename_and_delete(c)


@pytest.mark.slow
def test_64mib_file_and_one_byte_change_sends_at_most_two_chunks(tmp_path: Path) -> None:
    with bin_cluster(tmp_path) as c:
        a, b = c.devices
        data = bytearray(rand_bytes(64 * MiB, 7))
        write_atomic(a.folder / "disk.img", bytes(data))
        wait_file(b, "disk.img", sha(bytes(data)), timeout=90)
        wait_settled(a)
        before = c.metrics()
        data[32 * MiB] ^= 0xFF  # one byte, in the middle, in place (as a database would)
        with (a.folder / "disk.img").open("r+b") as f:
            f.seek(32 * MiB)
            f.write(bytes([data[32 * MiB]]))
        wait_file(b, "disk.img", sha(bytes(data)), timeout=60)
        after = c.metrics()
        stored = (
            after['qmoi_relay_chunk_puts_total{result="stored"}']
            - before['qmoi_relay_chunk_puts_total{result="stored"}']
        )
        served = (
            after['qmoi_relay_chunk_gets_total{result="served"}']
            - before['qmoi_relay_chunk_gets_total{result="served"}']
        )
        up_bytes = (
            after["qmoi_relay_chunk_bytes_received_total"]
            - before["qmoi_relay_chunk_bytes_received_total"]
        )
        assert 1 <= stored <= 2, (stored, served)
        assert 1 <= served <= 2, (stored, served)
        assert up_bytes <= 2 * 2 * MiB + 64


def _switch_both_ways(c: BinCluster) -> None:
    a, b = c.devices
    a.write("notes.txt", "plain text\n")
    wait_until(lambda: b.read("notes.txt") == "plain text\n", what="text arrives")
    # becomes binary (a NUL byte): a new representation, the content preserved
    binary = b"plain text\n\x00\x01\x02" + rand_bytes(3000, 1)
    write_atomic(a.folder / "notes.txt", binary)
    wait_file(b, "notes.txt", sha(binary))
    # grows past the text limit while valid UTF-8: chunked
    big = ("x" * 99 + "\n").encode() * (5 * MiB // 100)
    write_atomic(b.folder / "notes.txt", big)
    wait_file(a, "notes.txt", sha(big))
    # and back to a small text file: merged as text again (edits on both sides survive)
    write_atomic(a.folder / "notes.txt", b"back to text\n")
    wait_file(b, "notes.txt", sha(b"back to text\n"))
    b.write("notes.txt", "back to text\nedited on b\n")
    wait_until(lambda: a.read("notes.txt") == "back to text\nedited on b\n", what="text")
    assert tree_digests(a) == tree_digests(b)
    assert [p for p in tree_digests(a) if "sync-conflict" in p] == []


def _slow_write_never_half_materialized(c: BinCluster) -> None:
    a, b = c.devices
    parts = [b"\x00" + rand_bytes(64 * 1024, i) for i in range(10)]
    final = b"".join(parts)
    seen: set[str | None] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add(file_sha(b.folder / "slow.bin"))
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    pace = threading.Event()
    try:
        with (a.folder / "slow.bin").open("wb") as f:
            for part in parts:  # appended in 10 steps over ~1 s (the behaviour under test)
                f.write(part)
                f.flush()
                pace.wait(0.1)
        wait_file(b, "slow.bin", sha(final))
    finally:
        done.set()
        watcher.join()
    assert seen <= {None, sha(final)}, "a partial version was materialized"


def _rename_and_delete(c: BinCluster) -> None:
    a, b = c.devices
    data = rand_bytes(6 * MiB, 3)
    write_atomic(a.folder / "v.bin", data)
    wait_file(b, "v.bin", sha(data))
    wait_settled(a)
    served = c.metrics()['qmoi_relay_chunk_gets_total{result="served"}']
    (a.folder / "sub").mkdir()
    (a.folder / "v.bin").rename(a.folder / "sub/moved.bin")
    wait_file(b, "sub/moved.bin", sha(data))
    wait_until(lambda: not (b.folder / "v.bin").exists(), what="old name gone")
    # a rename moves the file on the other side: nothing is fetched again
    assert c.metrics()['qmoi_relay_chunk_gets_total{result="served"}'] == served
    (b.folder / "sub/moved.bin").unlink()
    wait_until(lambda: not (a.folder / "sub/moved.bin").exists(), what="delete arrives")
    assert space(a)["pending_down_files"] == 0
