"""Decode: response bytes -> upright RGB uint8 pixels, or a Rejected with its outcome.

JPEG goes through libjpeg-turbo with DCT-domain downscaling (decode only as many pixels as the
crop needs); every other format goes through Pillow. Nothing here trusts the Content-Type header.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from . import outcomes as O
from .config import ImageConfig

# We check pixel counts ourselves (max_pixels) before decoding; Pillow's own guard would raise
# an exception type we would then have to translate.
Image.MAX_IMAGE_PIXELS = None
# libjpeg's warnings (corrupt bytes it skipped, a missing end marker) reach us as Python warnings,
# one per image, which would flood a run's log; truncation is checked explicitly instead.
warnings.filterwarnings("ignore", category=UserWarning, module="turbojpeg")

_TJ = threading.local()
# EXIF orientation -> (number of 90-degree counter-clockwise turns, flip left-right first)
_ORIENT = {2: (0, True), 3: (2, False), 4: (2, True), 5: (1, True), 6: (3, False), 7: (3, True), 8: (1, False)}


class Rejected(Exception):
    """An image the engine will not use; `outcome` names why (engine/outcomes.py)."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


@dataclass
class Decoded:
    """Upright RGB pixels (maybe DCT-downscaled) and the original upright size."""

    rgb: np.ndarray
    width: int
    height: int
    format: str


def turbojpeg():
    """A TurboJPEG handle per thread (the library's handles are not shared between threads)."""
    if not hasattr(_TJ, "handle"):
        from turbojpeg import TurboJPEG

        _TJ.handle = TurboJPEG()
    return _TJ.handle


def sniff(data: bytes) -> str:
    """The image format the bytes really hold, or raise Rejected for non-images."""
    if not data:
        raise Rejected(O.NOT_AN_IMAGE, "empty body")
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" or data[:4] in (b"II*\x00", b"MM\x00*"):
        return "other"
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<svg", b"<head", b"<body", b"<")):
        kind = "svg" if b"<svg" in data[:4096].lower() else "html/xml"
        raise Rejected(O.NOT_AN_IMAGE, f"{kind} body")
    if head[:1] in (b"{", b"[") or all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        raise Rejected(O.NOT_AN_IMAGE, "text body")
    return "other"


def jpeg_complete(data: bytes) -> bool:
    """Whether an end-of-image marker follows the last scan (libjpeg only warns when it is missing)."""
    eoi = data.rfind(b"\xff\xd9")
    return eoi != -1 and eoi > data.rfind(b"\xff\xda")


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of a JPEG (1 when absent or unreadable); reads headers only."""
    if b"Exif\x00\x00" not in data[:65536]:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(0x0112, 1)
        return value if value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 -- a broken EXIF block must not cost the image
        return 1


def orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W, 3) array."""
    turns, flip = _ORIENT.get(orientation, (0, False))
    if flip:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns or flip else rgb


def check_size(width: int, height: int, cfg: ImageConfig) -> None:
    """Reject images too small, too elongated or too large (bomb guard) from their size alone."""
    if width * height > cfg.max_pixels:
        raise Rejected(O.DECOMPRESSION_BOMB, f"{width}x{height} exceeds {cfg.max_pixels} pixels")
    problem = cfg.size_problem(width, height)
    if problem:
        raise Rejected(O.TOO_SMALL if problem[0] == "small" else O.BAD_ASPECT, problem[1])


def jpeg_scale(width: int, height: int, target: int) -> tuple[int, int]:
    """The smallest power-of-2 libjpeg-turbo scale (1/8, 1/4, 1/2, 1) whose output still covers
    `target` on the shorter side.

    Only these scales have SIMD code: 3/4, 5/8 or 7/8 decode slower than the whole image (e.g.
    6.8 ms at 7/8 against 4.0 ms at 1/1 on 2026-12 LAION-sized photos, bench/RESULTS.md), and the
    crop's resize takes the rest of the factor (at most 2) for about 1 ms.
    """
    short = min(width, height)
    factors = sorted((f for f in turbojpeg().scaling_factors if f[0] == 1 and f[1] in (1, 2, 4, 8)),
                     key=lambda f: f[0] / f[1])
    for num, den in factors:
        if -(-short * num // den) >= target:
            return num, den
    return 1, 1


def decode_jpeg(data: bytes, cfg: ImageConfig) -> Decoded:
    """JPEG through libjpeg-turbo, downscaled in the DCT domain, EXIF orientation applied."""
    from turbojpeg import TJPF_RGB

    tj = turbojpeg()
    try:
        width, height, _, _ = tj.decode_header(data)
    except OSError as exc:
        raise Rejected(O.DECODE_ERROR, f"jpeg header: {exc}") from None
    if width < 1 or height < 1 or not jpeg_complete(data):
        raise Rejected(O.DECODE_ERROR, "truncated jpeg (no end-of-image marker)")
    orientation = exif_orientation(data)
    upright = (height, width) if orientation >= 5 else (width, height)
    check_size(*upright, cfg)
    try:
        rgb = tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=jpeg_scale(width, height, cfg.image_size))
    except OSError:
        return decode_pillow(data, cfg, "jpeg")  # CMYK / YCCK: libjpeg-turbo cannot make RGB of them
    return Decoded(orient(rgb, orientation), upright[0], upright[1], "jpeg")


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8; alpha is composited over white, 16-bit is scaled down."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"))


def decode_pillow(data: bytes, cfg: ImageConfig, fmt: str) -> Decoded:
    """Every format Pillow knows; first frame of animations; EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            check_size(width, height, cfg)
            if im.format == "JPEG":
                im.draft("RGB", (cfg.image_size, cfg.image_size))  # DCT scaling for the CMYK path too
            im.load()
            im = ImageOps.exif_transpose(im) or im
            rgb = to_rgb(im)
            fmt = (im.format or fmt).lower()
    except Rejected:
        raise
    except Image.DecompressionBombError as exc:
        raise Rejected(O.DECOMPRESSION_BOMB, str(exc)[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as exc:
        raise Rejected(O.DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:200]) from None
    return Decoded(rgb, width, height, fmt)


def decode(data: bytes, cfg: ImageConfig) -> Decoded:
    """Sniff the bytes and decode them to upright RGB, or raise Rejected."""
    fmt = sniff(data)
    return decode_jpeg(data, cfg) if fmt == "jpeg" else decode_pillow(data, cfg, fmt)
