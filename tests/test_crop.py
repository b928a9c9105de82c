import numpy as np
import pytest
from PIL import Image

from engine import outcomes as O
from engine.crop import center_crop
from engine.decode import Rejected

from .conftest import scaled

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("w,h", [(512, 512), (700, 512), (512, 900), (1536, 1024), (2000, 1999), (4100, 2731)])
def test_crop_is_square_and_matches_resize_then_crop(astronaut, w, h):
    src = scaled(astronaut, w, h)
    out = center_crop(src, 512)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    s = 512 / min(w, h)
    rw, rh = round(w * s), round(h * s)
    ref = np.asarray(Image.fromarray(src).resize((rw, rh), Image.Resampling.LANCZOS))
    top, left = (rh - 512) // 2, (rw - 512) // 2
    diff = np.abs(out.astype(int) - ref[top:top + 512, left:left + 512].astype(int))
    assert diff.mean() < 3.0


@pytest.mark.parametrize("name", ["bicubic", "bilinear", "box"])
@pytest.mark.parametrize("side", [1100, 2731, 4099])
def test_large_factors_average_fine_detail_instead_of_aliasing(name, side):
    """One-pixel stripes shrunk 2-8x (a PNG or WebP, which no DCT scaling shrank) come out an even gray:
    sampling them with a filter of fixed support instead would leave stripes of 0..255."""
    stripes = np.zeros((side, side + 3, 3), np.uint8)
    stripes[:, ::2] = 255
    out = center_crop(stripes, 512, name).astype(int)
    assert out.shape == (512, 512, 3)
    assert abs(out.mean() - 127.5) < 4 and out.std() < 8


def test_never_upscales(astronaut):
    with pytest.raises(Rejected) as e:
        center_crop(scaled(astronaut, 600, 500), 512)
    assert e.value.outcome == O.TOO_SMALL


def test_other_sizes(astronaut):
    assert center_crop(scaled(astronaut, 800, 600), 256).shape == (256, 256, 3)


@pytest.mark.parametrize("name", ["lanczos", "bicubic", "bilinear", "box"])
def test_every_filter_gives_the_same_picture(astronaut, name):
    src = scaled(astronaut, 900, 700)
    ref = center_crop(src, 512).astype(int)
    out = center_crop(src, 512, name)
    assert out.shape == (512, 512, 3)
    assert np.abs(out.astype(int) - ref).mean() < 3
