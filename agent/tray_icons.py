"""Tray icon images, drawn with Pillow (no image files to ship): a filled disc in the state's
colour (``tray_model.COLOURS``) with a white glyph — a tick (synced), two arrows (syncing),
two bars (paused), an exclamation mark (error), a dash (offline)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from qmoi_sync.agent.tray_model import COLOURS, TrayState

WHITE = (255, 255, 255, 255)


def draw_icon(state: TrayState, size: int = 64) -> Image.Image:
    """An RGBA ``size`` x ``size`` icon for ``state``."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    s = size / 64  # glyphs are drawn on a 64-unit grid
    d.ellipse((2 * s, 2 * s, 62 * s, 62 * s), fill=(*COLOURS[state], 255))
    w = max(2, round(7 * s))
    if state is TrayState.SYNCED:
        d.line([(18 * s, 33 * s), (28 * s, 43 * s), (46 * s, 22 * s)], fill=WHITE, width=w)
    elif state is TrayState.SYNCING:
        d.line([(16 * s, 25 * s), (46 * s, 25 * s)], fill=WHITE, width=w)
        d.polygon([(44 * s, 15 * s), (54 * s, 25 * s), (44 * s, 35 * s)], fill=WHITE)
        d.line([(48 * s, 40 * s), (18 * s, 40 * s)], fill=WHITE, width=w)
        d.polygon([(20 * s, 30 * s), (10 * s, 40 * s), (20 * s, 50 * s)], fill=WHITE)
    elif state is TrayState.PAUSED:
        d.rectangle((21 * s, 18 * s, 28 * s, 46 * s), fill=WHITE)
        d.rectangle((36 * s, 18 * s, 43 * s, 46 * s), fill=WHITE)
    elif state is TrayState.ERROR:
        d.rectangle((28 * s, 14 * s, 36 * s, 38 * s), fill=WHITE)
        d.rectangle((28 * s, 44 * s, 36 * s, 51 * s), fill=WHITE)
    else:  # offline
        d.rectangle((18 * s, 29 * s, 46 * s, 36 * s), fill=WHITE)
    return img
