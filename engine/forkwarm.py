"""Imported by the fork server of `--runner processes` (engine/prestart.py PRELOAD) and by no one
else: its import readies, once, what every worker forked from the server then inherits.

- Numba's start-up: a process's first call of a cached kernel imports Numba's typing and lowering
  registries (scipy.linalg among them) and loads the kernel from engine/__pycache__: ~0.8 CPU-s,
  which every worker paid on its first image. One sample through `shard.prepare` here loads the
  default path's kernels with the signatures the workers call them with; forked memory keeps the
  compiled code.
  Numba imports scipy.linalg (~0.3 CPU-s with what it pulls in: numpy.f2py, charset_normalizer)
  only to note whether BLAS backs np.dot and np.correlate, which no kernel of ours calls: refused
  here, so Numba notes "no BLAS" (it would then compile those with loops, never failing).
- pyarrow without pandas (prestart.arrow_without_pandas): the worker's parquet is built from
  Python lists, for which pyarrow would import pandas (~0.3-0.4 CPU-s) only to rule pandas objects out.
"""

from __future__ import annotations

import numpy as np

from . import shard
from .condition import make_conditioner
from .config import EngineConfig
from .decode import over_white
from .prestart import arrow_without_pandas, refused
from .sample import encode_jpeg

WARM_SIDE = (1040, 1100)  # height, width: >= 2x 512, so the DCT-scaled decode and the resize both run


def warm_sample() -> bytes:
    """A JPEG large enough for every stage: colour gradients (what it shows does not matter, only
    that each stage runs; built with broadcasts, as a full noise image costs ~0.2 CPU-s)."""
    h, w = WARM_SIDE
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)
    rgb[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    rgb[..., 2] = 96
    return encode_jpeg(rgb, 90)


def warm() -> None:
    """Run one sample through the default CPU stages (decode, hashes, crop, remap, PNG, JPEG), and
    composite one pixel over white (the decode of any image with alpha)."""
    cfg = EngineConfig(inputs=("warm-up",), output="warm-up")  # defaults only; nothing is read or written
    shard.prepare(warm_sample(), cfg, make_conditioner(cfg.image.conditioner, cfg.image.palette))
    over_white(np.zeros((1, 1, 4), np.uint8))


arrow_without_pandas()
try:
    with refused("scipy.linalg"):
        warm()
except Exception:  # noqa: BLE001 -- an optimisation only: workers then load the kernels themselves, and
    pass           # a real fault in a stage shows in their shards' outcomes, where it is counted
