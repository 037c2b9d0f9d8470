"""Snapshot format: keyed object names, sealed objects and signed, encrypted manifests.

Pure functions over bytes (no I/O), in the style of ``protocol/``. Everything a bucket returns is
hostile until one of the ``open_*`` functions accepted it.

Keys (per key epoch; from :attr:`qmoi_sync.protocol.keys.EpochKeys.snapshot`)::

    names    = HKDF(snapshot, salt=space_id, info="qmoi-sync snapshot v1 names")
    objects  = HKDF(snapshot, salt=space_id, info="qmoi-sync snapshot v1 objects")
    manifest = HKDF(snapshot, salt=space_id, info="qmoi-sync snapshot v1 manifest")

**Objects** hold one piece of plaintext (a CRDT document state or a delta of one). The object's
name is ``HMAC-SHA256(names, plaintext)``: identical content gets the same name on every device
and in every snapshot of the epoch (stored once), and the name says nothing about the content to
anyone without the key. The plaintext is framed (``u64 length | data``), zero-padded to a size
bucket (:func:`padded_size`, Padmé with a 4 KiB floor) and sealed with ChaCha20-Poly1305 under
``HMAC-SHA256(objects, "obj" | name)`` with a zero nonce: the key is unique per distinct
plaintext, so the encryption is deterministic (two devices upload byte-identical objects) without
ever reusing a key/nonce pair on different data. On restore the name is recomputed from the
decrypted plaintext, so a swapped object (valid ciphertext under another name) is refused::

    object = "QSO1" | epoch u32 | ciphertext            AD = "QSO1" | epoch u32 | name 32

**Manifests** describe one snapshot (every document's object chain, the file list, the relay
cursor it covers, the previous manifest's hash) as zlib-compressed JSON, padded, encrypted under
a per-manifest key and signed by the device that took it (Ed25519)::

    header   = "QSM1" | version u8 | space_id 16 | epoch u32 | signer 32 | seq u64
               | created_ms u64 | salt 16
    manifest = header | ct_len u32 | ciphertext | signature 64      (signature over all before)
    key      = HKDF(manifest, salt=salt, info="qmoi-sync snapshot manifest v1" | header)

**Chunks** of binary files are stored as the chunk module seals them (protocol/chunks.py:
AES-256-GCM under a key derived from the keyed chunk id, deterministic), zero-padded to the same
Padmé buckets, under ``<prefix>/c/<chunk id hex>``: the same chunk written by any device in any
snapshot is one object, and it is byte-identical to the relay's copy. A manifest lists each
binary file's chunk manifest (:class:`BinRef`: epoch, keyed whole-file hash, ids and sizes in
order); on restore every chunk is authenticated, its id recomputed from the plaintext and its
size checked against that list (:func:`open_chunk`).

The bucket layout is ``<prefix>/o/<name hex>`` for objects, ``<prefix>/c/<chunk id hex>`` for
chunks and ``<prefix>/m/<seq 12 digits>-<tag>`` for manifests (``tag`` = 8 hex of a keyed hash of
the signer, so manifests of two devices never collide and the name reveals no device).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qmoi_sync.protocol.chunks import CHUNK_ID_LEN, MAX_CHUNK, ChunkKeys
from qmoi_sync.protocol.errors import DecryptError, SignatureError
from qmoi_sync.protocol.identity import DeviceIdentity, verify

__all__ = [
    "CHUNK_DIR",
    "MANIFEST_DIR",
    "OBJECT_DIR",
    "BinRef",
    "ChunkRef",
    "DocRef",
    "FileRef",
    "IntegrityError",
    "Manifest",
    "ObjRef",
    "SnapshotError",
    "SnapshotKeys",
    "chunk_key",
    "manifest_key",
    "object_key",
    "open_chunk",
    "open_manifest",
    "open_object",
    "padded_size",
    "parse_manifest_key",
    "peek_manifest_header",
    "seal_chunk",
    "seal_manifest",
    "seal_object",
]

FORMAT_VERSION = 1  # of the manifest header
#: Manifest content: 2 added binary files ("bins"); 1 (text only) is still read.
CONTENT_VERSION = 2
OBJ_MAGIC = b"QSO1"
MAN_MAGIC = b"QSM1"
NAME_LEN = 32
SALT_LEN = 16
SIG_LEN = 64
SIGN_PK_LEN = 32
SPACE_ID_LEN = 16
MIN_BUCKET = 4096
#: Largest plaintext of one object (a document state); larger ones are refused when sealing.
MAX_OBJECT_PLAINTEXT = 1 << 31
#: Largest manifest body accepted from a bucket, and largest decompressed manifest.
MAX_MANIFEST = 256 * 1024 * 1024
MAX_MANIFEST_JSON = 1024 * 1024 * 1024
OBJECT_DIR = "o/"
MANIFEST_DIR = "m/"
CHUNK_DIR = "c/"
_GCM_TAG = 16
_HEADER = struct.Struct(">4sB16sI32sQQ16s")
_NONCE = bytes(12)


class SnapshotError(Exception):
    """A snapshot operation failed; the message is meant for the user."""


class IntegrityError(SnapshotError):
    """Something in the bucket is not what a member device wrote.

    ``kind``: ``missing`` (a referenced object is gone), ``tampered`` (fails authentication or is
    truncated), ``swapped`` (authentic, but not the object/manifest that name should hold),
    ``signature`` (manifest signature), ``unknown_signer`` (not signed by a member device),
    ``rollback`` (older than what this device already saw), ``malformed``, ``unknown_epoch``.
    """

    def __init__(self, kind: str, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


@dataclass(frozen=True, repr=False)
class SnapshotKeys:
    """The snapshot subkeys of one key epoch (``repr`` hides them)."""

    epoch: int
    names: bytes
    objects: bytes
    manifest: bytes

    @classmethod
    def derive(cls, snapshot_key: bytes, space_id: bytes, epoch: int) -> SnapshotKeys:
        if len(snapshot_key) != 32 or len(space_id) != SPACE_ID_LEN:
            raise ValueError("snapshot key must be 32 bytes and space id 16")
        pre = b"qmoi-sync snapshot v1 "
        return cls(
            epoch=epoch,
            names=_hkdf(snapshot_key, space_id, pre + b"names"),
            objects=_hkdf(snapshot_key, space_id, pre + b"objects"),
            manifest=_hkdf(snapshot_key, space_id, pre + b"manifest"),
        )

    def __repr__(self) -> str:
        return f"SnapshotKeys(epoch={self.epoch}, <hidden>)"

    def name_of(self, plaintext: bytes | memoryview) -> bytes:
        return hmac.new(self.names, plaintext, hashlib.sha256).digest()

    def signer_tag(self, sign_pk: bytes) -> str:
        return hmac.new(self.names, b"signer\0" + sign_pk, hashlib.sha256).hexdigest()[:8]


def padded_size(n: int) -> int:
    """Padmé padding (leaks O(log log n) bits of the length), never below 4 KiB."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    e = n.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (n + mask) & ~mask


def object_key(prefix: str, name: bytes) -> str:
    return f"{prefix}{OBJECT_DIR}{name.hex()}"


def manifest_key(prefix: str, seq: int, tag: str) -> str:
    return f"{prefix}{MANIFEST_DIR}{seq:012d}-{tag}"


def parse_manifest_key(prefix: str, key: str) -> tuple[int, str] | None:
    """(seq, tag) of a manifest object key, or None if the key is not one."""
    if not key.startswith(prefix + MANIFEST_DIR):
        return None
    rest = key[len(prefix) + len(MANIFEST_DIR) :]
    seq, sep, tag = rest.partition("-")
    if not sep or len(seq) != 12 or not seq.isdigit() or len(tag) != 8:
        return None
    if any(c not in "0123456789abcdef" for c in tag):
        return None
    return int(seq), tag


def _object_ad(epoch: int, name: bytes) -> bytes:
    return OBJ_MAGIC + struct.pack(">I", epoch) + name


def _object_cipher(keys: SnapshotKeys, name: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(hmac.new(keys.objects, b"obj" + name, hashlib.sha256).digest())


def seal_object(keys: SnapshotKeys, plaintext: bytes) -> tuple[bytes, bytes]:
    """(name, object bytes) for one piece of plaintext."""
    if len(plaintext) > MAX_OBJECT_PLAINTEXT:
        raise SnapshotError(f"object of {len(plaintext)} bytes is too large")
    name = keys.name_of(plaintext)
    framed = bytearray(padded_size(len(plaintext) + 8))
    struct.pack_into(">Q", framed, 0, len(plaintext))
    framed[8 : 8 + len(plaintext)] = plaintext
    ct = _object_cipher(keys, name).encrypt(_NONCE, bytes(framed), _object_ad(keys.epoch, name))
    return name, OBJ_MAGIC + struct.pack(">I", keys.epoch) + ct


def open_object(keys: SnapshotKeys, name: bytes, body: bytes, label: str = "") -> bytes:
    """Authenticate and decrypt an object fetched under ``name``; returns the plaintext."""
    where = label or name.hex()
    if len(body) < 8 + 16 or body[:4] != OBJ_MAGIC:
        raise IntegrityError("tampered", f"object {where} is truncated or not an object", where)
    (epoch,) = struct.unpack(">I", body[4:8])
    if epoch != keys.epoch:
        raise IntegrityError(
            "swapped", f"object {where} belongs to key epoch {epoch}, not {keys.epoch}", where
        )
    try:
        framed = _object_cipher(keys, name).decrypt(_NONCE, body[8:], _object_ad(epoch, name))
    except InvalidTag:
        raise IntegrityError(
            "tampered",
            f"object {where} fails authentication (tampered, truncated or swapped)",
            where,
        ) from None
    (n,) = struct.unpack(">Q", framed[:8])
    if n > len(framed) - 8 or framed[8 + n :].rstrip(b"\0"):
        raise IntegrityError("tampered", f"object {where} has a bad frame", where)
    plaintext = framed[8 : 8 + n]
    if not hmac.compare_digest(keys.name_of(plaintext), name):
        raise IntegrityError("swapped", f"object {where} does not hold the content named", where)
    return plaintext


# -- binary chunks -------------------------------------------------------------------------------
def chunk_key(prefix: str, chunk_id: bytes) -> str:
    return f"{prefix}{CHUNK_DIR}{chunk_id.hex()}"


def seal_chunk(ciphertext: bytes) -> bytes:
    """The bucket object of a chunk sealed by ``ChunkKeys.encrypt``: zero-padded (Padmé)."""
    return ciphertext + bytes(padded_size(len(ciphertext)) - len(ciphertext))


def open_chunk(keys: ChunkKeys, ref: ChunkRef, body: bytes, label: str = "") -> bytes:
    """Check and decrypt a chunk object fetched for ``ref``: the exact padded length, zero
    padding, authenticated decryption, the keyed id recomputed from the plaintext, the size the
    manifest records. Raises :class:`IntegrityError` (``tampered`` or ``swapped``)."""
    where = label or ref.chunk_id.hex()
    n = ref.size + _GCM_TAG
    if len(body) != padded_size(n):
        raise IntegrityError(
            "tampered",
            f"chunk {where} is {len(body)} bytes, not {padded_size(n)} (truncated or replaced)",
            where,
        )
    if any(body[n:]):
        raise IntegrityError("tampered", f"chunk {where} has a bad padding", where)
    try:
        plain = keys.decrypt(ref.chunk_id, body[:n])
    except DecryptError as exc:
        raise IntegrityError(
            "tampered",
            f"chunk {where} fails authentication ({exc}: tampered or swapped)",
            where,
        ) from None
    if len(plain) != ref.size:  # pragma: no cover - the length check above implies it
        raise IntegrityError("tampered", f"chunk {where} has the wrong size", where)
    return plain


# -- manifest content --------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjRef:
    """One object of a document chain: its name and plaintext size."""

    name: bytes
    size: int


@dataclass(frozen=True)
class DocRef:
    """A document as of the snapshot: apply the chain's objects in order (a full state, then
    deltas) to get its state; ``sv`` is the resulting state vector."""

    doc_id: bytes
    sv: bytes
    digest: bytes  # hash of the logical state (state vector + delete set): "unchanged?"
    chain: tuple[ObjRef, ...]

    @property
    def size(self) -> int:
        return sum(o.size for o in self.chain)


@dataclass(frozen=True)
class FileRef:
    """A file as it was laid out when the snapshot was taken (for history and restore-file)."""

    path: str
    fid: bytes
    kind: str
    mode: int
    size: int
    sha256: bytes


@dataclass(frozen=True)
class ChunkRef:
    """A chunk of a binary file: its keyed id and plaintext size."""

    chunk_id: bytes
    size: int


@dataclass(frozen=True)
class BinRef:
    """A binary file's content as of the snapshot: the chunk module's manifest of the version
    the index chose (chunk keys of ``epoch``, keyed whole-file ``hash``, chunks in order)."""

    fid: bytes
    epoch: int
    hash: bytes
    chunks: tuple[ChunkRef, ...]

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)


@dataclass
class Manifest:
    space_id: bytes
    epoch: int
    signer: bytes
    seq: int
    created_ms: int
    index: DocRef
    docs: list[DocRef] = field(default_factory=list)
    files: list[FileRef] = field(default_factory=list)
    bins: list[BinRef] = field(default_factory=list)
    prev_seq: int | None = None
    prev_hash: bytes | None = None
    cursor: int = 0
    epoch_fence: int = 0
    interval: int | None = None
    windows: dict[bytes, bytes] = field(default_factory=dict)
    sender_seq: int = 0

    @property
    def created_at(self) -> float:
        return self.created_ms / 1000

    def all_docs(self) -> list[DocRef]:
        return [self.index, *self.docs]

    def object_names(self) -> set[bytes]:
        return {o.name for d in self.all_docs() for o in d.chain}

    def chunk_sizes(self) -> dict[bytes, int]:
        """Every chunk the snapshot references (id -> plaintext size), each once."""
        return {c.chunk_id: c.size for b in self.bins for c in b.chunks}

    def bin(self, fid: bytes) -> BinRef | None:
        for b in self.bins:
            if b.fid == fid:
                return b
        return None

    def total_bytes(self) -> int:
        return sum(d.size for d in self.all_docs()) + sum(self.chunk_sizes().values())

    def file_at(self, path: str) -> FileRef | None:
        """The file (not folder) at ``path`` in this snapshot."""
        for f in self.files:
            if f.path == path and f.kind != "dir":
                return f
        return None

    def folders(self) -> list[str]:
        """Every folder of the tree, empty ones included (none in snapshots before folders
        were index entries: there, folders are only the parents of files)."""
        return [f.path for f in self.files if f.kind == "dir"]

    def doc(self, doc_id: bytes) -> DocRef | None:
        for d in self.docs:
            if d.doc_id == doc_id:
                return d
        return None


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _docref_json(d: DocRef) -> list[Any]:
    return [d.doc_id.hex(), _b64(d.sv), d.digest.hex(), [[o.name.hex(), o.size] for o in d.chain]]


def _content_json(m: Manifest) -> dict[str, Any]:
    return {
        "v": CONTENT_VERSION,
        "prev": None if m.prev_seq is None else [m.prev_seq, (m.prev_hash or b"").hex()],
        "cursor": m.cursor,
        "epoch_fence": m.epoch_fence,
        "interval": m.interval,
        "sender_seq": m.sender_seq,
        "windows": {k.hex(): _b64(v) for k, v in sorted(m.windows.items())},
        "index": _docref_json(m.index),
        "docs": [_docref_json(d) for d in m.docs],
        "files": [[f.path, f.fid.hex(), f.kind, f.mode, f.size, f.sha256.hex()] for f in m.files],
        "bins": [
            [b.fid.hex(), b.epoch, b.hash.hex(), [[c.chunk_id.hex(), c.size] for c in b.chunks]]
            for b in m.bins
        ],
    }


class _Bad(Exception):
    pass


def _hexb(v: Any, n: int | None = None) -> bytes:
    if not isinstance(v, str):
        raise _Bad("expected hex")
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise _Bad("bad hex") from None
    if n is not None and len(b) != n:
        raise _Bad("bad length")
    return b


def _unb64(v: Any) -> bytes:
    if not isinstance(v, str):
        raise _Bad("expected base64")
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise _Bad("bad base64") from None


def _int(v: Any, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _Bad("expected an integer")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad("expected a list")
    return v


def _docref(v: Any, doc_len: int = 16) -> DocRef:
    doc_id, sv, digest, chain = _list(v)
    refs = tuple(ObjRef(_hexb(n, NAME_LEN), _int(s)) for n, s in (_list(x) for x in _list(chain)))
    if not refs:
        raise _Bad("empty chain")
    return DocRef(_hexb(doc_id, doc_len), _unb64(sv), _hexb(digest, 32), refs)


def _binref(v: Any) -> BinRef:
    fid, epoch, digest, chunks = _list(v)
    refs = []
    for item in _list(chunks):
        cid, size = _list(item)
        n = _int(size, 1)
        if n > MAX_CHUNK:
            raise _Bad("chunk larger than a chunk can be")
        refs.append(ChunkRef(_hexb(cid, CHUNK_ID_LEN), n))
    return BinRef(_hexb(fid, 16), _int(epoch), _hexb(digest, 32), tuple(refs))


def _from_json(raw: Any, header: _Header) -> Manifest:
    if not isinstance(raw, dict) or raw.get("v") not in (1, CONTENT_VERSION):
        raise _Bad("unknown manifest content version")
    prev = raw.get("prev")
    prev_seq = prev_hash = None
    if prev is not None:
        ps, ph = _list(prev)
        prev_seq, prev_hash = _int(ps), _hexb(ph, 32)
    files = []
    for item in _list(raw.get("files")):
        path, fid, kind, mode, size, digest = _list(item)
        if not isinstance(path, str) or not isinstance(kind, str):
            raise _Bad("bad file entry")
        files.append(FileRef(path, _hexb(fid, 16), kind, _int(mode), _int(size), _hexb(digest, 32)))
    windows_raw = raw.get("windows")
    if not isinstance(windows_raw, dict):
        raise _Bad("bad windows")
    interval = raw.get("interval")
    return Manifest(
        space_id=header.space_id,
        epoch=header.epoch,
        signer=header.signer,
        seq=header.seq,
        created_ms=header.created_ms,
        index=_docref(raw.get("index")),
        docs=[_docref(d) for d in _list(raw.get("docs"))],
        files=files,
        bins=[_binref(b) for b in _list(raw.get("bins", []))],
        prev_seq=prev_seq,
        prev_hash=prev_hash,
        cursor=_int(raw.get("cursor")),
        epoch_fence=_int(raw.get("epoch_fence")),
        interval=None if interval is None else _int(interval),
        windows={_hexb(k, 32): _unb64(v) for k, v in windows_raw.items()},
        sender_seq=_int(raw.get("sender_seq")),
    )


@dataclass(frozen=True)
class _Header:
    space_id: bytes
    epoch: int
    signer: bytes
    seq: int
    created_ms: int
    salt: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAN_MAGIC,
            FORMAT_VERSION,
            self.space_id,
            self.epoch,
            self.signer,
            self.seq,
            self.created_ms,
            self.salt,
        )


@dataclass(frozen=True)
class ManifestHeader:
    """What can be read from a manifest before opening it (authenticated by open_manifest)."""

    space_id: bytes
    epoch: int
    signer: bytes
    seq: int
    created_ms: int


def _manifest_cipher(keys: SnapshotKeys, salt: bytes, header: bytes) -> ChaCha20Poly1305:
    info = b"qmoi-sync snapshot manifest v1" + header
    return ChaCha20Poly1305(_hkdf(keys.manifest, salt, info))


def seal_manifest(
    identity: DeviceIdentity, keys: SnapshotKeys, m: Manifest, salt: bytes | None = None
) -> bytes:
    """Encode, compress, pad, encrypt and sign a manifest."""
    header = _Header(
        m.space_id,
        keys.epoch,
        identity.public.sign_pk,
        m.seq,
        m.created_ms,
        salt or os.urandom(SALT_LEN),
    )
    hb = header.pack()
    packed = zlib.compress(json.dumps(_content_json(m), separators=(",", ":")).encode(), 6)
    framed = bytearray(padded_size(len(packed) + 8))
    struct.pack_into(">Q", framed, 0, len(packed))
    framed[8 : 8 + len(packed)] = packed
    ct = _manifest_cipher(keys, header.salt, hb).encrypt(_NONCE, bytes(framed), hb)
    signed = hb + struct.pack(">I", len(ct)) + ct
    return signed + identity.sign(signed)


def peek_manifest_header(body: bytes) -> ManifestHeader:
    """The (unauthenticated) header: which epoch's keys open it, who claims to have signed it."""
    if len(body) < _HEADER.size + 4 + 16 + SIG_LEN:
        raise IntegrityError("tampered", "manifest is truncated")
    magic, version, space_id, epoch, signer, seq, created_ms, _salt = _HEADER.unpack_from(body)
    if magic != MAN_MAGIC:
        raise IntegrityError("malformed", "not a manifest")
    if version != FORMAT_VERSION:
        raise IntegrityError("malformed", f"manifest format {version} is not supported")
    return ManifestHeader(space_id, epoch, signer, seq, created_ms)


def open_manifest(
    body: bytes,
    space_id: bytes,
    keys_for: Callable[[int], SnapshotKeys | None],
    label: str = "manifest",
) -> Manifest:
    """Verify (structure, space, signature, epoch key, AEAD) and decode a manifest.

    The caller still has to check that the signer was a member device allowed to write in that
    epoch (the membership log lives with the caller) and the manifest's place in the chain.
    """
    if len(body) > MAX_MANIFEST:
        raise IntegrityError("malformed", f"{label} is larger than {MAX_MANIFEST} bytes", label)
    h = peek_manifest_header(body)
    if h.space_id != space_id:
        raise IntegrityError("swapped", f"{label} belongs to another space", label)
    hb = body[: _HEADER.size]
    (ct_len,) = struct.unpack_from(">I", body, _HEADER.size)
    end = _HEADER.size + 4 + ct_len
    if end + SIG_LEN != len(body):
        raise IntegrityError("tampered", f"{label} is truncated or has trailing bytes", label)
    try:
        verify(h.signer, body[end:], body[:end])
    except SignatureError:
        raise IntegrityError("signature", f"{label}: signature does not verify", label) from None
    keys = keys_for(h.epoch)
    if keys is None:
        raise IntegrityError(
            "unknown_epoch", f"{label}: this device holds no key for epoch {h.epoch}", label
        )
    salt = hb[-SALT_LEN:]
    try:
        framed = _manifest_cipher(keys, salt, hb).decrypt(_NONCE, body[_HEADER.size + 4 : end], hb)
    except InvalidTag:
        raise IntegrityError("tampered", f"{label} fails authentication", label) from None
    (n,) = struct.unpack(">Q", framed[:8])
    if n > len(framed) - 8:
        raise IntegrityError("malformed", f"{label} has a bad frame", label)
    try:
        d = zlib.decompressobj()
        text = d.decompress(framed[8 : 8 + n], MAX_MANIFEST_JSON)
        if d.unconsumed_tail:
            raise _Bad("manifest content too large")
        raw = json.loads(text)
        header = _Header(h.space_id, h.epoch, h.signer, h.seq, h.created_ms, salt)
        return _from_json(raw, header)
    except RecursionError:  # json.loads on deeply nested content
        raise IntegrityError("malformed", f"{label}: content nested too deeply", label) from None
    except (zlib.error, ValueError, TypeError, KeyError, _Bad) as exc:
        raise IntegrityError("malformed", f"{label}: undecodable content ({exc})", label) from None


def manifest_hash(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def keys_by_epoch(
    snapshot_keys: Mapping[int, bytes], space_id: bytes
) -> Callable[[int], SnapshotKeys | None]:
    """A ``keys_for`` callable over {epoch: EpochKeys.snapshot} (derivations cached)."""
    cache: dict[int, SnapshotKeys] = {}

    def keys_for(epoch: int) -> SnapshotKeys | None:
        k = cache.get(epoch)
        if k is None:
            raw = snapshot_keys.get(epoch)
            if raw is None:
                return None
            k = cache[epoch] = SnapshotKeys.derive(raw, space_id, epoch)
        return k

    return keys_for
