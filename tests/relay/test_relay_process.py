"""Relay lifecycle: restart on the same data dir, a real ``python -m qmoi_sync.relay`` process,
graceful SIGTERM, and TLS."""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
import sys
from pathlib import Path

from relay_helpers import Client, RelayFactory, Space, authed, url_of
from tlscert import self_signed

from qmoi_sync.protocol import frames as F

LISTEN_RE = re.compile(r"relay listening on (ws://127\.0\.0\.1:(\d+))")
DEADLINE = 20.0


async def test_restart_on_same_data_dir_and_resume(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    data = tmp_path / "shared-data"
    space = Space.create(1)
    alice = space.members[0]
    relay = await relay_factory(data_dir=data)
    a = await authed(url_of(relay), space, alice)
    envs = [space.envelope(alice) for _ in range(5)]
    for e in envs:
        await a.send(F.Publish(envelope=e))
    assert [(await a.expect(F.Ack)).relay_seq for _ in envs] == [1, 2, 3, 4, 5]
    await relay.close()
    await a.wait_closed()

    relay2 = await relay_factory(data_dir=data)
    url2 = url_of(relay2)
    # The space and its log survived: a member authenticates without sending the log.
    b = await authed(url2, space, space.admin, log=False)
    await b.send(F.Subscribe(from_seq=2))
    delivers, _ = await b.collect_delivers(3)
    assert [(d.relay_seq, d.envelope) for d in delivers] == [
        (3, envs[2]),
        (4, envs[3]),
        (5, envs[4]),
    ]
    assert (await b.expect(F.CaughtUp)).head_seq == 5
    # Alice resends what she was not sure about (duplicates) and continues.
    a = await authed(url2, space, alice, log=False)
    await a.send(F.Publish(envelope=envs[4]))
    assert await a.expect(F.Ack) == F.Ack(sender_seq=5, relay_seq=5, duplicate=True)
    await a.send(F.Publish(envelope=space.envelope(alice)))
    assert (await a.expect(F.Ack)).relay_seq == 6
    assert (await b.expect(F.Deliver)).relay_seq == 6


async def _start_process(data: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmoi_sync.relay",
        "--host", "127.0.0.1", "--port", "0", "--data", str(data),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError("relay exited before listening")
                m = LISTEN_RE.search(line)
                if m:
                    return proc, m.group(1)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def _stop_process(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(DEADLINE):
        _out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_relay_subprocess_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "proc-data"
    space = Space.create(1)
    alice = space.members[0]
    proc, url = await _start_process(data)
    try:
        a = await authed(url, space, alice)
        b = await authed(url, space, space.admin)
        await b.send(F.Subscribe(from_seq=0))
        await b.expect(F.CaughtUp)
        env = space.envelope(alice)
        await a.send(F.Publish(envelope=env))
        assert (await a.expect(F.Ack)).relay_seq == 1
        assert (await b.expect(F.Deliver)).envelope == env
        rc, stderr = await _stop_process(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 0, stderr
    assert "shutting_down" in stderr and "stopped" in stderr
    # Connected clients were told the server is going away (1001), not just dropped.
    assert await a.wait_closed() == 1001
    # Logs never contain the envelope or full keys.
    assert env.hex() not in stderr and space.space_id.hex() not in stderr

    # A new process on the same data dir resumes.
    proc, url = await _start_process(data)
    try:
        c = await authed(url, space, space.admin, log=False)
        await c.send(F.Subscribe(from_seq=0))
        assert (await c.expect(F.Deliver)).envelope == env
        assert (await c.expect(F.CaughtUp)).head_seq == 1
        rc, stderr = await _stop_process(proc)
        assert rc == 0, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_relay_subprocess_bad_arguments(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmoi_sync.relay", "--data", str(tmp_path), "--tls-cert", "x.pem",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(DEADLINE):
        _out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"--tls-key" in err


async def test_tls(relay_factory: RelayFactory, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    relay = await relay_factory(tls_cert=cert, tls_key=key)
    url = url_of(relay)
    assert url.startswith("wss://")
    ctx = ssl.create_default_context(cafile=str(cert))
    space = Space.create(0)
    c = await Client.connect(url, ssl=ctx)
    w = await c.auth(space.admin, space.space_id, space.log_bytes)
    assert isinstance(w, F.Welcome)
    await c.close()
