"""Decode: response bytes -> upright RGB uint8 pixels, or a Rejected with its outcome.

What may be decoded (formats, pixel limit, concurrency) is engine/imagepolicy.py, shared with the
trainer. JPEG goes through libjpeg-turbo with DCT-domain downscaling (decode only as many pixels as
the crop needs); the other allowed formats go through Pillow, first frame only, converted to RGB in
row bands so one decode peaks near 2.5x its 8-bit RGB size (docs/SECURITY.md), but for WebP's pixels,
which OpenCV's libwebp decodes faster and in less memory once Pillow has read the header. Nothing here
trusts the Content-Type header.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import outcomes as O
from .config import ImageConfig
from .imagepolicy import BUDGET, COST, Rejected, check_pixels, open_image, sniff  # noqa: F401 -- re-exported

# libjpeg's first warning of a decode (PyTurboJPEG passes it to warnings.warn) names what it had to
# repair. These mean pixels are missing or wrong (libjpeg fills them with gray): the image is refused.
# Others ("N extraneous bytes before marker", JFIF/Adobe header oddities) are common in good photos.
DAMAGE = ("premature end", "bad huffman code", "bad arithmetic code", "instead of rst")
SCAN_LIMIT = "scans"
"""Marks libjpeg-turbo's refusal of a progressive JPEG of more than 500 scans (TJFLAG_LIMITSCANS): each scan,
however few its bytes, is a pass over every block, so 25,000 of them in 1 MB take minutes of CPU."""

# EXIF orientation -> (number of 90-degree counter-clockwise turns, flip left-right first)
_ORIENT = {2: (0, True), 3: (2, False), 4: (2, True), 5: (1, True), 6: (3, False), 7: (3, True), 8: (1, False)}


@dataclass
class Decoded:
    """Upright RGB pixels (maybe DCT-downscaled) and the original upright size."""

    rgb: np.ndarray
    width: int
    height: int
    format: str


class JpegWarnings(threading.local):
    """Stands in for the `warnings` module inside PyTurboJPEG, whose only use of it is to report libjpeg's
    warning after a decode: the message goes to the calling thread's list instead of the process-wide
    warnings machinery (not thread-safe to capture, and one message per image would flood a run's log)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def warn(self, message, *args, **kwargs) -> None:
        """Record the message for the decode running on this thread."""
        self.seen.append(str(message))

    def __getattr__(self, name):
        return getattr(warnings, name)


JPEG_WARNINGS = JpegWarnings()


@functools.cache
def turbojpeg():
    """The process's TurboJPEG wrapper, shared by every thread: it only holds the library's functions,
    and each of its calls makes (and destroys) its own libjpeg-turbo handle. One per thread loaded a
    new ctypes library object, in a reference cycle, for each shard's new threads (issue 10)."""
    import turbojpeg as module

    module.warnings = JPEG_WARNINGS
    return module.TurboJPEG()


def jpeg_complete(data: bytes) -> bool:
    """Whether an end-of-image marker follows the last scan (libjpeg only warns when it is missing).
    The scan markers are looked for after the last EOI only: a backward search for the last one
    crossed the whole entropy-coded body (0.14 ms a photo, against 0.002)."""
    eoi = data.rfind(b"\xff\xd9")
    return eoi != -1 and data.find(b"\xff\xda", eoi) == -1


def exif_segment(data: bytes) -> bytes | None:
    """The first APP1 Exif segment of a JPEG's header (what Pillow reads), found by walking the marker
    segments up to the first scan: it may follow megabytes of ICC profile or XMP, so no fixed prefix of
    the file is sure to hold it."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more header segments
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            return data[pos + 4:end]
        pos = end
    return None


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of a JPEG (1 when absent or unreadable); reads headers only."""
    segment = exif_segment(data)
    if segment is None:
        return 1
    try:
        exif = Image.Exif()
        exif.load(segment)
        value = exif.get(0x0112, 1)
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
    check_pixels(width, height, cfg.max_pixels)
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
    tj = turbojpeg()
    try:
        width, height, _, _ = tj.decode_header(data)
    except OSError as exc:
        raise Rejected(O.DECODE_ERROR, f"jpeg header: {exc}") from None
    if width < 1 or height < 1 or not jpeg_complete(data):
        raise Rejected(O.DECODE_ERROR, TRUNCATED_JPEG)
    orientation = exif_orientation(data)
    upright = (height, width) if orientation >= 5 else (width, height)
    check_size(*upright, cfg)
    rgb = turbo_pixels(data, jpeg_scale(width, height, cfg.image_size))
    if rgb is None:
        return decode_pillow(data, cfg, "jpeg")
    return Decoded(orient(rgb, orientation), upright[0], upright[1], "jpeg")


TRUNCATED_JPEG = "truncated jpeg (no end-of-image marker)"


def turbo_pixels(data: bytes, scale: tuple[int, int]) -> np.ndarray | None:
    """tj_decode's pixels, or None for the JPEGs libjpeg-turbo cannot make RGB of (CMYK / YCCK: Pillow's);
    Rejected past the scan limit (never to Pillow, which has none) and for damage."""
    try:
        return tj_decode(data, scale)
    except OSError as exc:
        if SCAN_LIMIT in str(exc):
            raise Rejected(O.DECODE_ERROR, f"jpeg: {exc}") from None
        return None


def tj_decode(data: bytes, scale: tuple[int, int]) -> np.ndarray:
    """RGB pixels from libjpeg-turbo at `scale`, at most 500 progressive scans; Rejected when libjpeg
    had to fill in damaged or missing data (DAMAGE)."""
    from turbojpeg import TJFLAG_LIMITSCANS, TJPF_RGB

    seen = JPEG_WARNINGS.seen
    seen.clear()
    rgb = turbojpeg().decode(data, pixel_format=TJPF_RGB, scaling_factor=scale, flags=TJFLAG_LIMITSCANS)
    damage = next((m for m in seen if any(d in m.lower() for d in DAMAGE)), None)
    seen.clear()
    if damage:
        raise Rejected(O.DECODE_ERROR, f"damaged jpeg: {damage}")
    return rgb


BAND_BYTES = 1 << 20
"""Rows converted at a time, in bytes of Pillow's pixels: temporaries stay small whatever the image."""
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def over_white(rgba: np.ndarray, bgra: bool = False) -> np.ndarray:
    """Composite (..., 4) uint8 RGBA (or OpenCV's BGRA) over white into RGB, rounded to the nearest value
    (Numba, one pass)."""
    from .decode_kernels import over_white_into  # Numba loads only when an image has alpha

    out = np.empty((*rgba.shape[:-1], 3), np.uint8)
    over_white_into(np.ascontiguousarray(rgba).reshape(-1), out.reshape(-1), bgra)
    return out


def scaled_gray(values: np.ndarray, scale: np.float32) -> np.ndarray:
    """(H, W) float32 -> (H, W, 1) uint8: times `scale`, rounded and clipped; NaN (float TIFF) as 0."""
    out = np.nan_to_num(values * scale + 0.5, copy=False, nan=0.0)  # a new array: Pillow's view is read-only
    return np.clip(out, 0, 255, out=out).astype(np.uint8)[..., None]


def finite_top(im: Image.Image) -> float:
    """The largest finite value of a float image (0 when none), read in row bands."""
    rows, top = max(1, BAND_BYTES // (4 * max(1, im.width))), 0.0
    for y in range(0, im.height, rows):
        band = np.asarray(im.crop((0, y, im.width, min(im.height, y + rows))), np.float32)
        top = max(top, float(np.max(band, initial=0.0, where=np.isfinite(band))))
    return top


def band_converter(im: Image.Image):
    """A function: one row band of `im` (a Pillow image) -> uint8 RGB, or gray that broadcasts to RGB.

    32-bit gray is scaled by its range: up to 255 as is, above as 16-bit; float gray whose values all lie
    within 0..1 (the usual convention of float TIFF) as 0..1."""
    if im.mode.startswith("I;16"):
        return lambda band: (np.asarray(band) >> 8).astype(np.uint8)[..., None]
    if im.mode in ("I", "F"):
        top = im.getextrema()[1]  # one pass over Pillow's pixels, no copy
        if not np.isfinite(top):  # NaN (it ends Pillow's search where it starts) or infinity: finite values only
            top = finite_top(im)
        scale = np.float32(255.0 / 65535.0 if top > 255 else 255.0 if im.mode == "F" and top <= 1 else 1.0)
        return lambda band: scaled_gray(np.asarray(band, np.float32), scale)
    if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        return lambda band: over_white(np.asarray(band.convert("RGBA")))  # a palette's transparency via Pillow
    if im.mode == "RGB":
        return np.asarray
    return lambda band: np.asarray(band.convert("RGB"))


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8, alpha over white, 16-bit scaled down, in row bands.

    Only the output is full size: Pillow's own tobytes() / convert() would each add a whole-image
    copy (two for np.asarray), and a float conversion eight bytes per channel.
    """
    im.load()
    width, height = im.size
    out = np.empty((height, width, 3), np.uint8)
    convert = band_converter(im)
    rows = max(1, BAND_BYTES // (4 * max(1, width)))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = convert(im.crop((0, top, width, bottom)))
    return out


def orientation_of(im: Image.Image) -> int:
    """The EXIF orientation of a loaded image (1 when absent or unreadable)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- a broken EXIF block must not cost the image
        return 1
    return value if value in range(1, 9) else 1


@functools.cache
def opencv():
    """The crop stage's OpenCV (already in every worker), its log quieted to fatal errors: a WebP it cannot
    read is the row's counted outcome (Pillow then names the fault), not an "[ERROR:0@...] imdecode_" line
    on stderr from every worker."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)
    return cv2


def webp_pixels(data: bytes, im: Image.Image) -> np.ndarray | None:
    """RGB of a WebP whose header Pillow read, through OpenCV's libwebp (first frame, alpha over white), or
    None where OpenCV does not give the picture Pillow would (Pillow then decodes it, or names the fault).

    The same pixels as Pillow's for lossy, lossless and alpha WebP (tests/test_decode.py) at ~0.65-0.75x the CPU:
    Pillow decodes every WebP through libwebp's animation decoder into RGBA canvases (300 against 233 ms,
    then a 28 against 10 ms conversion, on a 4096x4096 wallpaper)."""
    cv2 = opencv()
    try:
        px = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # EXIF orientation left to orient()
    except cv2.error:
        return None
    if px is None or px.dtype != np.uint8 or px.shape[:2] != (im.height, im.width) or px.ndim != 3:
        return None
    if px.shape[2] == 4:
        return over_white(px, bgra=True)
    return cv2.cvtColor(px, cv2.COLOR_BGR2RGB, dst=px) if px.shape[2] == 3 else None


def pillow_pixels(im: Image.Image, cfg: ImageConfig, fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    """(RGB, EXIF orientation) of an opened image whose header passed the checks; first frame only."""
    if im.format in ("JPEG", "MPO"):
        im.draft("RGB", (cfg.image_size, cfg.image_size))  # DCT scaling (the CMYK path), after the size check
    with BUDGET.reserve(im.width * im.height * COST.get(fmt, 1), cfg.max_pixels):
        return rgb_of(im, fmt, data), orientation_of(im)


def rgb_of(im: Image.Image, fmt: str, data: bytes) -> np.ndarray:
    """The pixels of an opened image as RGB: WebP through OpenCV where it can, the rest through Pillow."""
    rgb = webp_pixels(data, im) if fmt == "webp" else None
    return to_rgb(im) if rgb is None else rgb


def decode_pillow(data: bytes, cfg: ImageConfig, fmt: str) -> Decoded:
    """The allowed formats other than baseline JPEG; the header is checked before any pixel is read."""
    try:
        with open_image(data, cfg.max_pixels) as im:
            width, height = im.size
            check_size(width, height, cfg)  # symmetric in width/height: valid before EXIF is read
            rgb, orientation = pillow_pixels(im, cfg, sniff(data), data)
            fmt = (im.format or fmt).lower()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(O.DECOMPRESSION_BOMB, str(exc)[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise Rejected(O.DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:200]) from None
    if orientation >= 5:
        width, height = height, width
    return Decoded(orient(rgb, orientation), width, height, fmt)


def decode_full(data: bytes, max_pixels: int) -> np.ndarray:
    """Upright RGB at full size under the same policy, without the size rules (the `condition` command, the
    preview). A JPEG goes through libjpeg-turbo as in the shards, so a truncated or damaged one is Rejected as
    there (Pillow fills the missing blocks with gray and says nothing)."""
    try:
        fmt = sniff(data)
        with open_image(data, max_pixels) as im, BUDGET.reserve(im.width * im.height * COST.get(fmt, 1), max_pixels):
            rgb = full_jpeg(data) if fmt == "jpeg" else None
            if rgb is None:  # not a JPEG, or one libjpeg-turbo cannot make RGB of
                rgb = rgb_of(im, fmt, data)
            orientation = orientation_of(im)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected(O.DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:200]) from None
    return orient(rgb, orientation)


def full_jpeg(data: bytes) -> np.ndarray | None:
    """A JPEG's pixels at 1/1 through libjpeg-turbo with the shards' checks; None where Pillow must decode it."""
    if not jpeg_complete(data):
        raise Rejected(O.DECODE_ERROR, TRUNCATED_JPEG)
    return turbo_pixels(data, (1, 1))


def decode(data: bytes, cfg: ImageConfig) -> Decoded:
    """Sniff the bytes and decode them to upright RGB, or raise Rejected."""
    fmt = sniff(data)
    return decode_jpeg(data, cfg) if fmt == "jpeg" else decode_pillow(data, cfg, fmt)
