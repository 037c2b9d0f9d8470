"""A Tk popup menu for pystray backends that show no menu of their own.

pystray's plain X11 backend (``xorg``: what Linux gets without PyGObject/AppIndicator) only
reports a left click, on which it runs the menu's default item. There the tray makes that
default item "Menu…", which pops this menu up at the pointer: the same entries
(``tray_model.MenuEntry``) whose commands call the same callbacks. Tk ships with Python (the
``tkinter`` module; on Debian the ``python3-tk`` package), so no further dependency.

Each popup runs in its own thread with its own Tk interpreter (created, used and destroyed in
that thread, as Tk requires); at most one is open at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from qmoi_sync.agent.tray_model import MenuEntry

log = logging.getLogger("qmoi_sync.tray")

_open = threading.Lock()


def available() -> bool:
    try:
        import tkinter  # noqa: F401
    except ImportError:
        return False
    return True


def popup(entries: tuple[MenuEntry, ...], run: Callable[[str], Any]) -> bool:
    """Show the menu at the pointer (non-blocking). False if one is already open."""
    if not _open.acquire(blocking=False):
        return False
    threading.Thread(target=_show, args=(entries, run), name="tray-popup", daemon=True).start()
    return True


def _show(entries: tuple[MenuEntry, ...], run: Callable[[str], Any]) -> None:
    try:
        import tkinter as tk

        root = tk.Tk(className="qmoi-sync-menu")
        root.withdraw()
        chosen: list[str] = []
        menu = _build(tk, root, entries, chosen)

        def finish() -> None:
            root.quit()

        # Unposted: by a choice, a click elsewhere or Escape. Tk unmaps the menu in all cases.
        menu.bind("<Unmap>", lambda _e: root.after(10, finish))
        x, y = root.winfo_pointerxy()
        menu.tk_popup(x, y)
        root.mainloop()
        root.destroy()
        for action in chosen:
            run(action)
    except Exception:
        log.exception("tray popup menu failed")
    finally:
        _open.release()


def _build(tk: Any, root: Any, entries: tuple[MenuEntry, ...], chosen: list[str]) -> Any:
    menu = tk.Menu(root, tearoff=0)
    for e in entries:
        if e.separator:
            menu.add_separator()
        elif e.submenu:
            menu.add_cascade(label=e.text, menu=_build(tk, root, e.submenu, chosen))
        elif e.action is not None:
            menu.add_command(label=e.text, command=lambda a=e.action: chosen.append(a))
        else:
            menu.add_command(label=e.text, state="disabled")
    return menu
