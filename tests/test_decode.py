import numpy as np
import pytest
from PIL import Image

from engine import outcomes as O
from engine.config import ImageConfig
from engine.decode import Rejected, decode, jpeg_complete, jpeg_scale, sniff

from .conftest import encode, scaled

pytestmark = pytest.mark.quick
CFG = ImageConfig()


def mean_abs(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_jpeg_is_downscaled_in_dct_domain_but_covers_target(astronaut):
    big = scaled(astronaut, 2400, 1600)
    out = decode(encode(big, quality=92), CFG)
    assert (out.width, out.height, out.format) == (2400, 1600, "jpeg")
    assert out.rgb.shape[0] >= 512 and out.rgb.shape[0] < 1600  # scaled, but never below the crop
    # power-of-2 scales only (the SIMD ones): 1600 -> 800, never 600 (3/8)
    assert jpeg_scale(2400, 1600, 512) == (1, 2)
    assert jpeg_scale(600, 600, 512) == (1, 1)
    assert jpeg_scale(512, 700, 512) == (1, 1)
    assert jpeg_scale(4096, 5000, 512) == (1, 8) and jpeg_scale(4088, 5000, 512) == (1, 4)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"quality": 90}), ("BMP", {}), ("TIFF", {})])
def test_other_formats_through_pillow(astronaut, fmt, kw):
    out = decode(encode(scaled(astronaut, 700, 600), fmt, **kw), CFG)
    assert out.rgb.shape == (600, 700, 3) and out.rgb.dtype == np.uint8


def test_exif_rotated_jpeg_comes_out_upright(astronaut):
    upright = scaled(astronaut, 600, 800)  # portrait
    stored = np.ascontiguousarray(np.rot90(upright, -1))  # camera stored it turned: 800 wide, 600 high
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CW to view" ... as cameras write for this storage
    data = encode(stored, quality=95, exif=exif.tobytes())
    out = decode(data, CFG)
    assert (out.width, out.height) == (600, 800)
    h, w = out.rgb.shape[:2]
    assert (h, w) == (800, 600)  # not DCT-scaled: 1/2 (the next power of 2) would fall below the 512 crop
    assert mean_abs(out.rgb, scaled(upright, w, h)) < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(astronaut, orientation):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(scaled(astronaut, 640, 560), quality=95, exif=exif.tobytes())
    with Image.open(__import__("io").BytesIO(data)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert mean_abs(decode(data, CFG).rgb, expected) < 1.0


def test_cmyk_jpeg_becomes_rgb(astronaut):
    cmyk = Image.fromarray(scaled(astronaut, 640, 640)).convert("CMYK")
    out = decode(encode(cmyk, quality=95), CFG)
    assert out.rgb.shape[2] == 3 and min(out.rgb.shape[:2]) >= 512
    ref = scaled(astronaut, out.rgb.shape[1], out.rgb.shape[0])
    assert mean_abs(out.rgb, ref) < 12


def test_16bit_png_grayscale_and_rgb(astronaut):
    gray16 = (np.asarray(Image.fromarray(scaled(astronaut, 600, 600)).convert("L"), np.uint16) * 257)
    out = decode(encode(Image.fromarray(gray16), "PNG"), CFG)
    assert out.rgb.shape == (600, 600, 3)
    assert abs(int(out.rgb[..., 0].mean()) - int((gray16 >> 8).mean())) <= 1


def test_alpha_is_composited_over_white(astronaut):
    rgba = np.dstack([scaled(astronaut, 600, 600), np.zeros((600, 600), np.uint8)])
    out = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), CFG)
    assert (out.rgb == 255).all()


def test_alpha_over_white_is_exactly_rounded_for_every_value_and_alpha():
    """255 - ink * alpha / 255 rounded to the nearest integer, for all 65,536 (value, alpha) pairs."""
    from engine.decode import over_white

    value, alpha = (g.astype(np.uint8).ravel() for g in np.meshgrid(np.arange(256), np.arange(256)))
    rgba = np.stack([value, 255 - value, value // 2, alpha], axis=-1).reshape(256, 256, 4)
    ink, a = 255 - rgba[..., :3].astype(np.int64), rgba[..., 3:4].astype(np.int64)
    assert np.array_equal(over_white(rgba), 255 - (2 * ink * a + 255) // 510)
    assert np.array_equal(over_white(rgba[:, :7]), over_white(rgba)[:, :7])  # a strided view is read right


@pytest.mark.parametrize("kind", ["lossy", "lossless", "lossy_alpha", "lossless_alpha", "exif_rotated"])
def test_webp_decodes_to_pillows_pixels(astronaut, kind):
    """WebP goes through OpenCV's libwebp: the same RGB as Pillow's decode (alpha over white, EXIF turn)."""
    import io

    from engine.decode import orient, over_white

    rgb = scaled(astronaut, 700, 560)
    alpha = np.tile(np.linspace(0, 255, 700, dtype=np.uint8), (560, 1))
    im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA") if "alpha" in kind else Image.fromarray(rgb)
    kw = {"lossless": True} if kind.startswith("lossless") else {"quality": 85}
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        kw["exif"] = exif.tobytes()
    data = encode(im, "WEBP", **kw)
    with Image.open(io.BytesIO(data)) as ref:
        want = over_white(np.asarray(ref.convert("RGBA"))) if "alpha" in kind else np.asarray(ref.convert("RGB"))
    out = decode(data, CFG)
    assert out.format == "webp" and np.array_equal(out.rgb, orient(want, 6 if kind == "exif_rotated" else 1))
    assert (out.width, out.height) == ((560, 700) if kind == "exif_rotated" else (700, 560))


def test_a_broken_animated_webp_is_a_decode_error_and_prints_nothing(astronaut, capfd):
    """OpenCV refuses a damaged frame with a line on stderr; Pillow then names the fault, and the line is
    not printed (every worker of a run would print one per such image)."""
    frames = [Image.fromarray(scaled(astronaut, 640, 560)), Image.fromarray(255 - scaled(astronaut, 640, 560))]
    data = bytearray(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, quality=60))
    first = data.index(b"ANMF") + 60  # inside the first frame's bitstream
    data[first:first + 64] = bytes(64)
    capfd.readouterr()
    with pytest.raises(Rejected) as e:
        decode(bytes(data), CFG)
    assert e.value.outcome == O.DECODE_ERROR
    assert capfd.readouterr().err == ""


def test_animated_gif_gives_first_frame(astronaut, coffee):
    frames = [Image.fromarray(scaled(p, 600, 600)).convert("P") for p in (astronaut, coffee)]
    buf = __import__("io").BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = decode(buf.getvalue(), CFG)
    first = np.asarray(frames[0].convert("RGB"))
    assert mean_abs(out.rgb, first) < 1


@pytest.mark.parametrize("body,reason", [
    (b"", "empty"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "html"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "svg"),
    (b"  <svg width='10'></svg>", "svg"),
    (b"Access denied", "text"),
    (b'{"error": "gone"}', "text"),
])
def test_non_images_are_named(body, reason):
    with pytest.raises(Rejected) as e:
        sniff(body)
    assert e.value.outcome == O.NOT_AN_IMAGE and reason in e.value.reason


def test_truncated_jpeg_and_png_are_decode_errors(astronaut):
    jpg = encode(scaled(astronaut, 700, 700), quality=90)
    png = encode(scaled(astronaut, 700, 700), "PNG")
    for data in (jpg[: len(jpg) // 2], png[: len(png) // 2], jpg[:200]):
        with pytest.raises(Rejected) as e:
            decode(data, CFG)
        assert e.value.outcome == O.DECODE_ERROR


def test_a_jpeg_is_complete_only_with_an_end_marker_after_its_last_scan(astronaut):
    base = encode(scaled(astronaut, 640, 600), quality=90)
    progressive = encode(scaled(astronaut, 640, 600), quality=90, progressive=True)  # several scans
    assert progressive.count(b"\xff\xda") > 1
    assert jpeg_complete(base) and jpeg_complete(progressive)
    assert jpeg_complete(base + b"trailing bytes after the image")  # what some servers append
    cut = progressive[: progressive.rfind(b"\xff\xda") + 100]  # last scan begun, never ended
    assert not jpeg_complete(cut) and not jpeg_complete(base[:-2])
    # an end marker, then another image begun: the last scan has no end marker after it
    assert not jpeg_complete(base + base[: base.find(b"\xff\xda") + 50])


def test_garbage_after_magic_is_a_decode_error():
    with pytest.raises(Rejected) as e:
        decode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, CFG)
    assert e.value.outcome == O.DECODE_ERROR


def test_decompression_bomb_rejected_before_decoding():
    bomb = encode(Image.new("L", (12000, 12000)), "PNG", optimize=True)
    assert len(bomb) < 200_000
    with pytest.raises(Rejected) as e:
        decode(bomb, ImageConfig(max_pixels=100_000_000 // 2))
    assert e.value.outcome == O.DECOMPRESSION_BOMB


@pytest.mark.parametrize("size,outcome", [((500, 800), O.TOO_SMALL), ((1100, 520), O.BAD_ASPECT)])
def test_size_and_aspect_checked_after_decode(astronaut, size, outcome):
    for fmt in ("JPEG", "PNG"):
        with pytest.raises(Rejected) as e:
            decode(encode(scaled(astronaut, *size), fmt), CFG)
        assert e.value.outcome == outcome


@pytest.mark.parametrize("body,name", [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%\x80\x81 binary\nshowpage\n", "PostScript"),
    (b"\n %!PS\n" + bytes(range(256)), "PostScript"),
    (b"\xc5\xd0\xd3\xc6" + bytes(26) + b"%!PS-Adobe-3.0 EPSF-3.0\n", "EPS"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF"),
    (b"\x00\x00\x00\x1cftypavif" + bytes(64), "unknown"),  # AVIF: not on the list
    (b"\x00\x00\x01\x00\x01\x00" + bytes(64), "unknown"),  # ICO
    (b"8BPS\x00\x01" + bytes(64), "unknown"),  # PSD
])
def test_formats_outside_the_allowlist_are_refused(body, name):
    """PostScript, EPS, PDF and every unknown binary body never reach a decoder."""
    with pytest.raises(Rejected) as e:
        decode(body, CFG)
    assert e.value.outcome == O.UNSUPPORTED_FORMAT and name in e.value.reason


def test_bytes_must_match_the_sniffed_format(astronaut):
    """A PNG signature before other bytes goes to the PNG plugin only, never to the next plugin that fits."""
    bmp = encode(scaled(astronaut, 600, 600), "BMP")
    with pytest.raises(Rejected) as e:
        decode(b"\x89PNG\r\n\x1a\n" + bmp, CFG)
    assert e.value.outcome == O.DECODE_ERROR


def test_gif_frame_beyond_the_logical_screen_counts(astronaut):
    """A GIF declaring a 1x1 screen but holding a 600x600 frame is judged by the frame's extent."""
    data = bytearray(encode(Image.fromarray(scaled(astronaut, 600, 600)).convert("P"), "GIF"))
    data[6:10] = (1).to_bytes(2, "little") * 2
    with pytest.raises(Rejected) as e:
        decode(bytes(data), ImageConfig(min_image_size=64, image_size=64, max_pixels=100_000))
    assert e.value.outcome == O.DECOMPRESSION_BOMB
    assert decode(bytes(data), CFG).rgb.shape == (600, 600, 3)


def test_pillow_limit_stays_on_and_follows_max_pixels(monkeypatch):
    """Pillow's own bomb guard is never switched off; a decode sets it to that run's --max-pixels."""
    from engine.imagepolicy import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored for later tests

    assert Image.MAX_IMAGE_PIXELS is not None
    small = encode(Image.new("RGB", (700, 700)), "PNG")
    with open_image(small, 600_000):
        pass
    assert Image.MAX_IMAGE_PIXELS == 600_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow itself refuses beyond twice the limit
        Image.open(__import__("io").BytesIO(encode(Image.new("1", (1300, 1000)), "PNG")))
    with pytest.raises(Rejected) as e:  # between 1x and 2x Pillow only warns: the policy refuses
        with open_image(small, 400_000):
            pass
    assert e.value.outcome == O.DECOMPRESSION_BOMB


def test_pixel_budget_lets_one_large_decode_run_at_a_time():
    """Two reservations that together exceed the limit run one after the other; a lone one always runs."""
    import threading
    import time

    from engine.imagepolicy import PixelBudget

    budget, events = PixelBudget(), []

    def job(name):
        with budget.reserve(60, 100):
            events.append(f"{name}+")
            time.sleep(0.05)
            events.append(f"{name}-")

    threads = [threading.Thread(target=job, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    with budget.reserve(500, 100):  # larger than the limit alone: still admitted
        assert budget.used == 500


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_give_their_first_frame(astronaut, coffee, fmt):
    """APNG and animated WebP: only frame 0 is decoded (later frames are never read)."""
    frames = [Image.fromarray(scaled(p, 600, 600)) for p in (astronaut, coffee)]
    buf = __import__("io").BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    out = decode(buf.getvalue(), CFG)
    assert mean_abs(out.rgb, np.asarray(frames[0])) < 1
