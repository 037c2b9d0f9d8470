from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from qmoi_sync.protocol.errors import PathError
from qmoi_sync.protocol.paths import (
    conflict_name,
    is_conflict_name,
    split_ext_for_conflict,
    validate_relpath,
)

WHEN = datetime(2026, 11, 24, 10, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a/b/c.txt",
        ".bashrc",
        "dir.with.dots/file",
        "ünïcødé/日本語.md",
        "CONSOLE.txt",
        "com10",
        "a b/c d",
        "x" * 255,
        "/".join(["d" * 200] * 20),
    ],
)
def test_valid_paths(path: str) -> None:
    assert validate_relpath(path) == path


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("", "empty"),
        ("..", r"'\.\.'"),
        ("a/../b", r"'\.\.'"),
        ("./a", r"'\.'"),
        ("a/./b", r"'\.'"),
        ("a//b", "empty component"),
        ("a/", "empty component"),
        ("/etc/passwd", "absolute"),
        ("C:/Windows", "drive letter"),
        ("c:foo", "drive letter"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a\nb", "control"),
        ("a\x7fb", "control"),
        ("a\x85b", "control"),
        ("CON", "reserved"),
        ("dir/con.txt", "reserved"),
        ("nul", "reserved"),
        ("Aux.tar.gz", "reserved"),
        ("COM1", "reserved"),
        ("lpt9.log", "reserved"),
        ("COM\u00b9", "reserved"),
        ("PRN .txt", "reserved"),
        ("file.", "dot or a space"),
        ("file ", "dot or a space"),
        ("dir./x", "dot or a space"),
        ("x" * 256, "longer than 255"),
        ("é" * 128, "longer than 255"),
        ("/".join(["d" * 200] * 21), "4096"),
        ("bad\udcffsurrogate", "UTF-8"),
    ],
)
def test_invalid_paths(path: str, match: str) -> None:
    with pytest.raises(PathError, match=match) as ei:
        validate_relpath(path)
    assert ei.value.code == "bad_path"


def test_non_string_path() -> None:
    with pytest.raises(PathError):
        validate_relpath(b"a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a/b/report.pdf", ("a/b/report", ".pdf")),
        ("name", ("name", "")),
        (".bashrc", (".bashrc", "")),
        ("dir/.bashrc", ("dir/.bashrc", "")),
        (".config.json", (".config", ".json")),
        ("x.tar.gz", ("x.tar", ".gz")),
        ("d.ir/file", ("d.ir/file", "")),
    ],
)
def test_split_ext(path: str, expected: tuple[str, str]) -> None:
    assert split_ext_for_conflict(path) == expected


def test_conflict_names() -> None:
    assert (
        conflict_name("a/b/report.pdf", WHEN, "ABCDEFG")
        == "a/b/report.sync-conflict-20261124-101500-ABCDEFG.pdf"
    )
    assert conflict_name("name", WHEN, "ABCDEFG") == "name.sync-conflict-20261124-101500-ABCDEFG"
    assert (
        conflict_name(".bashrc", WHEN, "ABCDEFG") == ".bashrc.sync-conflict-20261124-101500-ABCDEFG"
    )


def test_conflict_name_time_forms() -> None:
    expected = "f.sync-conflict-20261124-101500-ABCDEFG.txt"
    assert conflict_name("f.txt", WHEN.timestamp(), "ABCDEFG") == expected
    assert conflict_name("f.txt", int(WHEN.timestamp()), "ABCDEFG") == expected
    assert conflict_name("f.txt", WHEN.replace(tzinfo=None), "ABCDEFG") == expected  # naive=UTC
    plus2 = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert conflict_name("f.txt", plus2, "ABCDEFG") == expected


def test_conflict_name_refusals() -> None:
    with pytest.raises(PathError):
        conflict_name("../x", WHEN, "ABCDEFG")
    with pytest.raises(PathError, match="short_id"):
        conflict_name("x", WHEN, "AB-CD")
    with pytest.raises(PathError, match="short_id"):
        conflict_name("x", WHEN, "")
    with pytest.raises(PathError):
        conflict_name("x", "yesterday", "ABCDEFG")  # type: ignore[arg-type]
    with pytest.raises(PathError, match="out of range"):
        conflict_name("x", 1e20, "ABCDEFG")


def test_conflict_name_long_stem_is_shortened() -> None:
    name = "é" * 120 + ".txt"  # 244 bytes
    out = conflict_name("dir/" + name, WHEN, "ABCDEFG")
    assert out.startswith("dir/") and out.endswith("-ABCDEFG.txt")
    assert validate_relpath(out) == out
    assert len(out.split("/")[-1].encode()) <= 255
    assert is_conflict_name(out)


def test_is_conflict_name() -> None:
    assert is_conflict_name("a/b/report.sync-conflict-20261124-101500-ABCDEFG.pdf")
    assert is_conflict_name("name.sync-conflict-20261124-101500-ABCDEFG")
    assert not is_conflict_name("a/b/report.pdf")
    assert not is_conflict_name("x.sync-conflict-2026-ABC.pdf")
    assert not is_conflict_name("dir.sync-conflict-20261124-101500-ABCDEFG/file.txt")


def test_conflict_name_impossible_with_huge_extension() -> None:
    with pytest.raises(PathError, match="no valid conflict name"):
        conflict_name("x." + "e" * 250, WHEN, "ABCDEFG")
