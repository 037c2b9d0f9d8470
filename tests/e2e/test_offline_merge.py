"""Concurrent offline edits to different lines of one text file merge: both edits survive, both
devices end with identical files, and no conflict copy is made. Offline = the peer's agent is
stopped, or the relay is down while both agents keep running."""

from __future__ import annotations

from pathlib import Path

from harness import Device, cluster, wait_until

BASE = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(1, 13)]


def _text(lines: list[str]) -> str:
    return "".join(lines)


def _conflict_copies(devices: list[Device]) -> list[str]:
    return [
        f"{d.name}:{p}" for d in devices for p in d.folder.rglob("*") if "sync-conflict" in p.name
    ]


def _wait_merged(devices: list[Device], path: str, want: str, what: str) -> None:
    def ok() -> bool:
        return all(d.read(path) == want for d in devices)

    try:
        wait_until(ok, timeout=30, what=what)
    except AssertionError as exc:
        got = {d.name: d.read(path) for d in devices}
        logs = "\n".join(f"--- {d.name}\n{d.log()[-4000:]}" for d in devices)
        raise AssertionError(f"{exc}\nwant:\n{want}\ngot: {got}\n{logs}") from None


def _seed(a: Device, b: Device, path: str) -> None:
    a.write(path, _text(BASE))
    _wait_merged([a, b], path, _text(BASE), "seed file on both devices")


def test_peer_stopped_concurrent_edits_merge(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_relay, (a, b)):
        _seed(a, b, "notes/plan.txt")
        b.stop()

        a_lines = list(BASE)
        a_lines[1] = "line 2: EDITED ON A while b was offline\n"
        a.write("notes/plan.txt", _text(a_lines))
        b_lines = list(BASE)
        b_lines[9] = "line 10: EDITED ON B while its agent was stopped\n"
        b.write("notes/plan.txt", _text(b_lines))
        # a has taken its edit in (and sent it to the relay) before b comes back.
        wait_until(lambda: a.space_status()["pending_out"] == 0, what="a's edit at the relay")

        b.start()
        merged = list(BASE)
        merged[1] = a_lines[1]
        merged[9] = b_lines[9]
        _wait_merged([a, b], "notes/plan.txt", _text(merged), "both offline edits merged")
        assert a.tree() == b.tree()
        assert _conflict_copies([a, b]) == []
        assert a.space_status()["conflicts"] == 0
        assert b.space_status()["conflicts"] == 0


def test_relay_down_concurrent_edits_merge(tmp_path: Path) -> None:
    with cluster(tmp_path) as (relay, (a, b)):
        assert relay is not None
        _seed(a, b, "plan.txt")
        port = relay.port
        relay.stop()
        for d in (a, b):
            wait_until(
                lambda d=d: not d.space_status()["relay"]["connected"],
                what=f"{d.name} notices the relay is down",
            )

        a_lines = list(BASE)
        a_lines[0] = "line 1: EDITED ON A during the relay outage\n"
        a.write("plan.txt", _text(a_lines))
        b_lines = list(BASE)
        b_lines[11] = "line 12: EDITED ON B during the relay outage\n"
        b.write("plan.txt", _text(b_lines))
        # Each agent has taken its own edit in and holds it in the outbox.
        for d in (a, b):
            wait_until(
                lambda d=d: d.space_status()["pending_out"] > 0,
                what=f"{d.name} queues its edit while the relay is down",
            )
        assert a.read("plan.txt") == _text(a_lines)
        assert b.read("plan.txt") == _text(b_lines)

        relay.start()  # same data directory, same port
        assert relay.port == port
        merged = list(BASE)
        merged[0] = a_lines[0]
        merged[11] = b_lines[11]
        _wait_merged([a, b], "plan.txt", _text(merged), "agents reconnect and merge")
        for d in (a, b):
            wait_until(
                lambda d=d: d.space_status()["pending_out"] == 0, what=f"{d.name} outbox drained"
            )
        assert a.tree() == b.tree()
        assert _conflict_copies([a, b]) == []
