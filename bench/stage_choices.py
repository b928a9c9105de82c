"""Per-stage alternatives on a fixed set of LAION-sized JPEGs: CPU-ms per image, one thread.

Measures, image by image, the choices issue 10 lists (JPEG binding and scale factor, resize
filter and library, JPEG encoder, PNG of the conditioning map, the pHash input) and the PSNR of
each candidate 512 crop against today's (turbojpeg M/8 + Pillow Lanczos). Prints a table; the
figures behind the engine's choices are copied into bench/RESULTS.md by hand.

    python -m bench.stage_choices [--n 300]
"""

from __future__ import annotations

import argparse
import io
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from bench.engine_bench import cached_corpus


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def timed(times: dict, name: str, fn, *args, **kw):
    """fn(*args) with its thread CPU time added to times[name]."""
    t = time.thread_time()
    out = fn(*args, **kw)
    times[name].append(time.thread_time() - t)
    return out


def cv2_crop(rgb: np.ndarray, size: int, interp: int) -> np.ndarray:
    """Center square (integer bounds) resized with OpenCV."""
    import cv2

    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    sq = rgb[top:top + side, left:left + side]
    return sq if side == size else cv2.resize(sq, (size, size), interpolation=interp)


def main() -> None:
    """Run every candidate on every image; print mean CPU-ms and PSNR."""
    import cv2
    import simplejpeg

    from engine import dedup as D
    from engine.condition import make_conditioner
    from engine.config import ImageConfig
    from engine.crop import center_crop
    from engine.decode import decode
    from engine.write import encode_jpeg, encode_png

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    files = sorted((cached_corpus(2000, 0) / "files").iterdir())[: a.n]
    cfg = ImageConfig()
    cond = make_conditioner()
    times: dict[str, list[float]] = defaultdict(list)
    quality: dict[str, list[float]] = defaultdict(list)
    pal = np.array([[0, 0, 0], [127, 127, 127], [255, 255, 255]], np.uint8)
    for _ in range(2):  # first pass warms Numba and the caches; only the second is kept
        times.clear()
        quality.clear()
        for f in files:
            body = f.read_bytes()
            img = timed(times, "decode turbojpeg M/8 (today)", decode, body, cfg)
            h, w, *_ = simplejpeg.decode_jpeg_header(body)
            s = 512 / min(h, w)
            sj = timed(times, "decode simplejpeg pow2", simplejpeg.decode_jpeg, body, "RGB",
                       min_height=int(np.ceil(h * s)) if h <= w else 0, min_width=int(np.ceil(w * s)) if w < h else 0)
            ref = timed(times, "resize Pillow lanczos (today)", center_crop, img.rgb, 512, "lanczos")
            for name, src in (("M/8", img.rgb), ("pow2", sj)):
                for iname, interp in (("area", cv2.INTER_AREA), ("linear", cv2.INTER_LINEAR)):
                    out = timed(times, f"resize cv2 {iname} after {name}", cv2_crop, src, 512, interp)
                    quality[f"cv2 {iname} after {name}"].append(psnr(out, ref))
                out = timed(times, f"resize Pillow lanczos after {name}", center_crop, src, 512, "lanczos")
                quality[f"Pillow lanczos after {name}"].append(psnr(out, ref))
            timed(times, "jpeg encode turbojpeg (today)", encode_jpeg, ref, 95)
            timed(times, "jpeg encode simplejpeg 422", simplejpeg.encode_jpeg, ref, 95, "RGB", "422")
            timed(times, "jpeg encode cv2", cv2.imencode, ".jpg", ref[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            m = timed(times, "remap (numba)", cond, ref)
            timed(times, "png today (L, level 1)", encode_png, m)
            timed(times, "png palette 2-bit level 1", palette_png, m, pal)
            timed(times, "hash content xxh3", D.content_hash, body)
            timed(times, "hash pixels xxh3 (decoded)", D.pixel_hash, img.rgb)
            timed(times, "phash on decoded (today)", D.phash, img.rgb)
            timed(times, "phash on 512 crop", D.phash, ref)
    print(f"{len(files)} images, mean CPU-ms per image, one thread")
    for name, v in times.items():
        print(f"  {name:40s} {1000 * np.mean(v):7.2f}")
    print("PSNR vs today's crop (dB): mean / 5th percentile")
    for name, v in quality.items():
        print(f"  {name:40s} {np.mean(v):6.1f} / {np.percentile(v, 5):6.1f}")


def palette_png(cond: np.ndarray, pal: np.ndarray) -> bytes:
    """Mode-P PNG with the smallest bit depth Pillow picks for few colours."""
    idx = np.zeros(cond.shape[:2], np.uint8)
    for i, c in enumerate(pal):
        idx[(cond[..., 0] == c[0]) & (cond[..., 1] == c[1]) & (cond[..., 2] == c[2])] = i
    im = Image.fromarray(idx, "P")
    im.putpalette(pal.tobytes())
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1, bits=2)
    return buf.getvalue()


if __name__ == "__main__":
    main()
