"""Sample corpus: a LAION-style parquet of image URLs and the loopback server that serves them.

`build_corpus` writes image files (real photos from scikit-image's shipped data folder, rescaled,
cropped and re-encoded) and a parquet whose rows point at a base URL; every row carries the outcome
the engine should give it (`expected_outcome`) and the case it exercises (`case`). `CorpusServer`
serves the files and every kind of bad HTTP behaviour on dedicated, relative routes, from a
background thread, so tests, `make demo` and the benchmarks all download from 127.0.0.1.
Routes and cases are listed in docs/CORPUS.md.

CLI:  python -m bench.corpus build --out DIR [--port P] [--profile small|laion] [--n N]
      python -m bench.corpus serve --dir DIR --port P
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gzip
import io
import math
import os
import random
import signal
import socket
import struct
import threading
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib.resources import files as _package_files
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp import web
from PIL import Image, ImageChops, ImageOps

# ----------------------------------------------------------------------------------------------
# Source photos
# ----------------------------------------------------------------------------------------------

# Only files that ship inside the scikit-image wheel (never the pooch-downloaded ones).
COLOR_PHOTOS = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
)
GRAY_PHOTOS = ("camera.png", "moon.png", "grass.png", "gravel.png", "brick.png", "coins.png")

# The port nobody listens on: connecting to it is refused at once (tcpmux, never served here).
REFUSED_URL = "http://127.0.0.1:1/refused.jpg"

CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif"}

_PHOTO_CACHE: dict[str, Image.Image] = {}


def load_photo(name: str) -> Image.Image:
    """One of scikit-image's shipped photos as RGB (or L for the gray ones), cached per process."""
    if name not in _PHOTO_CACHE:
        with Image.open(_package_files("skimage.data") / name) as im:
            _PHOTO_CACHE[name] = im.convert("L" if name in GRAY_PHOTOS else "RGB")
    return _PHOTO_CACHE[name]


def render(photo: str, width: int, height: int, rng: random.Random, grain: float = 0.0,
           tint: bool = False) -> Image.Image:
    """A width x height view of a photo (see `view`) with film grain."""
    im = view(photo, width, height, rng, tint)
    return add_grain(im, grain, rng) if grain > 0 else im


def view(photo: str, width: int, height: int, rng: random.Random, tint: bool = False) -> Image.Image:
    """A width x height view of a photo: one of 8 rotations/flips, a random crop window (40-100% of
    the largest one), tone jitter, resize. `tint` turns a gray photo into a duotone RGB one."""
    src = load_photo(photo)
    if tint and src.mode == "L":
        dark = tuple(rng.randint(0, 70) for _ in range(3))
        light = tuple(rng.randint(190, 255) for _ in range(3))
        src = ImageOps.colorize(src, black=dark, white=light)
    turn = rng.randrange(8)  # the dihedral group: views far apart to a perceptual hash
    if turn:
        src = src.transpose(list(Image.Transpose)[turn - 1])
    sw, sh = src.size
    scale = min(sw / width, sh / height) * rng.uniform(0.4, 1.0)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    x0, y0 = rng.randint(0, sw - cw), rng.randint(0, sh - ch)
    im = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.BICUBIC)
    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-8, 8)
    return im.point([min(255, max(0, round(v * gain + bias))) for v in range(256)] * len(im.getbands()))


_DCT32 = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(32) + 1) / 64)


def perceptual_hash(im: Image.Image) -> int:
    """The engine's 64-bit pHash when it imports (what its dedup compares), else a numpy twin:
    8x8 low DCT frequencies of a 32x32 luma thumbnail, DC left out."""
    try:
        from engine.dedup import phash
    except ImportError:
        g = np.asarray(im.convert("L").resize((32, 32), Image.BOX), np.float64)
        coef = (_DCT32 @ g @ _DCT32.T).ravel()[1:]
        return int.from_bytes(np.packbits(coef > np.median(coef)).tobytes(), "big")
    return phash(np.asarray(im.convert("RGB")))


# Views closer than this (bits of 64) are re-drawn, so the engine's near-duplicate filter (distance
# 4 by default) keeps every good image of the corpus.
MIN_HASH_DISTANCE = 10


def is_near(h: int, kept: list[int] | np.ndarray, k: int = MIN_HASH_DISTANCE) -> bool:
    """Whether hash h lies within k bits of any kept hash."""
    return any((h ^ x).bit_count() <= k for x in kept)


GRAIN_TILE = 1024


@functools.lru_cache(maxsize=64)
def _grain_tile(sigma: float) -> Image.Image:
    """A deterministic tile of gaussian noise around 128 (L mode)."""
    nprng = np.random.default_rng(int(sigma * 1000))
    noise = 128 + nprng.standard_normal((GRAIN_TILE, GRAIN_TILE), dtype=np.float32) * sigma
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "L")


def add_grain(im: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    """Add luminance film grain: upscaled small photos are far smoother than real ones, and grain
    brings the compressed sizes (and the decoder's work) to those of real photos. Tiled from a
    cached noise tile at a random offset, all in Pillow's C code, so it stays fast."""
    tile = _grain_tile(round(sigma * 2) / 2)
    w, h = im.size
    noise = Image.new("L", im.size)
    ox, oy = rng.randrange(GRAIN_TILE), rng.randrange(GRAIN_TILE)
    for y in range(-oy, h, GRAIN_TILE):
        for x in range(-ox, w, GRAIN_TILE):
            noise.paste(tile, (x, y))
    if im.mode != "L":
        noise = Image.merge(im.mode, (noise,) * len(im.getbands()))
    return ImageChops.add(im, noise, scale=1.0, offset=-128)


# ----------------------------------------------------------------------------------------------
# Encoders (bytes out); the odd ones are written by hand because Pillow cannot make them
# ----------------------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """Pillow-encode an image to bytes."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (RGB, or gray for 2-D input) from a uint16 array; Pillow writes no 16-bit RGB."""
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    rows = np.zeros((h, 1 + arr[0].size * 2), np.uint8)  # filter byte 0 per row
    rows[:, 1:] = arr.astype(">u2").view(np.uint8).reshape(h, -1)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b"")


def png_bomb(pixels: int) -> bytes:
    """A ~side x side 1-bit black PNG of `pixels` pixels that weighs only kilobytes."""
    side = math.isqrt(pixels)
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(comp.compress(block) for _ in range(side // 1000))
    idat += comp.compress(row * (side % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(small_jpeg: bytes, side: int) -> bytes:
    """A small baseline JPEG whose SOF header claims side x side pixels (a header-only bomb)."""
    i = small_jpeg.find(b"\xff\xc0")
    if i < 0:
        raise ValueError("no baseline SOF0 marker")
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    return small_jpeg[: i + 5] + struct.pack(">HH", side, side) + small_jpeg[i + 9 :]


def exif_rotated_jpeg(upright: Image.Image, orientation: int, quality: int = 95) -> bytes:
    """A JPEG whose pixels are stored rotated and whose EXIF orientation turns them upright again."""
    stored = upright.transpose(
        {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=quality, exif=exif.tobytes())


def animated_gif(frames: list[Image.Image]) -> bytes:
    """An animated, looping GIF of the given frames."""
    pal = [f.quantize(256, method=Image.Quantize.FASTOCTREE) for f in frames]
    return encode(pal[0], "GIF", save_all=True, append_images=pal[1:], duration=120, loop=0)


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One parquet row: what the engine reads plus what a test checks it against."""

    url: str | None
    text: str | bytes | None  # bytes: stored as-is in the string column (invalid UTF-8 case)
    width: int | None
    height: int | None
    expected_outcome: str
    case: str
    source: str | None = None  # corpus-relative path of the upright, lossless source (EXIF cases)
    scores: dict = field(default_factory=dict)


ADJ = ("misty", "golden", "quiet", "vivid", "old", "tiny", "bright", "dark", "wild", "calm", "rustic", "modern")
NOUN = ("cat", "coffee cup", "rocket", "motorcycle", "astronaut", "galaxy", "retina scan", "tissue sample",
        "mountain", "harbour", "street", "forest", "lighthouse", "portrait", "garden", "bridge")
PLACE = ("at dawn", "in the rain", "on a table", "in space", "by the sea", "in a studio", "at night",
         "in autumn", "under neon lights", "in black and white")
UNICODE_CAPTIONS = (
    "Café crème sur la table – photo d'archive",
    "東京の夜景、雨上がりの街",
    "Ελληνικό καφενείο στο λιμάνι",
    "قطة نائمة على الأريكة",
    "Кошка на подоконнике 🐱",
    "Straße im Schnee, Müller & Söhne",
)


def caption(rng: random.Random) -> str:
    """A plausible alt-text caption."""
    return f"{rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(PLACE)}".capitalize()


def scores(rng: random.Random, aesthetic: tuple[float, float] = (4.5, 8.0)) -> dict:
    """LAION score columns with plausible ranges."""
    return {
        "similarity": round(rng.uniform(0.26, 0.42), 6),
        "punsafe": round(rng.uniform(0.0, 0.2), 6),
        "pwatermark": round(rng.uniform(0.0, 0.6), 6),
        "AESTHETIC_SCORE": round(rng.uniform(*aesthetic), 6),
    }


SCHEMA = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
    ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
    ("AESTHETIC_SCORE", pa.float64()), ("expected_outcome", pa.string()), ("case", pa.string()),
    ("source", pa.string()),
])


def _text_column(texts: list) -> pa.Array:
    """TEXT as a string column; raw bytes go in unvalidated, as a non-Python writer could leave them."""
    if not any(isinstance(t, bytes) for t in texts):
        return pa.array(texts, pa.string())
    raw = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
    return pa.array(raw, pa.binary()).view(pa.string())


def write_parquet(rows: list[Row], path: Path) -> None:
    """Write rows with the LAION column names (plus expected_outcome, case, source)."""
    cols = {
        "URL": pa.array([r.url for r in rows], pa.string()),
        "TEXT": _text_column([r.text for r in rows]),
        "WIDTH": pa.array([r.width for r in rows], pa.int64()),
        "HEIGHT": pa.array([r.height for r in rows], pa.int64()),
    }
    for name in ("similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"):
        cols[name] = pa.array([r.scores.get(name) for r in rows], pa.float64())
    cols["expected_outcome"] = pa.array([r.expected_outcome for r in rows], pa.string())
    cols["case"] = pa.array([r.case for r in rows], pa.string())
    cols["source"] = pa.array([r.source for r in rows], pa.string())
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(cols, schema=SCHEMA), tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Profile "small": good images in every format plus every bad case
# ----------------------------------------------------------------------------------------------

GOOD_FORMATS = ("jpeg", "jpeg", "jpeg_progressive", "jpeg444", "jpeg_gray", "png", "png_rgba",
                "png_palette", "png_gray", "webp", "webp_lossless")


def _encode_good(im: Image.Image, fmt: str, rng: random.Random) -> tuple[bytes, str]:
    """Encode a rendered image in one of the good formats; returns (bytes, extension)."""
    q = rng.randint(75, 95)
    if fmt == "jpeg":
        return encode(im, "JPEG", quality=q), ".jpg"
    if fmt == "jpeg_progressive":
        return encode(im, "JPEG", quality=q, progressive=True), ".jpg"
    if fmt == "jpeg444":
        return encode(im, "JPEG", quality=q, subsampling=0), ".jpg"
    if fmt == "jpeg_gray":
        return encode(im.convert("L"), "JPEG", quality=q), ".jpg"
    if fmt == "png":
        return encode(im, "PNG", compress_level=1), ".png"
    if fmt == "png_rgba":
        rgba = im.convert("RGBA")
        alpha = np.full(im.size[::-1], 255, np.uint8)
        alpha[: alpha.shape[0] // 3] = 96  # a translucent band: alpha must be composited, not dropped
        rgba.putalpha(Image.fromarray(alpha))
        return encode(rgba, "PNG", compress_level=1), ".png"
    if fmt == "png_palette":
        return encode(im.quantize(256, method=Image.Quantize.FASTOCTREE), "PNG"), ".png"
    if fmt == "png_gray":
        return encode(im.convert("L"), "PNG", compress_level=1), ".png"
    if fmt == "webp":
        return encode(im, "WEBP", quality=q, method=0), ".webp"
    if fmt == "webp_lossless":
        return encode(im, "WEBP", lossless=True, method=0), ".webp"
    raise ValueError(fmt)


def _good_size(rng: random.Random, fmt: str) -> tuple[int, int]:
    """Shorter side 512..2000 (mostly below 1100; PNG/WebP kept small), aspect 1..1.9."""
    short = rng.randint(512, 2000) if rng.random() < 0.15 else rng.randint(512, 1100)
    if fmt.startswith("png") or fmt == "webp":  # slow encoders: keep them small so builds stay quick
        short = min(short, 800)
    if fmt == "webp_lossless":
        short = min(short, 640)
    long = int(short * rng.uniform(1.0, 1.9))
    return (long, short) if rng.random() < 0.6 else (short, long)


class _Builder:
    """Collects rows and files for one corpus; one helper per group of cases."""

    def __init__(self, out: Path, base_url: str, rng: random.Random):
        self.out, self.files, self.base, self.rng = out, out / "files", base_url.rstrip("/"), rng
        self.files.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.hashes: list[int] = []
        self.n = 0

    def photo(self, w: int, h: int, gray: bool = False) -> Image.Image:
        """A fresh view of a random photo, re-drawn until no earlier view is a near duplicate of it."""
        for _ in range(50):
            name = self.rng.choice(GRAY_PHOTOS if gray else COLOR_PHOTOS + GRAY_PHOTOS)
            im = render(name, w, h, self.rng, grain=2.0, tint=not gray)
            h_ = perceptual_hash(im)
            if not is_near(h_, self.hashes):
                break
        self.hashes.append(h_)
        return im

    def save(self, case: str, data: bytes, ext: str) -> str:
        """Write one file under files/ and return its name."""
        self.n += 1
        name = f"{self.n:04d}_{case}{ext}"
        (self.files / name).write_bytes(data)
        return name

    def add(self, route: str | None, expected: str, case: str, wh=(None, None), text=None, source=None, url=None):
        """Append a row; `route` is relative to the base URL (or `url` is taken verbatim)."""
        if url is None and route is not None:
            url = f"{self.base}/{route.lstrip('/')}"
        text = caption(self.rng) if text == "auto" or text is None and case != "caption_null" else text
        self.rows.append(Row(url, text, wh[0], wh[1], expected, case, source, scores(self.rng)))

    def jpeg_file(self, case: str, w: int = 800, h: int = 600) -> tuple[str, tuple[int, int]]:
        """A fresh valid JPEG for rows whose failure is not in the image itself (or whose success is)."""
        return self.save(case, encode(self.photo(w, h), "JPEG", quality=90), ".jpg"), (w, h)


def _add_good(b: _Builder, n_images: int) -> None:
    """Good images in every format and many sizes; every fifth row without WIDTH/HEIGHT."""
    for i in range(n_images):
        fmt = GOOD_FORMATS[i % len(GOOD_FORMATS)]
        w, h = _good_size(b.rng, fmt)
        data, ext = _encode_good(b.photo(w, h, gray=fmt.endswith("gray") and b.rng.random() < 0.5), fmt, b.rng)
        name = b.save(fmt, data, ext)
        b.add(f"files/{name}", "ok", fmt, (None, None) if i % 5 == 4 else (w, h))


def _add_metadata_cases(b: _Builder) -> None:
    """Rows decided before any download (null/malformed URLs, WIDTH/HEIGHT prefilter) and size edges."""
    for case, url in [("url_null", None), ("url_empty", ""), ("url_not_a_url", "not a url"),
                      ("url_htp", "htp:/x"), ("url_javascript", "javascript:alert(1)"),
                      ("url_ftp", "ftp://127.0.0.1/x.jpg"), ("url_no_host", "http://")]:
        b.add(None, "invalid_url", case, (800, 600), url=url)
    name = b.save("small", encode(b.photo(400, 300), "JPEG", quality=85), ".jpg")
    b.add(f"files/{name}", "filtered_size", "meta_small", (400, 300))
    b.add(f"files/{name}", "filtered_size", "meta_small_510", (1024, 510))
    name = b.save("wide", encode(b.photo(1500, 600), "JPEG", quality=85), ".jpg")
    b.add(f"files/{name}", "filtered_aspect", "meta_elongated", (2400, 800))
    b.add(f"files/{name}", "filtered_aspect", "meta_tall", (600, 1500))
    # Boundaries are inclusive: shorter side == 512 and aspect == 2 pass.
    name = b.save("edge", encode(b.photo(1024, 512), "JPEG", quality=90), ".jpg")
    b.add(f"files/{name}", "ok", "edge_1024x512", (1024, 512))
    # Decoded-size checks: rows without usable metadata are judged after decode.
    name = b.save("too_small", encode(b.photo(400, 300), "JPEG", quality=90), ".jpg")
    b.add(f"files/{name}", "too_small", "too_small")
    name = b.save("lying_dims", encode(b.photo(320, 240), "JPEG", quality=90), ".jpg")
    b.add(f"files/{name}", "too_small", "lying_dims", (1024, 768))
    name = b.save("bad_aspect", encode(b.photo(1500, 600), "JPEG", quality=90), ".jpg")
    b.add(f"files/{name}", "bad_aspect", "bad_aspect")


def _add_http_cases(b: _Builder) -> None:
    """Status codes, transient failures, connection trouble, slow and oversized bodies."""
    for code in (404, 403, 500, 429):
        b.add(f"status/{code}/{code}-a.jpg", "http_error", f"http_{code}", (800, 600))
    for case, code in (("http_503_once", 503), ("http_429_once", 429)):
        name, wh = b.jpeg_file(case)
        b.add(f"flaky/{code}/1/{name}", "ok", case, wh)
    b.add(None, "connection_error", "connection_refused", (800, 600), url=REFUSED_URL)
    name, wh = b.jpeg_file("reset")
    b.add(f"reset/{name}", "connection_error", "reset_mid_body", wh)
    name, wh = b.jpeg_file("reset_once")
    b.add(f"reset_once/{name}", "ok", "reset_once", wh)
    b.add("drip/drip-a.jpg", "timeout", "drip", (800, 600))
    b.add("stall/stall-a.jpg", "timeout", "stall_headers")
    b.add("big/64/big-a.jpg", "too_large", "too_large")
    b.add("big/64/big-b.jpg?chunked=1", "too_large", "too_large_chunked")
    name, wh = b.jpeg_file("lie")
    b.add(f"lie/{name}", "incomplete_body", "content_length_lies", wh)
    name, wh = b.jpeg_file("gzip")
    b.add(f"gzip/{name}", "ok", "gzip", wh)


def _add_redirect_and_optout_cases(b: _Builder) -> None:
    """Redirect loops, chains, non-http targets; X-Robots-Tag opt-outs."""
    b.add("redirect/loop/loop-a/0", "redirect_error", "redirect_loop", (800, 600))
    b.add("redirect/chain/30/none.jpg", "redirect_error", "redirect_too_many")
    name, wh = b.jpeg_file("redirect_chain")
    b.add(f"redirect/chain/3/{name}", "ok", "redirect_chain", wh)
    for scheme in ("ftp", "file", "javascript"):
        b.add(f"redirect/scheme/{scheme}/x.jpg", "redirect_error", f"redirect_{scheme}", (800, 600))
    for case, directive in (("optout_noai", "noai"), ("optout_noimageai", "noimageai"),
                            ("optout_combined", "noindex, noimageai")):
        name, wh = b.jpeg_file(case)
        b.add(f"optout/{directive.replace(' ', '')}/{name}", "opted_out", case, wh)


def _add_body_cases(b: _Builder, bomb_pixels: int) -> None:
    """Bodies that are not images, are broken images, or are images needing care to decode."""
    for kind in ("html", "svg", "empty", "text"):
        b.add(f"body/{kind}/{kind}-a.jpg", "not_an_image", f"{kind}_as_jpeg", (800, 600))
    # PostScript with a binary comment (what Pillow's EPS plugin would hand to Ghostscript): refused unread
    ps = b"%!PS-Adobe-3.0 EPSF-3.0\n%\xe2\xe3\xcf\xd3\n%%BoundingBox: 0 0 800 600\nshowpage\n%%EOF\n"
    b.add(f"files/{b.save('postscript', ps, '.jpg')}", "unsupported_format", "postscript_as_jpeg", (800, 600))
    good = encode(b.photo(800, 600), "JPEG", quality=90)
    b.add(f"files/{b.save('truncated', good[: len(good) // 2], '.jpg')}", "decode_error", "truncated_jpeg", (800, 600))
    png = encode(b.photo(800, 600), "PNG", compress_level=1)
    b.add(f"files/{b.save('truncated', png[: len(png) // 2], '.png')}", "decode_error", "truncated_png", (800, 600))
    garbage = b"\xff\xd8\xff\xe0" + bytes(b.rng.getrandbits(8) for _ in range(20000))
    b.add(f"files/{b.save('garbage', garbage, '.jpg')}", "decode_error", "garbage_jpeg")
    b.add(f"files/{b.save('bomb', png_bomb(bomb_pixels), '.png')}", "decompression_bomb", "bomb_png")
    side = min(65000, math.isqrt(bomb_pixels))
    bomb = jpeg_bomb(encode(b.photo(64, 64), "JPEG", quality=80), side)
    b.add(f"files/{b.save('bomb', bomb, '.jpg')}", "decompression_bomb", "bomb_jpeg")
    # Images that decode to a good sample only when handled with care.
    frames = [b.photo(720, 540) for _ in range(3)]
    b.add(f"files/{b.save('gif', animated_gif(frames), '.gif')}", "ok", "animated_gif", (720, 540))
    name = b.save("cmyk", encode(b.photo(900, 600).convert("CMYK"), "JPEG", quality=92), ".jpg")
    b.add(f"files/{name}", "ok", "cmyk", (900, 600))
    arr16 = np.asarray(b.photo(700, 560), np.uint16) * 257
    b.add(f"files/{b.save('png16', png16(arr16), '.png')}", "ok", "png16", (700, 560))
    arr16 = np.asarray(b.photo(600, 600, gray=True), np.uint16) * 257
    b.add(f"files/{b.save('png16_gray', png16(arr16), '.png')}", "ok", "png16_gray", (600, 600))
    for orientation in (6, 8, 3):
        upright = b.photo(900, 600)
        src = b.save(f"exif{orientation}_upright", encode(upright, "PNG", compress_level=1), ".png")
        name = b.save(f"exif{orientation}", exif_rotated_jpeg(upright, orientation), ".jpg")
        b.add(f"files/{name}", "ok", f"exif_rotated_{orientation}", (900, 600), source=f"files/{src}")
    wh = (800, 600)
    png_name = b.save("png_as_jpeg", encode(b.photo(*wh), "PNG", compress_level=1), ".png")
    b.add(f"files/{png_name}?type=image/jpeg", "ok", "png_served_as_jpeg", wh)
    name, wh = b.jpeg_file("octet")
    b.add(f"files/{name}?type=application/octet-stream", "ok", "octet_stream", wh)
    name = b.save("unicode name é", encode(b.photo(800, 600), "JPEG", quality=90), ".jpg")
    b.add(None, "ok", "unicode_url", (800, 600), url=f"{b.base}/files/{name}")  # unescaped, as LAION has


def _add_caption_cases(b: _Builder, invalid_utf8: bool) -> None:
    """Valid images with difficult captions: all must come out as ok samples."""
    texts = {
        "caption_null": None,
        "caption_control": "line one\nline two\ttab\x00nul\x07bell\x1b[31mred\x1b[0m\x7f\x85end",
        "caption_surrogate_escape": "smiling face \\ud83d\\ude00 and a lone \\ud800 half",
        "caption_replacement_char": "broken emoji \ufffd\ufffd from a lenient decoder",
        "caption_backslash": "a\\nb caf\\u00e9 C:\\\\photos\\\\x.jpg",
        "caption_unicode": None,
    }
    if invalid_utf8:
        # Bytes of a UTF-16 surrogate encoded as if it were a code point (CESU-8 style): not valid
        # UTF-8. pyarrow stores it unvalidated; reading it with .to_pylist() raises
        # UnicodeDecodeError, so an engine must decode TEXT leniently.
        texts["caption_invalid_utf8"] = b"surrogate half \xed\xa0\xbd\xed\xb8\x80 in raw bytes"
    for case, text in texts.items():
        name, wh = b.jpeg_file(case)
        if case == "caption_unicode":
            for j, t in enumerate(UNICODE_CAPTIONS):
                n2, wh2 = (name, wh) if j == 0 else b.jpeg_file(case)
                b.add(f"files/{n2}", "ok", case, wh2, text=t)
        else:
            b.add(f"files/{name}", "ok", case, wh, text=text)


# ----------------------------------------------------------------------------------------------
# Profile "laion": the benchmark's size distribution
# ----------------------------------------------------------------------------------------------

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


def _build_laion_rows(b: _Builder, n_images: int, seed: int, workers: int | None) -> list[tuple]:
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


# ----------------------------------------------------------------------------------------------
# Public: build
# ----------------------------------------------------------------------------------------------


def build_corpus(
    out_dir: str | Path,
    base_url: str,
    *,
    n_images: int = 40,
    profile: str = "small",
    seed: int = 0,
    bad_cases: bool | None = None,
    bomb_pixels: int = 20000 * 20000,
    invalid_utf8: bool = True,
    workers: int | None = None,
) -> Path:
    """Write out_dir/files/* and out_dir/corpus.parquet (rows pointing at base_url); return the parquet.

    profile "small": n_images good images in every format plus, when bad_cases (default on), one
    row per bad case. profile "laion": n_images JPEGs with the LAION-aesthetics size distribution,
    bad cases off by default. Deterministic for a given seed (same files, same rows, same order).
    invalid_utf8 adds a caption whose bytes are not valid UTF-8 (see docs/CORPUS.md).
    """
    if profile not in ("small", "laion"):
        raise ValueError(f"profile must be 'small' or 'laion', not {profile!r}")
    out = Path(out_dir)
    rng = random.Random(seed)
    b = _Builder(out, base_url, rng)
    if profile == "laion":
        _build_laion_rows(b, n_images, seed, workers)
    else:
        _add_good(b, n_images)
    if bad_cases if bad_cases is not None else profile == "small":
        _add_metadata_cases(b)
        _add_http_cases(b)
        _add_redirect_and_optout_cases(b)
        _add_body_cases(b, bomb_pixels)
        _add_caption_cases(b, invalid_utf8)
        rng.shuffle(b.rows)  # bad rows spread over shards, as in a real dump
    path = out / "corpus.parquet"
    write_parquet(b.rows, path)
    return path


def serve_and_build(out_dir: str | Path, *, port: int = 0, **kw) -> CorpusServer:
    """Start a CorpusServer on out_dir, build the corpus for its URL; the server has .parquet set.

    Usage: `with serve_and_build(tmp) as srv: run_engine(srv.parquet)`.
    """
    server = CorpusServer(out_dir, port=port).start()
    try:
        server.parquet = build_corpus(out_dir, server.base_url, **kw)
    except BaseException:
        server.stop()
        raise
    return server


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------

HTML_BODY = b"<!DOCTYPE html><html><head><title>Not Found</title></head><body><h1>404</h1></body></html>\n"
SVG_BODY = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="800" height="600">'
            b'<rect width="800" height="600" fill="red"/></svg>\n')
TEXT_BODY = b"This image is no longer available.\n"
BODIES = {"html": HTML_BODY, "svg": SVG_BODY, "empty": b"", "text": TEXT_BODY}
DRIP_CLAIMED_BYTES = 100_000
LIE_EXTRA_BYTES = 50_000
CHUNK = 1 << 20


class _Handlers:
    """Route handlers; hold the corpus folder, per-path hit counters and the stop flag."""

    def __init__(self, root: Path):
        self.root = root
        self.hits: collections.Counter[str] = collections.Counter()
        self.stopping = asyncio.Event()

    def _file(self, name: str) -> Path:
        """A file under root/files, refusing paths that escape it."""
        base = (self.root / "files").resolve()
        path = (base / name).resolve()
        if base not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True when stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    @staticmethod
    def _gone(request: web.Request) -> bool:
        """Whether the client has already gone away."""
        return request.transport is None or request.transport.is_closing()

    async def serve_file(self, request: web.Request) -> web.StreamResponse:
        """GET /files/{name}[?type=CT]: the file, with a Content-Type from its extension or ?type."""
        path = self._file(request.match_info["name"])
        ctype = request.query.get("type") or CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return web.FileResponse(path, headers={"Content-Type": ctype})

    async def status(self, request: web.Request) -> web.Response:
        """GET /status/{code}/{tag}: that status, every time."""
        code = int(request.match_info["code"])
        headers = {"Retry-After": "1"} if code in (429, 503) else None
        return web.Response(status=code, text=f"status {code}\n", headers=headers)

    async def flaky(self, request: web.Request) -> web.StreamResponse:
        """GET /flaky/{code}/{times}/{name}: `code` for the first `times` requests of this path, then the file."""
        if self.hits[request.path] <= int(request.match_info["times"]):
            return await self.status(request)
        return await self.serve_file(request)

    async def _partial_then(self, request: web.Request, path: Path, reset: bool) -> web.StreamResponse:
        """Send headers claiming more bytes than follow, part of the body, then close (RST if reset)."""
        data = path.read_bytes()
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = len(data) + (0 if reset else LIE_EXTRA_BYTES)
        await resp.prepare(request)
        try:
            await resp.write(data[: len(data) // 2] if reset else data)
            await asyncio.sleep(0.05)  # let the bytes leave before the close
        except ConnectionError:
            return resp
        transport = request.transport
        if transport is not None:
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        return resp

    async def reset(self, request: web.Request) -> web.StreamResponse:
        """GET /reset/{name}: half the body, then a TCP reset, every time."""
        return await self._partial_then(request, self._file(request.match_info["name"]), reset=True)

    async def reset_once(self, request: web.Request) -> web.StreamResponse:
        """GET /reset_once/{name}: a reset mid-body on the first request of this path, then the file."""
        if self.hits[request.path] <= 1:
            return await self.reset(request)
        return await self.serve_file(request)

    async def lie(self, request: web.Request) -> web.StreamResponse:
        """GET /lie/{name}: Content-Length claims LIE_EXTRA_BYTES more than the file; close after it."""
        return await self._partial_then(request, self._file(request.match_info["name"]), reset=False)

    async def drip(self, request: web.Request) -> web.StreamResponse:
        """GET /drip/{tag}: a JPEG-looking body of DRIP_CLAIMED_BYTES, one byte per second."""
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = DRIP_CLAIMED_BYTES
        await resp.prepare(request)
        body = b"\xff\xd8\xff\xe0" + b"\x00" * (DRIP_CLAIMED_BYTES - 4)
        for i in range(DRIP_CLAIMED_BYTES):
            if self._gone(request):
                break
            try:
                await resp.write(body[i : i + 1])
            except ConnectionError:
                break
            if await self._pause(1.0):
                break
        return self._abort(request, resp)

    async def stall(self, request: web.Request) -> web.StreamResponse:
        """GET /stall/{tag}: accept the request and never answer (until the client or server gives up)."""
        while not self._gone(request) and not await self._pause(0.5):
            pass
        return self._abort(request, web.Response(status=504))

    @staticmethod
    def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Drop the connection of an unfinished response so aiohttp does not try to complete it."""
        if request.transport is not None:
            request.transport.abort()
        return resp

    async def big(self, request: web.Request) -> web.StreamResponse:
        """GET /big/{mib}/{tag}[?chunked=1]: `mib` MiB of JPEG-looking bytes, with or without Content-Length."""
        total = int(request.match_info["mib"]) << 20
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = total
        await resp.prepare(request)
        first, zeros = b"\xff\xd8\xff\xe0" + bytes(CHUNK - 4), bytes(CHUNK)
        sent = 0
        try:
            while sent < total and not self.stopping.is_set() and not self._gone(request):
                part = (first if sent == 0 else zeros)[: min(CHUNK, total - sent)]
                await resp.write(part)
                sent += len(part)
        except ConnectionError:
            return resp
        if sent < total:
            return self._abort(request, resp)
        await resp.write_eof()
        return resp

    async def gzip_file(self, request: web.Request) -> web.Response:
        """GET /gzip/{name}: the file gzip-compressed, with Content-Encoding: gzip."""
        path = self._file(request.match_info["name"])
        body = gzip.compress(path.read_bytes(), mtime=0)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPES.get(path.suffix, "image/jpeg"),
                                                "Content-Encoding": "gzip"})

    async def redirect_loop(self, request: web.Request) -> web.Response:
        """GET /redirect/loop/{tag}/{0|1}: 0 -> 1 -> 0 -> ..."""
        step = 1 - int(request.match_info["step"])
        raise web.HTTPFound(f"/redirect/loop/{request.match_info['tag']}/{step}")

    async def redirect_chain(self, request: web.Request) -> web.Response:
        """GET /redirect/chain/{hops}/{name}: `hops` relative redirects, then /files/{name}."""
        hops, name = int(request.match_info["hops"]), request.match_info["name"]
        raise web.HTTPFound(f"/redirect/chain/{hops - 1}/{name}" if hops > 1 else f"/files/{name}")

    async def redirect_scheme(self, request: web.Request) -> web.Response:
        """GET /redirect/scheme/{ftp|file|javascript}/{tag}: a redirect to a non-http(s) URL."""
        target = {"ftp": "ftp://127.0.0.1/x.jpg", "file": "file:///etc/passwd",
                  "javascript": "javascript:alert(1)"}[request.match_info["scheme"]]
        return web.Response(status=302, headers={"Location": target})

    async def body(self, request: web.Request) -> web.Response:
        """GET /body/{html|svg|empty|text}/{tag}: that body, claiming to be image/jpeg."""
        kind = request.match_info["kind"]
        if kind not in BODIES:
            raise web.HTTPNotFound()
        return web.Response(body=BODIES[kind], headers={"Content-Type": "image/jpeg"})

    async def optout(self, request: web.Request) -> web.StreamResponse:
        """GET /optout/{directive}/{name}: the file with X-Robots-Tag: directive (commas get a space)."""
        resp = await self.serve_file(request)
        resp.headers["X-Robots-Tag"] = request.match_info["directive"].replace(",", ", ")
        return resp


def make_app(root: Path) -> tuple[web.Application, _Handlers]:
    """The aiohttp application with every route of the corpus."""
    h = _Handlers(root)

    @web.middleware
    async def count(request: web.Request, handler):
        h.hits[request.path] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.add_routes([
        web.get("/files/{name:.+}", h.serve_file),
        web.get("/status/{code:\\d+}/{tag}", h.status),
        web.get("/flaky/{code:\\d+}/{times:\\d+}/{name:.+}", h.flaky),
        web.get("/reset/{name:.+}", h.reset),
        web.get("/reset_once/{name:.+}", h.reset_once),
        web.get("/lie/{name:.+}", h.lie),
        web.get("/drip/{tag}", h.drip),
        web.get("/stall/{tag}", h.stall),
        web.get("/big/{mib:\\d+}/{tag}", h.big),
        web.get("/gzip/{name:.+}", h.gzip_file),
        web.get("/redirect/loop/{tag}/{step:[01]}", h.redirect_loop),
        web.get("/redirect/chain/{hops:\\d+}/{name:.+}", h.redirect_chain),
        web.get("/redirect/scheme/{scheme:ftp|file|javascript}/{tag}", h.redirect_scheme),
        web.get("/body/{kind}/{tag}", h.body),
        web.get("/optout/{directive}/{name:.+}", h.optout),
    ])
    return app, h


class CorpusServer:
    """The corpus's aiohttp server on 127.0.0.1, in a background thread with its own event loop.

    `with CorpusServer(dir) as srv: ...srv.base_url...`; port 0 picks a free port. `hits` counts
    requests per path (a test can see retries). Stops within about a second, drips included.
    """

    def __init__(self, corpus_dir: str | Path | None = None, port: int = 0, host: str = "127.0.0.1",
                 reuse_port: bool = False):
        self.root = Path(corpus_dir) if corpus_dir is not None else Path(".")
        self.host, self.port = host, port
        self.reuse_port = reuse_port  # several server processes on one port (the benchmark's pool)
        self.parquet: Path | None = None  # set by serve_and_build
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._handlers: _Handlers | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://{self.host}:{self.port}"

    @property
    def hits(self) -> collections.Counter:
        """Requests seen per URL path."""
        return self._handlers.hits if self._handlers else collections.Counter()

    def start(self) -> CorpusServer:
        """Start serving; returns once the socket listens (port resolved)."""
        self._thread = threading.Thread(target=self._run, name="corpus-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"corpus server failed to start: {self._error!r}") from self._error
        return self

    def _run(self) -> None:
        """Thread body: set up the site, then run the loop until stop()."""
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _setup(self) -> None:
        """Bind the listening socket."""
        app, self._handlers = make_app(self.root)
        # shutdown_timeout: how long stop() lets handlers finish before cancelling them.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True,
                           reuse_port=self.reuse_port or None)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        """Wake every waiting handler, then close the site and the connections."""
        self._handlers.stopping.set()
        await self._runner.cleanup()

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # a failed cleanup must not keep the thread alive
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> CorpusServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def summary(parquet: Path) -> str:
    """Rows per expected outcome, one line."""
    table = pq.read_table(parquet, columns=["expected_outcome"])
    counts = collections.Counter(table.column(0).to_pylist())
    return f"{table.num_rows} rows: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _serve_forever(directory: Path, port: int, reuse_port: bool = False) -> None:
    """Serve until Ctrl-C (or SIGTERM)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with CorpusServer(directory, port=port, reuse_port=reuse_port) as srv:
        print(f"serving {directory} at {srv.base_url} (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping")


def main(argv: list[str] | None = None) -> None:
    """python -m bench.corpus build|serve ..."""
    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    bp = sub.add_parser("build", help="write DIR/files/* and DIR/corpus.parquet")
    bp.add_argument("--out", required=True, type=Path, help="corpus folder")
    bp.add_argument("--port", type=int, default=8765, help="port the URLs point at (serve it with `serve`)")
    bp.add_argument("--profile", choices=("small", "laion"), default="small", help="small: every bad case; laion: benchmark sizes")
    bp.add_argument("--n", type=int, default=None, help="good images (default 40 small, 2000 laion)")
    bp.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    bp.add_argument("--bad-cases", choices=("on", "off", "default"), default="default", help="include the bad rows")
    sp = sub.add_parser("serve", help="serve a built corpus folder until Ctrl-C")
    sp.add_argument("--dir", required=True, type=Path, help="corpus folder (holding files/)")
    sp.add_argument("--port", type=int, default=8765, help="port to listen on (127.0.0.1)")
    sp.add_argument("--reuse-port", action="store_true", help="share the port with other server processes (SO_REUSEPORT)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        n = args.n if args.n is not None else (2000 if args.profile == "laion" else 40)
        bad = {"on": True, "off": False, "default": None}[args.bad_cases]
        path = build_corpus(args.out, f"http://127.0.0.1:{args.port}", n_images=n, profile=args.profile,
                            seed=args.seed, bad_cases=bad)
        print(f"{path}: {summary(path)}")
    else:
        _serve_forever(args.dir, args.port, args.reuse_port)


if __name__ == "__main__":
    main()
