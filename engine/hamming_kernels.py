"""The Numba kernels of the near-duplicate index (engine/hamming.py), apart so that importing the
index costs no Numba: a driver whose index stays small never imports it (~0.4 CPU-s of a run)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


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
