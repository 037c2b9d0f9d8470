"""The icons drawn for each tray state (needs the tray extra's Pillow)."""

from __future__ import annotations

import pytest

pytest.importorskip("PIL", reason="Pillow is in the tray extra: pip install -e '.[tray]'")

from qmoi_sync.agent.tray_icons import draw_icon
from qmoi_sync.agent.tray_model import COLOURS, TrayState


@pytest.mark.parametrize("state", list(TrayState))
@pytest.mark.parametrize("size", [16, 22, 64])
def test_icon_is_the_state_colour_with_a_white_glyph(state: TrayState, size: int) -> None:
    img = draw_icon(state, size)
    assert img.size == (size, size) and img.mode == "RGBA"
    assert img.getpixel((0, 0))[3] == 0  # transparent corners
    colours = {c[:3] for _n, c in img.getcolors(size * size) or [] if c[3] == 255}
    assert COLOURS[state] in colours
    assert (255, 255, 255) in colours


def test_icons_differ_between_states() -> None:
    images = {s: draw_icon(s).tobytes() for s in TrayState}
    assert len(set(images.values())) == len(TrayState)
