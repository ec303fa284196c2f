"""One colour per device, the same in every view: the plan's layer stack, the cards, the plots' lines.

A device keeps the colour it was given the first time a view asked for it, so
a re-plan never repaints the fleet. The first colours are the Okabe–Ito
palette (told apart by colour-blind viewers too, and on a projector); past it,
hues are spread by the golden angle so a hundred devices stay distinct.
Plain ``#rrggbb`` strings: no Qt here, any view turns them into its own type.
"""
from __future__ import annotations

import colorsys

# Okabe & Ito, "Color Universal Design" (2008), without black (the text colour) and yellow (unreadable on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#7F6000", "#8C564B")
GOLDEN_ANGLE = 0.381966  # fraction of the hue circle between two successive generated colours

# Status colours of a device card (background, text).
STATUS_COLOURS = {
    "lost": ("#fde2e1", "#a1120b"),
    "error": ("#fde2e1", "#a1120b"),
    "training": ("#e3f4ea", "#0b5d2a"),
    "receiving": ("#e6effa", "#0b3d75"),
    "profiling": ("#e6effa", "#0b3d75"),
    "pairing": ("#fff4d6", "#6b4e00"),
}
DEFAULT_STATUS_COLOUR = ("#f4f5f7", "#202124")
SIMULATED_BADGE = ("#fff1c2", "#6b4e00")  # background, text


def generated(index: int) -> str:
    """The ``index``-th colour past the palette (0-based), as ``#rrggbb``."""
    hue = (0.58 + index * GOLDEN_ANGLE) % 1.0
    lightness = (0.42, 0.55, 0.34)[index % 3]  # vary the lightness too: neighbours in hue differ in it
    r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.65)
    return f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}"


class DeviceColours:
    """Hands out one stable colour per device id."""

    def __init__(self) -> None:
        self._of: dict[str, str] = {}

    def __call__(self, device: str) -> str:
        colour = self._of.get(device)
        if colour is None:
            n = len(self._of)
            colour = self._of[device] = PALETTE[n] if n < len(PALETTE) else generated(n - len(PALETTE))
        return colour

    def rename(self, old: str, new: str) -> None:
        """A device now known by another id keeps its colour."""
        if old in self._of and new not in self._of:
            self._of[new] = self._of.pop(old)

    def known(self) -> dict[str, str]:
        return dict(self._of)
