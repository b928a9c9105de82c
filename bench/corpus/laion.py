"""Profile "laion": JPEGs with the LAION-aesthetics size distribution, for the benchmarks."""

from __future__ import annotations

import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .encoders import encode
from .photos import COLOR_PHOTOS, GRAY_PHOTOS, MIN_HASH_DISTANCE, add_grain, perceptual_hash, view
from .rows import Builder, Row, caption, scores

# Shorter-side bins of LAION-aesthetics-6.5 among images with shorter side >= 512 (seed tutorial).
LAION_BINS = ((0.61, 512, 767), (0.21, 768, 1023), (0.18, 1024, 2048))
# Bits per pixel that give ~200 KB files below 1024 and ~1 MB above at these areas.
LAION_BPP_SMALL, LAION_BPP_LARGE = 2.05, 2.4


def laion_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) drawn from the LAION bins; aspect 1..1.8, 60% landscape."""
    u, acc, (lo, hi) = rng.random(), 0.0, LAION_BINS[-1][1:]
    for p, b_lo, b_hi in LAION_BINS:
        acc += p
        if u < acc:
            lo, hi = b_lo, b_hi
            break
    # Large images thin out towards 2048 like real ones: log-uniform inside the top bin.
    short = int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))) if lo >= 1024 else rng.randint(lo, hi)
    long = int(short * rng.uniform(1.0, 1.8))
    return (long, short) if rng.random() < 0.6 else (short, long)


def _laion_image(args: tuple[int, int, str, int]) -> tuple[str, int, int, int, int]:
    """Render and encode one benchmark JPEG near its byte target; runs in a worker process.

    Returns (name, width, height, bytes, perceptual hash); `attempt` > 0 draws another view."""
    index, seed, out, attempt = args
    rng = random.Random((seed * 1_000_003 + index) * 101 + attempt)
    w, h = laion_size(rng)
    bpp = LAION_BPP_LARGE if min(w, h) >= 1024 else LAION_BPP_SMALL
    target = bpp * w * h / 8 * rng.uniform(0.7, 1.3)
    quality, grain = rng.randint(88, 95), 3.0
    # Mostly colour photos; gray ones come tinted (a duotone RGB JPEG, as gray JPEGs are rare).
    photo = rng.choice(COLOR_PHOTOS) if rng.random() < 0.7 else rng.choice(GRAY_PHOTOS)
    base = view(photo, w, h, rng, tint=True)
    progressive, grain_seed = rng.random() < 0.2, rng.getrandbits(32)
    for _ in range(3):  # grain steers the size; the view stays the same between tries
        im = add_grain(base, grain, random.Random(grain_seed)) if grain > 0 else base
        data = encode(im, "JPEG", quality=quality, progressive=progressive)
        ratio = target / len(data)
        if 0.8 < ratio < 1.25:
            break
        grain = min(24.0, max(0.0, grain * ratio ** 2 + (1.0 if ratio > 1 else 0.0)))
    name = f"{index:06d}.jpg"
    (Path(out) / name).write_bytes(data)
    return name, w, h, len(data), perceptual_hash(base)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _near_pairs_later(hashes: list[int], k: int = MIN_HASH_DISTANCE, block: int = 512) -> list[int]:
    """Indexes whose hash lies within k bits of an earlier one (blocked, table popcount)."""
    h = np.array(hashes, np.uint64)
    later = []
    for start in range(0, len(h), block):
        q = h[start : start + block]
        x = q[:, None] ^ h[None, : start + len(q)]
        if hasattr(np, "bitwise_count"):  # numpy >= 2
            near = np.bitwise_count(x) <= k
        else:
            near = _POPCOUNT8[x.view(np.uint8).reshape(len(q), -1, 8)].sum(-1, dtype=np.uint8) <= k
        near &= np.arange(start + len(q))[None, :] < np.arange(start, start + len(q))[:, None]
        later += [start + int(i) for i in np.flatnonzero(near.any(axis=1))]
    return later


def build_laion_rows(b: Builder, n_images: int, seed: int, workers: int | None) -> list[tuple]:
    """Render n benchmark images (in parallel when many) and add their rows."""
    jobs = [(i, seed, str(b.files), 0) for i in range(n_images)]
    workers = workers or min(os.cpu_count() or 1, 16)
    if n_images >= 64 and workers > 1:
        # spawn: callers may hold threads (the server), and fork with threads is unsafe.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            made = list(pool.map(_laion_image, jobs, chunksize=16))
    else:
        made = [_laion_image(j) for j in jobs]
    # Re-draw the later image of every near-duplicate pair (rare), so dedup keeps them all.
    for attempt in range(1, 20):
        redo = _near_pairs_later([m[4] for m in made])
        if not redo:
            break
        for i in redo:
            made[i] = _laion_image((i, seed, str(b.files), attempt))
    for name, w, h, _, _ in made:
        b.rows.append(Row(f"{b.base}/files/{name}", caption(b.rng), w, h, "ok", "laion_jpeg", None,
                          scores(b.rng, (6.5, 8.0))))
    return made
