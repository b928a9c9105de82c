"""Crop: the shorter side resized to `size` (bilinear by default), then a center square.

Only the center square of the source is resized, which gives the same pixels as "resize, then
crop" without ever resizing the discarded margins. After the decoder's DCT scaling the remaining
factor is at most 2 (decode.jpeg_scale): there OpenCV's SIMD resize of the square does the
job in about a tenth of Pillow's time. Larger factors (PNG, WebP and other formats no DCT scaling
shrinks, huge JPEGs) are area-averaged by OpenCV, first over whole k x k blocks: against a Lanczos
crop of the full image that scores as Pillow's widening bilinear did (PSNR mean 53.6 against 53.4 dB,
5th percentile 40.5 against 37.6) at under half its CPU (bench/RESULTS.md, "Session 23"). Lanczos
stays Pillow's.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from . import outcomes as O
from .decode import Rejected

# Workers already use every core (one shard task per core); OpenCV's own threads would only
# compete with them and hide their CPU time from the per-thread stage clocks.
cv2.setNumThreads(1)

# Pillow's antialiasing filters, best quality first; `box` is area averaging, like OpenCV's
# INTER_AREA that img2dataset uses. Costs on 512 crops: bench/RESULTS.md (engine section).
FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
# The same filters in OpenCV, used up to CV2_MAX_FACTOR (area averaging beyond). Lanczos is left to
# Pillow: OpenCV's 8x8 Lanczos is no faster than Pillow's. Quality and cost: bench/RESULTS.md (stage choices).
CV2_FILTERS = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "box": cv2.INTER_AREA}
CV2_MAX_FACTOR = 2.0
"""Largest downscale factor the chosen OpenCV filter takes (what a power-of-2 DCT scaling leaves): its
kernels keep a fixed support, which aliases little up to here."""


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centered square of side min(width, height), in source pixel coordinates."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def center_crop(rgb: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
    """A (size, size, 3) uint8 center crop, downscaled with `resample` (FILTERS); never upscaled."""
    height, width = rgb.shape[:2]
    side = min(width, height)
    if side < size:
        raise Rejected(O.TOO_SMALL, f"decoded {width}x{height} below crop size {size}")
    if width == height == size:
        return np.ascontiguousarray(rgb)
    if resample in CV2_FILTERS:
        square = box_reduced(rgb, side, size)
        if square.shape[0] == size:
            return np.ascontiguousarray(square)
        # After a block average the rest is area-averaged too: a fixed-support filter would alias what
        # an odd block leaves of fine detail (one-pixel stripes: tests/test_crop.py)
        interpolation = CV2_FILTERS[resample] if square.shape[0] == side else cv2.INTER_AREA
        return cv2.resize(square, (size, size), interpolation=interpolation)
    # reducing_gap: a box-filter pre-reduction for big ratios, then the filter; quality stays
    # indistinguishable from the plain filter at a fraction of the cost.
    out = Image.fromarray(rgb).resize((size, size), FILTERS[resample], box=center_box(width, height),
                                      reducing_gap=3.0)
    return np.asarray(out)


def box_reduced(rgb: np.ndarray, side: int, size: int) -> np.ndarray:
    """The center square, averaged over whole k x k blocks (OpenCV's INTER_AREA at an integer factor) until
    at most CV2_MAX_FACTOR x `size` is left: what Pillow's reducing_gap does before its filter, for the
    images no DCT scaling shrank (PNG, WebP, ...). Offsets are whole pixels, and the square loses at most
    k - 1 of them (at most half a block off Pillow's fractional box)."""
    k = -(-side // int(CV2_MAX_FACTOR * size))  # ceil
    side -= side % k
    height, width = rgb.shape[:2]
    top, left = (height - side) // 2, (width - side) // 2
    square = rgb[top:top + side, left:left + side]
    return square if k == 1 else cv2.resize(square, (side // k, side // k), interpolation=cv2.INTER_AREA)
