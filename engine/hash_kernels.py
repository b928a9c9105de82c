"""The Numba kernels of the perceptual hash (engine/hashes.py), apart so that importing the hashes
costs no Numba: the driver imports engine/hashes.py for its constants and never hashes pixels."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


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
