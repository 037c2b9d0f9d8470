"""DeviceInfo v2 (kind 0x05): capabilities, compatibility with the v1 (0x02) encoding, refusals."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoi_sync.protocol.errors import MalformedError, ProtocolError, TooLargeError
from qmoi_sync.protocol.payload import (
    CAPABILITIES_VERSION,
    Capabilities,
    DeviceInfo,
    decode_payload,
    encode_payload,
)

FULL = Capabilities(
    cpu_count=8,
    memory_total=16 * 2**30,
    disk_free=123 * 2**30,
    on_ac=False,
    battery_percent=42.5,
    headless=True,
    measured_at=1_700_000_000,
)

INFOS = [
    DeviceInfo("laptop", "Linux-x86_64", "0.1.0", FULL),
    DeviceInfo("server", "Linux-aarch64", "0.1.0", Capabilities(cpu_count=2, on_ac=True)),
    DeviceInfo("", capabilities=Capabilities()),
    DeviceInfo("x", capabilities=Capabilities(battery_percent=0.0, disk_free=0)),
    DeviceInfo("x", capabilities=Capabilities(battery_percent=100.0, on_ac=True)),
]


def _v1_bytes(name: bytes, platform: bytes, version: bytes) -> bytes:
    out = b"\x02"
    for s in (name, platform, version):
        out += struct.pack(">H", len(s)) + s
    return out


def _caps_record(
    version: int = 1, flags: int = 0, battery: int = 0, disk: int = 0, tail: bytes = b""
) -> bytes:
    return struct.pack(">BBHQQHQ", version, flags, 4, 2**30, disk, battery, 7) + tail


def _v2_bytes(record: bytes) -> bytes:
    body = _v1_bytes(b"n", b"p", b"v")[1:]
    return b"\x05" + body + struct.pack(">H", len(record)) + record


@pytest.mark.parametrize("info", INFOS, ids=range(len(INFOS)))
def test_roundtrip_and_strict_framing(info: DeviceInfo) -> None:
    data = encode_payload(info)
    assert data[0] == 0x05
    assert decode_payload(data) == info
    for n in range(len(data)):
        with pytest.raises(MalformedError):
            decode_payload(data[:n])
    with pytest.raises(MalformedError):
        decode_payload(data + b"\x00")


def test_without_capabilities_is_the_v1_encoding() -> None:
    info = DeviceInfo("Alice's laptop ☕", "linux", "0.1.0")
    data = encode_payload(info)
    assert data == _v1_bytes("Alice's laptop ☕".encode(), b"linux", b"0.1.0")
    assert decode_payload(data) == info
    assert decode_payload(data).capabilities is None  # type: ignore[union-attr]


def test_unknown_fields_mean_none() -> None:
    caps = decode_payload(_v2_bytes(_caps_record()))
    assert isinstance(caps, DeviceInfo) and caps.capabilities is not None
    c = caps.capabilities
    assert (c.on_ac, c.battery_percent, c.disk_free, c.headless) == (None, None, None, False)
    assert (c.cpu_count, c.memory_total, c.measured_at) == (4, 2**30, 7)


def test_battery_is_rounded_to_hundredths() -> None:
    info = DeviceInfo("n", capabilities=Capabilities(battery_percent=33.33333))
    got = decode_payload(encode_payload(info))
    assert isinstance(got, DeviceInfo) and got.capabilities is not None
    assert got.capabilities.battery_percent == 33.33


def test_newer_record_versions_keep_the_v1_prefix() -> None:
    newer = _caps_record(version=2, flags=0x01 | 0x02 | 0x80, tail=b"future fields")
    got = decode_payload(_v2_bytes(newer))
    assert isinstance(got, DeviceInfo) and got.capabilities is not None
    assert got.capabilities.on_ac is True
    assert got.capabilities.cpu_count == 4
    assert CAPABILITIES_VERSION == 1


@pytest.mark.parametrize(
    "record",
    [
        _caps_record(version=0),
        _caps_record(flags=0x80),  # unknown flag in version 1
        _caps_record(tail=b"x"),  # version 1 has exactly 30 bytes
        _caps_record()[:-1],
        _caps_record(version=2)[:-1],  # a newer record must still hold the v1 prefix
        _caps_record(flags=0x04, battery=10001),
        _caps_record(flags=0x00, battery=5),  # battery value without the known flag
        _caps_record(flags=0x02),  # on_ac without the known flag
        _caps_record(flags=0x00, disk=5),  # disk value without the known flag
        b"",
    ],
)
def test_malformed_records(record: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_payload(_v2_bytes(record))


def test_encoder_refusals() -> None:
    for bad in (-1.0, 100.5, math.nan, math.inf):
        with pytest.raises(MalformedError):
            encode_payload(DeviceInfo("n", capabilities=Capabilities(battery_percent=bad)))
    with pytest.raises(MalformedError):
        encode_payload(DeviceInfo("n", capabilities=Capabilities(cpu_count=70000)))
    with pytest.raises(MalformedError):
        encode_payload(DeviceInfo("n", capabilities=Capabilities(disk_free=-1)))
    with pytest.raises(MalformedError):
        encode_payload(DeviceInfo("n", capabilities="caps"))  # type: ignore[arg-type]
    with pytest.raises(TooLargeError):
        decode_payload(b"\x05" + _v1_bytes(b"n", b"p", b"v")[1:] + struct.pack(">H", 257))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = encode_payload(INFOS[0])


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10**6),
    extra=st.binary(max_size=8),
)
def test_mutated_v2_only_protocol_errors(
    edits: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    data = bytearray(GOOD)
    for pos, val in edits:
        data[pos % len(data)] = val
    if cut % 3 == 0:
        data = data[: max(1, cut % (len(data) + 1))] + extra
    try:
        decode_payload(bytes(data))
    except ProtocolError as exc:
        assert exc.code
