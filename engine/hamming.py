"""The near-duplicate index: which stored 64-bit hashes lie within Hamming distance k of a query.

Multi-index hashing, no linear scan: the 64 bits are cut into 4 bands of 16 (engine/hashes.py lays
the pHash bits out for it); two hashes within k differ in at most r_j bits of some band j, where
sum(r_j + 1) = k + 1, so probing every band's buckets within r_j finds all (docs/DEDUP.md).
The kernels are Numba and release the GIL, so searches of concurrent claims run in parallel. Until
the first band tables (a few thousand entries) every search is a plain scan, which numpy does when it
is small: a run of fewer images never loads Numba's kernels in the driver (~0.6-0.8 CPU-s: Numba's
registries, scipy.linalg among them, then each kernel from the cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .config import DedupConfig
from .hashes import BAND_STARTS, BAND_WIDTHS, NBANDS

DEFAULT_THRESHOLD = DedupConfig.near_distance
"""Default near-duplicate distance (--near-distance); bench/dedup_bench.py measured recall and false positives."""
_STARTS, _WIDTHS = np.array(BAND_STARTS, np.int64), np.array(BAND_WIDTHS, np.int64)
KERNELS = ("_popcount", "_bucket_of", "_build_band", "_ball", "_count_within", "_search_kernel", "_scan_range",
           "_scan_kernel")
"""The Numba kernels, in engine/hamming_kernels.py: still reachable here by these names."""


def _kernels():
    """engine/hamming_kernels.py, imported on first use: Numba loads when a kernel first runs, not
    with this module (a driver whose index stays small never loads it: ~0.4 CPU-s)."""
    from . import hamming_kernels

    return hamming_kernels


def __getattr__(name: str):
    """A kernel by its name here (tests and benches call them so)."""
    if name in KERNELS:
        return getattr(_kernels(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def ball_size(kb: int, r: int) -> int:
    """How many kb-bit values lie within distance r of one (probes per band)."""
    return sum(math.comb(kb, i) for i in range(min(r, kb) + 1))


NUMPY_PAIRS = 1 << 18
"""Largest queries x entries scan done with numpy (a 2 MiB temporary, ~1.5 ms) instead of a kernel:
64 claims against the 4,096 entries held before the first band tables."""
_POP8 = np.array([bin(b).count("1") for b in range(256)], np.uint8)


def _bit_count_table(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 of a contiguous array, by a byte table (numpy < 2)."""
    return _POP8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


_bit_count = getattr(np, "bitwise_count", _bit_count_table)  # numpy >= 2 has it built in


def _scan_numpy(queries: np.ndarray, k: int, hashes: np.ndarray) -> np.ndarray:
    """_scan_kernel's rows (query index, entry, distance) by numpy, in the same order (query, then entry)."""
    d = _bit_count(queries[:, None] ^ hashes[None, :])
    qi, i = np.nonzero(d <= k)
    return np.stack([qi, i, d[qi, i]], axis=1).astype(np.int64)


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
    queries = np.ascontiguousarray(queries, np.uint64)
    if len(queries) * len(hashes) <= NUMPY_PAIRS:
        return _scan_numpy(queries, k, hashes)
    return _collect(_kernels()._scan_kernel, queries, k, hashes, len(hashes))


def band_radii(k: int) -> np.ndarray:
    """Probe radius per band such that sum(r_j + 1) = k + 1 (pigeonhole: some band is within r_j)."""
    total = k + 1
    return np.array([total // NBANDS + (1 if j < total % NBANDS else 0) - 1 for j in range(NBANDS)], np.int64)


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
    for j in range(NBANDS if n else 0):  # no entries: the zeroed offsets are the tables already
        _kernels()._build_band(phash, n, BAND_STARTS[j], BAND_WIDTHS[j], kb, t.offsets[j], t.ids[j], t.sorted[j])
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
        if t.n_static == 0:  # no band tables yet: a plain scan of every entry
            hits = scan(queries, self.k, snap.phash[: snap.n])
            return np.unique(hits, axis=0) if len(hits) > 1 else hits
        scratch = np.empty(ball_size(int(t.kbits.max()), int(self.radii.max())), np.int64)
        hits = _collect(_kernels()._search_kernel, np.ascontiguousarray(queries, np.uint64), self.k, snap.phash,
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
