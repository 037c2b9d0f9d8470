"""Every parser on a trust boundary, as a fuzz target: ``name -> Target``.

A target takes raw bytes (what arrives from a socket, a file or a bucket; text parsers decode
them with ``surrogateescape`` so any bytes reach them, invalid UTF-8 included), calls the real
parser, and checks the contract of that parser:

* it returns, or raises its documented error type with a readable message (`fuzzlib.only`);
  any other exception escapes and fails the test;
* where the encoding is canonical, what decodes re-encodes to the very same bytes.

The fuzz tests draw inputs for these targets; test_corpus.py replays the saved corpus through
them. The valid samples (`SAMPLES`) are real encodings built with the protocol / agent code and
are the seeds of the mutation strategies.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from fuzz.fuzzlib import only
from pycrdt import Doc, Text

from qmoi_sync.agent import snapshot_format as sf
from qmoi_sync.agent.causal import (
    UpdateDecodeError,
    decode_snapshot,
    decode_state_vector,
    decode_update,
    encode_state_vector,
    missing_dependencies,
)
from qmoi_sync.agent.control import RequestError, parse_request
from qmoi_sync.agent.settings_formats import SettingsParseError, format_handler
from qmoi_sync.protocol import frames as F
from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.chunks import ChunkKeys, ChunkRef, Manifest
from qmoi_sync.protocol.envelope import open_envelope, parse_header, seal
from qmoi_sync.protocol.errors import InviteError, PathError, ProtocolError
from qmoi_sync.protocol.hints import (
    HintEntry,
    PrefetchHint,
    decode_hint,
    encode_hint,
    open_hint,
    seal_hint,
)
from qmoi_sync.protocol.identity import DeviceIdentity, DevicePublic, is_valid_device_id
from qmoi_sync.protocol.invite import Invite, build_join_request, decode_invite, parse_join_request
from qmoi_sync.protocol.keys import derive_epoch_keys, unwrap_secret, wrap_secret
from qmoi_sync.protocol.membership import MemberOp, MembershipLog, Role
from qmoi_sync.protocol.paths import (
    conflict_name,
    is_conflict_name,
    split_ext_for_conflict,
    validate_relpath,
)
from qmoi_sync.protocol.payload import (
    Capabilities,
    DeviceInfo,
    DocUpdate,
    RepairGap,
    RepairReply,
    RepairRequest,
    StateReply,
    StateRequest,
    Updates,
    decode_payload,
    encode_payload,
)
from qmoi_sync.protocol.replay import ReplayWindow

SPACE = bytes(range(16))
ALICE = DeviceIdentity.from_private_bytes(bytes(range(64)))
BOB = DeviceIdentity.from_private_bytes(bytes(range(64, 128)))
CAROL = DeviceIdentity.from_private_bytes(bytes(range(128, 192)))
SECRET0 = b"s" * 32
KEYS0 = derive_epoch_keys(SPACE, 0, SECRET0)
CHUNK_KEYS = ChunkKeys.for_epoch(0, KEYS0)
SNAP_KEYS = sf.SnapshotKeys.derive(KEYS0.snapshot, SPACE, 0)


def text_of(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[bytes], None]
    samples: Callable[[], list[bytes]]


# ------------------------------------------------------------------------- protocol targets


def _frame(data: bytes) -> None:
    frame, _ = only(F.decode_frame, data, ProtocolError)
    if frame is not None:
        assert F.encode_frame(frame) == data


def _peer_frame(data: bytes) -> None:
    frame, _ = only(L.decode_peer_frame, data, ProtocolError)
    if frame is not None:
        assert L.encode_peer_frame(frame) == data


def _envelope(data: bytes) -> None:
    header, _ = only(parse_header, data, ProtocolError)
    opened, _ = only(
        lambda d: open_envelope(d, SPACE, {0: KEYS0.msg}, lambda pk: pk == ALICE.public.sign_pk),
        data,
        ProtocolError,
    )
    if opened is not None:
        assert header is not None and opened.header == header


def _prefetch_hint(data: bytes) -> None:
    """A hint body, and the same bytes as a sealed hint (what the relay forwards)."""
    hint, _ = only(decode_hint, data, ProtocolError)
    if hint is not None:
        assert encode_hint(hint) == data
    only(
        lambda d: open_hint(d, SPACE, {0: KEYS0.msg}, lambda pk: pk == ALICE.public.sign_pk),
        data,
        ProtocolError,
    )


def _payload(data: bytes) -> None:
    p, _ = only(decode_payload, data, ProtocolError)
    if p is not None:
        assert decode_payload(encode_payload(p)) == p


def _membership_log(data: bytes) -> None:
    log, _ = only(MembershipLog.from_bytes, data, ProtocolError)
    if log is not None:
        assert log.to_bytes() == data


def _member_op(data: bytes) -> None:
    op, _ = only(MemberOp.from_bytes, data, ProtocolError)
    if op is not None:
        assert op.to_bytes() == data


def _invite_token(data: bytes) -> None:
    inv, _ = only(decode_invite, text_of(data), InviteError)
    if inv is not None:
        assert decode_invite(inv.encode()) == inv


def _join_request(data: bytes) -> None:
    only(parse_join_request, data, ProtocolError)


def _path(data: bytes) -> None:
    text = text_of(data)
    ok, _ = only(validate_relpath, text, PathError)
    # helpers used on names from other devices: total on every string
    is_conflict_name(text)
    if ok is not None:
        stem, ext = split_ext_for_conflict(text)
        assert stem + ext == text
        name = conflict_name(text, 1_700_000_000, "abc123")
        assert is_conflict_name(name)


def _device_public(data: bytes) -> None:
    pub, _ = only(DevicePublic.from_bytes, data, ProtocolError)
    if pub is not None:
        assert pub.to_bytes() == data
    is_valid_device_id(text_of(data))


def _replay_window(data: bytes) -> None:
    w, _ = only(ReplayWindow.from_bytes, data, ProtocolError)
    if w is not None:
        assert ReplayWindow.from_bytes(w.to_bytes()).to_bytes() == w.to_bytes()


def _wrapped_secret(data: bytes) -> None:
    only(lambda d: unwrap_secret(BOB, SPACE, 0, d), data, ProtocolError)


def _chunk(data: bytes) -> None:
    cid, ct = data[:32], data[32:]
    only(lambda d: CHUNK_KEYS.decrypt(cid, d), ct, ProtocolError)


def _json_or_none(data: bytes) -> Any:
    """What the agent does with JSON text from another device (index fields): a value, or
    None when it is not JSON — ValueError or RecursionError (deep nesting)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _chunk_manifest(data: bytes) -> None:
    obj = _json_or_none(data)
    m, _ = only(Manifest.from_json, obj, ProtocolError)
    if m is not None:
        assert Manifest.from_json(m.to_json()) == m


def _lan_txt(data: bytes) -> None:
    """A DNS TXT record's rdata (length-prefixed ``key=value`` strings), as zeroconf hands its
    properties to the agent: keys are bytes, a key without '=' has the value None."""
    props: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(data):
        n = data[i]
        item = data[i + 1 : i + 1 + n]
        i += 1 + n
        key, eq, value = item.partition(b"=")
        props.setdefault(key, value if eq else None)
    only(L.parse_txt, props, ProtocolError)


# ------------------------------------------------------------------------- agent targets


def _crdt_update(data: bytes) -> None:
    only(decode_update, data, UpdateDecodeError)
    only(lambda d: missing_dependencies(b"\x00", d), data, UpdateDecodeError)
    sv = _crdt_samples()[1]
    only(lambda d: missing_dependencies(sv, d), data, UpdateDecodeError)


def _state_vector(data: bytes) -> None:
    sv, _ = only(decode_state_vector, data, UpdateDecodeError)
    if sv is not None:
        assert decode_state_vector(encode_state_vector(sv)) == sv
    only(lambda d: missing_dependencies(d, _crdt_samples()[0]), data, UpdateDecodeError)
    only(decode_snapshot, data, UpdateDecodeError)


def _settings(fmt: str, style: str = "") -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        parsed, _ = only(
            format_handler(fmt, style_hint=style).parse, text_of(data), SettingsParseError
        )
        if parsed is not None:
            parsed.tree()  # a file that parses must flatten, whatever is in it

    return check


def _snapshot_manifest(data: bytes) -> None:
    only(
        lambda d: sf.open_manifest(d, SPACE, lambda e: SNAP_KEYS if e == 0 else None),
        data,
        sf.IntegrityError,
    )
    only(sf.peek_manifest_header, data, sf.IntegrityError)


def _snapshot_object(data: bytes) -> None:
    """An object body fetched from the bucket (hostile) under a name the manifest gave."""
    name = _object_samples_named()[0]
    only(lambda d: sf.open_object(SNAP_KEYS, name, d), data, sf.IntegrityError)
    only(lambda d: sf.open_chunk(CHUNK_KEYS, _CHUNK_REF, d), data, sf.IntegrityError)


def seal_raw_manifest(content: bytes, signer: DeviceIdentity = ALICE, seq: int = 3) -> bytes:
    """An authentic manifest (right keys, valid signature) around arbitrary content bytes:
    what a member device with a bug, or a malicious member, can upload to the bucket."""
    header = sf._Header(SPACE, 0, signer.public.sign_pk, seq, 1_700_000_000_000, b"\x05" * 16)
    hb = header.pack()
    packed = zlib.compress(content, 6)
    framed = bytearray(sf.padded_size(len(packed) + 8))
    struct.pack_into(">Q", framed, 0, len(packed))
    framed[8 : 8 + len(packed)] = packed
    ct = sf._manifest_cipher(SNAP_KEYS, header.salt, hb).encrypt(sf._NONCE, bytes(framed), hb)
    signed = hb + struct.pack(">I", len(ct)) + ct
    return signed + signer.sign(signed)


def _snapshot_content(data: bytes) -> None:
    """The JSON inside an authentic manifest (only members can write it: still hostile)."""
    body = seal_raw_manifest(data)
    only(lambda d: sf.open_manifest(d, SPACE, lambda e: SNAP_KEYS), body, sf.IntegrityError)


def _control_request(data: bytes) -> None:
    only(parse_request, data, RequestError)


# ------------------------------------------------------------------------- valid samples


def _frame_samples() -> list[bytes]:
    log = _log_samples()[0]
    env = _envelope_samples()[0]
    frames: list[F.Frame] = [
        F.Hello(SPACE, ALICE.public.sign_pk, F.PROTO_VERSION),
        F.Auth(b"g" * 64, log),
        F.Subscribe(7),
        F.Publish(env),
        F.PushMembership(log),
        F.JoinRequest(SPACE, b"i" * 16, b"request"),
        F.JoinReply(9, True, "ok", log),
        F.PutChunk(b"c" * 32, b"data" * 10),
        F.GetChunk(b"c" * 32),
        F.Truncate(5),
        F.ListChunks(bytes(32)),
        F.DropChunks(86400, (b"a" * 32, b"b" * 32)),
        F.Challenge(b"n" * 32),
        F.Welcome(3, log),
        F.Deliver(4, env),
        F.Ack(1, 2, False),
        F.CaughtUp(10),
        F.Membership(log),
        F.JoinForward(1, b"req"),
        F.JoinResult(True, "welcome", log),
        F.Error("code", "message é", True),
        F.ChunkAck(b"c" * 32, True),
        F.ChunkData(b"c" * 32, b"xyz"),
        F.ChunkMissing(b"c" * 32),
        F.Truncated(5),
        F.LogTruncated(6),
        F.Presence((ALICE.public.sign_pk, BOB.public.sign_pk)),
        F.ChunkList(((b"a" * 32, 5), (b"b" * 32, 6)), True),
        F.ChunksDropped(2, 1024),
        F.Hint(_hint_samples()[1]),
        F.Hinted(_hint_samples()[1]),
    ]
    return [F.encode_frame(f) for f in frames]


@cache
def _hint_samples() -> list[bytes]:
    hint = PrefetchHint(
        b"t" * 16, 0, (HintEntry(0, b"a" * 32, 1_000_000), HintEntry(1_000_000, b"b" * 32, 7))
    )
    return [encode_hint(hint), seal_hint(ALICE, SPACE, 0, KEYS0.msg, 1_700_000_000_000_000, hint)]


@cache
def _envelope_samples() -> list[bytes]:
    return [
        seal(ALICE, SPACE, 0, KEYS0.msg, 1, b"hello", salt=bytes(16)),
        seal(ALICE, SPACE, 0, KEYS0.msg, 2**40, encode_payload(Updates([])), salt=b"\x01" * 16),
    ]


@cache
def _log_samples() -> list[bytes]:
    log, s0 = MembershipLog.create(ALICE, 1000, space_id=SPACE)
    short = log.to_bytes()
    log.add_member(ALICE, BOB.public, Role.member, {0: s0}, 1001)
    log.add_member(ALICE, CAROL.public, Role.admin, {0: s0}, 1002)
    log.set_role(ALICE, CAROL.public.sign_pk, Role.reader, 1003)
    _op, s1 = log.remove_member(ALICE, CAROL.public.sign_pk, 1004)
    log.add_member(ALICE, CAROL.public, Role.member, {0: s0, 1: s1}, 1005)
    return [short, log.to_bytes()]


def _op_samples() -> list[bytes]:
    log = MembershipLog.from_bytes(_log_samples()[1])
    return [op.to_bytes() for op in log.ops]


def _payload_samples() -> list[bytes]:
    payloads = [
        Updates([DocUpdate(bytes(16), b"u" * 20), DocUpdate(b"d" * 16, b"")]),
        StateRequest([(b"d" * 16, b"\x01\x02")]),
        StateReply([DocUpdate(b"d" * 16, b"\x00\x00")]),
        # the state-vector resync through the relay (agent/relay_repair.py)
        RepairRequest(
            b"r" * 16, [b"A" * 32, b"B" * 32], [RepairGap(b"A" * 32, 2, 5)], [(b"d" * 16, b"\x00")]
        ),
        RepairRequest(b"r" * 16),
        RepairReply(b"r" * 16, b"C" * 32, 1, 3, [(b"A" * 32, 7)], [DocUpdate(b"d" * 16, b"u")]),
        DeviceInfo("laptop", "linux", "0.1"),
        DeviceInfo(
            "laptop",
            "linux",
            "0.1",
            Capabilities(
                cpu_count=4,
                memory_total=8 << 30,
                disk_free=1 << 30,
                on_ac=True,
                battery_percent=50.0,
                measured_at=1_700_000_000,
            ),
        ),
    ]
    return [encode_payload(p) for p in payloads]


def _invite_samples() -> list[bytes]:
    inv = Invite(
        SPACE,
        "wss://relay.example:8443/x",
        ALICE.public.sign_pk,
        b"s" * 32,
        2**40,
        Role.admin,
        "Notes ✓",
    )
    inv2 = Invite(SPACE, None, ALICE.public.sign_pk, b"t" * 32, 99)
    return [inv.encode().encode(), inv2.encode().encode()]


def _join_samples() -> list[bytes]:
    inv = Invite(SPACE, "wss://x", ALICE.public.sign_pk, b"s" * 32, 99)
    return [build_join_request(inv, BOB.public, "bob's phone")]


def _path_samples() -> list[bytes]:
    return [
        p.encode()
        for p in (
            "notes/todo.md",
            "a/b/c.tar.gz",
            "Ünïcødé/日本語.txt",
            "x.sync-conflict-20240101-120000-abc123.md",
            ".hidden/file",
        )
    ]


def _peer_frame_samples() -> list[bytes]:
    env = _envelope_samples()[0]
    log = _log_samples()[0]
    frames: list[L.PeerFrame] = [
        L.PeerHello(b"t" * 16, b"n" * 32),
        L.PeerAuth(ALICE.public.sign_pk, b"g" * 64, log),
        L.JoinAsk(b"j" * 16, b"request"),
        L.PeerChallenge(ALICE.public.sign_pk, b"n" * 32, b"g" * 64),
        L.PeerWelcome(log),
        L.JoinAnswer(True, "ok", log),
        L.StreamEnvelope(env),
        L.SyncRequest(5, env),
        L.SyncReply(5, True, env),
        L.DirectEnvelope(env),
        L.LogUpdate(log),
        L.Bye("code", "reason"),
        L.ChunkGet(0, b"c" * 32),
        L.ChunkData(b"c" * 32, b"data"),
        L.ChunkMissing(b"c" * 32),
    ]
    return [L.encode_peer_frame(f) for f in frames]


def _replay_samples() -> list[bytes]:
    w = ReplayWindow()
    for s in (1, 2, 3, 7, 9, 1000):
        w.mark(s)
    return [w.to_bytes(), ReplayWindow(5).to_bytes()]


def _wrap_samples() -> list[bytes]:
    return [wrap_secret(BOB.public, SPACE, 0, SECRET0)]


def _chunk_samples() -> list[bytes]:
    data = b"chunk data " * 10
    cid = CHUNK_KEYS.chunk_id(data)
    return [cid + CHUNK_KEYS.encrypt(cid, data)]


def _chunk_manifest_samples() -> list[bytes]:
    refs = [ChunkRef(b"a" * 32, 1000), ChunkRef(b"b" * 32, 24)]
    m = Manifest.build(CHUNK_KEYS, refs)
    return [json.dumps(m.to_json()).encode()]


def _lan_txt_samples() -> list[bytes]:
    out = []
    for props in (L.space_txt(b"t" * 16), L.invite_txt(b"j" * 16)):
        rdata = b""
        for k, v in props.items():
            item = f"{k}={v}".encode()
            rdata += bytes([len(item)]) + item
        out.append(rdata)
    return out


@cache
def _crdt_samples() -> list[bytes]:
    """Real pycrdt (yrs) updates: inserts, deletes, two clients, and a state vector."""
    a, b = Doc(), Doc()
    ta = a.get("t", type=Text)
    ta += "hello world"
    u1 = a.get_update()
    b.apply_update(u1)
    tb = b.get("t", type=Text)
    tb.insert(5, ", brave new")
    del ta[0:2]
    u2 = b.get_update(a.get_state())
    u3 = a.get_update()
    return [u1, a.get_state(), u2, u3]


def _state_vector_samples() -> list[bytes]:
    a = Doc()
    t = a.get("t", type=Text)
    t += "abc"
    del t[0:1]
    from pycrdt import Snapshot

    snap = Snapshot.from_doc(a).encode()
    return [a.get_state(), encode_state_vector({1: 5, 2**40: 3}), snap]


def _settings_samples(fmt: str) -> Callable[[], list[bytes]]:
    texts = {
        "json": [
            '// settings\n{\n  "editor.fontSize": 14, /* c */\n  "a": {"b": [1, 2.5, null, '
            'true, "x\\u00e9"]},\n  "trailing": {},\n}\n',
            "{}",
        ],
        "toml": [
            '# c\ntitle = "x"\n[server]\nport = 8080\nwhen = 1979-05-27T07:32:00Z\n'
            "inf = inf\n[[items]]\nname = 'a'\n[a.b.c]\nd = [1, 2]\ne = { f = 1 }\n",
            "",
        ],
        "ini": [
            '# c\n[user]\n\tname = A\n\temail = a@x\n[remote "origin"]\n\turl = u\n'
            "\tfetch = a\n\tfetch = b\n[alias]\n\tlg = log \\\n\t\t--graph\n",
            "key=value\n[s]\nx\n",
        ],
    }[fmt]
    return lambda: [t.encode() for t in texts]


@cache
def _snapshot_samples() -> list[bytes]:
    idx = sf.DocRef(bytes(16), b"\x00", b"h" * 32, (sf.ObjRef(b"o" * 32, 10),))
    m = sf.Manifest(
        space_id=SPACE,
        epoch=0,
        signer=b"",
        seq=3,
        created_ms=1_700_000_000_000,
        index=idx,
        docs=[idx],
        files=[sf.FileRef("a/b.txt", bytes(16), "text", 0o644, 7, b"d" * 32)],
        bins=[sf.BinRef(b"f" * 16, 0, b"e" * 32, (sf.ChunkRef(b"c" * 32, 12),))],
        prev_seq=2,
        prev_hash=b"p" * 32,
        cursor=41,
        windows={b"w" * 32: b"\x01"},
        sender_seq=9,
    )
    return [sf.seal_manifest(ALICE, SNAP_KEYS, m, salt=b"\x05" * 16)]


_CHUNK_PLAIN = b"snapshot chunk " * 20
_CHUNK_REF = sf.ChunkRef(CHUNK_KEYS.chunk_id(_CHUNK_PLAIN), len(_CHUNK_PLAIN))


@cache
def _object_samples_named() -> tuple[bytes, list[bytes]]:
    name, body = sf.seal_object(SNAP_KEYS, b"an index document state" * 10)
    chunk = sf.seal_chunk(CHUNK_KEYS.encrypt(_CHUNK_REF.chunk_id, _CHUNK_PLAIN))
    return name, [body, chunk]


def snapshot_content_samples() -> list[bytes]:
    body = _snapshot_samples()[0]
    # the content JSON of the sample manifest (the mutation seeds of the content target)
    m = sf.open_manifest(body, SPACE, lambda e: SNAP_KEYS)
    return [json.dumps(sf._content_json(m), separators=(",", ":")).encode()]


def _control_samples() -> list[bytes]:
    reqs = [
        {"v": 1, "cmd": "status"},
        {"v": 1, "cmd": "invite", "space": "notes", "role": "reader", "expires_s": 60},
        {"v": 1, "cmd": "revoke", "space": "notes", "device": "phone"},
        {"v": 1, "cmd": "pause", "space": None},
        {"v": 1, "cmd": "devices"},
    ]
    return [json.dumps(r).encode() + b"\n" for r in reqs]


# ------------------------------------------------------------------------- the registry

TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("frame", _frame, _frame_samples),
        Target("peer_frame", _peer_frame, _peer_frame_samples),
        Target("envelope", _envelope, _envelope_samples),
        Target("payload", _payload, _payload_samples),
        Target("prefetch_hint", _prefetch_hint, _hint_samples),
        Target("membership_log", _membership_log, _log_samples),
        Target("member_op", _member_op, _op_samples),
        Target("invite_token", _invite_token, _invite_samples),
        Target("join_request", _join_request, _join_samples),
        Target("path", _path, _path_samples),
        Target("device_public", _device_public, lambda: [ALICE.public.to_bytes()]),
        Target("replay_window", _replay_window, _replay_samples),
        Target("wrapped_secret", _wrapped_secret, _wrap_samples),
        Target("chunk", _chunk, _chunk_samples),
        Target("chunk_manifest", _chunk_manifest, _chunk_manifest_samples),
        Target("lan_txt", _lan_txt, _lan_txt_samples),
        Target("crdt_update", _crdt_update, _crdt_samples),
        Target("state_vector", _state_vector, _state_vector_samples),
        Target("settings_json", _settings("json"), _settings_samples("json")),
        Target("settings_toml", _settings("toml"), _settings_samples("toml")),
        Target("settings_ini", _settings("ini"), _settings_samples("ini")),
        Target("settings_gitconfig", _settings("ini", ".gitconfig"), _settings_samples("ini")),
        Target("snapshot_manifest", _snapshot_manifest, _snapshot_samples),
        Target("snapshot_content", _snapshot_content, snapshot_content_samples),
        Target("snapshot_object", _snapshot_object, lambda: _object_samples_named()[1]),
        Target("control_request", _control_request, _control_samples),
    ]
}

#: Deeply nested / huge-count inputs every target also gets (bounded sizes).
NASTY: list[bytes] = [
    b"[" * 100_000,
    b"{" * 50_000,
    b'{"a":' * 30_000,
    b"[" * 3000 + b"]" * 3000,
    b"\xff" * 64,
    b"\x00" * 64,
    b"\xc3\x28",  # invalid UTF-8
    b"\xed\xa0\x80",  # an encoded surrogate
    b"a = [" * 5000,
    b"[a]\n" * 2000,
    b"x = {" * 5000,
    os.urandom(0) + b"\x01" + b"\xff\xff\xff\xff" * 4,
    base64.b64encode(b"\x00" * 48),
]
