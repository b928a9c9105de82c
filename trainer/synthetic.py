"""Small shards in the engine's sample format, for tests and benchmarks (no engine, no network).

The engine's sample format (engine/sample.py: member names, keys, shard names): `KEY.jpg`,
`KEY.cond.png` (mode L or RGB), `KEY.txt`, `KEY.json` (with `url`), no stats files (so the
trainer resizes these to any --resolution). Photos come from scikit-image's bundled data (a dev
dependency, imported only here); the JPEGs stay Pillow's quality 90, which the reference losses
in tests/assets were recorded on.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from engine import sample as S

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def photos() -> list[np.ndarray]:
    """RGB uint8 photos shipped with scikit-image."""
    from skimage import data

    return [getattr(data, name)() for name in PHOTOS]


def palette_map(rgb: np.ndarray) -> np.ndarray:
    """Black / gray50 / white by luminance thresholds: a stand-in for the engine's conditioner."""
    g = rgb.astype(np.float32).mean(axis=2)
    return np.where(g < 85, 0, np.where(g < 170, 128, 255)).astype(np.uint8)


def encode(img: Image.Image, fmt: str) -> bytes:
    """Image to bytes in a format (JPEG quality 90 or PNG)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo_sample(rng: np.random.Generator, pics: list[np.ndarray], size: int) -> tuple[Image.Image, Image.Image]:
    """A random square crop of a photo, resized to `size`, and its palette map (mode L)."""
    pic = pics[rng.integers(len(pics))]
    h, w = pic.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(pic[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    return crop, Image.fromarray(palette_map(np.asarray(crop)), "L")


def blocks_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """A map of random rectangles and an image that is a pure function of it (for learning checks)."""
    cond = np.zeros((size, size), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, size, 2)
        h, w = rng.integers(size // 4, size // 2 + 1, 2)
        cond[y:y + h, x:x + w] = rng.choice([128, 255])
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)  # black/gray/white ->
    image = colours[np.searchsorted([0, 128, 255], cond)]
    return Image.fromarray(image, "RGB"), Image.fromarray(cond, "L")


def write_shards(folder: str | Path, n_shards: int = 2, per_shard: int = 8, size: int = 64, seed: int = 0,
                 kind: str = "photo", cond_mode: str = "L", captions: bool = True) -> list[Path]:
    """Write `n_shards` tar shards of `per_shard` samples each; return their paths."""
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pics = photos() if kind == "photo" else []
    paths = []
    for s in range(n_shards):
        path = folder / f"{S.shard_name(s)}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                image, cond = photo_sample(rng, pics, size) if kind == "photo" else blocks_sample(rng, size)
                key = S.sample_key(s, i, per_shard)
                sink.write({
                    "__key__": key, S.JPG: encode(image, "JPEG"), S.COND: encode(cond.convert(cond_mode), "PNG"),
                    S.TXT: f"a photo, sample {key}" if captions else "",
                    S.JSON: json.dumps({"url": f"http://127.0.0.1/{key}.jpg", "key": key}),
                })
        paths.append(path)
    return paths


def first_condition(shards: str | Path | list, dest: str | Path) -> Path:
    """Save the first conditioning map found in one or more shards as a PNG (a validation image)."""
    from webdataset.tariterators import tarfile_samples

    from trainer.data import SampleError, decode_member

    urls = [str(u) for u in shards] if isinstance(shards, list) else [str(shards)]
    for sample in tarfile_samples([{"url": u} for u in urls]):
        try:
            decode_member(sample, S.COND).save(dest)  # the decoding policy: allowed formats only
            return Path(dest)
        except SampleError:
            continue
    raise ValueError(f"no conditioning map in {', '.join(urls)}")
