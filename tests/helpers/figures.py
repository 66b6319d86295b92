"""The recipes' figures read back as pixels: their size, and where each curve's color is drawn.

Matplotlib draws a plot's curves in its color cycle (C0, C1, C2, ... unless told otherwise); the
middle of an antialiased line is that exact color, which text, grid and fills never are.
"""

from typing import NamedTuple

import numpy as np

# Matplotlib's default color cycle: the 1st, 2nd and 3rd curve of an axes.
CYCLE = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C))


class Curve(NamedTuple):
    pixels: int  # how many pixels have the curve's color
    row: float  # their median row (0 at the top: the higher the value plotted, the smaller)
    width: int  # from the leftmost to the rightmost, in pixels


def read(path, figsize, dpi) -> np.ndarray:
    """The PNG's RGB pixels (uint8), after asserting it is ``figsize`` inches at ``dpi`` and not blank."""
    from matplotlib import image

    rgb = np.round(image.imread(path)[..., :3] * 255).astype(np.uint8)
    assert rgb.shape[:2] == (round(figsize[1] * dpi), round(figsize[0] * dpi)), rgb.shape
    # Text, grid and antialiased lines: hundreds of colors; an empty canvas has one.
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100
    return rgb


def curve(pixels: np.ndarray, color) -> Curve:
    rows, columns = np.nonzero(np.all(pixels == np.asarray(color, np.uint8), axis=-1))
    if not len(rows):
        return Curve(0, float("nan"), 0)
    return Curve(len(rows), float(np.median(rows)), int(columns.max() - columns.min() + 1))


def drawn(found: Curve, dpi) -> bool:
    """Whether ``found`` is more than its legend's sample: a line 2 em long (10 pt font), 1.5 pt wide."""
    legend_sample = 2 * 10 * 1.5 * (dpi / 72) ** 2
    return found.pixels > 2 * legend_sample


def band(pixels: np.ndarray, color, alpha) -> int:
    """How many pixels have ``color`` filled at ``alpha`` over white (``fill_between``'s band)."""
    blended = np.round(255 * (1 - alpha) + alpha * np.asarray(color, float))
    return int(np.all(np.abs(pixels.astype(float) - blended) <= 1, axis=-1).sum())
