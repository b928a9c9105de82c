"""The three hashes of one image, pure functions of its bytes and pixels (engine/dedup.py compares them).

  content_hash  xxh3_64 of the downloaded bytes: the same file at two URLs.
  pixel_hash    xxh3_64 of the decoded RGB pixels and their shape: the same picture re-saved with
                other metadata or in a lossless format.
  phash         64-bit DCT perceptual hash (Numba): re-encoded, rescaled, slightly cropped copies land
                within a small Hamming distance of each other.

Hashes are unsigned 64-bit Python ints. Parquet and Arrow store them as int64 with the same bits
(`to_int64` / `to_uint64`), because int64 columns sort and compare natively everywhere.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import numpy as np
import xxhash
from numba import njit

PHASH_VERSION = 1
"""Bump whenever `phash` changes its bits: run.json records it (engine/fingerprint.py), so a resumed
run never compares new hashes with the ones its finished shards stored under another version."""
PHASH_SIDE = 32
"""The grayscale thumbnail the DCT runs on (classic pHash size)."""
BAND_WIDTHS = (16, 16, 16, 16)
"""The hash's bit layout: four 16-bit bands, which the index (engine/hamming.py) probes one by one."""
BAND_STARTS = (0, 16, 32, 48)
NBANDS = len(BAND_WIDTHS)
U64 = (1 << 64) - 1


class ImageHashes(NamedTuple):
    """The three hashes of one image (unsigned 64-bit ints)."""

    content: int
    pixels: int
    phash: int


def content_hash(data: bytes) -> int:
    """xxh3_64 of the downloaded bytes, as an unsigned int."""
    return xxhash.xxh3_64_intdigest(data)


def pixel_hash(rgb: np.ndarray) -> int:
    """xxh3_64 of the decoded pixels and their shape (the same bytes in another shape differ)."""
    h = xxhash.xxh3_64(struct.pack("<3q", *rgb.shape, *([0] * (3 - rgb.ndim))))
    h.update(np.ascontiguousarray(rgb).data)
    return h.intdigest()


def to_int64(value: int) -> int:
    """uint64 -> int64 with the same bits (for parquet / Arrow int64 columns)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def to_uint64(value: int) -> int:
    """int64 (as stored in parquet) -> the uint64 hash."""
    return value & U64


def hamming(a: int, b: int) -> int:
    """Bits in which two 64-bit hashes differ."""
    return (a ^ b).bit_count()


def _zigzag_bits() -> tuple[np.ndarray, np.ndarray]:
    """The 64 lowest DCT frequencies after DC (by u+v, then u) and the hash bit each one sets.

    Consecutive frequencies go to bands 0, 1, 2, 3 in turn, so every band of the index mixes low and
    higher frequencies and the bucket sizes stay even.
    """
    order = sorted((u + v, u, v) for u in range(12) for v in range(12))[1:65]
    uv = np.array([(u, v) for _, u, v in order], np.int64)
    bit = np.array([BAND_STARTS[c % NBANDS] + c // NBANDS for c in range(64)], np.int64)
    return uv, bit


_ZZ_UV, _ZZ_BIT = _zigzag_bits()
_DCT = np.array([[math.cos(math.pi * (2 * x + 1) * u / (2 * PHASH_SIDE)) for x in range(PHASH_SIDE)]
                 for u in range(int(_ZZ_UV.max()) + 1)], np.float64)


@njit(nogil=True, cache=True)
def _carry(short, whole):
    """whole += short; short = 0 (the uint16 row sums before they could overflow)."""
    for i in range(short.shape[0]):
        whole[i] += short[i]
        short[i] = 0


@njit(nogil=True, cache=True)
def _gray_thumbnail(rgb, n):
    """Luma of `rgb` area-averaged onto n x n (exact box weights, any size in, no aliasing).

    Per output row, the input rows wholly inside it are summed as integers (uint8 into uint16, 16
    lanes per vector, carried into uint32 every 257 rows) and the at most two rows it shares with a
    neighbour are added weighted; luma is taken of those sums (it is linear), then the n x n
    horizontal binning is cheap. The sums are exact, so the hash is that of the plain box average.
    """
    h, w = rgb.shape[0], rgb.shape[1]
    sy, sx = h / n, w / n
    flat = rgb.reshape(h, w * 3)
    m = w * 3
    short = np.zeros(m, np.uint16)  # up to 257 rows of 255 fit
    whole = np.zeros(m, np.uint32)
    part = np.zeros(m, np.float32)
    luma = np.empty((n, w), np.float64)
    for oy in range(n):
        y0, y1 = oy * sy, (oy + 1) * sy
        whole[:] = 0
        part[:] = 0
        rows = 0
        for y in range(int(y0), min(int(math.ceil(y1)), h)):
            wy = min(y + 1.0, y1) - max(float(y), y0)
            src = flat[y]
            if wy == 1.0:
                for i in range(m):
                    short[i] += np.uint16(src[i])
                rows += 1
                if rows == 257:
                    _carry(short, whole)
                    rows = 0
            elif wy > 0:
                f = np.float32(wy)
                for i in range(m):
                    part[i] += f * np.float32(src[i])
        _carry(short, whole)
        for x in range(w):
            luma[oy, x] = (0.299 * (whole[3 * x] + part[3 * x]) + 0.587 * (whole[3 * x + 1] + part[3 * x + 1])
                           + 0.114 * (whole[3 * x + 2] + part[3 * x + 2]))
    out = np.empty((n, n), np.float64)
    for ox in range(n):
        x0, x1 = ox * sx, (ox + 1) * sx
        for oy in range(n):
            s = 0.0
            for x in range(int(x0), min(int(math.ceil(x1)), w)):
                wx = min(x + 1.0, x1) - max(float(x), x0)
                if wx > 0:
                    s += wx * luma[oy, x]
            out[oy, ox] = s / (sx * sy)
    return out


@njit(nogil=True, cache=True)
def _phash_kernel(rgb, dct, zz_uv, zz_bit):
    """64 low DCT frequencies of the thumbnail, each bit set where the coefficient beats their median."""
    side = dct.shape[1]
    g = _gray_thumbnail(rgb, side)
    t = np.zeros((dct.shape[0], side), np.float64)  # rows: frequency u, columns: x (no BLAS needed)
    for u in range(dct.shape[0]):
        for y in range(side):
            f = dct[u, y]
            for x in range(side):
                t[u, x] += f * g[y, x]
    coef = np.empty(zz_uv.shape[0], np.float64)
    for c in range(zz_uv.shape[0]):
        u, v = zz_uv[c, 0], zz_uv[c, 1]
        s = 0.0
        for x in range(dct.shape[1]):
            s += t[u, x] * dct[v, x]
        coef[c] = s
    med = np.median(coef)
    h = np.uint64(0)
    for c in range(coef.shape[0]):
        if coef[c] > med:
            h |= np.uint64(1) << np.uint64(zz_bit[c])
    return h


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a decoded RGB uint8 (H, W, 3) image, as an unsigned int."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"phash wants an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    return int(_phash_kernel(np.ascontiguousarray(rgb), _DCT, _ZZ_UV, _ZZ_BIT))


def image_hashes(data: bytes, rgb: np.ndarray) -> ImageHashes:
    """The three hashes of one downloaded and decoded image."""
    return ImageHashes(content_hash(data), pixel_hash(rgb), phash(rgb))
