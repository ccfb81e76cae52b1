"""Image helpers shared by the stages (training grids, the eval report, the toy-teacher measurement)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def grid(rows: list[np.ndarray], scale: int = 2) -> Image.Image:
    """Stack image rows (each (K, H, W, 3) uint8, all the same shape) into one picture with 2-px white
    gutters, enlarged ``scale`` times with nearest-neighbour (small toy images stay crisp)."""
    k, h, w, _ = rows[0].shape
    canvas = np.full((len(rows) * (h + 2), k * (w + 2), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
