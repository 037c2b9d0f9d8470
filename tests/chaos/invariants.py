"""The shared invariant checker: run it after every scenario, once the faults have healed.

    watch = OutsideWatch(tmp_path, allowed=[...every space root, agent home, relay dir, log...])
    ... scenario ...
    violations = check_all(relay, devices, ledger, watch=watch)
    assert not violations, format_violations(violations)

``check_all`` first waits (bounded) for the devices to settle: identical trees, every outbox
acknowledged, no binary transfer pending, and still identical after that. Then:

* converged      — all devices hold identical trees (and settings files, when given);
* lost           — every ledger entry that must survive (``Ledger.expected_*``) is in the tree;
* outside        — nothing was created, changed or removed outside the allowed paths;
* plaintext      — the relay's data dir (and any ``plaintext_dirs``, e.g. a bucket's files)
                   holds none of the ledger's names, tokens or binary slices;
* died           — every agent and the relay are alive (the runner restarts what it kills, so
                   a dead process here died on its own);
* unexplained    — refusal / quarantine counters (``drop_counters``) are exactly what the
                   scenario explains: ``expected_drops`` maps a counter to the minimum count the
                   scenario's hostile inputs must produce; a counter not listed must stay 0.

Each check is also callable on its own. Every function returns a list of ``Violation``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Device, Relay, grep_bytes, wait_until

from chaos.ledger import Ledger, interleaved, tokens_in

SETTLE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}"


def format_violations(vs: Sequence[Violation]) -> str:
    return "\n".join(str(v) for v in vs)


# -- settle -----------------------------------------------------------------------------------
def _settled(dev: Device) -> bool:
    st = dev.status() or {}
    for s in st.get("spaces", []):
        if s["pending_out"] or s.get("pending_up_files") or s.get("pending_down_files"):
            return False
        if not s["relay"]["connected"]:
            return False
    return bool(st.get("agent_running"))


def settle(devices: Sequence[Device], timeout: float = SETTLE_TIMEOUT) -> list[Violation]:
    """Wait until trees are identical and every device is drained and connected, then equal
    again (not just momentarily equal). A timeout is a ``converged`` violation."""

    def equal() -> bool:
        first = devices[0].tree()
        return all(d.tree() == first for d in devices[1:])

    try:
        wait_until(equal, timeout=timeout, what="trees to converge", interval=0.2)
        for d in devices:
            wait_until(
                lambda d=d: _settled(d), timeout=timeout, what=f"{d.name} drained", interval=0.2
            )
        wait_until(equal, timeout=timeout / 2, what="trees equal once drained", interval=0.2)
    except AssertionError as exc:
        return [Violation("converged", f"{exc}\n{describe_differences(devices)}")]
    return []


def describe_differences(devices: Sequence[Device]) -> str:
    trees = [d.tree() for d in devices]
    out = []
    for p in sorted(set().union(*trees)):
        vals = [t.get(p) for t in trees]
        if len(set(vals)) > 1:
            cols = " | ".join(
                f"{d.name}={'-' if v is None else repr(v[:60])}"
                for d, v in zip(devices, vals, strict=True)
            )
            out.append(f"  {p}: {cols}")
    return "\n".join(out) or "  (trees equal)"


# -- individual checks ------------------------------------------------------------------------
def check_ledger(tree: Mapping[str, bytes], ledger: Ledger) -> list[Violation]:
    """Everything the ledger says must survive is somewhere in ``tree``."""
    found: set[str] = set()
    digests = set()
    for data in tree.values():
        found |= tokens_in(data)
        digests.add(hashlib.sha256(data).hexdigest())
    out = []
    missing = sorted(ledger.expected_tokens() - found)
    if missing:
        where = {t: ledger.tokens[t] for t in missing[:20]}
        mixed = [t for t in missing if any(interleaved(t, d) for d in tree.values())]
        note = (
            f" ({len(mixed)} of them interleaved character by character with a concurrent"
            f" edit of the same line: {mixed[:5]})"
            if mixed
            else ""
        )
        out.append(Violation("lost", f"{len(missing)} text lines lost: {where}{note}"))
    lost_bin = sorted(ledger.expected_versions() - digests)
    if lost_bin:
        where = {d[:12]: ledger.versions[d] for d in lost_bin[:20]}
        out.append(Violation("lost", f"{len(lost_bin)} binary versions lost: {where}"))
    return out


def check_settings(files: Mapping[str, Path], ledger: Ledger, doc: str = "app") -> list[Violation]:
    """Every settings key the ledger set is in every device's settings file (``files``:
    device name -> its mapped JSON file)."""
    want = ledger.settings.get(doc, {})
    out = []
    for name, path in files.items():
        try:
            got: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            out.append(Violation("lost", f"{name}: settings file unreadable: {exc}"))
            continue
        missing = {k: v for k, v in want.items() if got.get(k) != v}
        if missing:
            out.append(
                Violation("lost", f"{name}: {len(missing)} settings missing: {list(missing)[:10]}")
            )
    return out


class OutsideWatch:
    """A listing (path, size, mtime) of everything under ``root`` except ``allowed`` subtrees
    and files, plus a sentinel file in ``root``; ``changes()`` lists what differs now."""

    SENTINEL = "chaos-sentinel.txt"

    def __init__(self, root: Path, allowed: Sequence[Path]) -> None:
        self.root = root
        self.allowed = [p.resolve() for p in allowed]
        (root / self.SENTINEL).write_text("nothing may touch this file\n")
        self.before = self._listing()

    def _skip(self, p: Path) -> bool:
        rp = p.resolve()
        return any(rp == a or a in rp.parents for a in self.allowed)

    def _listing(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            d = Path(dirpath)
            dirnames[:] = [n for n in dirnames if not self._skip(d / n)]
            for n in dirnames + filenames:
                p = d / n
                if self._skip(p):
                    continue
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                size = 0 if p.is_dir() else st.st_size
                out[str(p.relative_to(self.root))] = (size, 0 if p.is_dir() else st.st_mtime_ns)
        return out

    def changes(self) -> list[Violation]:
        now = self._listing()
        out = []
        for p in sorted(set(now) | set(self.before)):
            if now.get(p) != self.before.get(p):
                what = (
                    "created" if p not in self.before else "removed" if p not in now else "changed"
                )
                out.append(Violation("outside", f"{what} outside every space root: {p}"))
        return out


def check_plaintext(dirs: Sequence[Path], ledger: Ledger) -> list[Violation]:
    needles = ledger.needles()
    out = []
    for d in dirs:
        if not d.exists():
            continue
        for path, needle in grep_bytes(d, needles)[:20]:
            out.append(Violation("plaintext", f"{path} contains {needle[:40]!r}"))
    return out


def check_processes(relay: Relay | None, devices: Sequence[Device]) -> list[Violation]:
    out = []
    procs: list[tuple[str, Any, str]] = [(f"agent {d.name}", d.proc, d.log()) for d in devices]
    if relay is not None:
        procs.append(("relay", relay.proc, relay.log()))
    for name, proc, log in procs:
        if proc is None:
            out.append(Violation("died", f"{name} is not running (stopped and not restarted)"))
        elif proc.poll() is not None:
            out.append(Violation("died", f"{name} exited {proc.returncode}:\n{log[-3000:]}"))
    return out


def drop_counters(dev: Device) -> dict[str, int]:
    """Inputs a device refused or set aside, from its `status --json`."""
    st = dev.status() or {}
    c = {"quarantined": 0, "chunks_refused": 0, "lan_refused": 0, "settings_invalid": 0}
    for s in st.get("spaces", []):
        c["quarantined"] += s.get("quarantined", 0)
        c["chunks_refused"] += s.get("chunks_refused", 0)
        c["lan_refused"] += (s.get("lan") or {}).get("refused", 0)
        c["settings_invalid"] += sum(1 for d in s.get("settings", []) if d["state"] == "invalid")
    return c


def check_counters(
    devices: Sequence[Device], expected_drops: Mapping[str, int] | None = None
) -> list[Violation]:
    expected = dict(expected_drops or {})
    totals: dict[str, int] = {}
    per_dev = {}
    for d in devices:
        c = drop_counters(d)
        per_dev[d.name] = c
        for k, v in c.items():
            totals[k] = totals.get(k, 0) + v
    out = []
    for k, v in totals.items():
        want = expected.get(k)
        if want is None and v:
            out.append(Violation("unexplained", f"{k}={v} with no hostile input: {per_dev}"))
        elif want is not None and v < want:
            out.append(Violation("unexplained", f"{k}={v}, the scenario dropped {want}: {per_dev}"))
    return out


def log_tracebacks(relay: Relay | None, devices: Sequence[Device]) -> list[str]:
    """Tracebacks in the logs: not a violation by themselves (some are logged on purpose),
    but worth a look in a report."""
    out = []
    logs = [(f"agent {d.name}", d.log()) for d in devices]
    if relay is not None:
        logs.append(("relay", relay.log()))
    for name, text in logs:
        for chunk in text.split("Traceback (most recent call last):")[1:]:
            lines = [ln for ln in chunk.strip().splitlines() if ln and not ln.startswith(" ")]
            out.append(f"{name}: {lines[0] if lines else '?'}")
    return out


def check_all(
    relay: Relay | None,
    devices: Sequence[Device],
    ledger: Ledger,
    *,
    watch: OutsideWatch | None = None,
    settings_files: Mapping[str, Path] | None = None,
    plaintext_dirs: Sequence[Path] = (),
    expected_drops: Mapping[str, int] | None = None,
    settle_timeout: float = SETTLE_TIMEOUT,
) -> list[Violation]:
    out = check_processes(relay, devices)
    if out:
        return out  # a dead process cannot converge; report that, not its consequences
    out += settle(devices, settle_timeout)
    if settings_files:
        out += _settle_settings(settings_files, ledger, settle_timeout)
    out += check_ledger(devices[0].tree(), ledger)
    if watch is not None:
        out += watch.changes()
    dirs = [*([relay.data] if relay is not None else []), *plaintext_dirs]
    out += check_plaintext(dirs, ledger)
    out += check_counters(devices, expected_drops)
    out += check_processes(relay, devices)
    return out


def _settle_settings(files: Mapping[str, Path], ledger: Ledger, timeout: float) -> list[Violation]:
    try:
        wait_until(
            lambda: not check_settings(files, ledger),
            timeout=timeout / 2,
            what="settings files hold every key",
            interval=0.3,
        )
    except AssertionError:
        return check_settings(files, ledger)
    return []


__all__ = [
    "OutsideWatch",
    "Violation",
    "check_all",
    "check_counters",
    "check_ledger",
    "check_plaintext",
    "check_processes",
    "check_settings",
    "describe_differences",
    "drop_counters",
    "format_violations",
    "log_tracebacks",
    "settle",
]
