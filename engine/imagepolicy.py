"""What may be decoded, shared by the engine (engine/decode.py) and the trainer (trainer/data.py).

* Formats: the bytes are sniffed (never the URL or Content-Type) and only JPEG, PNG, WebP, GIF, BMP
  and TIFF go on, each to Pillow's plugin for that one format (`Image.open(formats=[...])`), so
  PostScript/EPS (Ghostscript), PDF and every other Pillow plugin are never tried.
* Pixels: the count declared in the header is checked when the file is opened, before any pixel or
  EXIF block is read. Pillow's own limit stays on at the same value and its bomb warning is an error.
* Concurrency: decodes reserve their pixel count from a process-wide budget of --max-pixels, so the
  threads of one process never hold more than one maximum-size image being decoded at a time.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator

from PIL import EpsImagePlugin, Image

from . import outcomes as O

# sniffed name -> the one Pillow plugin allowed to open it (MPO, a multi-picture JPEG, comes through JPEG)
ALLOWED = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
# The stated bound on one decode: peak memory <= factor x its 8-bit RGB size (3 bytes a pixel) + slack,
# measured by tests/test_decode_memory.py. Pillow keeps 4 bytes a pixel and the output takes 3.
PEAK_FACTOR = {"webp": 6.6}
"""Per format, where it differs from DEFAULT_PEAK_FACTOR."""
DEFAULT_PEAK_FACTOR = 2.5
PEAK_SLACK = 16 << 20
"""Bytes of fixed overhead on top (row-band temporaries, decoder state)."""
# WebP's pixels come from OpenCV's libwebp (engine/decode.py webp_pixels: at most 3.75x, animated), but
# where OpenCV gives no picture Pillow decodes it, through libwebp's animation decoder, the only WebP
# decoder Pillow offers: two RGBA canvases and a copy of the frame, 6.59x measured on a 32 Mpx RGBA WebP.
# A WebP pixel therefore counts 2.7 against the pixel limit and the decode budget, so that no decode of
# any format costs more than 2.5 x 3 bytes x --max-pixels.
COST = {"webp": 2.7}
DEFAULT_MAX_PIXELS = 80_000_000
"""The trainer's limit, and the engine's --max-pixels default (engine/config.py ImageConfig)."""

# Pillow's own guard stays on; above MAX_IMAGE_PIXELS it warns and above twice that it raises: make
# the warning an error too, so Pillow refuses exactly what --max-pixels refuses.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
# Belt and braces: even an Image.open() elsewhere in this process can never start Ghostscript.
EpsImagePlugin.gs_binary = False


class Rejected(Exception):
    """An image the engine will not use; `outcome` names why (engine/outcomes.py)."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


def sniff(data: bytes) -> str:
    """The allowed format the bytes really hold (a key of ALLOWED), or raise Rejected."""
    if not data:
        raise Rejected(O.NOT_AN_IMAGE, "empty body")
    for fmt, magic in _MAGIC:
        if magic(data):
            return fmt
    for name, magic in _REFUSED:
        if magic(data):
            raise Rejected(O.UNSUPPORTED_FORMAT, f"{name} body (not an allowed image format)")
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<svg", b"<head", b"<body", b"<")):
        kind = "svg" if b"<svg" in data[:4096].lower() else "html/xml"
        raise Rejected(O.NOT_AN_IMAGE, f"{kind} body")
    if head[:1] in (b"{", b"[") or all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        raise Rejected(O.NOT_AN_IMAGE, "text body")
    raise Rejected(O.UNSUPPORTED_FORMAT, f"unknown format (starts {data[:8].hex()})")


_MAGIC = (
    ("jpeg", lambda d: d[:3] == b"\xff\xd8\xff"),
    ("png", lambda d: d[:8] == b"\x89PNG\r\n\x1a\n"),
    ("gif", lambda d: d[:6] in (b"GIF87a", b"GIF89a")),
    ("webp", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP"),
    ("bmp", lambda d: d[:2] == b"BM" and len(d) >= 26),
    ("tiff", lambda d: d[:4] in (b"II*\x00", b"MM\x00*")),
)
# named only for a clearer reason: every unknown binary body is refused the same way
_REFUSED = (
    ("PostScript", lambda d: d.lstrip(b"\x04 \t\r\n")[:2] == b"%!"),
    ("EPS", lambda d: d[:4] == b"\xc5\xd0\xd3\xc6"),
    ("PDF", lambda d: b"%PDF" in d[:1024]),
)


def peak_factor(fmt: str) -> float:
    """K of the stated bound for a format: peak memory of one decode <= K x 3 bytes x pixels + PEAK_SLACK."""
    return PEAK_FACTOR.get(fmt, DEFAULT_PEAK_FACTOR)


def check_pixels(width: int, height: int, max_pixels: int, fmt: str = "") -> None:
    """Reject a declared size above the pixel limit (the decompression-bomb guard), a WebP pixel counting 2.5."""
    cost = COST.get(fmt, 1)
    if width * height * cost > max_pixels:
        share = f"{int(max_pixels / cost)} pixels ({fmt}: --max-pixels / {cost})" if cost > 1 else f"{max_pixels} pixels"
        raise Rejected(O.DECOMPRESSION_BOMB, f"{width}x{height} exceeds {share} (--max-pixels)")


@contextlib.contextmanager
def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """The image opened (header only, no pixels read) by its one allowed plugin, its size checked."""
    fmt = sniff(data)
    Image.MAX_IMAGE_PIXELS = max_pixels  # one value per process in practice: the run's --max-pixels
    try:
        im = Image.open(io.BytesIO(data), formats=[ALLOWED[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(O.DECOMPRESSION_BOMB, str(exc)[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected(O.DECODE_ERROR, f"{fmt}: {type(exc).__name__}: {exc}"[:200]) from None
    with im:
        check_pixels(*im.size, max_pixels, fmt)
        check_tile(im, max_pixels)
        check_strips(im)
        check_palette(im)
        yield im


def check_tile(im: Image.Image, max_pixels: int) -> None:
    """Reject a TIFF whose declared tile is above the pixel limit: libtiff decodes a tile at a time into a
    buffer of the tile's full size, whatever the image's (an 800x640 image declaring 65520x8192 tiles
    took 1.5 GiB)."""
    tags = getattr(im, "tag_v2", None)
    width, height = (int(tags.get(tag) or 0) for tag in (322, 323)) if tags is not None else (0, 0)
    if width * height > max_pixels:
        raise Rejected(O.DECOMPRESSION_BOMB, f"tiff tile {width}x{height} exceeds {max_pixels} pixels (--max-pixels)")


def check_palette(im: Image.Image) -> None:
    """Reject a palette PNG without its PLTE chunk (required by the PNG spec; libpng refuses it too): Pillow
    opens it with no palette, and with a tRNS chunk its convert("RGB") failed an internal assertion (the
    trainer's decode) while the engine's band conversion made it gray (found by mutation fuzzing)."""
    if im.format == "PNG" and im.mode in ("P", "PA") and im.palette is None:
        raise Rejected(O.DECODE_ERROR, "png palette image without a PLTE chunk")


STRIP_TAGS = {273: "StripOffsets", 279: "StripByteCounts", 324: "TileOffsets", 325: "TileByteCounts"}
"""The TIFF tags Pillow seeks and reads by: their values must be whole numbers."""


def check_strips(im: Image.Image) -> None:
    """Reject a TIFF whose strip or tile offsets/sizes are not whole numbers: a StripOffsets tag stored as
    ASCII, UNDEFINED, FLOAT or DOUBLE reached Pillow's load() as text, bytes or floats and raised TypeError
    (found by mutation fuzzing), where every other damage ends as a decode error."""
    tags = getattr(im, "tag_v2", None)
    for tag, name in STRIP_TAGS.items():
        value = tags.get(tag) if tags is not None else None
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(isinstance(v, int) for v in values):
            raise Rejected(O.DECODE_ERROR, f"tiff {name} of type {tags.tagtype.get(tag)} (not whole numbers)")


class PixelBudget:
    """Pixels being decoded in this process; a decode waits while others would take it over the limit.

    One decode is always let through alone, so an image is never refused for lack of budget.
    """

    def __init__(self) -> None:
        self.used = 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int, limit: int) -> Iterator[None]:  # pixels: weighted by COST
        """Hold `pixels` of the budget `limit` for the duration of the block."""
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + pixels <= limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


BUDGET = PixelBudget()
