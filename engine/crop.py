"""Crop: the shorter side resized to `size` (Lanczos by default), then a center square.

Resizing only the center square of the source (Pillow's `box`) gives the same pixels as
"resize, then crop" without ever resizing the discarded margins.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from . import outcomes as O
from .decode import Rejected

# Pillow's antialiasing filters, best quality first; `box` is area averaging, like OpenCV's
# INTER_AREA that img2dataset uses. Costs on 512 crops: bench/RESULTS.md (engine section).
FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centered square of side min(width, height), in source pixel coordinates."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def center_crop(rgb: np.ndarray, size: int, resample: str = "lanczos") -> np.ndarray:
    """A (size, size, 3) uint8 center crop, downscaled with `resample` (FILTERS); never upscaled."""
    height, width = rgb.shape[:2]
    if min(width, height) < size:
        raise Rejected(O.TOO_SMALL, f"decoded {width}x{height} below crop size {size}")
    box = center_box(width, height)
    if width == height == size:
        return np.ascontiguousarray(rgb)
    # reducing_gap: a box-filter pre-reduction for big ratios, then Lanczos; quality stays
    # indistinguishable from plain Lanczos at a fraction of the cost.
    out = Image.fromarray(rgb).resize((size, size), FILTERS[resample], box=box, reducing_gap=3.0)
    return np.asarray(out)
