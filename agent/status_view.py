"""Human rendering of a StatusReport: a compact table on a terminal, plain lines when piped."""

from __future__ import annotations

import re
import sys

from qmoi_sync.agent.status import (
    AgentStatus,
    MemberStatus,
    SnapshotStatus,
    SpaceStatus,
    StatusReport,
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text that came from other devices (names, platforms, paths in warnings) may hold control
    characters: show them as \\xNN instead of sending escape sequences to the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _rich(text: str) -> str:
    """As printable(), and inert as rich markup (a peer named "[/]" must not crash ``status``)."""
    from rich.markup import escape

    return escape(printable(text))


def _agent_line(a: AgentStatus) -> str:
    p = a.policy
    power = "AC" if p.on_ac else ("battery" if p.on_ac is False else "power ?")
    if p.battery_percent is not None:
        power += f" {p.battery_percent:.0f}%"
    load = "?" if p.load is None else f"{p.load:.2f}"
    return (
        f"agent   pid {a.pid}  cpu {a.cpu_percent:.1f}%  rss {a.rss_bytes / 2**20:.0f} MiB  "
        f"up {a.uptime_s:.0f}s  policy {p.state}  ({power}, load {load})"
    )


def _path(dev: MemberStatus) -> str:
    """How this device reaches that one: "lan 10.0.0.7:47700 0.4 ms", "relay wss://… 12 ms"."""
    if dev.path is None:
        return ""
    rtt = f" {dev.rtt_ms:.1f} ms" if dev.rtt_ms is not None else ""
    return f"{dev.path} {printable(dev.address or '?')}{rtt}"


def _device_extra(dev: MemberStatus) -> str:
    parts = [_path(dev)] if dev.path else []
    c = dev.capabilities
    if c is not None:
        if c.on_ac is False and c.battery_percent is not None:
            parts.append(f"battery {c.battery_percent:.0f}%")
        if c.disk_free is not None:
            parts.append(f"{c.disk_free / 2**30:.1f} GiB free")
        if c.headless:
            parts.append("headless")
    if dev.last_seen:
        parts.append(f"seen {dev.last_seen[:19]}")
    return ", ".join(parts)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


def transfer_line(s: SpaceStatus) -> str:
    """Pending up/down (items and bytes, envelopes plus binary files) and the current rate."""
    up = s.pending_out + s.pending_up_files
    up_bytes = s.pending_out_bytes + s.pending_up_bytes
    down = s.pending_in + s.pending_down_files
    down_bytes = s.pending_in_bytes + s.pending_down_bytes
    return (
        f"pending up {up} ({_size(up_bytes)}) down {down} ({_size(down_bytes)})  "
        f"rate up {_size(s.rate_up_bps)}/s down {_size(s.rate_down_bps)}/s"
    )


def snapshot_line(snap: SnapshotStatus) -> str:
    """One line about a space's S3 snapshots: target, last one, duty, and the last error."""
    last = f"last {snap.last_id} at {snap.last_at}" if snap.last_id else "no snapshot yet"
    running = ", running now" if snap.running else ""
    line = f"snapshots {snap.target}: {last}{running}; {snap.duty}"
    if snap.last_error:
        line += f"; ERROR: {snap.last_error}"
    return line


def settings_line(s: SpaceStatus) -> str | None:
    """One line about a space's settings documents (agent/settings_sync.py): name and state."""
    if not s.settings:
        return None
    parts = []
    for d in s.settings:
        extra = f" ({d.keys} keys)" if d.state == "ok" else ""
        if d.conflicts:
            extra += f", {d.conflicts} conflict(s)"
        parts.append(f"{d.name} {d.state}{extra}")
    return "settings " + "; ".join(parts)


def render_status(report: StatusReport) -> None:
    if sys.stdout.isatty():
        _render_rich(report)
    else:
        _render_plain(report)


def _render_plain(report: StatusReport) -> None:
    d = report.device
    print(f"device  {printable(d.name)}  {d.id}")
    if not report.agent_running:
        print("agent   not running (showing what is on disk)")
    if report.agent is not None:
        print(_agent_line(report.agent))
        for reason in report.agent.policy.reasons:
            print(f"  policy: {printable(reason)}")
    for s in report.spaces:
        relay = s.relay.url or "LAN only"
        conn = "connected" if s.relay.connected else "not connected"
        print(
            f"space   {printable(s.name)}  {s.state}  {printable(s.folder)}  "
            f"relay {printable(relay)} ({conn})  "
            f"{transfer_line(s)}  conflicts {s.conflicts}  last sync {s.last_sync or '-'}"
            + (
                f"  lan {s.lan.peers} peer(s) on port {s.lan.port}"
                if s.lan and s.lan.enabled
                else ""
            )
            + (f"  {line}" if (line := chunk_paths_line(s)) else "")
        )
        for dev in s.devices:
            me = "  (this device)" if dev.this_device else ""
            extra = _device_extra(dev)
            extra = f"  {extra}" if extra else ""
            online = "online" if dev.online else "offline"
            print(
                f"  {dev.short_id}  {printable(dev.name or '?')}  {dev.role}  {online}  "
                f"{printable(dev.platform or '')}{me}{extra}"
            )
        if s.snapshot is not None and s.snapshot.target:
            print(f"  {printable(snapshot_line(s.snapshot))}")
        if (line := settings_line(s)) is not None:
            print(f"  {printable(line)}")
        for w in s.warnings:
            print(f"  warning: {printable(w)}")
        for line in refusal_lines(s):
            print(f"  {printable(line)}")


def refusal_lines(s: SpaceStatus) -> list[str]:
    """One line per offender and per open sequence gap (names came from other devices: the
    callers make them printable)."""
    out = []
    for o in s.offenders:
        who = o.id if o.short_id is None else f"{o.short_id} {o.name or '?'}"
        out.append(f"offender: {who}: {o.what} x{o.count} (last {o.last})")
    for g in s.gaps:
        out.append(
            f"gap: {g.short_id} {g.name or '?'}: {g.missing} envelope(s) missing from seq "
            f"{g.first_missing}, {g.held} held, since {g.since}, {g.repairs} repair attempt(s)"
        )
    for r in s.repaired_gaps:
        by = f" (from {r.by[:7]})" if r.by else ""
        out.append(
            f"gap repaired: {r.short_id} {r.name or '?'}: {r.missing} envelope(s) from seq "
            f"{r.first_missing}, by {r.how}{by} at {r.repaired_at}"
        )
    return out


def chunk_paths_line(s: SpaceStatus) -> str | None:
    """Where this device's binary-file chunks came from: "chunks 40 lan / 3 relay"."""
    if not (s.chunks_lan or s.chunks_relay):
        return None
    return f"chunks {s.chunks_lan} lan / {s.chunks_relay} relay"


def _render_rich(report: StatusReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    d = report.device
    console.print(f"[bold]{_rich(d.name)}[/]  [dim]{d.id}[/]")
    if not report.agent_running:
        console.print("[yellow]agent not running[/] — showing what is on disk")
    if report.agent is not None:
        policy_colour = "green" if report.agent.policy.state == "normal" else "yellow"
        console.print(f"[dim]{_agent_line(report.agent)}[/]")
        for reason in report.agent.policy.reasons:
            console.print(f"  [{policy_colour}]policy:[/] {_rich(reason)}")
    colours = {
        "idle": "green",
        "syncing": "cyan",
        "offline": "yellow",
        "error": "red",
        "paused": "magenta",
    }
    for s in report.spaces:
        colour = colours.get(s.state, "white")
        relay = s.relay.url or "LAN only"
        conn = "[green]connected[/]" if s.relay.connected else "[yellow]not connected[/]"
        console.print(
            f"\n[bold]{_rich(s.name)}[/] [{colour}]{s.state}[/]  {_rich(s.folder)}\n"
            f"  relay {_rich(relay)} {conn} · {transfer_line(s)} · conflicts {s.conflicts}"
            f" · files {s.files} · last sync {s.last_sync or '—'}"
            + (
                f" · LAN {s.lan.peers} peer(s), port {s.lan.port}"
                if s.lan and s.lan.enabled
                else ""
            )
            + (f" · {line}" if (line := chunk_paths_line(s)) else "")
        )
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for col in ("device", "name", "role", "", "platform", "path / resources / last seen"):
            table.add_column(col)
        for dev in s.devices:
            name = _rich(dev.name or "?") + (" (this device)" if dev.this_device else "")
            platform = _rich(dev.platform or "")
            online = "[green]online[/]" if dev.online else "[dim]offline[/]"
            table.add_row(dev.short_id, name, dev.role, online, platform, _device_extra(dev))
        console.print(table)
        if s.snapshot is not None and s.snapshot.target:
            colour = "red" if s.snapshot.last_error else "dim"
            console.print(f"  [{colour}]{_rich(snapshot_line(s.snapshot))}[/]")
        if (line := settings_line(s)) is not None:
            console.print(f"  [dim]{_rich(line)}[/]")
        for w in s.warnings:
            console.print(f"  [yellow]warning:[/] {_rich(w)}")
        for line in refusal_lines(s):
            console.print(f"  [red]{_rich(line)}[/]")
