"""The report's colours, one definition for report.html and the matplotlib figures.

Okabe–Ito's vermillion and blue (Okabe & Ito 2008): told apart with every common colour-vision deficiency,
unlike red against green. Harmful (S > 0) is vermillion, helpful (S < 0) blue, zero white.
"""
from __future__ import annotations

from typing import Dict, Tuple

RGB = Tuple[int, int, int]

SIDES: Dict[str, RGB] = {"harmful": (213, 94, 0), "helpful": (0, 114, 178), "neutral": (135, 149, 161)}


def hex_of(rgb: RGB) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def tint(rgb: RGB, t: float) -> RGB:
    """``rgb`` mixed with white: ``t = 0`` white, ``t = 1`` the colour itself."""
    return tuple(round(255 + (c - 255) * t) for c in rgb)  # type: ignore[return-value]


def diverging() -> "matplotlib.colors.Colormap":  # noqa: F821  (matplotlib imported by the caller's module)
    """helpful blue → white → harmful vermillion, for heatmaps centred on zero."""
    from matplotlib.colors import LinearSegmentedColormap

    stops = [hex_of(SIDES["helpful"]), "#ffffff", hex_of(SIDES["harmful"])]
    return LinearSegmentedColormap.from_list("msif_helpful_harmful", stops)
