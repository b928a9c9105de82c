"""Source photos (scikit-image's shipped ones) and the views, grain and perceptual hash made of them."""

from __future__ import annotations

import functools
import random
from importlib.resources import files as _package_files

import numpy as np
from PIL import Image, ImageChops, ImageOps

# Only files that ship inside the scikit-image wheel (never the pooch-downloaded ones).
COLOR_PHOTOS = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
)
GRAY_PHOTOS = ("camera.png", "moon.png", "grass.png", "gravel.png", "brick.png", "coins.png")


_PHOTO_CACHE: dict[str, Image.Image] = {}


def load_photo(name: str) -> Image.Image:
    """One of scikit-image's shipped photos as RGB (or L for the gray ones), cached per process."""
    if name not in _PHOTO_CACHE:
        with Image.open(_package_files("skimage.data") / name) as im:
            _PHOTO_CACHE[name] = im.convert("L" if name in GRAY_PHOTOS else "RGB")
    return _PHOTO_CACHE[name]


def render(photo: str, width: int, height: int, rng: random.Random, grain: float = 0.0,
           tint: bool = False) -> Image.Image:
    """A width x height view of a photo (see `view`) with film grain."""
    im = view(photo, width, height, rng, tint)
    return add_grain(im, grain, rng) if grain > 0 else im


def view(photo: str, width: int, height: int, rng: random.Random, tint: bool = False) -> Image.Image:
    """A width x height view of a photo: one of 8 rotations/flips, a random crop window (40-100% of
    the largest one), tone jitter, resize. `tint` turns a gray photo into a duotone RGB one."""
    src = load_photo(photo)
    if tint and src.mode == "L":
        dark = tuple(rng.randint(0, 70) for _ in range(3))
        light = tuple(rng.randint(190, 255) for _ in range(3))
        src = ImageOps.colorize(src, black=dark, white=light)
    turn = rng.randrange(8)  # the dihedral group: views far apart to a perceptual hash
    if turn:
        src = src.transpose(list(Image.Transpose)[turn - 1])
    sw, sh = src.size
    scale = min(sw / width, sh / height) * rng.uniform(0.4, 1.0)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    x0, y0 = rng.randint(0, sw - cw), rng.randint(0, sh - ch)
    im = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.BICUBIC)
    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-8, 8)
    return im.point([min(255, max(0, round(v * gain + bias))) for v in range(256)] * len(im.getbands()))


_DCT32 = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(32) + 1) / 64)


def perceptual_hash(im: Image.Image) -> int:
    """The engine's 64-bit pHash when it imports (what its dedup compares), else a numpy twin:
    8x8 low DCT frequencies of a 32x32 luma thumbnail, DC left out."""
    try:
        from engine.hashes import phash
    except ImportError:
        g = np.asarray(im.convert("L").resize((32, 32), Image.BOX), np.float64)
        coef = (_DCT32 @ g @ _DCT32.T).ravel()[1:]
        return int.from_bytes(np.packbits(coef > np.median(coef)).tobytes(), "big")
    return phash(np.asarray(im.convert("RGB")))


# Views closer than this (bits of 64) are re-drawn, so the engine's near-duplicate filter (distance
# 4 by default) keeps every good image of the corpus.
MIN_HASH_DISTANCE = 10


def is_near(h: int, kept: list[int] | np.ndarray, k: int = MIN_HASH_DISTANCE) -> bool:
    """Whether hash h lies within k bits of any kept hash."""
    return any((h ^ x).bit_count() <= k for x in kept)


GRAIN_TILE = 1024


@functools.lru_cache(maxsize=64)
def _grain_tile(sigma: float) -> Image.Image:
    """A deterministic tile of gaussian noise around 128 (L mode)."""
    nprng = np.random.default_rng(int(sigma * 1000))
    noise = 128 + nprng.standard_normal((GRAIN_TILE, GRAIN_TILE), dtype=np.float32) * sigma
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "L")


def add_grain(im: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    """Add luminance film grain: upscaled small photos are far smoother than real ones, and grain
    brings the compressed sizes (and the decoder's work) to those of real photos. Tiled from a
    cached noise tile at a random offset, all in Pillow's C code, so it stays fast."""
    tile = _grain_tile(round(sigma * 2) / 2)
    w, h = im.size
    noise = Image.new("L", im.size)
    ox, oy = rng.randrange(GRAIN_TILE), rng.randrange(GRAIN_TILE)
    for y in range(-oy, h, GRAIN_TILE):
        for x in range(-ox, w, GRAIN_TILE):
            noise.paste(tile, (x, y))
    if im.mode != "L":
        noise = Image.merge(im.mode, (noise,) * len(im.getbands()))
    return ImageChops.add(im, noise, scale=1.0, offset=-128)
