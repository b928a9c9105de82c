"""Encoders (bytes out); the odd ones are written by hand because Pillow cannot make them."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from PIL import Image


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
