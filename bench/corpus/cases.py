"""Profile "small": good images in every format plus the catalogue of bad cases, one row each.

Each bad case is a row whose URL points at a route of the server (bench/corpus/serve.py) or at a
file made broken on purpose, with the outcome the engine must give it (docs/CORPUS.md lists them).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from .encoders import animated_gif, encode, exif_rotated_jpeg, jpeg_bomb, png16, png_bomb
from .rows import UNICODE_CAPTIONS, Builder

# The port nobody listens on: connecting to it is refused at once (tcpmux, never served here).
REFUSED_URL = "http://127.0.0.1:1/refused.jpg"


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


def add_good(b: Builder, n_images: int) -> None:
    """Good images in every format and many sizes; every fifth row without WIDTH/HEIGHT."""
    for i in range(n_images):
        fmt = GOOD_FORMATS[i % len(GOOD_FORMATS)]
        w, h = _good_size(b.rng, fmt)
        data, ext = _encode_good(b.photo(w, h, gray=fmt.endswith("gray") and b.rng.random() < 0.5), fmt, b.rng)
        name = b.save(fmt, data, ext)
        b.add(f"files/{name}", "ok", fmt, (None, None) if i % 5 == 4 else (w, h))


def add_metadata_cases(b: Builder) -> None:
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


def add_http_cases(b: Builder) -> None:
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
    name, wh = b.jpeg_file("brotli_unasked")
    b.add(f"br/{name}", "unsupported_format", "brotli_unasked", wh)


def add_redirect_and_optout_cases(b: Builder) -> None:
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


def add_body_cases(b: Builder, bomb_pixels: int) -> None:
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


def add_caption_cases(b: Builder, invalid_utf8: bool) -> None:
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
