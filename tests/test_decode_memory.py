"""Peak memory of one decode, measured in a fresh process against the bound stated in docs/SECURITY.md.

The child reads the file, notes its RSS, resets the kernel's peak-RSS mark (/proc/self/clear_refs)
and decodes; the peak above that baseline is what the decode cost. A lowered --max-pixels keeps CI
fast: the bound is relative to the image's 8-bit RGB size.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bench.corpus import png_bomb
from engine import outcomes as O
from engine.imagepolicy import COST, PEAK_SLACK, peak_factor

from .conftest import encode

LIMIT = 16_000_000  # --max-pixels of these tests: 4000 x 4000
MIB = 1 << 20

CHILD = r"""
import gc, json, sys
from engine.config import ImageConfig
from engine.decode import Rejected, decode

def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

data = open(sys.argv[1], "rb").read()
# What a worker has loaded before its first image (engine/forkwarm.py): Numba's alpha kernel, OpenCV
import cv2, numpy as np
from engine.decode import over_white
over_white(np.zeros((1, 1, 4), np.uint8))
gc.collect()
base = kib("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
except OSError:
    pass  # without the reset, the peak so far is the imports': at most the baseline
try:
    d = decode(data, ImageConfig(max_pixels=int(sys.argv[2])))
    result = {"outcome": "ok", "pixels": d.width * d.height, "shape": list(d.rgb.shape)}
except Rejected as e:
    result = {"outcome": e.outcome, "pixels": 0}
result["peak"] = kib("VmHWM") - base
print(json.dumps(result))
"""


def peak_of_decode(path) -> dict:
    """Decode one file in a fresh interpreter; its outcome and peak RSS above the baseline (bytes)."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(LIMIT)], capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout.splitlines()[-1])


def gradient(side: int) -> np.ndarray:
    """A side x side uint8 pattern that compresses well but is not flat."""
    x = np.arange(side, dtype=np.uint32)
    return ((x[:, None] * 7 + x[None, :] * 3) % 251).astype(np.uint8)


def test_png_bomb_is_refused_from_its_header(tmp_path):
    """30000 x 30000 in under a megabyte: refused before one row is inflated (main used 860 MiB)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(30000 * 30000))
    got = peak_of_decode(path)
    assert got["outcome"] == O.DECOMPRESSION_BOMB
    assert got["peak"] < 8 * MIB, got


@pytest.mark.parametrize("kind", ["png16_gray", "png_rgba", "png_palette_transparent", "webp_rgba"])
def test_peak_memory_of_a_decode_at_the_pixel_limit(tmp_path, kind):
    """16-bit, alpha, palette+transparency and WebP images at the limit stay within the stated bound."""
    side = 4000 if kind != "webp_rgba" else int((LIMIT / COST["webp"]) ** 0.5)
    g = gradient(side)
    if kind == "png16_gray":
        data = encode(Image.fromarray(g.astype(np.uint16) * 257), "PNG", compress_level=1)
    elif kind == "png_palette_transparent":
        data = encode(Image.fromarray(g % 64).convert("P"), "PNG", compress_level=1, transparency=3)
    else:
        rgba = np.dstack([g, g[::-1], g.T, np.roll(g, side // 2, axis=1)])
        data = encode(Image.fromarray(rgba), "WEBP" if kind == "webp_rgba" else "PNG",
                      **({"lossless": True, "method": 0} if kind == "webp_rgba" else {"compress_level": 1}))
    path = tmp_path / kind
    path.write_bytes(data)
    got = peak_of_decode(path)
    assert got["outcome"] == O.OK and got["pixels"] == side * side, got
    rgb_bytes = 3 * side * side
    bound = peak_factor(kind.split("_")[0]) * rgb_bytes + PEAK_SLACK
    print(kind, f"peak {got['peak'] / MIB:.1f} MiB = {got['peak'] / rgb_bytes:.2f}x RGB, bound {bound / MIB:.1f} MiB")
    assert got["peak"] <= bound


def test_images_over_the_limit_are_refused_without_decoding(tmp_path):
    """One pixel row over the limit is refused from the header."""
    path = tmp_path / "over.png"
    path.write_bytes(encode(Image.fromarray(gradient(4001)[:, :4000].copy()), "PNG", compress_level=1))
    got = peak_of_decode(path)
    assert got["outcome"] == O.DECOMPRESSION_BOMB and got["peak"] < 8 * MIB, got
