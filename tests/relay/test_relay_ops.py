"""Relay operations: /healthz and /metrics over real HTTP against real relay processes, counters
that move with real traffic and refusals, the Prometheus text format, the container health
probe, and a graceful SIGTERM that commits the publishes still in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from relay_helpers import Client, RelayFactory, Space, authed, url_of
from tlscert import self_signed

from qmoi_sync.protocol import frames as F
from qmoi_sync.relay.metrics import RelayMetrics, Snapshot, render, space_label
from qmoi_sync.relay.store import RelayStore

DEADLINE = 20.0
LISTEN_RE = re.compile(r"relay listening on (wss?://127\.0\.0\.1:(\d+))")


# -- a tiny Prometheus text-format parser (no prometheus_client dependency) -------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')

_UNESCAPE = {"n": "\n", "\\": "\\", '"': '"'}
Series = tuple[str, frozenset[tuple[str, str]]]


def parse_prometheus(text: str) -> tuple[dict[Series, float], dict[str, str]]:
    """Parse the text exposition format 0.0.4 strictly enough to catch formatting mistakes:
    every sample belongs to a metric declared by a preceding ``# TYPE``, label values are
    properly quoted and escaped, no series appears twice, values are floats."""
    assert text.endswith("\n"), "exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[Series, float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                assert parts[2] not in helps, f"line {n}: second HELP for {parts[2]}"
                helps.add(parts[2])
            elif len(parts) >= 3 and parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "summary", "histogram", "untyped"), line
                assert parts[2] not in types, f"line {n}: second TYPE for {parts[2]}"
                types[parts[2]] = parts[3]
            continue
        m = _SAMPLE_RE.match(line)
        assert m, f"line {n} is not a sample: {line!r}"
        name, _braces, label_text, value = m.groups()
        assert name in types, f"line {n}: {name} has no # TYPE before it"
        labels: list[tuple[str, str]] = []
        if label_text:
            pos = 0
            while pos < len(label_text):
                lm = _LABEL_RE.match(label_text, pos)
                assert lm, f"line {n}: bad labels {label_text!r}"
                raw = lm.group(2)
                unescaped = re.sub(r"\\(.)", lambda x: _UNESCAPE.get(x.group(1), "?"), raw)
                labels.append((lm.group(1), unescaped))
                pos = lm.end()
        key = (name, frozenset(labels))
        assert key not in samples, f"line {n}: duplicate series {key}"
        samples[key] = float(value)
    return samples, types


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- HTTP and processes -----------------------------------------------------------------------


@dataclass
class HttpReply:
    status: int
    content_type: str
    body: str


def _get(url: str) -> HttpReply:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as resp:
            return HttpReply(resp.status, resp.headers["Content-Type"], resp.read().decode())
    except urllib.error.HTTPError as exc:
        return HttpReply(exc.code, exc.headers["Content-Type"], exc.read().decode())


async def get(url: str) -> HttpReply:
    return await asyncio.to_thread(_get, url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RelayProc:
    proc: asyncio.subprocess.Process
    url: str
    port: int
    metrics_port: int
    log: Path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def metrics(self) -> dict[Series, float]:
        reply = await get(self.metrics_url)
        assert reply.status == 200, reply
        return parse_prometheus(reply.body)[0]

    async def wait_metrics(self, cond: object, what: str) -> dict[Series, float]:
        """Scrape until ``cond(samples)`` holds (the relay updates counters asynchronously)."""
        assert callable(cond)
        last: dict[Series, float] = {}
        try:
            async with asyncio.timeout(DEADLINE):
                while True:
                    last = await self.metrics()
                    if cond(last):
                        return last
                    await asyncio.sleep(0.05)
        except TimeoutError:
            interesting = {k: v for k, v in last.items() if v}
            raise AssertionError(f"timed out waiting for {what}; last: {interesting}") from None

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


async def start_relay(argv: list[str], log: Path, metrics_port: int) -> RelayProc:
    with open(log, "ab") as logf:  # noqa: ASYNC230 - opening a local log file
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=logf
        )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    out = log.read_text()  # noqa: ASYNC240
                    raise AssertionError(f"relay exited before listening:\n{out}")
                m = LISTEN_RE.search(line)
                if m:
                    return RelayProc(proc, m.group(1), int(m.group(2)), metrics_port, log)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


def cli_relay_argv(data: Path, metrics_port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "qmoi_sync.agent", "relay", "serve",
        "--host", "127.0.0.1", "--port", "0", "--data", str(data),
        "--metrics-port", str(metrics_port), *extra,
    ]  # fmt: skip


@pytest.fixture
async def relay_proc(tmp_path: Path) -> AsyncIterator[RelayProc]:
    """``qmoi-sync relay serve --metrics-port P`` as a real process."""
    mport = free_port()
    rp = await start_relay(
        cli_relay_argv(tmp_path / "relay-data", mport), tmp_path / "relay.log", mport
    )
    try:
        yield rp
    finally:
        if rp.proc.returncode is None:
            rp.proc.kill()
            await rp.proc.wait()


# -- tests ------------------------------------------------------------------------------------


async def test_healthz_and_metrics_over_http(relay_proc: RelayProc) -> None:
    base = f"http://127.0.0.1:{relay_proc.port}"
    health = await get(f"{base}/healthz")
    assert health.status == 200
    assert health.content_type == "application/json"
    body = json.loads(health.body)
    assert body["status"] == "ok"
    assert body["spaces"] == 0 and body["connections"] == 0
    assert isinstance(body["uptime_s"], float) and body["uptime_s"] >= 0

    # Metrics are not on the public relay port; other plain HTTP requests get a 404 too.
    assert (await get(f"{base}/metrics")).status == 404
    assert (await get(f"{base}/")).status == 404
    # ...but on the metrics listener, which also answers /healthz.
    reply = await get(relay_proc.metrics_url)
    assert reply.status == 200
    assert reply.content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples, types = parse_prometheus(reply.body)
    assert types["qmoi_relay_connections"] == "gauge"
    assert types["qmoi_relay_envelopes_received_total"] == "counter"
    assert types["qmoi_relay_refusals_total"] == "counter"
    for state in ("handshake", "joining", "authenticated", "subscribed"):
        assert ("qmoi_relay_connections", frozenset({("state", state)})) in samples
    assert value(samples, "qmoi_relay_store_up") == 1
    mhealth = await get(f"http://127.0.0.1:{relay_proc.metrics_port}/healthz")
    assert mhealth.status == 200 and json.loads(mhealth.body)["status"] == "ok"
    assert (await get(f"http://127.0.0.1:{relay_proc.metrics_port}/nope")).status == 404

    # The relay port still speaks websocket after all that HTTP.
    space = Space.create(0)
    c = await authed(relay_proc.url, space, space.admin)
    await c.close()
    assert await relay_proc.stop() == 0
    # Successful probes are not logged line by line (a HEALTHCHECK would flood the log).
    assert "200 OK" not in relay_proc.log.read_text()


async def test_counters_move_with_traffic_and_refusals(relay_proc: RelayProc) -> None:
    space = Space.create(1)
    alice = space.members[0]
    a = await authed(relay_proc.url, space, alice)
    b = await authed(relay_proc.url, space, space.admin)
    await b.send(F.Subscribe(from_seq=0))
    await b.expect(F.CaughtUp)

    before = await relay_proc.metrics()
    assert value(before, "qmoi_relay_connections", state="subscribed") == 1
    assert value(before, "qmoi_relay_connections", state="authenticated") == 1
    assert value(before, "qmoi_relay_spaces") == 1

    envs = [space.envelope(alice, plaintext=os.urandom(100 + i)) for i in range(3)]
    for env in envs:
        await a.send(F.Publish(envelope=env))
    for _ in envs:
        await a.expect(F.Ack)
    delivers, _ = await b.collect_delivers(3)
    assert [d.envelope for d in delivers] == envs
    size = sum(len(e) for e in envs)

    m = await relay_proc.wait_metrics(
        lambda s: value(s, "qmoi_relay_envelopes_delivered_total") == 3, "3 deliveries"
    )
    for what in ("received", "stored", "delivered"):
        assert value(m, f"qmoi_relay_envelopes_{what}_total") == 3, what
        assert value(m, f"qmoi_relay_envelope_bytes_{what}_total") == size, what
    assert value(m, "qmoi_relay_store_commit_batches_total") >= 1
    # Per-space storage: labelled with the hashed id, never the raw one.
    label = space_label(space.space_id)
    assert value(m, "qmoi_relay_space_storage_bytes", space=label) == size
    assert value(m, "qmoi_relay_storage_bytes") == size
    assert space.space_id.hex() not in (await get(relay_proc.metrics_url)).body
    assert not any(k[0] == "qmoi_relay_refusals_total" for k in m)

    # A duplicate publish is counted as received and duplicate, not stored.
    await a.send(F.Publish(envelope=envs[0]))
    assert (await a.expect(F.Ack)).duplicate
    # A refused (bad) frame: a Publish whose signature does not verify (non-fatal).
    bad = bytearray(space.envelope(alice))
    bad[-1] ^= 0xFF
    await a.send(F.Publish(envelope=bytes(bad)))
    await a.expect_error("bad_signature", fatal=False)
    m = await relay_proc.wait_metrics(
        lambda s: value(s, "qmoi_relay_refusals_total", reason="bad_signature") == 1,
        "the bad_signature refusal",
    )
    assert value(m, "qmoi_relay_envelopes_received_total") == 5
    assert value(m, "qmoi_relay_envelopes_stored_total") == 3
    assert value(m, "qmoi_relay_envelopes_duplicate_total") == 1

    # An undecodable frame: fatal, counted under its error code, connection closed.
    await a.send_raw(b"\xff garbage")
    err = await a.expect(F.Error)
    assert err.fatal
    await a.wait_closed()
    m = await relay_proc.wait_metrics(
        lambda s: (
            value(s, "qmoi_relay_refusals_total", reason=err.code) == 1
            and value(s, "qmoi_relay_connections", state="authenticated") == 0
        ),
        f"the {err.code} refusal and the closed connection",
    )
    assert value(m, "qmoi_relay_connections_opened_total") == 2

    # A membership push (the admin adds a device) is counted, and broadcast to the space.
    space.add()
    await b.send(F.PushMembership(log=space.log_bytes))
    assert isinstance(await b.expect(F.Membership), F.Membership)
    m = await relay_proc.wait_metrics(
        lambda s: value(s, "qmoi_relay_membership_pushes_total") == 1, "a membership push"
    )
    assert value(m, "qmoi_relay_membership_broadcasts_total") == 1
    await b.close()
    assert await relay_proc.stop() == 0


async def test_python_m_relay_accepts_metrics_options(tmp_path: Path) -> None:
    mport = free_port()
    argv = [
        sys.executable, "-m", "qmoi_sync.relay", "--host", "127.0.0.1", "--port", "0",
        "--data", str(tmp_path / "d"), "--metrics-port", str(mport),
        "--metrics-space-label", "raw",
    ]  # fmt: skip
    rp = await start_relay(argv, tmp_path / "relay.log", mport)
    try:
        space = Space.create(0)
        c = await authed(rp.url, space, space.admin)
        await c.send(F.Publish(envelope=space.envelope(space.admin)))
        await c.expect(F.Ack)
        m = await rp.wait_metrics(
            lambda s: value(s, "qmoi_relay_envelopes_stored_total") == 1, "one stored"
        )
        labels = [dict(k[1])["space"] for k in m if k[0] == "qmoi_relay_space_storage_bytes"]
        assert labels == [space.space_id.hex()]
        await c.close()
        assert await rp.stop() == 0
    finally:
        if rp.proc.returncode is None:
            rp.proc.kill()
            await rp.proc.wait()


def test_render_space_label_modes_and_escaping() -> None:
    m = RelayMetrics()
    m.refusals['we"ird\\code\n'] += 2
    sid = bytes(range(16))
    snap = Snapshot(
        connections={"subscribed": 2},
        spaces=1,
        space_bytes=[(sid, 1234)],
        store_batches=1,
        duplicates=0,
    )
    for mode, expected in (("hash", space_label(sid)), ("raw", sid.hex()), ("none", None)):
        text = render(m, Snapshot(**{**snap.__dict__, "space_label_mode": mode}))
        samples, _ = parse_prometheus(text)
        spaces = [dict(k[1])["space"] for k in samples if k[0] == "qmoi_relay_space_storage_bytes"]
        assert spaces == ([expected] if expected else []), mode
        assert value(samples, "qmoi_relay_storage_bytes") == 1234
        assert value(samples, "qmoi_relay_refusals_total", reason='we"ird\\code\n') == 2
    assert len(space_label(sid)) == 12 and space_label(sid) not in sid.hex()


async def test_healthz_503_when_the_store_is_unusable(relay_factory: RelayFactory) -> None:
    relay = await relay_factory()
    base = f"http://127.0.0.1:{relay.port}"
    assert (await get(f"{base}/healthz")).status == 200
    # The database goes away under the running relay (as a failed disk or a crash of the
    # writer would leave it): health must say so.
    await relay.store.close()
    reply = await get(f"{base}/healthz")
    assert reply.status == 503
    body = json.loads(reply.body)
    assert body["status"] == "unavailable" and "closed" in body["error"]
    # Websocket clients are still served by the listener (and get a store error, not a hang).
    assert url_of(relay).startswith("ws://")


# -- container health probe -------------------------------------------------------------------


async def _healthcheck(port: int) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmoi_sync.relay.healthcheck", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(DEADLINE):
        _out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_container_healthcheck_plain_tls_and_down(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    plain = await relay_factory(data_dir=tmp_path / "plain")
    assert await _healthcheck(plain.port) == (0, "")
    cert, key = self_signed(tmp_path, ip="127.0.0.2")
    tls = await relay_factory(data_dir=tmp_path / "tls", tls_cert=cert, tls_key=key)
    assert await _healthcheck(tls.port) == (0, "")
    await plain.store.close()
    rc, err = await _healthcheck(plain.port)
    assert rc == 1 and "503" in err, err
    rc, err = await _healthcheck(free_port())
    assert rc == 1 and "unhealthy" in err, err


# -- graceful shutdown ------------------------------------------------------------------------

_LINGER_RELAY = """
import asyncio, logging, sys
from pathlib import Path
from qmoi_sync.relay.server import RelayConfig, run_relay
logging.basicConfig(level=logging.INFO)
cfg = RelayConfig(host="127.0.0.1", port=0, data_dir=Path(sys.argv[1]),
                  metrics_port=int(sys.argv[2]), commit_linger_s=60.0)
asyncio.run(run_relay(cfg, ready=lambda p: print(f"relay listening on ws://127.0.0.1:{p}",
                                                     flush=True)))
"""


async def test_sigterm_commits_publishes_still_in_flight(tmp_path: Path) -> None:
    """The relay's own SIGTERM handling (run_relay without a stop event, as
    ``python -m qmoi_sync.relay`` runs it). The group commit is held open (linger 60 s) so the
    publishes are provably received but not yet committed when SIGTERM arrives; after the
    process exits, every one of them is in the database."""
    data = tmp_path / "data"
    mport = free_port()
    rp = await start_relay(
        [sys.executable, "-c", _LINGER_RELAY, str(data), str(mport)], tmp_path / "r.log", mport
    )
    space = Space.create(1)
    alice = space.members[0]
    envs = [space.envelope(alice) for _ in range(50)]
    try:
        a = await authed(rp.url, space, alice)
        for env in envs:
            await a.send(F.Publish(envelope=env))
        m = await rp.wait_metrics(
            lambda s: value(s, "qmoi_relay_envelopes_received_total") == 50, "50 publishes"
        )
        assert value(m, "qmoi_relay_envelopes_stored_total") == 0  # all still in flight
        async with asyncio.timeout(DEADLINE):
            assert await rp.stop() == 0
    finally:
        if rp.proc.returncode is None:
            rp.proc.kill()
            await rp.proc.wait()
    log = rp.log.read_text()
    assert "signal name=SIGTERM" in log and "stopped" in log, log
    assert await a.wait_closed() == 1001  # going away, not dropped
    store = await RelayStore.open(data)
    try:
        assert await store.head_seq(space.space_id) == 50
        page = await store.read_page(space.space_id, 0, max_count=100, max_bytes=1 << 30)
        assert [data for _seq, data in page] == envs
    finally:
        await store.close()


async def _publish_then_lose_connection(
    relay_factory: RelayFactory, tmp_path: Path, *, shutdown: bool
) -> None:
    """Publishes are queued for a (lingering) group commit when the publisher's connection goes
    away, by the client closing it or by a graceful relay stop. The relay cancels that
    connection's ack task; the envelopes must still all be stored, so that the device's resend
    of what it never saw acknowledged is acked as duplicates of *stored* envelopes.
    (Regression: the cancelled ack task cancelled the store future it awaited, the store
    skipped that envelope but stored the later ones, and the resend was acked as a duplicate
    with relay_seq 0: the envelope was lost.)"""
    data = tmp_path / "d"
    relay = await relay_factory(data_dir=data, commit_linger_s=60.0 if shutdown else 2.0)
    space = Space.create(1)
    alice = space.members[0]
    envs = [space.envelope(alice) for _ in range(5)]
    a = await authed(url_of(relay), space, alice)
    for env in envs:
        await a.send(F.Publish(envelope=env))
    await _wait(lambda: relay.metrics.envelopes_received == 5)
    if shutdown:
        await relay.close()
        await a.wait_closed()
        relay = await relay_factory(data_dir=data)
    else:
        await a.close()
        await _wait(lambda: not relay._conns)
        assert relay.metrics.envelopes_stored == 0  # the connection went first
        await _wait(lambda: relay.metrics.envelopes_stored == 5)
    a2 = await authed(url_of(relay), space, alice, log=False)
    for env in envs:
        await a2.send(F.Publish(envelope=env))
    acks = [await a2.expect(F.Ack) for _ in envs]
    assert [(k.relay_seq, k.duplicate) for k in acks] == [(i, True) for i in range(1, 6)]
    await a2.close()


async def test_publisher_disconnect_before_commit_loses_nothing(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    await _publish_then_lose_connection(relay_factory, tmp_path, shutdown=False)


async def test_graceful_stop_before_commit_loses_nothing(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    await _publish_then_lose_connection(relay_factory, tmp_path, shutdown=True)


async def _wait(cond: object) -> None:
    assert callable(cond)
    async with asyncio.timeout(DEADLINE):
        while not cond():  # noqa: ASYNC110 - in-process relay state, no event to await
            await asyncio.sleep(0.01)


__all__ = ["Client", "parse_prometheus"]
