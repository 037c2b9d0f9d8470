"""The control socket of a real running agent under fuzzed request lines.

One agent process (`qmoi-sync run`, no space) is started for the module; every example opens
its Unix socket, sends one line and reads the one reply line. The contract: every line gets a
JSON reply `{"ok": false, "error": <readable text>}` (or ok for a valid request), the
connection is never dropped without a reply, and the agent is still answering `status`
afterwards. Only harmless commands can be valid here (status, devices, pause/resume of no
space): `stop` is kept out of the strategies.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz.fuzzlib import examples, mutated
from fuzz.targets import NASTY
from harness import Device
from hypothesis import given
from hypothesis import strategies as st

from qmoi_sync.agent.control import MAX_REQUEST, RequestError, parse_request


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    root = tmp_path_factory.mktemp("ctl")
    dev = Device(root / "home", root / "folder", "fuzzed")
    dev.init().start(timeout=90)  # generous: a loaded 2-core machine
    try:
        yield dev
    finally:
        dev.stop()


def _exchange(sock_path: Path, payload: bytes, timeout: float = 60) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        try:
            s.sendall(payload)
        except BrokenPipeError:  # the agent answered (too large) and closed before we finished
            pass
        with s.makefile("rb") as f:
            line = f.readline()
    assert line.endswith(b"\n"), f"no reply line for {payload[:60]!r}"
    reply = json.loads(line)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        err = reply.get("error")
        assert isinstance(err, str) and err.strip() and len(err) <= 4000, reply
    return reply


_SAFE = [
    b'{"v": 1, "cmd": "status"}\n',
    b'{"v": 1, "cmd": "devices"}\n',
    b'{"v": 1, "cmd": "pause", "space": "nope"}\n',
    b'{"v": 1, "cmd": "invite", "space": "nope", "role": "member"}\n',
    b'{"v": 1, "cmd": "revoke", "space": "nope", "device": "x"}\n',
]


def _harmless(line: bytes) -> bool:
    """Keep `stop` (and anything that parses as it) out: the agent must stay up."""
    try:
        req = parse_request(line.split(b"\n", 1)[0])
    except RequestError:
        return True
    return getattr(req, "cmd", None) != "stop"


@examples(40)
@given(
    line=st.one_of(st.binary(max_size=200).map(lambda b: b + b"\n"), mutated(_SAFE)).filter(
        _harmless
    )
)
def test_fuzzed_lines_get_a_reply(agent: Device, line: bytes) -> None:
    if not line.endswith(b"\n"):
        line += b"\n"
    _exchange(agent.home / "control.sock", line)


def test_nasty_lines_get_a_reply_and_the_agent_stays_up(agent: Device) -> None:
    sock = agent.home / "control.sock"
    for data in NASTY:
        if _harmless(data):
            reply = _exchange(sock, data + b"\n")
            assert reply["ok"] is False
    # a line longer than the limit: an answer, not a dropped connection (was: no reply)
    reply = _exchange(sock, b'{"v": 1, "cmd": "status", "pad": "' + b"x" * (MAX_REQUEST + 10))
    assert reply == {"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"}
    # deep nesting: a readable error (was: RecursionError in the handler, no reply)
    reply = _exchange(sock, b"[" * 5000 + b"\n")
    assert reply["ok"] is False and "nested too deeply" in reply["error"]
    status = _exchange(sock, b'{"v": 1, "cmd": "status"}\n')
    assert status["ok"] is True and status["result"]["agent_running"] is True


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"v": true, "cmd": "status"}', "unsupported control version True"),
        (b'{"v": 1, "cmd": ["status"]}', "unknown command ['status']"),
        (b"[1]", "request must be a JSON object"),
        (b"\xff\xfe", "not JSON"),
        (b'{"v": 1, "cmd": "' + b"x" * 500 + b'"}', "unknown command 'xxx"),
    ],
)
def test_parse_request_errors(line: bytes, error: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(line)
    assert error in str(e.value)
    assert len(str(e.value)) < 200
