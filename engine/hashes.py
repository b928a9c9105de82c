"""The three hashes of one image, pure functions of its bytes and pixels (engine/dedup.py compares them).

  content_hash  xxh3_64 of the downloaded bytes: the same file at two URLs.
  pixel_hash    xxh3_64 of the decoded RGB pixels and their shape: the same picture re-saved with
                other metadata or in a lossless format.
  phash         64-bit DCT perceptual hash (Numba, engine/hash_kernels.py): re-encoded, rescaled, slightly cropped copies land
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


KERNELS = ("_carry", "_gray_thumbnail", "_phash_kernel")
"""The Numba kernels, in engine/hash_kernels.py: still reachable here by these names."""


def __getattr__(name: str):
    """A kernel by its name here, importing Numba and the kernels then (tests read their signatures)."""
    if name in KERNELS:
        from . import hash_kernels

        return getattr(hash_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a decoded RGB uint8 (H, W, 3) image, as an unsigned int."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"phash wants an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    # Numba loads where pixels are hashed, not where this module is imported (the driver)
    from .hash_kernels import _phash_kernel

    return int(_phash_kernel(np.ascontiguousarray(rgb), _DCT, _ZZ_UV, _ZZ_BIT))


def image_hashes(data: bytes, rgb: np.ndarray) -> ImageHashes:
    """The three hashes of one downloaded and decoded image."""
    return ImageHashes(content_hash(data), pixel_hash(rgb), phash(rgb))
