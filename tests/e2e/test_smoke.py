"""Smallest end-to-end path: relay + two agent processes, one file each way."""

from pathlib import Path

from harness import cluster, wait_until


def test_file_flows_both_ways(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        a.write("hello.txt", "hello from a\n")
        wait_until(lambda: b.read("hello.txt") == "hello from a\n", what="a→b")
        b.write("sub/dir/b.txt", "from b\n")
        wait_until(lambda: a.read("sub/dir/b.txt") == "from b\n", what="b→a nested")
