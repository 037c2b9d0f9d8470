"""Small big-endian binary reader/writer helpers shared by the decoders (internal).

The :class:`Reader` never lets ``IndexError``/``struct.error``/``UnicodeDecodeError`` escape: every
problem becomes a :class:`MalformedError` or :class:`TooLargeError` naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .errors import MalformedError, TooLargeError

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


def u8(v: int) -> bytes:
    _check_range(v, 0xFF, "u8")
    return bytes((v,))


def u16(v: int) -> bytes:
    _check_range(v, 0xFFFF, "u16")
    return _U16.pack(v)


def u32(v: int) -> bytes:
    _check_range(v, U32_MAX, "u32")
    return _U32.pack(v)


def u64(v: int) -> bytes:
    _check_range(v, U64_MAX, "u64")
    return _U64.pack(v)


def _check_range(v: int, hi: int, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > hi:
        raise MalformedError(f"value {v!r} does not fit in {what}")


def fixed(value: bytes, size: int, what: str) -> bytes:
    """Check a fixed-size byte field before encoding it."""
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise MalformedError(f"{what} must be exactly {size} bytes")
    return bytes(value)


def blob32(value: bytes, limit: int, what: str) -> bytes:
    """u32 length prefix + bytes."""
    if not isinstance(value, bytes | bytearray):
        raise MalformedError(f"{what} must be bytes")
    if len(value) > limit:
        raise TooLargeError(f"{what} is {len(value)} bytes, limit is {limit}")
    return _U32.pack(len(value)) + bytes(value)


def blob16(value: bytes, limit: int, what: str) -> bytes:
    """u16 length prefix + bytes."""
    if not isinstance(value, bytes | bytearray):
        raise MalformedError(f"{what} must be bytes")
    if len(value) > min(limit, 0xFFFF):
        raise TooLargeError(f"{what} is {len(value)} bytes, limit is {min(limit, 0xFFFF)}")
    return _U16.pack(len(value)) + bytes(value)


def str16(value: str, limit: int, what: str) -> bytes:
    """u16 length prefix + UTF-8."""
    if not isinstance(value, str):
        raise MalformedError(f"{what} must be a str")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedError(f"{what} is not encodable as UTF-8") from None
    return blob16(raw, limit, what)


def boolean(v: bool) -> bytes:
    return b"\x01" if v else b"\x00"


def join(parts: Iterable[bytes]) -> bytes:
    return b"".join(parts)


class Reader:
    """Sequential reader over an immutable buffer."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedError(f"{what}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise MalformedError(
                f"{self._what} is truncated: {field} needs {n} bytes at offset {self._pos}, "
                f"{self.remaining} left"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(_U64.unpack(self.take(8, field))[0])

    def boolean(self, field: str) -> bool:
        v = self.u8(field)
        if v > 1:
            raise MalformedError(f"{self._what}: {field} must be 0 or 1, got {v}")
        return v == 1

    def blob32(self, limit: int, field: str) -> bytes:
        n = self.u32(f"{field} length")
        if n > limit:
            raise TooLargeError(f"{self._what}: {field} is {n} bytes, limit is {limit}")
        return self.take(n, field)

    def blob16(self, limit: int, field: str) -> bytes:
        n = self.u16(f"{field} length")
        if n > limit:
            raise TooLargeError(f"{self._what}: {field} is {n} bytes, limit is {limit}")
        return self.take(n, field)

    def str16(self, limit: int, field: str) -> str:
        raw = self.blob16(limit, field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedError(f"{self._what}: {field} is not valid UTF-8") from None

    def count(self, limit: int, field: str) -> int:
        n = self.u32(field)
        if n > limit:
            raise TooLargeError(f"{self._what}: {field} is {n}, limit is {limit}")
        return n

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedError(
                f"{self._what} has {self.remaining} unexpected trailing bytes at offset {self._pos}"
            )
