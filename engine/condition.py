"""Condition stage: turn an RGB crop into its conditioning map (palette remap by default).

The palette remap reproduces ImageMagick 6's `-dither None -remap palette.png` bit for bit.
IM6 does not search the whole palette: it builds an octree of the palette colours (8 levels, one
bit of R, G and B per level, most significant first), walks a pixel down that tree through bits
7..1 as far as the palette has nodes, and only compares the colours below the *parent* of the
deepest node reached (the root's parent is the root). Among those it takes the smallest squared
RGB distance; ties go to the colour visited last in child order 0..7 (child id = r | g<<1 | b<<2),
i.e. the largest Morton key. Pixels are 8-bit values scaled by 257 (Q16), which scales every
distance by the same factor, so integer 8-bit distances give the same choice. For palettes whose
colours sit far apart in the tree (black/gray50/white) this equals the plain nearest colour (last
on ties); for others it does not, which is why the kernel follows the tree and not a plain argmin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numba import njit, prange

from .palette import DEFAULT_PALETTE, parse_palette, tree_order
from .sample import PackedMap, index_bits

Conditioner = Callable[[np.ndarray], np.ndarray]

# Threads pay only on idle cores: on a busy box waking them can cost a 4 ms scheduler tick, more
# than one thread needs for 1024x1024 (bench/remap_bench.py). Shard workers (512 crops) stay serial.
PARALLEL_MIN_PIXELS = 1 << 22


# ---------------------------------------------------------------------------------------------
# kernels


CHUNK = 256  # pixels per inner pass: small enough for L1, long enough for SIMD loops


@njit(nogil=True, cache=True)
def _scratch(pal):
    """Per-call scratch: columns r, g, b, limit, best, best_d, x (one row per colour), and |c|^2.

    Separate arrays, not rows of one: LLVM then knows they do not overlap and vectorizes."""
    sq = np.empty(pal.shape[0], np.int32)
    for i in range(pal.shape[0]):
        sq[i] = pal[i, 0] * pal[i, 0] + pal[i, 1] * pal[i, 1] + pal[i, 2] * pal[i, 2]
    col = (np.empty(CHUNK, np.int32), np.empty(CHUNK, np.int32), np.empty(CHUNK, np.int32),
           np.empty(CHUNK, np.int32), np.empty(CHUNK, np.int32), np.empty(CHUNK, np.int32))
    return col, np.empty((pal.shape[0], CHUNK), np.int32), sq


@njit(nogil=True, cache=True, inline="always")
def _nearest_chunk(pixels, lo, hi, pal, col, xs, sq) -> None:
    """IM's palette index of pixels[lo:hi] into col[4][:hi-lo], column-wise so every inner loop
    is a branch-free SIMD loop."""
    n = hi - lo
    r, g, b, limit, best, best_d = col
    for q in range(n):
        r[q], g[q], b[q] = pixels[lo + q, 0], pixels[lo + q, 1], pixels[lo + q, 2]
        limit[q], best_d[q], best[q] = 255, 1 << 30, 0
    # x = (r^cr)|(g^cg)|(b^cb) has as many leading zero bits as tree levels the pixel shares
    # with colour c, so the smallest x over the palette gives the deepest node IM reaches.
    for i in range(pal.shape[0]):
        cr, cg, cb, x = pal[i, 0], pal[i, 1], pal[i, 2], xs[i]
        for q in range(n):
            x[q] = (r[q] ^ cr) | (g[q] ^ cg) | (b[q] ^ cb)
            limit[q] = min(limit[q], x[q])
    # IM walks bits 7..1 (at most 7 levels) and searches below the parent of the node it
    # reached: colour i is a candidate iff x_i < 2 * next_pow2(min x), and never below 4.
    for q in range(n):
        v = limit[q]
        v |= v >> 1
        v |= v >> 2
        v |= v >> 4
        limit[q] = max(4, 2 * v + 2)
    for i in range(pal.shape[0]):
        cr, cg, cb, c2, x = 2 * pal[i, 0], 2 * pal[i, 1], 2 * pal[i, 2], sq[i], xs[i]
        for q in range(n):
            # |p - c|^2 less the |p|^2 all colours share: the same order, three fewer subtractions
            d = c2 - (r[q] * cr + g[q] * cg + b[q] * cb)
            # "<=": among equal distances IM keeps the colour it visits last (octree order).
            take = (x[q] < limit[q]) & (d <= best_d[q])
            best_d[q] = d if take else best_d[q]
            best[q] = i if take else best[q]


MIXED = 255  # a cell whose colours do not all get one palette index (palettes of the table are smaller)
LUT_MAX_COLORS = 8  # the exhaustive table build grows with the palette: ~0.15 s at 3 colours, ~0.4 s at 8


@njit(nogil=True, cache=True)
def _cell_table(pal, cells) -> None:
    """cells[(r>>3)<<10 | (g>>3)<<5 | b>>3]: the index all 512 colours of that 8x8x8 cell get from
    the exact search, or MIXED. Exhaustive (all 2**24 colours), so a table hit is never a guess."""
    col, xs, sq = _scratch(pal)
    block = np.empty((512, 3), np.uint8)
    for c in range(1 << 15):
        r0, g0, b0 = (c >> 10) << 3, ((c >> 5) & 31) << 3, (c & 31) << 3
        for k in range(512):
            block[k, 0], block[k, 1], block[k, 2] = r0 + (k >> 6), g0 + ((k >> 3) & 7), b0 + (k & 7)
        first, same = -1, True
        for lo in range(0, 512, CHUNK):
            _nearest_chunk(block, lo, lo + CHUNK, pal, col, xs, sq)
            for q in range(CHUNK):
                first = col[4][q] if first < 0 else first
                same = same and col[4][q] == first
        cells[c] = first if same else MIXED


@njit(nogil=True, cache=True, inline="always")
def _pack_row(idx, w, bits, row) -> None:
    """PNG scanline: filter byte 0, then `bits`-bit indices packed from the top bit, zero-padded."""
    per = 8 // bits
    row[0] = 0
    for x in range(w, w + per):
        idx[x] = 0
    if bits == 2:  # the default 3-colour palette: unrolled, it vectorizes
        for j in range(-(-w // 4)):
            row[1 + j] = (idx[4 * j] << 6) | (idx[4 * j + 1] << 4) | (idx[4 * j + 2] << 2) | idx[4 * j + 3]
        return
    for j in range(-(-w // per)):
        acc = 0
        for t in range(per):
            acc = (acc << bits) | idx[j * per + t]
        row[1 + j] = acc


@njit(nogil=True, cache=True)
def _png_rows(rgb, pal, bits, cells, rows) -> None:
    """PNG scanlines of the (H, W, 3) image's palette indices, straight from the search (no index
    image). With a cell table (cells.size > 0), colours of a one-index cell take it from the table
    and only the rest, gathered per row, go through the exact search."""
    h, w = rgb.shape[0], rgb.shape[1]
    flat = rgb.reshape(h, w * 3)
    col, xs, sq = _scratch(pal)
    miss, where, idx = np.empty((w, 3), np.uint8), np.empty(w, np.int32), np.empty(w + 8, np.int32)
    cell = np.empty(w, np.int32)
    lut = cells.size > 0
    for y in range(h):
        p = flat[y]
        for x in range(w):  # a pass of its own vectorizes: 0.99 -> 0.72 CPU-ms per 512 crop of table lookups
            cell[x] = ((np.int32(p[3 * x]) & 0xF8) << 7) | ((np.int32(p[3 * x + 1]) & 0xF8) << 2) | (p[3 * x + 2] >> 3)
        m = 0
        for x in range(w):
            v = np.int32(cells[cell[x]]) if lut else MIXED
            idx[x] = v
            if v == MIXED:  # a few % of a photo's pixels: the branch predicts well
                miss[m, 0], miss[m, 1], miss[m, 2], where[m] = p[3 * x], p[3 * x + 1], p[3 * x + 2], x
                m += 1
        for lo in range(0, m, CHUNK):
            hi = min(m, lo + CHUNK)
            _nearest_chunk(miss, lo, hi, pal, col, xs, sq)
            for q in range(hi - lo):
                idx[where[lo + q]] = col[4][q]
        _pack_row(idx, w, bits, rows[y])


@njit(nogil=True, cache=True)
def _remap_range(pixels, pal, out, start, stop) -> None:
    """Remap pixels[start:stop] into out (RGB colours), chunk by chunk with one set of scratch columns."""
    col, xs, sq = _scratch(pal)
    for lo in range(start, stop, CHUNK):
        hi = min(stop, lo + CHUNK)
        _nearest_chunk(pixels, lo, hi, pal, col, xs, sq)
        for q in range(hi - lo):
            j = col[4][q]
            out[lo + q, 0], out[lo + q, 1], out[lo + q, 2] = pal[j, 0], pal[j, 1], pal[j, 2]


@njit(nogil=True, cache=True)
def _remap_serial(pixels: np.ndarray, pal: np.ndarray, out: np.ndarray) -> None:
    """Remap (N, 3) pixels into `out` on the calling thread."""
    _remap_range(pixels, pal, out, 0, pixels.shape[0])


@njit(nogil=True, cache=True, parallel=True)
def _remap_parallel(pixels: np.ndarray, pal: np.ndarray, out: np.ndarray) -> None:
    """Remap (N, 3) pixels into `out` on all Numba threads, in blocks of 64 Ki pixels."""
    n = pixels.shape[0]
    block = 65536
    for blk in prange((n + block - 1) // block):
        _remap_range(pixels, pal, out, blk * block, min(n, (blk + 1) * block))


# Numba's workqueue threading layer aborts on concurrent parallel launches; one at a time,
# and a caller that finds it busy runs serially (its own thread is the parallelism then).
_PARALLEL_LOCK = threading.Lock()


def remap_palette(rgb: np.ndarray, palette: np.ndarray, parallel: bool | None = None) -> np.ndarray:
    """Each pixel of an (H, W, 3) uint8 image replaced by its palette colour, as IM6 -remap does.

    `palette` is a parse_palette() array (a spec string is parsed too). `parallel=None` uses all
    Numba threads for images of PARALLEL_MIN_PIXELS or more.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    pal = tree_order(palette if isinstance(palette, np.ndarray) else parse_palette(palette))
    pixels = np.ascontiguousarray(rgb).reshape(-1, 3)
    out = np.empty_like(pixels)
    if parallel is None:
        parallel = pixels.shape[0] >= PARALLEL_MIN_PIXELS
    if parallel and _PARALLEL_LOCK.acquire(blocking=False):
        try:
            _remap_parallel(pixels, pal, out)
        finally:
            _PARALLEL_LOCK.release()
    else:
        _remap_serial(pixels, pal, out)
    return out.reshape(rgb.shape)


@njit(nogil=True, cache=True)
def _luma709_q16(pixels: np.ndarray, out: np.ndarray) -> None:
    """IM6 `-colorspace Gray` then PNG: Rec.709 luma weights on Q16 values, rounded, then truncated to 8 bits."""
    for p in range(pixels.shape[0]):
        y = 0.212656 * (pixels[p, 0] * 257.0) + 0.715158 * (pixels[p, 1] * 257.0)
        y = y + 0.072186 * (pixels[p, 2] * 257.0)
        q = min(max(int(y + 0.5), 0), 65535)
        v = q // 257  # IM6's 8-bit gray PNG writer truncates (its PNM writer would round)
        out[p, 0] = out[p, 1] = out[p, 2] = v


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """Grayscale map, equal to `convert-im6.q16 IN -colorspace Gray OUT.png`, as (H, W, 3) uint8."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    pixels = np.ascontiguousarray(rgb).reshape(-1, 3)
    out = np.empty_like(pixels)
    _luma709_q16(pixels, out)
    return out.reshape(rgb.shape)


# ---------------------------------------------------------------------------------------------
# registry: a conditioner is any (H, W, 3) uint8 -> (H, W, 3) uint8 function


def remap_packed(rgb: np.ndarray, palette: np.ndarray) -> PackedMap:
    """The remap of `rgb` as palette-PNG scanlines, packed by the search kernel itself (one pass).

    Palettes of up to LUT_MAX_COLORS colours first look each pixel's 8x8x8 cell up in a table
    (cell_table, exhaustive over all colours, built once per process); only pixels of cells that
    straddle a boundary are searched.

    Decodes to remap_palette(rgb, palette) pixel for pixel (tests/test_write.py)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    pal = tree_order(palette)
    bits = index_bits(len(pal))
    rows = np.empty((rgb.shape[0], 1 + -(-rgb.shape[1] * bits // 8)), np.uint8)
    cells = cell_table(pal.tobytes()) if len(pal) <= LUT_MAX_COLORS else np.empty(0, np.uint8)
    _png_rows(np.ascontiguousarray(rgb), pal, bits, cells, rows)
    return PackedMap(rows, pal.astype(np.uint8), bits, rgb.shape[1])


_TABLE_LOCK = threading.Lock()  # the shard's two CPU threads meet the first image together: build once


def cell_table(pal_bytes: bytes) -> np.ndarray:
    """The 32 Ki-cell table of a tree_order() palette (its bytes: hashable), built once per process."""
    with _TABLE_LOCK:
        return _build_table(pal_bytes)


@functools.lru_cache(maxsize=8)
def _build_table(pal_bytes: bytes) -> np.ndarray:
    """cell_table's build (cached in memory, and on disk beside Numba's cache: ~0.17 CPU-s saved
    in every later process, on a run's start-up path)."""
    cached = load_cells(TABLE_CACHE, pal_bytes)
    if cached is not None:
        return cached
    cells = np.empty(1 << 15, np.uint8)
    _cell_table(np.frombuffer(pal_bytes, np.int32).reshape(-1, 3), cells)
    save_cells(TABLE_CACHE, pal_bytes, cells)
    return cells


TABLE_CACHE = Path(__file__).parent / "__pycache__"
"""Where built cell tables are kept (Numba keeps this module's kernels there too)."""


def cells_file(folder: Path, pal_bytes: bytes) -> Path:
    """The table's file: named by this module's source and the palette, so an edit of either misses."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + pal_bytes).hexdigest()[:24]
    return folder / f"cells-{digest}.u8"


def load_cells(folder: Path, pal_bytes: bytes) -> np.ndarray | None:
    """A table saved before, or None (none, unreadable, or not a whole table)."""
    try:
        cells = np.fromfile(cells_file(folder, pal_bytes), np.uint8)
    except (OSError, ValueError):
        return None
    n = len(pal_bytes) // 12  # int32 RGB triples
    ok = len(cells) == 1 << 15 and bool(np.all((cells < n) | (cells == MIXED)))
    return cells if ok else None


def save_cells(folder: Path, pal_bytes: bytes, cells: np.ndarray) -> None:
    """Keep a built table for later processes (temp file, then rename: readers never see half of
    one); a folder that cannot be written only means the next process builds it again."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cells-")
        with os.fdopen(fd, "wb") as f:
            f.write(cells.tobytes())
        os.replace(tmp, cells_file(folder, pal_bytes))
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@dataclasses.dataclass(frozen=True, eq=False)
class PaletteConditioner:
    """The default: nearest palette colour as ImageMagick's -remap picks it (pickles for Ray)."""

    palette: np.ndarray
    """parse_palette() of the --palette spec."""

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The map as (H, W, 3) RGB."""
        return remap_palette(rgb, self.palette)

    def packed(self, rgb: np.ndarray) -> PackedMap:
        """The map as palette-PNG scanlines (engine.sample.encode_map_png writes them)."""
        return remap_packed(rgb, self.palette)


def _palette_conditioner(palette: str) -> Conditioner:
    """The default: nearest palette colour as ImageMagick's -remap picks it."""
    return PaletteConditioner(parse_palette(palette))


def _grayscale_conditioner(palette: str) -> Conditioner:
    """Grayscale (the palette is not used)."""
    return grayscale


CONDITIONERS: dict[str, Callable[[str], Conditioner]] = {
    "palette": _palette_conditioner,
    "grayscale": _grayscale_conditioner,
}


def make_conditioner(name: str = "palette", palette: str = DEFAULT_PALETTE) -> Conditioner:
    """The conditioner registered under `name`, built for `palette` where it uses one."""
    try:
        factory = CONDITIONERS[name]
    except KeyError:
        raise ValueError(f"unknown conditioner {name!r}; choose one of {sorted(CONDITIONERS)}") from None
    return factory(palette)
