"""Per-stage alternatives on a fixed set of LAION-sized JPEGs: CPU-ms per image, one thread.

Measures, image by image, the choices issue 10 lists (JPEG binding and scale factor, resize
filter and library, JPEG encoder, PNG of the conditioning map, the pHash input) and the PSNR of
each candidate 512 crop against a full-resolution Lanczos crop. Prints a table; the
figures behind the engine's choices are copied into bench/RESULTS.md by hand.

    python -m bench.stage_choices [--n 300]
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
import time
import zlib
from collections import defaultdict

import numpy as np

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


def m8_scale(width: int, height: int, target: int) -> tuple[int, int]:
    """The engine's scale before issue 10: the smallest M/8 that still covers `target`."""
    short = min(width, height)
    m = next((m for m in range(1, 9) if -(-short * m // 8) >= target), 8)
    return m // math.gcd(m, 8), 8 // math.gcd(m, 8)  # libjpeg-turbo names its factors reduced


def tarfile_stream_write(tar: tarfile.TarFile, sample: dict) -> None:
    """A sample through tarfile's own stream writer (mode "w|"), as engine/write.py wrote it before issue 10."""
    for ext in sorted(k for k in sample if k != "__key__"):
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[ext]), time.time(), 0o444, "bigdata", "bigdata"
        tar.addfile(info, io.BytesIO(sample[ext]))


def main() -> None:
    """Run every candidate on every image; print mean CPU-ms and PSNR."""
    import cv2
    try:
        import simplejpeg  # not an engine dependency: measured for comparison when installed
    except ImportError:
        simplejpeg = None
    from turbojpeg import TJPF_RGB

    from bench.encode_choices import exact_indices
    from engine import hashes as D
    from engine.condition import make_conditioner
    from engine.config import ImageConfig
    from engine.crop import center_crop
    from engine.decode import decode, turbojpeg
    from engine.palette import tree_order
    from engine.sample import encode_jpeg, encode_map_png, encode_png
    from engine.write import SampleTarWriter

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    files = sorted((cached_corpus(2000, 0) / "files").iterdir())[: a.n]
    cfg = ImageConfig()
    cond = make_conditioner()
    pal = tree_order(cond.palette)
    times: dict[str, list[float]] = defaultdict(list)
    quality: dict[str, list[float]] = defaultdict(list)
    ours = SampleTarWriter(io.BytesIO())  # tar writers into memory: the Python and copying, no disk
    theirs = tarfile.open(fileobj=io.BytesIO(), mode="w|", format=tarfile.USTAR_FORMAT)
    for _ in range(2):  # first pass warms Numba and the caches; only the second is kept
        times.clear()
        quality.clear()
        for f in files:
            body = f.read_bytes()
            img = timed(times, "decode engine (turbojpeg, power-of-2 scale)", decode, body, cfg)
            w, h, _, _ = turbojpeg().decode_header(body)
            m8 = timed(times, "decode turbojpeg M/8 scale (before)", turbojpeg().decode, body,
                       pixel_format=TJPF_RGB, scaling_factor=m8_scale(w, h, 512))
            if simplejpeg:
                timed(times, "decode simplejpeg (its M/8 pick)", simplejpeg.decode_jpeg, body, "RGB",
                      min_height=512, min_width=512)
            # the reference: full-resolution decode, Pillow Lanczos
            ideal = center_crop(turbojpeg().decode(body, pixel_format=TJPF_RGB), 512, "lanczos")
            before = timed(times, "resize Pillow lanczos of M/8 (before)", center_crop, m8, 512, "lanczos")
            quality["before: M/8 + Pillow lanczos"].append(psnr(before, ideal))
            for name in ("bilinear", "bicubic", "box"):
                out = timed(times, f"resize {name} of power-of-2 (cv2)", center_crop, img.rgb, 512, name)
                quality[f"power-of-2 + cv2 {name}"].append(psnr(out, ideal))
            ref = center_crop(img.rgb, 512)
            timed(times, "jpeg encode simplejpeg 422 (engine)", encode_jpeg, ref, 95)
            timed(times, "jpeg encode turbojpeg 422 (before)", turbojpeg().encode, ref, quality=95,
                  pixel_format=TJPF_RGB)
            timed(times, "jpeg encode cv2", cv2.imencode, ".jpg", ref[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            m = timed(times, "remap RGB (numba)", cond, ref)
            timed(times, "remap indices (numba, exact search)", exact_indices, ref.reshape(-1, 3), pal,
                  np.empty(ref.shape[0] * ref.shape[1], np.uint8))
            packed = timed(times, "remap packed rows (numba, cell table, engine)", cond.packed, ref)
            timed(times, "png L level 1", encode_png, m)
            timed(times, "png palette 2-bit of packed rows (engine)", encode_map_png, packed)
            timed(times, "png palette 2-bit, zlib default strategy (before)", encode_map_png, packed,
                  zlib.Z_DEFAULT_STRATEGY)
            sample = {"__key__": "0000000000", "jpg": encode_jpeg(ref, 95), "cond.png": encode_map_png(packed),
                      "txt": b"a caption", "json": b'{"url": "http://example.com/a.jpg"}'}
            timed(times, "tar sample, one write (engine)", ours.write, sample)
            timed(times, "tar sample, tarfile stream (before)", tarfile_stream_write, theirs, sample)
            timed(times, "hash content xxh3", D.content_hash, body)
            timed(times, "hash pixels xxh3 (decoded)", D.pixel_hash, img.rgb)
            timed(times, "phash on decoded (engine)", D.phash, img.rgb)
            timed(times, "phash on 512 crop", D.phash, ref)
    print(f"{len(files)} images, mean CPU-ms per image, one thread")
    for name, v in times.items():
        print(f"  {name:40s} {1000 * np.mean(v):7.2f}")
    print("PSNR of the 512 crop against a full-resolution Pillow Lanczos crop (dB): mean / 5th percentile")
    for name, v in quality.items():
        print(f"  {name:40s} {np.mean(v):6.1f} / {np.percentile(v, 5):6.1f}")


if __name__ == "__main__":
    main()
