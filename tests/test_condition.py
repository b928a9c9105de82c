"""engine/condition.py against a real ImageMagick 6 run: `-dither None -remap palette.png`, pixel for pixel."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.condition import CONDITIONERS, grayscale, make_conditioner, remap_palette
from engine.palette import (
    DEFAULT_PALETTE,
    NAMED_COLORS,
    is_grayscale_palette,
    parse_color,
    parse_palette,
    tree_order,
)

# Colour photos shipped inside scikit-image's data folder (read from disk, never downloaded).
PHOTOS = [
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png",
]  # fmt: skip
NON_GRAY = "red,green,blue,white,black"
# matplotlib's tab10 colours: a palette where IM's octree search differs from the plain nearest colour.
TAB10 = "#1F77B4,#FF7F0E,#2CA02C,#D62728,#9467BD,#8C564B,#E377C2,#7F7F7F,#BCBD22,#17BECF"


def imagemagick() -> list[str]:
    """The ImageMagick command: Debian's convert-im6.q16, else magick, else /usr/bin/convert."""
    for name in ("convert-im6.q16", "magick"):
        if path := shutil.which(name):
            return [path]
    if Path("/usr/bin/convert").exists():  # never the /usr/local/bin stand-in
        return ["/usr/bin/convert"]
    pytest.fail("ImageMagick not found: these tests compare against it (make system-deps installs it)")


def write_ppm(path: Path, rgb: np.ndarray) -> None:
    """Binary PPM: no compression, so a 16 Mpixel image goes through ImageMagick quickly."""
    h, w, _ = rgb.shape
    path.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(rgb).tobytes())


def read_rgb(path: Path) -> np.ndarray:
    """Any image ImageMagick wrote (gray PNG, palette PNG, PPM) as (H, W, 3) uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def palette_png(tmp: Path, spec: str) -> Path:
    """The tutorial's palette image: `convert xc:black xc:gray50 xc:white +append palette.png`."""
    path = tmp / "palette.png"
    subprocess.run([*imagemagick(), *(f"xc:{c}" for c in spec.split(",")), "+append", str(path)], check=True)
    return path


def im_remap(tmp: Path, rgb: np.ndarray, spec: str, ext: str = "png") -> np.ndarray:
    """What users run, one process per image: convert IN -dither None -remap palette.png OUT."""
    src, dst = tmp / f"in.{ext}", tmp / f"out.{ext}"
    write_ppm(src, rgb) if ext == "ppm" else Image.fromarray(rgb).save(src, compress_level=1)
    pal = palette_png(tmp, spec)
    subprocess.run([*imagemagick(), str(src), "-dither", "None", "-remap", str(pal), str(dst)], check=True)
    return read_rgb(dst)


def skimage_photo(name: str) -> np.ndarray:
    """A photo from scikit-image's data folder, decoded once (JPEGs too) so both sides see the same pixels."""
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as im:
        return np.asarray(im.convert("RGB"))


def rgb_cube() -> np.ndarray:
    """All 2**24 RGB colours as one 4096x4096 image."""
    v = np.arange(1 << 24, dtype=np.uint32)
    return np.stack([v >> 16, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)


def plain_nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Whole-palette argmin of squared distance, first colour on ties: what IM does NOT do in general."""
    px = rgb.reshape(-1, 1, 3).astype(np.int32)
    d = ((px - palette[None].astype(np.int32)) ** 2).sum(-1)
    return palette[d.argmin(1)].reshape(rgb.shape)


@pytest.fixture(scope="module")
def cube() -> np.ndarray:
    return rgb_cube()


# ---------------------------------------------------------------------------------------------
# palette parsing


@pytest.mark.quick
def test_default_palette_is_black_imagemagick_gray50_white():
    assert parse_palette(DEFAULT_PALETTE).tolist() == [[0, 0, 0], [127, 127, 127], [255, 255, 255]]
    assert is_grayscale_palette(DEFAULT_PALETTE) and not is_grayscale_palette(NON_GRAY)


@pytest.mark.quick
def test_parse_palette_forms():
    assert parse_palette(" Red , #00ff00,#00F").tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    assert parse_palette(["grey50", (1, 2, 3)]).tolist() == [[127, 127, 127], [1, 2, 3]]
    assert parse_palette("green").tolist() == [[0, 128, 0]]  # IM's green is SVG's, not X11's
    for bad in ["", "nosuchcolour", "gray101", "#12345", [(0, 0, 256)], ["black"] * 257]:
        with pytest.raises(ValueError):
            parse_palette(bad)


@pytest.mark.quick
def test_every_colour_name_as_imagemagick_reads_it():
    """All table names and gray0..100 / grey0..100 in one ImageMagick process."""
    names = [*NAMED_COLORS, *(f"gray{n}" for n in range(101)), *(f"grey{n}" for n in range(101))]
    raw = subprocess.run(
        [*imagemagick(), *(f"xc:{n}" for n in names), "+append", "-depth", "8", "rgb:-"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    expected = np.frombuffer(raw, np.uint8).reshape(-1, 3)
    assert [list(parse_color(n)) for n in names] == expected.tolist()


# ---------------------------------------------------------------------------------------------
# remap == ImageMagick


@pytest.mark.parametrize("spec", [DEFAULT_PALETTE, NON_GRAY, TAB10])
def test_remap_equals_imagemagick_on_photos(tmp_path, spec):
    palette = parse_palette(spec)
    for name in PHOTOS:
        rgb = skimage_photo(name)
        ours = remap_palette(rgb, palette)
        assert ours.shape == rgb.shape and ours.dtype == np.uint8
        theirs = im_remap(tmp_path, rgb, spec)
        assert np.array_equal(ours, theirs), f"{name}: {np.any(ours != theirs, -1).sum()} pixels differ"


@pytest.mark.parametrize(("spec", "stride"), [(DEFAULT_PALETTE, 1), (TAB10, 13)])
def test_remap_equals_imagemagick_on_rgb_cube(tmp_path, cube, spec, stride):
    """All 2**24 colours (every exact tie, every corner of IM's octree), or every 13th (118 exact ties) for tab10."""
    palette = parse_palette(spec)
    flat = cube.reshape(-1, 3)[::stride]
    sample = flat[: len(flat) // 4096 * 4096].reshape(-1, 4096, 3)  # Debian policy: sides <= 16000
    theirs = im_remap(tmp_path, sample, spec, ext="ppm")
    ours = remap_palette(sample, palette, parallel=False)
    assert np.array_equal(ours, theirs), f"{np.any(ours != theirs, -1).sum()} colours differ"
    assert np.array_equal(remap_palette(sample, palette, parallel=True), ours)
    # The sample must hold what makes IM special (ties, octree misses), or a naive argmin would pass too.
    few = np.s_[:, ::61] if stride == 1 else np.s_[:, ::5]  # a prime stride reaches every part of the cube
    flat_theirs = theirs.reshape(1, -1, 3)[few]
    assert np.any(plain_nearest(sample.reshape(1, -1, 3)[few], palette) != flat_theirs)


@pytest.mark.parametrize("spec", [DEFAULT_PALETTE, NON_GRAY])
def test_packed_remap_with_cell_table_equals_remap_on_every_colour(cube, spec):
    """The engine's path (cell table, then the exact search for straddling cells, packed rows)
    gives every one of the 2**24 colours the index remap_palette (== IM, tests above) gives it."""
    from engine.condition import LUT_MAX_COLORS, remap_packed

    palette = parse_palette(spec)
    assert len(palette) <= LUT_MAX_COLORS  # the table path is the one under test
    img = cube.reshape(4096, 4096, 3)
    packed = remap_packed(img, palette)
    per = 8 // packed.bits
    shifts = (packed.bits * np.arange(per - 1, -1, -1)).astype(np.uint8)
    indices = ((packed.rows[:, 1:, None] >> shifts) & ((1 << packed.bits) - 1)).reshape(4096, -1)[:, :4096]
    assert np.array_equal(packed.colors[indices], remap_palette(img, palette, parallel=False))


@pytest.mark.quick
def test_remap_non_contiguous_and_threads():
    rgb = skimage_photo("astronaut.png")
    palette = parse_palette(NON_GRAY)
    expected = remap_palette(np.ascontiguousarray(rgb[::2, ::-1]), palette)
    assert np.array_equal(remap_palette(rgb[::2, ::-1], palette), expected)
    big = np.tile(rgb, (2, 2, 1))
    want = remap_palette(big, palette, parallel=False)
    assert np.array_equal(remap_palette(big, palette, parallel=True), want)
    results: list[np.ndarray] = []  # racing parallel calls: one runs threaded, the others serially

    def work() -> None:
        results.append(remap_palette(big, palette, parallel=True))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, want) for r in results)


@pytest.mark.quick
def test_remap_rejects_bad_input():
    palette = parse_palette(DEFAULT_PALETTE)
    for bad in [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)]:
        with pytest.raises(ValueError):
            remap_palette(bad, palette)


# ---------------------------------------------------------------------------------------------
# conditioner registry


@pytest.mark.quick
def test_grayscale_equals_imagemagick_colorspace_gray(tmp_path):
    rgb = skimage_photo("coffee.png")
    Image.fromarray(rgb).save(tmp_path / "in.png")
    cmd = [*imagemagick(), str(tmp_path / "in.png"), "-colorspace", "Gray", str(tmp_path / "g.png")]
    subprocess.run(cmd, check=True)
    theirs = read_rgb(tmp_path / "g.png")
    ours = make_conditioner("grayscale")(rgb)
    assert ours.shape == rgb.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs) and np.array_equal(ours, grayscale(rgb))


@pytest.mark.quick
def test_conditioner_registry():
    assert {"palette", "grayscale"} <= set(CONDITIONERS)
    rgb = skimage_photo("chelsea.png")
    cond = make_conditioner("palette", NON_GRAY)
    out = pickle.loads(pickle.dumps(cond))(rgb)  # travels to Ray workers
    assert np.array_equal(out, remap_palette(rgb, parse_palette(NON_GRAY)))
    assert set(map(tuple, out.reshape(-1, 3))) <= set(map(tuple, parse_palette(NON_GRAY).tolist()))
    assert np.array_equal(make_conditioner()(rgb), remap_palette(rgb, parse_palette(DEFAULT_PALETTE)))
    with pytest.raises(ValueError):
        make_conditioner("canny-not-yet")


@pytest.mark.quick
def test_cell_table_kept_on_disk_is_reused_and_a_bad_file_is_not(tmp_path):
    """A built cell table is saved for later processes (their start-up skips the ~0.17 s build);
    a file of the wrong size or with indices outside the palette is rebuilt, not used."""
    from engine import condition as C

    pal = tree_order(parse_palette(DEFAULT_PALETTE)).tobytes()
    built = C.cell_table(pal)
    assert C.load_cells(tmp_path, pal) is None
    C.save_cells(tmp_path, pal, built)
    assert np.array_equal(C.load_cells(tmp_path, pal), built)
    assert [p.name for p in tmp_path.iterdir()] == [C.cells_file(tmp_path, pal).name]  # no temp file left
    other = tree_order(parse_palette(NON_GRAY)).tobytes()
    assert C.load_cells(tmp_path, other) is None  # another palette, another file
    C.cells_file(tmp_path, pal).write_bytes(built.tobytes()[:-1])
    assert C.load_cells(tmp_path, pal) is None
    C.cells_file(tmp_path, pal).write_bytes(np.full(1 << 15, 7, np.uint8).tobytes())
    assert C.load_cells(tmp_path, pal) is None
    C.save_cells(tmp_path / "missing", pal, built)  # an unwritable place: nothing saved, no error
