"""Pause and resume, per space and for the whole agent, with real relay and agent processes.

A paused space keeps watching and takes local changes into its CRDT, but its relay link is
stopped: nothing is sent (the outbox grows) and nothing is applied (deliveries wait at the
relay). The paused state is persisted; resuming catches up both ways.
"""

from __future__ import annotations

from pathlib import Path

from harness import Device, Relay, cluster, create_space, invite, join, wait_until


def _state(dev: Device, space: str) -> str:
    return str(dev.space_status(space)["state"])


def _pending(dev: Device, space: str) -> int:
    return int(dev.space_status(space)["pending_out"])


def _logs(devices: list[Device], exc: AssertionError) -> AssertionError:
    return AssertionError(
        f"{exc}\n" + "\n".join(f"--- {d.name}\n{d.log()[-4000:]}" for d in devices)
    )


def test_pause_and_resume_one_space(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        try:
            a.write("before.txt", "synced before the pause\n")
            wait_until(lambda: b.read("before.txt") is not None, what="before.txt on b")

            assert "paused: notes" in a.cli("pause", "notes").stdout
            wait_until(lambda: _state(a, "notes") == "paused", what="a paused")
            assert a.space_status("notes")["relay"]["connected"] is False
            assert "already paused" in a.cli("pause", "notes").stdout

            # a keeps watching: its change is committed locally, queued, not sent.
            a.write("from-a.txt", "written on a while paused\n")
            wait_until(lambda: _pending(a, "notes") >= 1, what="a's change queued in its outbox")
            # b's change reaches the relay but is not applied on a.
            b.write("from-b.txt", "written on b while a is paused\n")
            wait_until(lambda: _pending(b, "notes") == 0, what="b's change at the relay")
            assert b.read("from-a.txt") is None
            assert a.read("from-b.txt") is None

            # Persisted across a restart.
            a.stop()
            a.start()
            wait_until(lambda: _state(a, "notes") == "paused", what="still paused after restart")
            assert a.space_status("notes")["relay"]["connected"] is False
            assert _pending(a, "notes") >= 1
            assert a.read("from-b.txt") is None

            assert "resumed: notes" in a.cli("resume", "notes").stdout
            wait_until(
                lambda: b.read("from-a.txt") == "written on a while paused\n",
                what="a's queued change on b",
            )
            wait_until(
                lambda: a.read("from-b.txt") == "written on b while a is paused\n",
                what="b's change applied on a",
            )
            wait_until(
                lambda: _state(a, "notes") == "idle" and _pending(a, "notes") == 0,
                what="a idle after resume",
            )
            assert a.tree() == b.tree()
        except AssertionError as exc:
            raise _logs([a, b], exc) from None


def test_pause_and_resume_the_whole_agent(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay-data").start()
    a = Device(tmp_path / "home-a", tmp_path / "folder-a", "a").init()
    b = Device(tmp_path / "home-b", tmp_path / "folder-b", "b").init()
    a_work, b_work = tmp_path / "work-a", tmp_path / "work-b"
    try:
        create_space(a, relay, "notes")
        a.cli("space", "create", "work", "--folder", str(a_work), "--relay", relay.url)
        a.start()
        join(b, invite(a, "notes"), "notes")
        b.cli("join", invite(a, "work"), "--folder", str(b_work), "--name", "work")
        b.start()
        for space in ("notes", "work"):
            wait_until(lambda s=space: _state(b, s) == "idle", what=f"b idle in {space}")

        assert "paused: notes, work" in a.cli("pause").stdout
        for space in ("notes", "work"):
            wait_until(lambda s=space: _state(a, s) == "paused", what=f"a paused in {space}")

        a.write("a-notes.txt", "a notes\n")
        (a_work / "a-work.txt").write_text("a work\n")
        b.write("b-notes.txt", "b notes\n")
        (b_work / "b-work.txt").write_text("b work\n")
        for space in ("notes", "work"):
            wait_until(lambda s=space: _pending(a, s) >= 1, what=f"a queued in {space}")
            wait_until(lambda s=space: _pending(b, s) == 0, what=f"b sent in {space}")
        assert a.read("b-notes.txt") is None and not (a_work / "b-work.txt").exists()
        assert b.read("a-notes.txt") is None and not (b_work / "a-work.txt").exists()

        # Resume one space while the agent is stopped (written to its database), then start.
        a.stop()
        assert "resumed: work" in a.cli("resume", "work").stdout
        a.start()
        wait_until(lambda: (b_work / "a-work.txt").exists(), what="a's work change on b")
        wait_until(lambda: (a_work / "b-work.txt").exists(), what="b's work change on a")
        assert _state(a, "notes") == "paused"
        assert a.read("b-notes.txt") is None and b.read("a-notes.txt") is None

        assert "resumed: notes" in a.cli("resume").stdout
        wait_until(lambda: b.read("a-notes.txt") == "a notes\n", what="a's notes change on b")
        wait_until(lambda: a.read("b-notes.txt") == "b notes\n", what="b's notes change on a")
        for space in ("notes", "work"):
            wait_until(lambda s=space: _state(a, s) == "idle", what=f"a idle in {space}")
        assert "already resumed" in a.cli("resume").stdout
    except AssertionError as exc:
        raise _logs([a, b], exc) from None
    finally:
        a.stop()
        b.stop()
        relay.stop()
