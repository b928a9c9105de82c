"""Imported by the fork server of `--runner processes` (engine/prestart.py PRELOAD) and by no one
else: its import readies, once, what every worker forked from the server then inherits.

- Numba's start-up: a process's first call of a cached kernel imports Numba's typing and lowering
  registries (scipy.linalg among them) and loads the kernel from engine/__pycache__: ~0.8 CPU-s,
  which every worker paid on its first image. One sample through `shard.prepare` here loads the
  default path's kernels with the signatures the workers call them with; forked memory keeps the
  compiled code.
- pyarrow without pandas (prestart.arrow_without_pandas): the worker's parquet is built from
  Python lists, for which pyarrow would import pandas (~0.3-0.4 CPU-s) only to rule pandas objects out.
"""

from __future__ import annotations

import numpy as np

from . import shard
from .condition import make_conditioner
from .config import EngineConfig
from .prestart import arrow_without_pandas
from .sample import encode_jpeg

WARM_SIDE = (1040, 1100)  # height, width: >= 2x 512, so the DCT-scaled decode and the resize both run


def warm_sample() -> bytes:
    """A JPEG photo stand-in (smooth colour gradients with noise), large enough for every stage."""
    h, w = WARM_SIDE
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], axis=-1)
    rgb = rgb + np.random.default_rng(0).integers(0, 24, rgb.shape)
    return encode_jpeg(np.clip(rgb, 0, 255).astype(np.uint8), 90)


def warm() -> None:
    """Run one sample through the default CPU stages (decode, hashes, crop, remap, PNG, JPEG)."""
    cfg = EngineConfig(inputs=("warm-up",), output="warm-up")  # defaults only; nothing is read or written
    shard.prepare(warm_sample(), cfg, make_conditioner(cfg.image.conditioner, cfg.image.palette))


arrow_without_pandas()
try:
    warm()
except Exception:  # noqa: BLE001 -- an optimisation only: workers then load the kernels themselves, and
    pass           # a real fault in a stage shows in their shards' outcomes, where it is counted
