"""Exact and near-duplicate detection across every shard of a run.

Hashes (pure functions of one image):
  content_hash  xxh3_64 of the downloaded bytes: the same file at two URLs.
  pixel_hash    xxh3_64 of the decoded RGB pixels and their shape: the same picture re-saved with
                other metadata or in a lossless format.
  phash         64-bit DCT perceptual hash (Numba): re-encoded, rescaled, slightly cropped copies land
                within a small Hamming distance of each other.

Index: `HammingIndex` answers "which stored hashes lie within distance k of q?" without a linear
scan (multi-index hashing: 64 bits cut into 4 bands of 16; two hashes within k differ in at most r_j bits
of some band j, where sum(r_j + 1) = k + 1, so probing every band's buckets within r_j finds all).

Shards and client: `DedupShard` holds part of the index (plain Python; the pipeline wraps it with
`ray.remote(DedupShard)`), `DedupClient` routes batches of claims to the shards and keeps
check-and-insert atomic across them (reserve -> query -> finalize; see docs/DEDUP.md for why two
near duplicates racing through different shards still keep exactly one).

Hashes are unsigned 64-bit Python ints. Parquet and Arrow store them as int64 with the same bits
(`to_int64` / `to_uint64`), because int64 columns sort and compare natively everywhere.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import xxhash
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .config import DedupConfig

DEFAULT_THRESHOLD = DedupConfig.near_distance
"""Default near-duplicate distance (--near-distance); bench/dedup_bench.py measured recall and false positives."""
NEW, DUPLICATE_EXACT, DUPLICATE_NEAR = "new", "duplicate_exact", "duplicate_near"
U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------- hashes

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


PHASH_SIDE = 32
"""The grayscale thumbnail the DCT runs on (classic pHash size)."""


def _zigzag_bits() -> tuple[np.ndarray, np.ndarray]:
    """The 64 lowest DCT frequencies after DC (by u+v, then u) and the hash bit each one sets.

    Consecutive frequencies go to bands 0, 1, 2, 3 in turn, so every band of the index mixes low and
    higher frequencies and the bucket sizes stay even.
    """
    order = sorted((u + v, u, v) for u in range(12) for v in range(12))[1:65]
    uv = np.array([(u, v) for _, u, v in order], np.int64)
    bit = np.array([BAND_STARTS[c % NBANDS] + c // NBANDS for c in range(64)], np.int64)
    return uv, bit


BAND_WIDTHS = (16, 16, 16, 16)
BAND_STARTS = (0, 16, 32, 48)
NBANDS = len(BAND_WIDTHS)
_STARTS, _WIDTHS = np.array(BAND_STARTS, np.int64), np.array(BAND_WIDTHS, np.int64)
_ZZ_UV, _ZZ_BIT = _zigzag_bits()
_DCT = np.array([[math.cos(math.pi * (2 * x + 1) * u / (2 * PHASH_SIDE)) for x in range(PHASH_SIDE)]
                 for u in range(int(_ZZ_UV.max()) + 1)], np.float64)


@njit(nogil=True, cache=True)
def _gray_thumbnail(rgb, n):
    """Luma of `rgb` area-averaged onto n x n (exact box weights, any size in, no aliasing).

    Each input row is turned into luma once and added, weighted, into the output rows it overlaps
    (a vectorised float32 loop); the n x n horizontal binning of those rows is then cheap.
    """
    h, w = rgb.shape[0], rgb.shape[1]
    sy, sx = h / n, w / n
    flat = rgb.reshape(h, w * 3)  # a constant stride of 3 lets LLVM vectorise the luma loop
    rows = np.zeros((n, w), np.float32)
    g = np.empty(w, np.float32)
    for y in range(h):
        for x in range(w):
            g[x] = (np.float32(0.299) * flat[y, 3 * x] + np.float32(0.587) * flat[y, 3 * x + 1]
                    + np.float32(0.114) * flat[y, 3 * x + 2])
        for oy in range(int(y / sy), min(int(math.ceil((y + 1) / sy)), n)):
            wy = np.float32(min(y + 1.0, (oy + 1) * sy) - max(float(y), oy * sy))
            if wy > 0:
                r = rows[oy]
                for x in range(w):
                    r[x] += wy * g[x]
    out = np.empty((n, n), np.float64)
    for ox in range(n):
        x0, x1 = ox * sx, (ox + 1) * sx
        for oy in range(n):
            s = 0.0
            for x in range(int(x0), min(int(math.ceil(x1)), w)):
                wx = min(x + 1.0, x1) - max(float(x), x0)
                if wx > 0:
                    s += wx * rows[oy, x]
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


def image_hashes(data: bytes, rgb: np.ndarray) -> tuple[int, int, int]:
    """(content, pixels, phash) of one downloaded and decoded image."""
    return content_hash(data), pixel_hash(rgb), phash(rgb)


def hamming(a: int, b: int) -> int:
    """Bits in which two 64-bit hashes differ."""
    return (a ^ b).bit_count()


# ------------------------------------------------------------------------------------ claims

class Claim(NamedTuple):
    """One image asking to be kept: its sample key and its three hashes (unsigned ints)."""

    key: str
    content: int
    pixels: int
    phash: int


class Verdict(NamedTuple):
    """The index's answer: NEW (keep it), or DUPLICATE_EXACT / DUPLICATE_NEAR of `owner_key`."""

    status: str
    owner_key: str | None = None
    distance: int | None = None


# ---------------------------------------------------------------------------- numba kernels

@intrinsic
def _popcount(typingctx, x):
    """Set bits of a uint64: LLVM's ctpop, one popcnt instruction (a SWAR version is 30x slower)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


@njit(nogil=True, cache=True)
def _bucket_of(h, start, width, kbits):
    """The top `kbits` bits of the band [start, start + width) of h: its bucket number."""
    return np.int64((h >> np.uint64(start + width - kbits)) & np.uint64((1 << kbits) - 1))


@njit(nogil=True, cache=True)
def _build_band(hashes, n, start, width, kbits, offsets, ids, sorted_h):
    """Counting sort of entries 0..n-1 by bucket into offsets[2^kbits + 1], ids[n] and sorted_h[n]."""
    nb = 1 << kbits
    offsets[:] = 0
    for i in range(n):
        offsets[_bucket_of(hashes[i], start, width, kbits) + 1] += 1
    for b in range(nb):
        offsets[b + 1] += offsets[b]
    fill = offsets[:-1].copy()
    for i in range(n):
        b = _bucket_of(hashes[i], start, width, kbits)
        ids[fill[b]] = i
        sorted_h[fill[b]] = hashes[i]
        fill[b] += 1


@njit(nogil=True, cache=True)
def _ball(base, kb, r, out):
    """Write every kb-bit value within Hamming distance r of `base` into out; returns how many."""
    m = 0
    pos = np.empty(max(r, 1), np.int64)
    for nflip in range(min(r, kb) + 1):
        for t in range(nflip):
            pos[t] = t
        while True:
            b = base
            for t in range(nflip):
                b ^= np.int64(1) << pos[t]
            out[m] = b
            m += 1
            t = nflip - 1  # advance to the next combination of nflip positions
            while t >= 0 and pos[t] == kb - nflip + t:
                t -= 1
            if t < 0:
                break
            pos[t] += 1
            for u in range(t + 1, nflip):
                pos[u] = pos[u - 1] + 1
    return m


def ball_size(kb: int, r: int) -> int:
    """How many kb-bit values lie within distance r of one (probes per band)."""
    return sum(math.comb(kb, i) for i in range(min(r, kb) + 1))


@njit(nogil=True, cache=True, inline="always")
def _count_within(sh, lo, hi, q, uk):
    """How many of sh[lo:hi] lie within uk of q (no early exit, so LLVM vectorises it)."""
    c = 0
    for p in range(lo, hi):
        c += _popcount(sh[p] ^ q) <= uk
    return c


@njit(nogil=True, cache=True)
def _search_kernel(queries, k, hashes, n_static, n_total, starts, widths, kbits, radii, offsets, ids, sorted_h,
                   scratch, out):
    """Write (query, entry, distance) of every stored hash within k into `out`; returns how many
    there are (if more than out holds, the caller retries with a bigger one). Probes the bands within
    their radii, then scans the entries added since the last rebuild; an entry may be reported once
    per band that finds it.

    offsets: (bands, 2^kbits + 1) bucket starts per band; ids: (bands, n_static) entry ids sorted by
    bucket; sorted_h: the hashes in the same order, so a bucket is verified with one sequential read.
    The hot loops only store into a preallocated array: growing one there costs 6x.
    """
    cap = out.shape[0]
    n = 0
    uk = np.uint64(k)
    for qi in range(queries.shape[0]):
        q = queries[qi]
        if n_static > 0:
            for j in range(starts.shape[0]):
                if radii[j] < 0:
                    continue
                off, sh, idj = offsets[j], sorted_h[j], ids[j]  # 1-D views: tight inner loop
                m = _ball(_bucket_of(q, starts[j], widths[j], kbits[j]), kbits[j], radii[j], scratch)
                for t in range(m):
                    b = scratch[t]
                    lo, hi = off[b], off[b + 1]
                    if _count_within(sh, lo, hi, q, uk) == 0:
                        continue  # the usual case, decided by a branch-free (SIMD) loop
                    for p in range(lo, hi):
                        d = _popcount(sh[p] ^ q)
                        if d <= uk:
                            if n < cap:
                                out[n, 0], out[n, 1], out[n, 2] = qi, idj[p], d
                            n += 1
        n = _scan_range(q, qi, uk, hashes, n_static, n_total, out, n)
    return n


@njit(nogil=True, cache=True, inline="always")
def _scan_range(q, qi, uk, hashes, lo, hi, out, n):
    """Append (query, entry, distance) for hashes[lo:hi] within uk of q; returns the new count."""
    cap = out.shape[0]
    for i in range(lo, hi):
        d = _popcount(hashes[i] ^ q)
        if d <= uk:
            if n < cap:
                out[n, 0], out[n, 1], out[n, 2] = qi, i, d
            n += 1
    return n


@njit(nogil=True, cache=True)
def _scan_kernel(queries, k, hashes, n_total, out):
    """Like _search_kernel by a plain scan of hashes[:n_total] (the small table of pending claims)."""
    n = 0
    uk = np.uint64(k)
    for qi in range(queries.shape[0]):
        n = _scan_range(queries[qi], qi, uk, hashes, 0, n_total, out, n)
    return n


def _collect(kernel, *args) -> np.ndarray:
    """Run a hit-writing kernel, again with a big enough buffer if the first one overflowed."""
    out = np.empty((256, 3), np.int64)
    n = kernel(*args, out)
    if n > len(out):
        out = np.empty((n, 3), np.int64)
        kernel(*args, out)
    return out[:n]


def scan(queries: np.ndarray, k: int, hashes: np.ndarray) -> np.ndarray:
    """Rows (query index, entry, distance) of every hashes[i] within k of a query, by a plain scan."""
    return _collect(_scan_kernel, np.ascontiguousarray(queries, np.uint64), k, hashes, len(hashes))


def band_radii(k: int) -> np.ndarray:
    """Probe radius per band such that sum(r_j + 1) = k + 1 (pigeonhole: some band is within r_j)."""
    total = k + 1
    return np.array([total // NBANDS + (1 if j < total % NBANDS else 0) - 1 for j in range(NBANDS)], np.int64)


# ------------------------------------------------------------------------------ the index

class Tables(NamedTuple):
    """Band tables over entries 0..n_static-1; immutable once built (a rebuild makes new ones)."""

    n_static: int
    kbits: np.ndarray    # (bands,) bucket bits: the top kbits bits of each band
    offsets: np.ndarray  # (bands, 2^kbits + 1) int32: first position of each bucket
    ids: np.ndarray      # (bands, n_static) int32: entry ids sorted by bucket
    sorted: np.ndarray   # (bands, n_static) uint64: their hashes, so a bucket is verified sequentially


class Snapshot(NamedTuple):
    """What a lock-free search reads: the hash array, how many entries count, and the tables."""

    phash: np.ndarray
    n: int
    tables: Tables


def build_tables(phash: np.ndarray, n: int) -> Tables:
    """Counting-sort entries 0..n-1 into every band (bucket bits follow the size: ~8-16 per bucket)."""
    if n >= 2**31:
        raise ValueError("one index shard holds at most 2^31 hashes; use more --index-shards")
    kb = int(min(BAND_WIDTHS[-1], max(4, math.ceil(math.log2(max(n, 1))) - 3)))
    t = Tables(n, np.array([kb] * NBANDS, np.int64), np.zeros((NBANDS, (1 << kb) + 1), np.int32),
               np.zeros((NBANDS, n), np.int32), np.zeros((NBANDS, n), np.uint64))
    for j in range(NBANDS):
        _build_band(phash, n, BAND_STARTS[j], BAND_WIDTHS[j], kb, t.offsets[j], t.ids[j], t.sorted[j])
    return t


class HammingIndex:
    """Stored hashes with their keys, searchable within Hamming distance `k` without a linear scan.

    Entries are appended to flat numpy arrays and never change. Four band tables (entry ids sorted
    by bucket, CSR style) cover the entries up to `tables.n_static`; newer ones are scanned directly
    until there are enough of them to rebuild. Tables are immutable and swapped whole, so a search
    can run on a snapshot without any lock while claims are inserted and tables rebuilt.
    """

    def __init__(self, k: int = DEFAULT_THRESHOLD, capacity: int = 1024):
        DedupConfig(near_distance=k)  # its one range check, naming --near-distance
        self.k = k
        self.radii = band_radii(k)
        self.phash = np.zeros(capacity, np.uint64)
        self.content = np.zeros(capacity, np.uint64)
        self.pixels = np.zeros(capacity, np.uint64)
        self.keys = np.zeros(capacity, "S12")
        self.n = 0
        self.tables = build_tables(self.phash, 0)

    def __len__(self) -> int:
        return self.n

    def add(self, phash: np.ndarray, content: np.ndarray, pixels: np.ndarray, keys: Sequence[str]) -> int:
        """Append entries (arrays of uint64, keys as str); returns the id of the first one."""
        m = len(keys)
        self._reserve(self.n + m)
        enc = [key.encode() for key in keys]
        width = max((len(e) for e in enc), default=0)
        if width > self.keys.dtype.itemsize:
            self.keys = self.keys.astype(f"S{width}")
        s = slice(self.n, self.n + m)
        self.phash[s], self.content[s], self.pixels[s], self.keys[s] = phash, content, pixels, enc
        first, self.n = self.n, self.n + m
        return first

    def _reserve(self, need: int) -> None:
        """Grow the entry arrays (doubling) to hold `need` entries."""
        if need <= len(self.phash):
            return
        cap = max(need, 2 * len(self.phash))
        for name in ("phash", "content", "pixels", "keys"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def _delta_limit(self) -> int:
        """Entries left out of the band tables before a rebuild: ~sqrt(400 n) balances the scan of
        the recent entries (~0.4 ns each per search) against the rebuild (~160 ns per entry)."""
        return int(min(262_144, max(4096, math.sqrt(400 * self.n))))

    def needs_rebuild(self, snap: Snapshot | None = None) -> bool:
        """Whether so many entries lie outside the band tables that searches slow down."""
        snap = snap or self.snapshot()
        return snap.n - snap.tables.n_static > self._delta_limit()

    def snapshot(self) -> Snapshot:
        """The entries and tables as they are now; later inserts and rebuilds leave it intact."""
        return Snapshot(self.phash, self.n, self.tables)

    def rebuild(self) -> None:
        """Re-sort the band tables over every entry."""
        self.install(build_tables(self.phash, self.n))

    def install(self, tables: Tables) -> None:
        """Use freshly built tables (built from a snapshot, maybe while others kept searching)."""
        if tables.n_static > self.tables.n_static:
            self.tables = tables

    def search(self, queries: np.ndarray, snap: Snapshot | None = None) -> np.ndarray:
        """Rows (query index, entry id, distance) of every entry of `snap` within k, each pair once.

        Without a snapshot: of every entry now, rebuilding the tables first if they lag behind.
        Safe without the shard's lock: it only reads arrays that are never written below snap.n.
        """
        if snap is None:
            if self.needs_rebuild():
                self.rebuild()
            snap = self.snapshot()
        t = snap.tables
        scratch = np.empty(ball_size(int(t.kbits.max()), int(self.radii.max())), np.int64)
        hits = _collect(_search_kernel, np.ascontiguousarray(queries, np.uint64), self.k, snap.phash,
                        t.n_static, snap.n, _STARTS, _WIDTHS, t.kbits, self.radii, t.offsets, t.ids, t.sorted,
                        scratch)
        return np.unique(hits, axis=0) if len(hits) > 1 else hits

    def search_since(self, queries: np.ndarray, start: int) -> np.ndarray:
        """Like search, over the entries added since a snapshot of `start` entries (a plain scan)."""
        hits = scan(queries, self.k, self.phash[start: self.n])
        hits[:, 1] += start
        return hits

    def key(self, i: int) -> str:
        """The sample key of entry i."""
        return self.keys[i].decode()

    def nbytes(self) -> int:
        """Bytes held by the arrays (capacity included)."""
        t = self.tables
        arrays = [self.phash, self.content, self.pixels, self.keys, t.offsets, t.ids, t.sorted]
        return sum(a.nbytes for a in arrays)


# ------------------------------------------------------------------------------- a shard

class _Pending:
    """Claims reserved by a multi-shard client and not yet finalized (a few batches at most)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.rows: list[list] = []  # [key, content, pixels, phash, beaten_by (status, key, dist) | None, t]
        self.where: dict[int, int] = {}
        self.hashes = np.zeros(64, np.uint64)  # phash of row i at i; capacity doubles

    @property
    def phash(self) -> np.ndarray:
        """The pending claims' perceptual hashes, in row order."""
        return self.hashes[: len(self.tokens)]

    def add(self, token: int, key: str, content: int, pixels: int, ph: int) -> None:
        """Reserve one claim (a second reserve of the same token replaces the first)."""
        self.remove(token)
        self.where[token] = len(self.tokens)
        self.tokens.append(token)
        self.rows.append([key, content, pixels, ph, None, time.monotonic()])
        if len(self.tokens) > len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
        self.hashes[len(self.tokens) - 1] = ph

    def remove(self, token: int) -> list | None:
        """Drop a reservation (swap with the last one); returns its row."""
        i = self.where.pop(token, None)
        if i is None:
            return None
        row, last = self.rows[i], len(self.tokens) - 1
        if i != last:
            self.tokens[i], self.rows[i] = self.tokens[last], self.rows[last]
            self.hashes[i] = self.hashes[last]
            self.where[self.tokens[i]] = i
        self.tokens.pop()
        self.rows.pop()
        return row

    def expire(self, ttl: float) -> int:
        """Forget reservations older than ttl seconds (their client died between phases)."""
        now = time.monotonic()
        if not self.rows or now - min(row[5] for row in self.rows) <= ttl:
            return 0
        old = [t for t, row in zip(self.tokens, self.rows, strict=True) if now - row[5] > ttl]
        for t in old:
            self.remove(t)
        return len(old)


def _kind(a_content: int, a_pixels: int, b_content: int, b_pixels: int) -> str:
    """Exact when bytes or pixels are equal, near otherwise."""
    return DUPLICATE_EXACT if a_content == b_content or a_pixels == b_pixels else DUPLICATE_NEAR


def _better(a: tuple | None, b: tuple) -> tuple:
    """Of two conflicts (status, owner, distance), the one to report: exact first, then closest."""
    if a is None:
        return b
    rank = lambda c: (c[0] != DUPLICATE_EXACT, c[2], c[1])  # noqa: E731
    return b if rank(b) < rank(a) else a


class DedupShard:
    """One part of the global index: the images whose key routes here, plus pending reservations.

    Plain Python so the in-process runner can use it directly and the Ray runner can wrap it with
    `ray.remote(DedupShard)`; every public method holds a lock, so each call is atomic either way.
    `claim` is the one-call check-and-insert for a single shard; `reserve`, `query` and `finalize`
    are the three phases `DedupClient` uses when there are several (docs/DEDUP.md).
    """

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, exact_only: bool = False,
                 pending_ttl_s: float = 600.0):
        self.exact_only = exact_only
        self.k = 0 if exact_only else threshold
        self.index = HammingIndex(self.k)
        self.pending = _Pending()
        self.pending_ttl_s = pending_ttl_s
        self.clusters: Counter = Counter()
        self.verdicts: Counter = Counter()
        self.lock = threading.Lock()
        self._building = False  # a rebuild of the band tables is under way (outside the lock)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()

    # -- one-call path (a single shard holds everything) --------------------------------------

    def claim(self, items: list[Claim]) -> list[Verdict]:
        """Check-and-insert a batch; earlier claims of the batch count as stored for later ones."""
        q, stored = self._search(items)
        with self.lock:
            found = self._conflicts(items, [(c.key, -1) for c in items], q, stored)
            kept: list[int] = []
            kept_set: set[int] = set()
            out = []
            inside = self._within_batch(items)
            for i, (c, (best, own)) in enumerate(zip(items, found, strict=True)):
                for j, d in inside.get(i, ()):
                    if j not in kept_set:
                        continue
                    if items[j].key == c.key:
                        own = own or d == 0  # the same claim twice in one batch: kept once
                    else:
                        best = _better(best, (_kind(c.content, c.pixels, items[j].content, items[j].pixels),
                                              items[j].key, d))
                if own or best is None:
                    if not own:
                        kept.append(i)
                        kept_set.add(i)
                    out.append(Verdict(NEW))
                else:
                    self.clusters[best[1]] += 1
                    out.append(Verdict(*best))
                self.verdicts[out[-1].status] += 1
            self._insert([items[i] for i in kept])
            return out

    def load(self, items: Iterable[Claim]) -> int:
        """Bulk insert claims known to be kept (resume); no checks. Returns how many."""
        items = list(items)
        with self.lock:
            self._insert(items)
        return len(items)

    # -- three-phase path (DedupClient with several shards) -----------------------------------

    def reserve(self, tickets: list[tuple]) -> list[None]:
        """Phase 1: hold (token, key, content, pixels, phash) claims as pending, visible to queries."""
        with self.lock:
            self.pending.expire(self.pending_ttl_s)
            for token, key, content, pixels, ph in tickets:
                self.pending.add(token, key, content, pixels, ph)
            return [None] * len(tickets)

    def query(self, tickets: list[tuple]) -> list[tuple | None]:
        """Phase 2: per ticket, (status, owner, distance, own) of its best conflict here, or None.

        A pending claim that loses to the asking ticket (it has the larger key) is marked beaten
        instead; `own` says this shard already stores the ticket's own key with the same hash.
        """
        claims = [Claim(*t[1:]) for t in tickets]
        q, stored = self._search(claims)
        with self.lock:
            found = self._conflicts(claims, [(t[1], t[0]) for t in tickets], q, stored)
            return [None if best is None and not own else (*(best or (None, None, None)), own)
                    for best, own in found]

    def finalize(self, decisions: list[tuple], duplicates: list[tuple[str, str]]) -> list[Verdict | None]:
        """Phase 3: per (token, keep, already_stored), store or drop the reservation.

        A claim the client wants to keep is stored unless a winning query beat it meanwhile; the
        verdict says which (None for claims the client already knows are duplicates).
        `duplicates` are the (owner key, status) of those, for the cluster stats.
        """
        with self.lock:
            for owner, status in duplicates:
                self.clusters[owner] += 1
                self.verdicts[status] += 1
            out: list[Verdict | None] = []
            kept: list[Claim] = []
            for token, keep, stored in decisions:
                row = self.pending.remove(token)
                if not keep:
                    out.append(None)
                    continue
                if stored:
                    out.append(Verdict(NEW))  # this key is already kept here (a retried task)
                elif row is None:
                    # the reservation expired: uniqueness can no longer be proven, so drop the image
                    out.append(Verdict(DUPLICATE_NEAR, None, None))
                elif row[4] is not None:
                    self.clusters[row[4][1]] += 1
                    out.append(Verdict(*row[4]))
                else:
                    kept.append(Claim(*row[:4]))
                    out.append(Verdict(NEW))
                self.verdicts[out[-1].status] += 1
            self._insert(kept)
            return out

    # -- shared helpers ------------------------------------------------------------------------

    def _search(self, claims: Sequence[Claim]) -> tuple[np.ndarray, tuple[np.ndarray, int]]:
        """The lock-free part of a check: (query hashes, (hits among a snapshot, its size)).

        Searches of concurrent calls run in parallel (Numba releases the GIL); whichever call finds
        the tables lagging rebuilds them here too, from a snapshot, while the others go on.
        """
        q = np.array([c.phash for c in claims], np.uint64)
        with self.lock:
            snap = self.index.snapshot()
            build = not self._building and self.index.needs_rebuild(snap)
            self._building = self._building or build
        if build:
            try:
                tables = build_tables(snap.phash, snap.n)
                with self.lock:
                    self.index.install(tables)
                snap = Snapshot(snap.phash, snap.n, tables)
            finally:
                self._building = False
        return q, (self.index.search(q, snap) if len(q) else np.zeros((0, 3), np.int64), snap.n)

    def _conflicts(self, claims: Sequence[Claim], priority: Sequence[tuple], q: np.ndarray,
                   stored: tuple[np.ndarray, int]) -> list[tuple[tuple | None, bool]]:
        """Per claim: (best conflict (status, owner, distance) or None, whether its own key is stored).

        Called under the lock with the lock-free hits of `_search`; adds the entries stored since.
        Stored entries always win. Between pending claims the smaller (key, token) wins: a claim
        that loses gets the conflict, one that wins marks the pending claim beaten.
        """
        out: list[list] = [[None, False] for _ in claims]
        if not claims:
            return []
        idx = self.index
        hits, seen = stored
        for qi, i, d in hits.tolist() + idx.search_since(q, seen).tolist():
            c, content, pixels = claims[qi], int(idx.content[i]), int(idx.pixels[i])
            if self.exact_only and c.content != content and c.pixels != pixels:
                continue
            owner = idx.key(i)
            if owner == c.key:
                out[qi][1] = out[qi][1] or d == 0
            else:
                out[qi][0] = _better(out[qi][0], (_kind(c.content, c.pixels, content, pixels), owner, d))
        pend = self.pending
        if pend.tokens:
            for qi, i, d in scan(q, self.k, pend.phash).tolist():
                c, row, token = claims[qi], pend.rows[i], pend.tokens[i]
                key, content, pixels, _, beaten, _ = row
                if key == c.key or (self.exact_only and c.content != content and c.pixels != pixels):
                    continue
                kind = _kind(c.content, c.pixels, content, pixels)
                if (key, token) < priority[qi]:
                    out[qi][0] = _better(out[qi][0], (kind, key, d))  # the earlier key wins: c loses
                elif beaten is None or (kind != DUPLICATE_EXACT, d) < (beaten[0] != DUPLICATE_EXACT, beaten[2]):
                    row[4] = (kind, c.key, d)  # c wins: that claim learns it at finalize
        return [(best, own) for best, own in out]

    def _within_batch(self, items: Sequence[Claim]) -> dict[int, list[tuple[int, int]]]:
        """For each claim, the earlier claims of the same batch within distance k: {i: [(j, d)]}."""
        if len(items) < 2:
            return {}
        q = np.array([c.phash for c in items], np.uint64)
        pairs: dict[int, list[tuple[int, int]]] = {}
        for i, j, d in scan(q, self.k, q).tolist():
            c, o = items[i], items[j]
            if j < i and not (self.exact_only and c.content != o.content and c.pixels != o.pixels):
                pairs.setdefault(i, []).append((j, d))
        return pairs

    def _insert(self, items: Sequence[Claim]) -> None:
        """Append kept claims to the index."""
        if items:
            self.index.add(np.array([c.phash for c in items], np.uint64),
                           np.array([c.content for c in items], np.uint64),
                           np.array([c.pixels for c in items], np.uint64), [c.key for c in items])

    def stats(self, top: int = 20) -> dict:
        """Sizes, verdict counts and the most frequent duplicate clusters [(owner key, count)]."""
        with self.lock:
            n = len(self.index)
            return {"entries": n, "pending": len(self.pending.tokens), "bytes": self.index.nbytes(),
                    "bytes_per_hash": round(self.index.nbytes() / n, 1) if n else None,
                    "verdicts": dict(self.verdicts), "top_clusters": self.clusters.most_common(top),
                    "clusters": len(self.clusters)}


# ------------------------------------------------------------------------------ the client

_POOL_LOCK = threading.Lock()
Call = Callable[..., list]
"""call(shard, method_name, *args) -> the method's result list (Ray: ray.get(...remote(...)))."""


def home_shard(key: str, n_shards: int) -> int:
    """The shard that stores claims of `key` (stable across processes and runs)."""
    return xxhash.xxh3_64_intdigest(key.encode()) % n_shards


class DedupClient:
    """Routes batches of claims to the index shards: one call per shard per phase, not per image.

    With one shard, a batch is one `claim` call. With several, each claim is reserved at its home
    shard, queried at every shard, then finalized at home (docs/DEDUP.md). Picklable, so the Ray
    runner can send it into every task; calls to several shards go out in parallel on threads.
    """

    def __init__(self, shards: Sequence, call: Call, parallel: bool = True):
        self.shards, self.call, self.parallel = list(shards), call, parallel
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):
        return {"shards": self.shards, "call": self.call, "parallel": self.parallel, "_pool": None}

    def _fan_out(self, calls: list[tuple[int, str, tuple]]) -> dict[int, list]:
        """Run (shard, method, args) calls, in parallel where there are several; results by shard."""
        run = lambda c: self.call(self.shards[c[0]], c[1], *c[2])  # noqa: E731
        if not self.parallel or len(calls) <= 1:
            return {c[0]: run(c) for c in calls}
        with _POOL_LOCK:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(32, len(self.shards)), thread_name_prefix="dedup")
        return dict(zip((c[0] for c in calls), self._pool.map(run, calls), strict=True))

    def claim(self, items: list[Claim]) -> list[Verdict]:
        """Verdicts for a batch of claims; check-and-insert is atomic across every caller."""
        if not items:
            return []
        if len(self.shards) == 1:
            return self.call(self.shards[0], "claim", list(items))
        n = len(self.shards)
        tickets = [(secrets.randbits(62), c.key, c.content, c.pixels, c.phash) for c in items]
        home = [home_shard(c.key, n) for c in items]
        by_home: dict[int, list[int]] = {}
        for i, h in enumerate(home):
            by_home.setdefault(h, []).append(i)
        self._fan_out([(h, "reserve", ([tickets[i] for i in idx],)) for h, idx in by_home.items()])
        answers = self._fan_out([(s, "query", (tickets,)) for s in range(n)])
        best: list[tuple | None] = [None] * len(items)
        own = [False] * len(items)
        for s in range(n):
            for i, a in enumerate(answers[s]):
                if a is not None:
                    own[i] = own[i] or a[3]
                    if a[0] is not None:
                        best[i] = _better(best[i], a[:3])
        calls = []
        for h, idx in by_home.items():
            decisions = [(tickets[i][0], best[i] is None or own[i], own[i]) for i in idx]
            dups = [(best[i][1], best[i][0]) for i in idx if best[i] is not None and not own[i]]
            calls.append((h, "finalize", (decisions, dups)))
        results = self._fan_out(calls)
        verdicts: list[Verdict | None] = [None] * len(items)
        for h, idx in by_home.items():
            for i, v in zip(idx, results[h], strict=True):
                verdicts[i] = v if v is not None else Verdict(*best[i])
        return verdicts  # type: ignore[return-value]

    def load(self, items: Iterable[Claim], batch: int = 100_000) -> int:
        """Bulk insert kept claims at their home shards (resume). Returns how many."""
        n, total, chunk = len(self.shards), 0, []
        for c in items:
            chunk.append(c)
            if len(chunk) >= batch:
                total += self._load(chunk, n)
                chunk = []
        return total + self._load(chunk, n)

    def _load(self, chunk: list[Claim], n: int) -> int:
        """One bulk insert per shard."""
        parts: dict[int, list[Claim]] = {}
        for c in chunk:
            parts.setdefault(home_shard(c.key, n), []).append(c)
        return sum(self._fan_out([(s, "load", (p,)) for s, p in parts.items()]).values())

    def stats(self, top: int = 20) -> dict:
        """The shards' stats summed, clusters merged across shards."""
        per = list(self._fan_out([(s, "stats", (top,)) for s in range(len(self.shards))]).values())
        clusters: Counter = Counter()
        verdicts: Counter = Counter()
        for p in per:
            clusters.update(dict(p["top_clusters"]))
            verdicts.update(p["verdicts"])
        entries = sum(p["entries"] for p in per)
        nbytes = sum(p["bytes"] for p in per)
        return {"shards": len(per), "entries": entries, "pending": sum(p["pending"] for p in per),
                "bytes": nbytes, "bytes_per_hash": round(nbytes / entries, 1) if entries else None,
                "verdicts": dict(verdicts), "top_clusters": clusters.most_common(top)}


# ------------------------------------------------------------------------------ resume

HASH_COLUMNS = ("key", "content_hash", "pixel_hash", "phash")


def iter_rebuild_items(paths: Iterable[str | os.PathLike], batch_size: int = 65_536) -> Iterator[Claim]:
    """Claims of every written sample (outcome "ok") in per-shard parquet files, streamed."""
    import pyarrow.parquet as pq

    for path in paths:
        f = pq.ParquetFile(path)
        for b in f.iter_batches(batch_size=batch_size, columns=[*HASH_COLUMNS, "outcome"]):
            cols = b.to_pydict()
            for key, content, pixels, ph, outcome in zip(*(cols[c] for c in HASH_COLUMNS), cols["outcome"],
                                                         strict=True):
                if outcome == "ok" and ph is not None:
                    yield Claim(key, to_uint64(content), to_uint64(pixels), to_uint64(ph))


def rebuild_items_from_parquet(paths: Iterable[str | os.PathLike]) -> list[Claim]:
    """The claims of completed shards, to `load` into a fresh index on resume."""
    return list(iter_rebuild_items(paths))
