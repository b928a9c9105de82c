"""Imported by the fork server (engine/prestart.py PRELOAD), after the shard stages: calls each
Numba kernel a worker runs once on a tiny image, so the kernels are loaded from Numba's cache
(and LLVM started) once in the server, and every worker forks with them ready."""

from __future__ import annotations

import numpy as np

from . import condition, dedup


def warm() -> None:
    """One call of each worker kernel (hashes, palette indices, grayscale) on a 64x64 image."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    dedup.image_hashes(b"", rgb)
    condition.make_conditioner("palette").indexed(rgb)
    condition.grayscale(rgb)


warm()
