"""Human rendering of a StatusReport: a compact table on a terminal, plain lines when piped."""

from __future__ import annotations

import sys

from qmoi_sync.agent.status import StatusReport


def render_status(report: StatusReport) -> None:
    if sys.stdout.isatty():
        _render_rich(report)
    else:
        _render_plain(report)


def _render_plain(report: StatusReport) -> None:
    d = report.device
    print(f"device  {d.name}  {d.id}")
    if not report.agent_running:
        print("agent   not running (showing what is on disk)")
    for s in report.spaces:
        relay = s.relay.url or "LAN only"
        conn = "connected" if s.relay.connected else "not connected"
        print(
            f"space   {s.name}  {s.state}  {s.folder}  relay {relay} ({conn})  "
            f"pending {s.pending_out}  conflicts {s.conflicts}  last sync {s.last_sync or '-'}"
        )
        for dev in s.devices:
            me = "  (this device)" if dev.this_device else ""
            print(f"  {dev.short_id}  {dev.name or '?'}  {dev.role}  {dev.platform or ''}{me}")
        for w in s.warnings:
            print(f"  warning: {w}")


def _render_rich(report: StatusReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    d = report.device
    console.print(f"[bold]{d.name}[/]  [dim]{d.id}[/]")
    if not report.agent_running:
        console.print("[yellow]agent not running[/] — showing what is on disk")
    colours = {"idle": "green", "syncing": "cyan", "offline": "yellow", "error": "red"}
    for s in report.spaces:
        colour = colours.get(s.state, "white")
        relay = s.relay.url or "LAN only"
        conn = "[green]connected[/]" if s.relay.connected else "[yellow]not connected[/]"
        console.print(
            f"\n[bold]{s.name}[/] [{colour}]{s.state}[/]  {s.folder}\n"
            f"  relay {relay} {conn} · pending {s.pending_out} · conflicts {s.conflicts}"
            f" · files {s.files} · last sync {s.last_sync or '—'}"
        )
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for col in ("device", "name", "role", "platform"):
            table.add_column(col)
        for dev in s.devices:
            name = (dev.name or "?") + (" (this device)" if dev.this_device else "")
            table.add_row(dev.short_id, name, dev.role, dev.platform or "")
        console.print(table)
        for w in s.warnings:
            console.print(f"  [yellow]warning:[/] {w}")
