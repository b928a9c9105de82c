"""Unusual-but-valid photos and malformed images through the engine's per-image path (shard.prepare:
bytes -> decode -> checks -> crop -> conditioning map -> encoded sample, or Rejected with its outcome).

Every case is built here from a real photo (scikit-image's data folder) with Pillow, TurboJPEG, tifffile,
OpenCV or raw bytes; JPEG variants no library here writes (12-bit, lossless, many-scan progressive) are
written by the small entropy coder below. A valid image must come out as the upright 512x512 sample
(compared with a reference crop of the upright picture); a malformed one as a named outcome.
"""

from __future__ import annotations

import functools
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from engine import outcomes as O
from engine.condition import make_conditioner
from engine.config import EngineConfig
from engine.decode import Rejected, decode_full
from engine.shard import prepare

from .conftest import encode, scaled
from .test_decode_memory import MIB, peak_of_decode

pytestmark = pytest.mark.quick
CFG = EngineConfig(inputs=("x",), output="unused")
CONDITIONER = make_conditioner(CFG.image.conditioner, CFG.image.palette)
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}
"""EXIF orientation -> the transpose that turns the upright picture into what a camera stores with that tag."""


def sample_of(data: bytes) -> np.ndarray:
    """The 512x512 RGB sample prepare() writes for `data` (its KEY.jpg, decoded), its map checked too."""
    prep = prepare(data, CFG, CONDITIONER)
    with Image.open(io.BytesIO(prep.cond_png)) as cond:
        assert cond.size == (512, 512)
    with Image.open(io.BytesIO(prep.jpg)) as im:
        assert im.size == (512, 512)
        return np.asarray(im.convert("RGB"))


def reference(upright: np.ndarray) -> np.ndarray:
    """The sample an upright RGB picture should give: the centre square, resized to 512."""
    h, w = upright.shape[:2]
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(Image.fromarray(upright).resize((512, 512), Image.Resampling.BILINEAR, box=box))


def assert_sample(data: bytes, upright: np.ndarray, tolerance: float = 4.0) -> None:
    """`data` makes the upright picture's sample, within JPEG noise (mean absolute difference)."""
    got = sample_of(data)
    diff = float(np.abs(got.astype(np.int16) - reference(upright).astype(np.int16)).mean())
    assert diff < tolerance, diff


def outcome_of(data: bytes) -> str:
    """The outcome prepare() gives `data` ("ok" when it makes a sample)."""
    try:
        prepare(data, CFG, CONDITIONER)
    except Rejected as rej:
        return rej.outcome
    return O.OK


def exif(orientation: int) -> bytes:
    """An EXIF block holding just an orientation tag."""
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for `upright` under an EXIF orientation."""
    return upright if orientation == 1 else np.asarray(Image.fromarray(upright).transpose(TRANSPOSE[orientation]))


def gray(rgb: np.ndarray) -> np.ndarray:
    """Luma of an RGB picture, as Pillow computes it."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


# ---------------------------------------------------------------------------------------------
# a minimal JPEG writer for the variants no library on hand writes


def pack_bits(codes, lengths) -> bytes:
    """Entropy-coded bytes of (code, bit length) pairs, most significant bit first, padded with ones, 0xFF stuffed."""
    codes, lengths = np.asarray(codes, np.int64), np.asarray(lengths, np.int64)
    codes, lengths = codes[lengths > 0], lengths[lengths > 0]
    pos = np.arange(int(lengths.max()))[None, :]
    bits = (codes[:, None] >> np.clip(lengths[:, None] - 1 - pos, 0, None)) & 1
    flat = bits[pos < lengths[:, None]].astype(np.uint8)
    flat = np.concatenate([flat, np.ones(-len(flat) % 8, np.uint8)])
    return np.packbits(flat).tobytes().replace(b"\xff", b"\xff\x00")


def category(values):
    """JPEG magnitude categories of differences, and their extra bits."""
    v = np.asarray(values, np.int64)
    s = np.where(v == 0, 0, np.floor(np.log2(np.maximum(np.abs(v), 1))).astype(np.int64) + 1)
    return s, np.where(v >= 0, v, v + (1 << s) - 1)


def segment(marker: int, body: bytes) -> bytes:
    """One marker segment."""
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def huffman(table: int, symbols: bytes, length: int) -> bytes:
    """A DHT segment giving each of `symbols` a code of `length` bits (code i = i)."""
    counts = [0] * 16
    counts[length - 1] = len(symbols)
    return segment(0xC4, bytes([table]) + bytes(counts) + symbols)


def frame(marker: int, precision: int, width: int, height: int) -> bytes:
    """A one-component SOF segment."""
    return segment(marker, bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0]))


QUANT = segment(0xDB, bytes([0, 8] + [1] * 63))  # DC step 8: a flat block at m has quantized DC m - 2^(P-1)


def dc_scan(levels: np.ndarray, precision: int, with_eob: bool) -> bytes:
    """Entropy-coded DC differences of flat 8x8 blocks (5-bit code = category), each followed by an EOB ("0")."""
    dc = levels.astype(np.int64).ravel() - (1 << (precision - 1))
    s, extra = category(np.diff(dc, prepend=0))
    n = len(dc)
    parts = [s, extra] + ([np.zeros(n, np.int64)] if with_eob else [])
    lens = [np.full(n, 5), s] + ([np.ones(n, np.int64)] if with_eob else [])
    return pack_bits(np.stack(parts, 1).ravel(), np.stack(lens, 1).ravel())


def flat_blocks_jpeg(levels: np.ndarray, precision: int = 8, marker: int = 0xC0) -> bytes:
    """A grayscale sequential JPEG whose 8x8 blocks are flat at `levels` (DC only): 8- or 12-bit."""
    h, w = levels.shape
    return (b"\xff\xd8" + QUANT + frame(marker, precision, w * 8, h * 8) + huffman(0x00, bytes(range(16)), 5)
            + huffman(0x10, b"\x00", 1) + segment(0xDA, bytes([1, 1, 0, 0, 63, 0]))
            + dc_scan(levels, precision, True) + b"\xff\xd9")


def lossless_jpeg(img: np.ndarray, precision: int = 8) -> bytes:
    """A lossless (SOF3) grayscale JPEG, predictor 1 (the left sample; above for a row's first)."""
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[:, 1:], pred[1:, 0], pred[0, 0] = x[:, :-1], x[:-1, 0], 1 << (precision - 1)
    s, extra = category((x - pred).ravel())
    body = pack_bits(np.stack([s, extra], 1).ravel(), np.stack([np.full(s.size, 5), s], 1).ravel())
    return (b"\xff\xd8" + frame(0xC3, precision, x.shape[1], x.shape[0]) + huffman(0x00, bytes(range(17)), 5)
            + segment(0xDA, bytes([1, 1, 0, 1, 0, 0])) + body + b"\xff\xd9")


def many_scans_jpeg(levels: np.ndarray, n_scans: int) -> bytes:
    """A progressive grayscale JPEG: a DC scan of flat blocks, then `n_scans` AC scans that are nothing but
    end-of-band runs (a few bytes each, yet each a pass over every block: the many-scans attack)."""
    h, w = levels.shape
    codes, lens, left = [], [], levels.size
    while left:  # symbol 0x00 = EOB, one block (code 00); 0xE0 = EOBRUN of 2^14 + 14 extra bits (code 01)
        run = min(left, 32767)
        codes, lens = (codes + [0] * run, lens + [2] * run) if run < 1 << 14 else (codes + [1, run - (1 << 14)], lens + [2, 14])
        left -= run
    ac = segment(0xDA, bytes([1, 1, 0, 1, 63, 0])) + pack_bits(codes, lens)
    return (b"\xff\xd8" + QUANT + frame(0xC2, 8, w * 8, h * 8) + huffman(0x00, bytes(range(16)), 5)
            + huffman(0x10, b"\x00\xe0", 2) + segment(0xDA, bytes([1, 1, 0, 0, 0, 0]))
            + dc_scan(levels, 8, False) + ac * n_scans + b"\xff\xd9")


def block_levels(rgb: np.ndarray) -> np.ndarray:
    """The photo's luma averaged over 8x8 blocks (what a DC-only JPEG can hold)."""
    g = gray(rgb).astype(np.float64)
    h, w = g.shape
    return g.reshape(h // 8, 8, w // 8, 8).mean((1, 3)).round().astype(np.int64)


def flat_picture(levels: np.ndarray) -> np.ndarray:
    """The RGB picture of flat 8x8 blocks at 8-bit `levels`."""
    g = np.repeat(np.repeat(levels, 8, 0), 8, 1).astype(np.uint8)
    return np.dstack([g] * 3)


def test_hand_written_jpeg_writer_is_right(astronaut):
    """The writer's 8-bit sequential and lossless files decode exactly in Pillow: its 12-bit ones are real too."""
    levels = block_levels(scaled(astronaut, 640, 576))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(flat_blocks_jpeg(levels)))), flat_picture(levels)[..., 0])
    g = gray(scaled(astronaut, 640, 576))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(lossless_jpeg(g)))), g)
    assert_sample(flat_blocks_jpeg(levels, 8, 0xC1), flat_picture(levels), 1.0)  # extended sequential (SOF1)


# ---------------------------------------------------------------------------------------------
# valid but unusual


def turbo(rgb: np.ndarray, subsample: str, cmyk: bool = False) -> bytes:
    """A JPEG written by libjpeg-turbo (TurboJPEG): any chroma subsampling, or YCCK from CMYK pixels."""
    import turbojpeg as tj

    from engine.decode import turbojpeg

    if cmyk:  # Adobe's convention, which Pillow reads: inverted CMYK, coded as YCCK
        ink = np.asarray(Image.fromarray(rgb).convert("CMYK"))
        return turbojpeg().encode(np.ascontiguousarray(255 - ink), 95, tj.TJPF_CMYK, tj.TJSAMP_444)
    return turbojpeg().encode(rgb, 95, tj.TJPF_RGB, getattr(tj, f"TJSAMP_{subsample}"))


def mpo(first: np.ndarray, second: np.ndarray) -> bytes:
    """A multi-picture JPEG (as stereo cameras write) of two pictures."""
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(second)], quality=95)
    return buf.getvalue()


JPEG_VARIANTS = {
    "cmyk_adobe": lambda rgb, _: encode(Image.fromarray(rgb).convert("CMYK"), quality=95),
    "ycck_adobe": lambda rgb, _: turbo(rgb, "444", cmyk=True),
    "progressive": lambda rgb, _: encode(rgb, quality=95, progressive=True),
    "restart_intervals": lambda rgb, _: encode(rgb, quality=95, restart_marker_blocks=3),
    "restart_every_row": lambda rgb, _: encode(rgb, quality=95, restart_marker_rows=1),
    "huge_icc_profile": lambda rgb, _: encode(rgb, quality=95, icc_profile=bytes(3_000_000)),
    "mpo_first_picture": lambda rgb, other: mpo(rgb, other),
    **{f"subsampling_{s}": functools.partial(lambda s, rgb, _: turbo(rgb, s), s) for s in ("444", "422", "420", "440", "411")},
}


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
def test_unusual_jpegs_make_the_sample(astronaut, coffee, variant):
    """CMYK/YCCK (Adobe, inverted), progressive, restart markers, every chroma subsampling, a 3 MB ICC
    profile, MPO: the upright sample of the picture."""
    rgb = scaled(astronaut, 803, 641)  # odd sizes: partial MCUs on both edges
    assert_sample(JPEG_VARIANTS[variant](rgb, scaled(coffee, 803, 641)), rgb)


def test_grayscale_jpeg_makes_a_gray_sample(astronaut):
    """One-component JPEG: an RGB sample with equal channels."""
    g = gray(scaled(astronaut, 800, 640))
    assert_sample(encode(g, quality=95), np.dstack([g] * 3))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_in_every_format_gives_the_upright_sample(astronaut, fmt, orientation):
    """A portrait picture stored turned or mirrored, with its EXIF orientation (JPEG APP1, PNG eXIf, WebP
    EXIF chunk, TIFF tag): the sample is the upright picture's."""
    upright = scaled(astronaut, 700, 900)
    kw = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    assert_sample(encode(stored(upright, orientation), fmt, exif=exif(orientation), **kw), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_after_large_header_segments_is_read(astronaut, orientation):
    """The EXIF block after 128 KiB of ICC profile segments (APP2) is still found: the orientation was
    looked for in the file's first 64 KiB only, and such a photo came out sideways."""
    upright = scaled(astronaut, 640, 800)
    data = encode(stored(upright, orientation), quality=95, exif=exif(orientation))
    app1 = data.find(b"\xff\xe1")
    icc = b"".join(segment(0xE2, b"ICC_PROFILE\x00" + bytes([i, 2]) + bytes(65519)) for i in (1, 2))
    assert_sample(data[:app1] + icc + data[app1:], upright)


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_out_of_range_orientation_is_ignored(astronaut, orientation):
    """Orientation 0, 9 or 65535 (no such thing): the picture as stored."""
    rgb = scaled(astronaut, 700, 900)
    assert_sample(encode(rgb, quality=95, exif=exif(orientation)), rgb)
    assert_sample(encode(rgb, "PNG", exif=exif(orientation)), rgb)


def test_broken_exif_block_does_not_cost_the_image(astronaut):
    """An EXIF block whose first IFD lies past its end: the picture as stored. One whose IFD claims 65535
    entries: its first, real entry (orientation 6) is still read."""
    upright = scaled(astronaut, 700, 900)
    data = encode(upright, quality=95, exif=exif(6))
    tiff = data.find(b"Exif\x00\x00") + 6
    assert_sample(data[:tiff + 4] + (0x7FFFFFF0).to_bytes(4, "little") + data[tiff + 8:], upright)
    data = encode(stored(upright, 6), quality=95, exif=exif(6))
    ifd = tiff + int.from_bytes(data[tiff + 4:tiff + 8], "little")
    assert_sample(data[:ifd] + b"\xff\xff" + data[ifd + 2:], upright)


def png16(rgb: np.ndarray, alpha: bool) -> bytes:
    """A 16-bit RGB or RGBA PNG (OpenCV writes them; Pillow does not)."""
    import cv2

    deep = rgb.astype(np.uint16) * 257
    if alpha:
        deep = np.dstack([deep, np.full(deep.shape[:2], 65535, np.uint16)])
    return cv2.imencode(".png", deep[..., [2, 1, 0, 3][: deep.shape[2]]])[1].tobytes()


def tiff_of(array: np.ndarray, **kw) -> bytes:
    """A TIFF written by tifffile (sample formats Pillow does not write)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kw)
    return buf.getvalue()


def test_deep_palette_alpha_and_bilevel_pngs(astronaut):
    """16-bit RGB/RGBA, palette with tRNS, LA and 1-bit PNGs: the picture (transparency over white)."""
    rgb = scaled(astronaut, 800, 640)
    assert_sample(png16(rgb, False), rgb, 2.0)
    assert_sample(png16(rgb, True), rgb, 2.0)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    clear = np.asarray(pal.convert("RGB")).copy()
    clear[np.asarray(pal) == 5] = 255
    assert_sample(encode(pal, "PNG", transparency=5), clear, 2.0)
    g = gray(rgb)
    assert_sample(encode(Image.fromarray(g).convert("LA"), "PNG"), np.dstack([g] * 3), 2.0)
    bilevel = Image.fromarray(g).convert("1", dither=Image.Dither.NONE)  # hard edges: JPEG noise of the sample
    assert_sample(encode(bilevel, "PNG"), np.dstack([np.asarray(bilevel.convert("L"))] * 3), 6.0)


@pytest.mark.parametrize("kind", ["uint16", "uint16_big_endian", "float32_unit", "float32_0_255"])
def test_deep_and_float_tiffs(astronaut, kind):
    """16-bit and 32-bit float gray TIFFs. Float TIFFs hold 0..1 by convention (GIMP, tifffile, scikit-image):
    they came out black (0..1 taken as 0..255 levels)."""
    g = gray(scaled(astronaut, 800, 640))
    array = {"uint16": g.astype(np.uint16) * 257, "uint16_big_endian": g.astype(np.uint16) * 257,
             "float32_unit": g.astype(np.float32) / 255, "float32_0_255": g.astype(np.float32)}[kind]
    data = tiff_of(array, byteorder=">" if "big" in kind else "<")
    assert_sample(data, np.dstack([g] * 3), 2.0)


def test_float_tiff_with_nan_makes_a_sample(astronaut):
    """NaN samples (a float TIFF's "no data") become black, not whatever an undefined cast gives."""
    g = gray(scaled(astronaut, 800, 640))
    values = g.astype(np.float32) / 255
    values[:, :400] = np.nan  # the first sample too: Pillow's extrema are then NaN
    expected = np.dstack([g] * 3)
    expected[:, :400] = 0
    assert_sample(tiff_of(values), expected, 2.0)


@pytest.mark.parametrize("size,outcome", [
    ((512, 512), O.OK), ((511, 512), O.TOO_SMALL), ((512, 511), O.TOO_SMALL),
    ((1024, 512), O.OK), ((1025, 512), O.BAD_ASPECT), ((512, 1024), O.OK), ((512, 1025), O.BAD_ASPECT),
    ((1023, 2046), O.OK), ((1023, 2047), O.BAD_ASPECT),
])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_size_and_aspect_boundaries(astronaut, size, outcome, fmt):
    """Exactly the minimum size and the largest aspect ratio pass; one pixel beyond is refused by name."""
    rgb = scaled(astronaut, *size)
    data = encode(rgb, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert outcome_of(data) == outcome
    if outcome == O.OK:
        assert_sample(data, rgb)


# ---------------------------------------------------------------------------------------------
# malformed


def header_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of a JPEG's segments up to its first scan."""
    out, pos = [], 2
    while pos < len(data):
        marker, end = data[pos + 1], pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        out.append((marker, pos, end))
        if marker == 0xDA:
            return out
        pos = end
    return out


def with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF claims another size (its scan data unchanged)."""
    out = bytearray(data)
    for marker, start, _ in header_segments(data):
        if marker in (0xC0, 0xC1, 0xC2):
            out[start + 5:start + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (CRC fixed)."""
    ihdr = data[16:29]
    return data[:8] + png_chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + ihdr[8:]) + data[33:]


def tiff_tag_patched(data: bytes, tag: str, value: int) -> bytes:
    """A TIFF with one tag's (inline or first stored) value replaced."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        t = tf.pages[0].tags[tag]
        where, size = (t.valueoffset, 4 if t.dtype == 4 else 2)
    out = bytearray(data)
    out[where:where + size] = value.to_bytes(size, "little")
    return bytes(out)


def without_chunk(png: bytes, kind: bytes) -> bytes:
    """A PNG with its first chunk of this kind left out."""
    at = png.index(kind) - 4
    return png[:at] + png[at + 12 + int.from_bytes(png[at:at + 4], "big"):]


def tiff_tag_retyped(data: bytes, tag: str, tiff_type: int) -> bytes:
    """A TIFF with one tag's entry given another field type (its count and value bytes left as they are)."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        where = tf.pages[0].tags[tag].offset + 2  # entry: tag (2 bytes), type (2), count (4), value (4)
    out = bytearray(data)
    out[where:where + 2] = tiff_type.to_bytes(2, "little")
    return bytes(out)


def malformed(rgb: np.ndarray) -> dict:
    """Name -> (body, expected outcome), each built from the photo `rgb`."""
    jpg = encode(rgb, quality=90)
    prog = encode(rgb, quality=90, progressive=True)
    scans = [i for i in range(len(prog) - 1) if prog[i:i + 2] == b"\xff\xda"]
    sof = next((s, e) for m, s, e in header_segments(jpg) if m == 0xC0)
    dht = next(s for m, s, e in header_segments(jpg) if m == 0xC4)
    png = encode(rgb, "PNG")
    bomb_text = zlib.compress(bytes(200_000_000), 9)  # 200 MB of text in 0.2 MB
    gif = encode(Image.fromarray(rgb).convert("P"), "GIF")
    webp = encode(rgb, "WEBP", quality=90)
    tif = tiff_of(rgb, rowsperstrip=64)
    tiled = tiff_of(rgb, tile=(256, 256), compression="zlib")
    bmp = encode(rgb, "BMP")
    levels = block_levels(rgb[:640, :640])
    return {
        "jpeg_sof_65535x65535": (with_size(jpg, 65535, 65535), O.DECODE_ERROR),  # above libjpeg's 65500
        "jpeg_sof_60000x60000": (with_size(jpg, 60000, 60000), O.DECOMPRESSION_BOMB),
        "jpeg_width_0": (with_size(jpg, 0, 640), O.DECODE_ERROR),
        "jpeg_height_0": (with_size(jpg, 800, 0), O.DECODE_ERROR),
        "jpeg_claims_twice_its_size": (with_size(jpg, 1600, 1280), O.DECODE_ERROR),
        "jpeg_claims_8000x8000": (with_size(jpg, 8000, 8000), O.DECODE_ERROR),
        "jpeg_cut_in_half_then_end_marker": (jpg[:len(jpg) // 2] + b"\xff\xd9", O.DECODE_ERROR),
        "progressive_cut_mid_scan": (prog[:(scans[2] + scans[3]) // 2], O.DECODE_ERROR),
        "progressive_cut_mid_scan_then_end_marker": (prog[:(scans[2] + scans[3]) // 2] + b"\xff\xd9", O.DECODE_ERROR),
        "jpeg_bogus_huffman_counts": (jpg[:dht + 5] + b"\xff" * 16 + jpg[dht + 21:], O.DECODE_ERROR),
        "jpeg_two_sof": (jpg[:sof[1]] + with_size(jpg[:sof[1]], 4000, 4000)[sof[0]:] + jpg[sof[1]:], O.DECODE_ERROR),
        "jpeg_12_bit": (flat_blocks_jpeg(levels * 16, 12, 0xC1), O.DECODE_ERROR),
        "jpeg_lossless": (lossless_jpeg(gray(rgb)), O.DECODE_ERROR),
        "jpeg_600_scans": (many_scans_jpeg(levels, 600), O.DECODE_ERROR),
        "png_bad_ihdr_crc": (png[:29] + bytes(4) + png[33:], O.DECODE_ERROR),
        "png_giant_ztxt": (png[:33] + png_chunk(b"zTXt", b"comment\x00\x00" + bomb_text) + png[33:], O.DECODE_ERROR),
        "png_giant_iccp": (png[:33] + png_chunk(b"iCCP", b"icc\x00\x00" + bomb_text) + png[33:], O.DECODE_ERROR),
        "png_palette_without_plte": (without_chunk(encode(Image.fromarray(rgb).quantize(64), "PNG", transparency=3), b"PLTE"),
                                     O.DECODE_ERROR),
        "png_65535x65535": (png_with_size(png, 65535, 65535), O.DECOMPRESSION_BOMB),
        "png_width_0": (png_with_size(png, 0, 640), O.DECODE_ERROR),
        "png_8000x8000_tiny_body": (png_with_size(png, 8000, 8000), O.DECODE_ERROR),
        "gif_screen_65535x65535": (gif[:6] + (65535).to_bytes(2, "little") * 2 + gif[10:], O.DECOMPRESSION_BOMB),
        "webp_riff_size_too_big": (webp[:4] + (len(webp) * 10).to_bytes(4, "little") + webp[8:], O.DECODE_ERROR),
        "webp_riff_size_too_small": (webp[:4] + (100).to_bytes(4, "little") + webp[8:], O.DECODE_ERROR),
        "tiff_strips_past_the_end": (tiff_tag_patched(tif, "StripOffsets", len(tif) + 10_000_000), O.DECODE_ERROR),
        # ASCII, UNDEFINED, FLOAT offsets reached Pillow's load() as text/bytes/floats: TypeError, not an outcome
        **{f"tiff_strip_offsets_of_type_{t}": (tiff_tag_retyped(tif, "StripOffsets", t), O.DECODE_ERROR) for t in (2, 7, 11, 12)},
        "tiff_ifd_past_the_end": (tif[:4] + (len(tif) + 100).to_bytes(4, "little") + tif[8:], O.DECODE_ERROR),
        "tiff_tiles_65520_wide": (tiff_tag_patched(tiled, "TileWidth", 65520), O.DECODE_ERROR),
        "tiff_tiles_65520x8192": (tiff_tag_patched(tiff_tag_patched(tiled, "TileWidth", 65520), "TileLength", 8192),
                                  O.DECOMPRESSION_BOMB),
        "bmp_60000x60000": (bmp[:18] + (60000).to_bytes(4, "little") * 2 + bmp[26:], O.DECOMPRESSION_BOMB),
        "bmp_height_minus_2_31": (bmp[:22] + (-2**31).to_bytes(4, "little", signed=True) + bmp[26:], O.DECOMPRESSION_BOMB),
        "bmp_8000x8000_tiny_body": (bmp[:18] + (8000).to_bytes(4, "little") * 2 + bmp[26:], O.DECODE_ERROR),
    }


def test_malformed_images_end_with_their_named_outcome(astronaut):
    """Each malformed body is refused by name, never an exception, a crash or a sample of garbage. The
    damaged JPEGs (scan data cut short, a SOF claiming more blocks than the data holds) were written as
    samples whose missing blocks libjpeg had filled with gray; 600 scans were decoded (25,000 take minutes)."""
    cases = malformed(scaled(astronaut, 800, 640))
    got = {name: outcome_of(body) for name, (body, _) in cases.items()}
    assert got == {name: outcome for name, (_, outcome) in cases.items()}


def test_the_full_size_decode_refuses_the_same_jpegs(astronaut):
    """`python -m engine condition` and the preview decode at full size (decode_full): the truncated and damaged
    JPEGs came out of Pillow with their missing blocks gray, a map of half a picture. Now each JPEG case ends as in
    the shards."""
    cases = {k: v for k, v in malformed(scaled(astronaut, 800, 640)).items() if k.startswith(("jpeg", "progressive"))}
    got = {}
    for name, (body, _) in cases.items():
        try:
            got[name] = decode_full(body, CFG.image.max_pixels).shape and "decoded"
        except Rejected as e:
            got[name] = e.outcome
    # Where it differs from the shards, it says so: the pixel limit is checked before libjpeg-turbo's 65500 px, and
    # Pillow's libjpeg-turbo 3 decodes lossless JPEG at full size (the shards' DCT-scaled path cannot).
    full_size = {"jpeg_sof_65535x65535": O.DECOMPRESSION_BOMB, "jpeg_lossless": "decoded"}
    assert got == {name: full_size.get(name, outcome) for name, (_, outcome) in cases.items()}


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
def test_the_full_size_decode_reads_unusual_jpegs_as_pillow_does(astronaut, coffee, variant):
    """libjpeg-turbo at 1/1 for decode_full: the same picture as Pillow's for every variant (CMYK/YCCK through
    Pillow itself)."""
    body = JPEG_VARIANTS[variant](scaled(astronaut, 803, 641), scaled(coffee, 803, 641))
    got = decode_full(body, CFG.image.max_pixels)
    want = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 2, variant


def test_12_bit_and_lossless_jpegs_say_why(astronaut):
    """libjpeg-turbo 2.1's TurboJPEG (and Pillow) cannot decode these: the reason names the variant."""
    levels = block_levels(scaled(astronaut, 640, 640))
    for body, words in ((flat_blocks_jpeg(levels * 16, 12, 0xC1), "precision 12"), (lossless_jpeg(flat_picture(levels)[..., 0]), "0xc3")):
        with pytest.raises(Rejected) as e:
            prepare(body, CFG, CONDITIONER)
        assert e.value.outcome == O.DECODE_ERROR and words in e.value.reason


def test_progressive_jpeg_of_too_many_scans_is_refused_by_turbojpeg_not_pillow(astronaut):
    """Past 500 scans the image is refused (libjpeg-turbo's scan limit); Pillow, which has none, never gets it."""
    levels = block_levels(scaled(astronaut, 640, 640))
    assert_sample(many_scans_jpeg(levels, 2), flat_picture(levels), 1.5)  # a few such scans: a real image
    with pytest.raises(Rejected) as e:
        prepare(many_scans_jpeg(levels, 501), CFG, CONDITIONER)
    assert e.value.outcome == O.DECODE_ERROR and "500 scans" in e.value.reason


def test_harmless_libjpeg_warnings_keep_the_image(astronaut):
    """Bytes between the last scan and the end marker (some cameras pad there) make libjpeg warn
    "extraneous bytes": the photo is still good and still made into a sample."""
    rgb = scaled(astronaut, 800, 640)
    jpg = encode(rgb, quality=95)
    assert_sample(jpg[:-2] + bytes(40) + b"\xff\xd9", rgb)


@pytest.mark.parametrize("name", ["jpeg_sof_60000x60000", "png_65535x65535", "gif_screen_65535x65535",
                                  "bmp_60000x60000", "tiff_tiles_65520x8192"])
def test_huge_claims_are_refused_before_allocating(tmp_path, astronaut, name):
    """Refused from the header: the decode's peak RSS stays under 8 MiB (a fresh process, kernel peak mark).
    The TIFF is 800x640 but declares 65520x8192 tiles: libtiff's tile buffer took 1.5 GiB before the tile counted."""
    body, outcome = malformed(scaled(astronaut, 800, 640))[name]
    path = tmp_path / name
    path.write_bytes(body)
    got = peak_of_decode(path)
    assert got["outcome"] == outcome and got["peak"] < 8 * MIB, got
