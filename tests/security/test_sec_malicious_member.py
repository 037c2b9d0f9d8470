"""A malicious *member*: its envelopes are validly signed and correctly encrypted, so the relay
stores and forwards them; only the receiving agents can refuse what is inside.

Setup (real processes, the session's ``world``): a relay, agents ``a`` (admin) and ``b`` running,
and device ``m`` created with the CLI (init + join) but never started. The test loads m's key from
its home and its membership log / epoch secrets from its ``state.db``, then speaks to the relay
as m.

After every attack: the receivers created nothing outside their folder, their files are intact,
``status --json`` reports the refusal (quarantined envelopes, or a refused-path warning), and a
normal edit still propagates both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from pathlib import Path

import pytest
from harness import Device, wait_until
from security.sec_helpers import (
    SYNC_TIMEOUT,
    World,
    assert_readable,
    cli_in_pty,
    create_files_payload,
)
from websockets.exceptions import ConnectionClosed

from qmoi_sync.agent.textdoc import ingest_disk_text
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol.payload import INDEX_DOC_ID, DeviceInfo, DocUpdate, Updates, encode_payload

pytestmark = pytest.mark.timeout(120)


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _item_on_root(info: int, root: bytes, content: bytes) -> bytes:
    """A v1 update with one item (client 7, clock 0) under root type ``root``."""
    struct = bytes([info]) + b"\x01" + _varuint(len(root)) + root + content
    return _varuint(1) + _varuint(1) + _varuint(7) + _varuint(0) + struct + b"\x00"


# Fixed "random" bytes (seeded, so a run can never draw the 1-in-65536 prefix that yrs would read
# as an empty update followed by ignored trailing bytes).
RANDOM = random.Random(20261125).randbytes(512)


def wait_quarantined(world: World, before: dict[str, int], n: int) -> None:
    for dev in (world.a, world.b):
        wait_until(
            lambda dev=dev: world.quarantined(dev) == before[dev.name] + n,
            SYNC_TIMEOUT,
            f"{dev.name} quarantines {n} envelope(s)",
        )


def quarantined(world: World) -> dict[str, int]:
    return {d.name: world.quarantined(d) for d in (world.a, world.b)}


# -- (a) malformed CRDT updates, (b) garbage payloads -----------------------------------------
async def test_malformed_crdt_updates_are_quarantined(world: World) -> None:
    before_trees = world.trees()
    before = quarantined(world)
    rep = await world.replica()
    keep = rep.fid_of("keep.txt")
    # A real update of keep.txt's document, cut in half.
    real = ingest_disk_text(rep.doc(keep), "precious line 1\nprecious line 2\nEVIL\n")
    assert real is not None
    bad_updates = [
        [DocUpdate(keep, RANDOM[:200])],  # random bytes on a live document
        [DocUpdate(keep, real[: len(real) // 2])],  # truncated real update
        [DocUpdate(INDEX_DOC_ID, _item_on_root(0x0F, b"files", b"\x00"))],  # bad content ref
        [DocUpdate(keep, _item_on_root(0x04, b"content", b"\x02\xff\xfe"))],  # bad UTF-8
        # One good index update + one bad: the envelope is refused as a whole.
        [
            DocUpdate(
                INDEX_DOC_ID,
                rep.index.create(os.urandom(16).hex(), "half.txt", "text", 0o644, "M", time.time()),
            ),
            DocUpdate(keep, RANDOM[200:264]),
        ],
    ]
    for items in bad_updates:
        await world.publish(encode_payload(Updates(items=items)))
    wait_quarantined(world, before, len(bad_updates))
    world.sync_goes_on()
    assert world.trees() == before_trees, "existing files must be untouched, nothing added"
    m_id = world.m_dev.public.device_id
    for dev in (world.a, world.b):
        st = world.status(dev)
        assert any("quarantined" in w for w in st["warnings"]), st["warnings"]  # type: ignore[attr-defined]
        # `status` names the member that signed them (its signature verified: it is proven).
        mine = [o for o in st["offenders"] if o["id"] == m_id]
        assert sum(o["count"] for o in mine) >= len(bad_updates), st["offenders"]
        assert any(o["what"] == "malformed CRDT update" for o in mine), mine
        assert mine[0]["short_id"] == m_id[:7] and mine[0]["last"], mine
    text = world.b.cli("status").stdout
    assert f"offender: {m_id[:7]}" in text and "malformed CRDT update" in text, text


@pytest.mark.parametrize(
    "plaintext",
    [
        RANDOM[:300],
        b"\x09" + os.urandom(40),  # unknown payload kind
        b"\x01" + (10**9).to_bytes(4, "big") + os.urandom(20),  # claims a billion items
        b"",  # empty plaintext
    ],
    ids=["random", "unknown_kind", "huge_count", "empty"],
)
async def test_garbage_payloads_are_quarantined(world: World, plaintext: bytes) -> None:
    before_trees = world.trees()
    before = quarantined(world)
    await world.publish(plaintext)
    wait_quarantined(world, before, 1)
    world.sync_goes_on()
    assert world.trees() == before_trees


# -- (c) paths that escape the folder ----------------------------------------------------------
BAD_PATHS = [
    "../evil.txt",
    "sub/../../evil.txt",
    "/etc/qmoi-evil",
    "C:\\evil",
    "C:evil.txt",
    "a\\..\\b",
    "nul\x00byte.txt",
    "bell\x07.txt",
    "esc\x1b[31m.txt",
    "line\nbreak.txt",
    "CON",
    "nul.txt",
    "Com1.log",
    "x" * 300,
    "deep/" + "y" * 300 + "/z.txt",
    "dot.",
    "space ",
    "a//b.txt",
    "./x.txt",
    "lone\udcffsurrogate.txt",
]


def _refused_paths(st: dict[str, object]) -> int:
    return sum(1 for w in st["warnings"] if w.startswith("refused a remote path"))  # type: ignore[attr-defined]


async def test_paths_escaping_the_folder_are_refused(world: World) -> None:
    before_trees = world.trees()
    before_q = quarantined(world)
    rep = await world.replica()
    await world.publish(create_files_payload(rep, BAD_PATHS, "EVIL\n"))
    for dev in (world.a, world.b):
        wait_until(
            lambda dev=dev: _refused_paths(world.status(dev)) >= len(BAD_PATHS),
            SYNC_TIMEOUT,
            f"{dev.name} refuses every bad path",
        )
    world.sync_goes_on()
    assert world.trees() == before_trees, "no file may appear for a refused path"
    outside = [
        world.tmp / "evil.txt",
        Path("/etc/qmoi-evil"),
        Path("/evil"),
        Path("C:\\evil"),
        Path.cwd() / "C:\\evil",
    ]
    for dev in (world.a, world.b):
        outside += [dev.folder.parent / "evil.txt", dev.folder / "C:\\evil", dev.folder / "b"]
    for p in outside:
        assert not p.exists(), f"{p} was created"
    for dev in (world.a, world.b):
        for p in dev.folder.rglob("*"):
            assert b"EVIL" not in (p.read_bytes() if p.is_file() else b""), p
        # The refusals are warnings, not quarantines: the envelope itself was well-formed.
        assert world.status(dev)["quarantined"] == before_q[dev.name]


async def test_symlinked_parent_on_the_receiver(world: World) -> None:
    outside = world.tmp / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("outside, untouched\n")
    # b's user planted a symlinked folder and a symlinked file inside the space folder.
    (world.b.folder / "link").symlink_to(outside, target_is_directory=True)
    (world.b.folder / "file-link.txt").symlink_to(outside / "target.txt")
    before_b = world.b.tree()
    rep = await world.replica()
    await world.publish(create_files_payload(rep, ["link/x.txt", "file-link.txt"], "EVIL\n"))

    # a has no symlink there: for a these are ordinary, valid paths.
    wait_until(lambda: world.a.read("link/x.txt") == "EVIL\n", SYNC_TIMEOUT, "a gets link/x.txt")
    wait_until(lambda: world.a.read("file-link.txt") == "EVIL\n", SYNC_TIMEOUT, "a gets file")
    world.made |= {"link/x.txt", "file-link.txt"}

    def b_refused() -> bool:
        ws = world.status(world.b)["warnings"]
        return any("link/x.txt" in w for w in ws) and any("file-link.txt" in w for w in ws)  # type: ignore[attr-defined]

    wait_until(b_refused, SYNC_TIMEOUT, "b refuses to write through its symlinks")
    world.sync_goes_on()
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert (outside / "target.txt").read_text() == "outside, untouched\n"
    assert (world.b.folder / "link").is_symlink() and (
        world.b.folder / "file-link.txt"
    ).is_symlink()
    assert all(world.b.tree().get(p) == v for p, v in before_b.items())


# -- (d) hostile text shown to the user -------------------------------------------------------
HOSTILE_NAME = "[/]\x1b]0;pwned\x07[link=https://evil.example]admin[/link]\x1b[2J"


async def test_hostile_device_name_is_shown_inert(world: World) -> None:
    """m announces a device name full of rich markup and terminal escapes. Everyone's
    ``status`` must still work on a terminal, showing the name as text (no crash on the
    unbalanced ``[/]``, no hyperlink, no escape sequence reaching the terminal)."""
    await world.publish(encode_payload(DeviceInfo(HOSTILE_NAME, "[bold]x", "0")))
    short = world.m_dev.public.short_id

    def shown() -> bool:
        return any(
            d["short_id"] == short and d["name"] == HOSTILE_NAME
            for d in world.status(world.b)["devices"]
        )

    wait_until(shown, SYNC_TIMEOUT, "b stores m's new name")
    rc, out = cli_in_pty(world.b, "status")
    assert rc == 0, out
    assert "Traceback" not in out and "MarkupError" not in out, out
    assert short in out
    assert "[/]" in out and "[link=https://evil.example]" in out, "the name must be shown as text"
    assert "\x1b]0;" not in out and "\x1b]8;" not in out and "\x1b[2J" not in out, repr(out)
    rc, out = cli_in_pty(world.b, "devices")
    assert rc == 0 and "Traceback" not in out and short in out, out
    assert "\x1b]0;" not in out and "\x1b[2J" not in out, repr(out)
    world.sync_goes_on()


# -- (d) a flood -----------------------------------------------------------------------------
async def test_flood_is_rate_limited_and_sync_goes_on(world: World) -> None:
    """m publishes as fast as it can (validly signed envelopes with a garbage payload). The
    relay (50 msgs/s, burst 100 per connection in this world) drops what does not fit with a
    readable ``rate_limited`` error; an edit made during the flood still arrives; what got
    through is quarantined and ``status`` names m."""
    m_id = world.m_dev.public.device_id
    before = {d.name: _count_of(world, d, m_id) for d in (world.a, world.b)}
    w = await world.wire_as()
    envelopes = [world.space.seal(world.m_dev, b"\x09flood") for _ in range(1500)]
    answers: dict[str, int] = {"ack": 0, "rate_limited": 0, "other": 0}
    errors: list[F.Error] = []

    async def flood() -> None:
        with contextlib.suppress(ConnectionClosed):
            for env in envelopes:
                await w.send(F.Publish(envelope=env))

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            while sum(answers.values()) < len(envelopes):
                frame = await w.recv_skipping(timeout=SYNC_TIMEOUT)
                if isinstance(frame, F.Ack):
                    answers["ack"] += 1
                elif isinstance(frame, F.Error) and frame.code == "rate_limited":
                    answers["rate_limited"] += 1
                    errors.append(frame)
                else:
                    answers["other"] += 1

    reader = asyncio.create_task(read())
    flooding = asyncio.create_task(flood())
    # During the flood, an honest edit still goes through (measured as "arrives").
    await asyncio.to_thread(world.a_to_b, "during-flood.txt", "still syncing\n")
    await flooding
    await reader
    assert answers["rate_limited"] > 0, answers
    assert answers["ack"] < len(envelopes), answers
    assert not errors[0].fatal and "slow down" in errors[0].message, errors[0]
    assert_readable(errors[0])
    for dev in (world.a, world.b):
        wait_until(
            lambda dev=dev: _count_of(world, dev, m_id) >= before[dev.name] + 1,
            SYNC_TIMEOUT,
            f"{dev.name} names m as an offender",
        )
    world.sync_goes_on()


def _count_of(world: World, dev: Device, dev_id: str) -> int:
    return sum(o["count"] for o in world.status(dev)["offenders"] if o["id"] == dev_id)
