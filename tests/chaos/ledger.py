"""The write ledger: what a scenario wrote, and what must therefore survive every fault.

Every write the test makes is fsync'd before it is recorded, so each entry was durable on its
device when recorded (``Entry.at``, monotonic seconds). After the faults heal, ``expected``
says what must be present in the converged tree; :mod:`chaos.invariants` checks it.

The file format the runner writes makes every surviving fact findable whatever the sync did
(renames, merges, conflict copies), and every removal attributable:

* text files start with a header line ``# lineage <L>`` that edits never touch, and every other
  line carries a unique token ``tok-<dev>-<n>;``. A token must be somewhere in the tree unless
  a recorded operation removed it: a line edit that replaced it (``removed``), or a delete /
  ``mv`` onto its file (``kill_lineage``: the whole lineage, wherever and whenever written —
  a concurrent edit of a deleted file may legitimately go either way).
* binary files start with ``\\xff\\xfeBIN <L>\\n`` then random bytes; each version is known by
  its sha256. A version must be somewhere (as the file, or as a conflict copy) unless its
  lineage was killed, or some device overwrote it while that very version was on its disk
  (``superseded``): concurrent binary edits keep both.
* settings are unique keys (``set_key``), which must be in every device's settings file.

``needles`` lists plaintext the relay's storage (and a bucket) must never contain.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field

TOKEN_RE = re.compile(rb"tok-[a-z0-9]+-[0-9]+;")
LINEAGE_RE = re.compile(rb"# lineage (L[0-9]+)\n")
BIN_MAGIC = b"\xff\xfeBIN "
MIN_NEEDLE = 8


@dataclass
class Entry:
    at: float  # time.monotonic() when the write was durable (fsync returned)
    device: str
    op: str
    path: str
    detail: str = ""


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)
    # token -> lineage it was written into
    tokens: dict[str, str] = field(default_factory=dict)
    removed_tokens: set[str] = field(default_factory=set)
    killed: set[str] = field(default_factory=set)
    # binary version digest -> lineage
    versions: dict[str, str] = field(default_factory=dict)
    superseded: set[str] = field(default_factory=set)
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # doc -> key -> value
    names: set[str] = field(default_factory=set)  # file basenames, for the plaintext check
    samples: list[bytes] = field(default_factory=list)  # slices of binary contents
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- fresh identifiers ------------------------------------------------------------------
    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def token(self, device: str) -> str:
        return f"tok-{device}-{self.next_id()};"

    def lineage(self) -> str:
        return f"L{self.next_id()}"

    # -- recording --------------------------------------------------------------------------
    def _log(self, device: str, op: str, path: str, detail: str = "") -> None:
        self.entries.append(Entry(time.monotonic(), device, op, path, detail))
        self.names.add(path.rsplit("/", 1)[-1])

    def text_written(
        self, device: str, op: str, path: str, lineage: str, added: list[str], removed: list[str]
    ) -> None:
        for t in added:
            self.tokens[t] = lineage
        self.removed_tokens.update(removed)
        self._log(device, op, path, f"+{len(added)} -{len(removed)} {lineage}")

    def binary_written(
        self, device: str, op: str, path: str, lineage: str, data: bytes, replaced: bytes | None
    ) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self.versions[digest] = lineage
        if replaced is not None:
            self.superseded.add(hashlib.sha256(replaced).hexdigest())
        mid = len(data) // 2
        self.samples.append(data[mid : mid + 32])
        self._log(device, op, path, f"{digest[:12]} {len(data)}B {lineage}")

    def kill_lineage(self, device: str, op: str, path: str, lineage: str | None) -> None:
        if lineage is not None:
            self.killed.add(lineage)
        self._log(device, op, path, f"kills {lineage}")

    def overwritten(self, device: str, op: str, path: str, data: bytes) -> None:
        """A delete, or a ``mv`` onto a file, of a file whose contents were ``data``: its
        lineage is killed, and every token it held was removed by this device's user.

        The tokens, not only the header's lineage: a file can hold lines of several lineages.
        A ``mv`` onto a tracked text file is ingested as an edit of that file, so two devices
        renaming different files onto one path concurrently merge both texts into one file
        (two header lines, chaos soak seed 924441503); overwriting it later removes both, and
        only the first header was killed. Tokens written elsewhere, or concurrently (not yet
        on this disk), are still required."""
        self.removed_tokens.update(tokens_in(data))
        self.kill_lineage(device, op, path, lineage_of(data[:64]))

    def moved(self, device: str, path: str, target: str) -> None:
        self._log(device, "rename", path, f"-> {target}")
        self.names.add(target.rsplit("/", 1)[-1])

    def set_key(self, device: str, doc: str, key: str, value: str) -> None:
        self.settings.setdefault(doc, {})[key] = value
        self._log(device, "setting", doc, key)

    def fault(self, what: str) -> None:
        self.entries.append(Entry(time.monotonic(), "-", "fault", what))

    # -- what must hold ---------------------------------------------------------------------
    def expected_tokens(self) -> set[str]:
        return {
            t
            for t, lin in self.tokens.items()
            if t not in self.removed_tokens and lin not in self.killed
        }

    def expected_versions(self) -> set[str]:
        return {
            d
            for d, lin in self.versions.items()
            if d not in self.superseded and lin not in self.killed
        }

    def needles(self) -> list[bytes]:
        """Plaintext that must never reach the relay or a bucket: every token, every file
        name, a slice of every binary version."""
        out = [t.encode() for t in self.tokens]
        out += [n.encode() for n in self.names]
        out += list(self.samples)
        for doc in self.settings.values():
            out += [k.encode() for k in doc]
        # Short needles match random ciphertext by chance (a 3-byte key did, in a 300 KB
        # sealed chunk): 8 bytes and more only.
        return [n for n in out if len(n) >= MIN_NEEDLE]

    def dump(self) -> str:
        return self.tail(len(self.entries))

    def tail(self, n: int = 60) -> str:
        return "\n".join(
            f"{e.at:10.2f} {e.device:>2} {e.op:<8} {e.path} {e.detail}" for e in self.entries[-n:]
        )


def interleaved(token: str, data: bytes) -> bool:
    """Whether ``token``'s characters appear in order within one line of ``data``: what is
    left of a line when a concurrent edit of the same line merged character by character."""
    want = token.encode()
    for line in data.splitlines():
        # Whole tokens are not what is left of a merge: without this, "tok-c-4;" was said to
        # be interleaved in any line holding "tok-c-40;" (chaos soak seed 924441503).
        line = TOKEN_RE.sub(b"", line)
        it = iter(line)
        if all(any(c == x for x in it) for c in want):
            return True
    return False


def tokens_in(data: bytes) -> set[str]:
    return {m.decode() for m in TOKEN_RE.findall(data)}


def lineage_of(data: bytes) -> str | None:
    """The lineage a file's contents carry (text header or binary magic)."""
    if data.startswith(BIN_MAGIC):
        end = data.find(b"\n", len(BIN_MAGIC))
        return data[len(BIN_MAGIC) : end].decode("ascii", "replace") if end > 0 else None
    m = LINEAGE_RE.match(data)
    return m.group(1).decode() if m else None


__all__ = ["BIN_MAGIC", "MIN_NEEDLE", "Entry", "Ledger", "interleaved", "lineage_of", "tokens_in"]
