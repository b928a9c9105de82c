"""The encode side of one sample, alternatives side by side: CPU-ms per 512 crop, one thread.

Crops are the engine's own (decode + center crop of the bench corpus's LAION-sized JPEGs), so
remap, map PNG and JPEG see what they see in a run. Candidates run in turns (round-robin, best
round kept) so a busy box slows them alike; the ratios are the figures to read.

    python -m bench.encode_choices [--n 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from numba import njit

from bench.engine_bench import cached_corpus
from engine.condition import CHUNK, _nearest_chunk, _scratch


@njit(nogil=True, cache=True)
def exact_indices(pixels, pal, out) -> None:
    """The peer the engine's remap replaced: the exact search of every one of the (N, 3) pixels
    (no cell table), its palette index (into tree-ordered `pal`) into the (N,) uint8 `out`."""
    col, xs, sq = _scratch(pal)
    for lo in range(0, pixels.shape[0], CHUNK):
        hi = min(pixels.shape[0], lo + CHUNK)
        _nearest_chunk(pixels, lo, hi, pal, col, xs, sq)
        for q in range(hi - lo):
            out[lo + q] = col[4][q]


def crops(n: int) -> list[np.ndarray]:
    """The engine's 512 crops of the first n corpus images."""
    from engine.config import ImageConfig
    from engine.crop import center_crop
    from engine.decode import decode

    cfg = ImageConfig()
    files = sorted((cached_corpus(2000, 0) / "files").iterdir())[:n]
    return [center_crop(decode(f.read_bytes(), cfg).rgb, cfg.image_size) for f in files]


def candidates() -> dict:
    """name -> f(crop) for the map (remap + PNG) and the JPEG q95 (4:2:2 unless named)."""
    import cv2
    from PIL import Image
    from turbojpeg import TJPF_RGB

    from engine.condition import make_conditioner
    from engine.decode import turbojpeg
    from engine.palette import tree_order
    from engine.sample import encode_jpeg, encode_map_png

    cond = make_conditioner()
    pal = tree_order(cond.palette)

    def exact_then_pillow(a):  # before: exact search of every pixel to an index image, Pillow's palette PNG
        out = np.empty(a.shape[0] * a.shape[1], np.uint8)
        exact_indices(a.reshape(-1, 3), pal, out)
        im = Image.frombuffer("P", a.shape[1::-1], out, "raw", "P", 0, 1)
        im.putpalette(pal.astype(np.uint8).tobytes(), "RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def pillow(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=95, subsampling="4:2:2")
        return buf.getvalue()

    return {
        "map: exact search + Pillow palette PNG (before)": exact_then_pillow,
        "map: cell table + packed rows + zlib (engine)": lambda a: encode_map_png(cond.packed(a)),
        "jpeg: PyTurboJPEG (before)": lambda a: turbojpeg().encode(a, quality=95, pixel_format=TJPF_RGB),
        "jpeg: simplejpeg (engine)": lambda a: encode_jpeg(a, 95),
        "jpeg: Pillow": pillow,
        "jpeg: OpenCV (4:2:0)": lambda a: cv2.imencode(".jpg", a[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1],
    }


def main() -> None:
    """Time every candidate over the crops, in rounds; print the best round's CPU-ms and bytes."""
    import cv2

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cv2.setNumThreads(1)
    images = crops(a.n)
    cands = candidates()
    best: dict[str, float] = {}
    size: dict[str, float] = {}
    for _ in range(a.rounds):
        for name, fn in cands.items():
            fn(images[0])  # compiled / warmed before its clock starts
            start, total = time.process_time(), 0
            for img in images:
                total += len(fn(img))
            best[name] = min(best.get(name, 1e9), 1000 * (time.process_time() - start) / len(images))
            size[name] = total / len(images) / 1024
    print(f"{len(images)} crops of {images[0].shape[1]}x{images[0].shape[0]}, best of {a.rounds} rounds, one thread")
    for name in cands:
        print(f"  {name:50s} {best[name]:6.2f} CPU-ms  {size[name]:6.1f} KB")


if __name__ == "__main__":
    main()
