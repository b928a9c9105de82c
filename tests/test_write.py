import json
import subprocess

import numpy as np
import pytest
import webdataset as wds

from engine.sample import encode_jpeg, encode_png
from engine.write import TarShard, remove_stale_tmp, write_json, write_rows

from .conftest import scaled

pytestmark = pytest.mark.quick


def test_tar_is_whole_or_absent_and_reads_back(tmp_path, astronaut):
    crop = scaled(astronaut, 512, 512)
    cond = np.where(crop > 127, 255, 0).astype(np.uint8)
    tar = TarShard(tmp_path / "00000.tar")
    assert not (tmp_path / "00000.tar").exists()  # only a temporary name while writing
    tar.write("0000000000", encode_jpeg(crop, 95), encode_png(cond), "café ☕", {"url": "http://h/ü"})
    tar.write("0000000001", encode_jpeg(crop, 80), encode_png(cond[..., :1].repeat(3, 2)), "", {"url": "u"})
    tar.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["00000.tar"]
    names = subprocess.run(["tar", "-tf", str(tmp_path / "00000.tar")], capture_output=True, text=True,
                           check=True).stdout.split()
    assert sorted(names) == sorted(f"000000000{i}.{ext}" for i in (0, 1) for ext in ("jpg", "cond.png", "txt", "json"))
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == ["0000000000", "0000000001"]
    assert samples[0]["jpg"].shape == (512, 512, 3)
    assert np.abs(samples[0]["jpg"].astype(int) - crop.astype(int)).mean() < 3
    assert (samples[0]["cond.png"] == cond).all()  # lossless, RGB stored as RGB
    assert samples[1]["cond.png"].shape == (512, 512, 3)  # gray stored as L, decoded back to 3 channels
    assert samples[0]["txt"] == "café ☕" and samples[0]["json"]["url"] == "http://h/ü"


def test_gray_maps_are_stored_with_one_channel():
    gray = np.dstack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3)
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(encode_png(gray))).mode == "L"
    gray[0, 0, 2] = 1
    assert Image.open(io.BytesIO(encode_png(gray))).mode == "RGB"


def test_abort_leaves_nothing(tmp_path):
    tar = TarShard(tmp_path / "00001.tar")
    tar.write("k", b"j", b"p", "t", {})
    tar.abort()
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "00003.tar.abcd1234.tmp").write_bytes(b"partial")
    (tmp_path / "00003.parquet.ffff0000.tmp").write_bytes(b"partial")
    write_json({"a": 1}, tmp_path / "stats.json")
    assert remove_stale_tmp(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
    assert json.loads((tmp_path / "stats.json").read_text()) == {"a": 1}


def test_rows_parquet_keeps_lone_surrogate_free_text(tmp_path):
    import pyarrow.parquet as pq

    write_rows([{"key": "k", "row": 0, "url": "u", "caption": "x\\ud800", "outcome": "ok", "reason": ""}],
               tmp_path / "00000.parquet")
    t = pq.read_table(tmp_path / "00000.parquet")
    assert t.column("outcome").to_pylist() == ["ok"] and t.num_rows == 1


@pytest.mark.parametrize("palette", ["black,gray50,white", "red,#0a0b0c,navy,yellow,white", "black"])
def test_palette_png_decodes_to_the_remapped_pixels_everywhere(astronaut, palette):
    """The engine's palette PNG of a crop decodes to the remapped pixels in Pillow, webdataset's
    rgb8 and the trainer's loader, in fewer bytes than an RGB PNG of them."""
    import io

    from PIL import Image

    from engine.condition import make_conditioner
    from engine.sample import encode_map_png
    from trainer.data import load_pair

    crop = scaled(astronaut, 512, 512)
    cond = make_conditioner("palette", palette)
    png = encode_map_png(cond.packed(crop))
    expected = cond(crop)
    assert Image.open(io.BytesIO(png)).mode == "P"
    assert np.array_equal(wds.autodecode.imagehandler("rgb8")("cond.png", png), expected)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)
    _, trainer_cond = load_pair({"jpg": encode_jpeg(crop, 95), "cond.png": png}, 512)
    assert np.array_equal(trainer_cond, expected)
    assert len(png) < len(encode_png(expected))


PALETTES_BY_BITS = {1: "black,white", 2: "black,gray50,white", 4: "red,#0a0b0c,navy,yellow,white",
                    8: ",".join(f"#{v:02x}{(v * 7) % 256:02x}{(v * 13) % 256:02x}" for v in range(0, 255, 12))}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packed_map_png_is_the_remap_at_any_width(astronaut, bits):
    """The kernel's own scanlines (no index image, no Pillow encode) decode to remap_palette's
    pixels, for every PNG bit depth and for widths that end mid-byte and mid-chunk."""
    import io

    from PIL import Image

    from engine.condition import make_conditioner, remap_packed
    from engine.sample import encode_map_png

    cond = make_conditioner("palette", PALETTES_BY_BITS[bits])
    for h, w in [(512, 512), (37, 301), (5, 1)]:
        crop = np.ascontiguousarray(scaled(astronaut, max(h, w), max(h, w))[:h, :w])
        packed = remap_packed(crop[:, :], cond.palette)
        png = encode_map_png(packed)
        im = Image.open(io.BytesIO(png))
        assert (packed.bits, im.mode, im.size) == (bits, "P", (w, h))
        assert np.array_equal(np.asarray(im.convert("RGB")), cond(crop)), (h, w)


def test_tar_bytes_are_the_ones_tarfile_writes(tmp_path):
    """Re-archiving the members with tarfile's own stream writer gives back the very same bytes."""
    import io
    import tarfile

    tar = TarShard(tmp_path / "00000.tar")
    for i, size in enumerate((0, 1, 511, 512, 513, 20_000)):  # payloads ending on and off a block
        tar.write(f"k{i:04d}", bytes(range(256)) * (size // 256) + b"j" * (size % 256), b"p" * i, "é" * i, {"i": i})
    tar.commit()
    ours = (tmp_path / "00000.tar").read_bytes()
    again = io.BytesIO()
    with tarfile.open(tmp_path / "00000.tar") as src, \
            tarfile.open(fileobj=again, mode="w|", format=tarfile.USTAR_FORMAT) as dst:
        members = src.getmembers()
        for m in members:
            dst.addfile(m, src.extractfile(m))
    assert [m.name for m in members][:4] == ["k0000.cond.png", "k0000.jpg", "k0000.json", "k0000.txt"]
    assert again.getvalue() == ours and len(ours) % tarfile.RECORDSIZE == 0


@pytest.mark.parametrize("name,size,mtime", [("0000000000.jpg", 0, 0), ("k.cond.png", 123_456, 1.8e9 + 0.7),
                                             ("é" * 50, 8**11 - 1, 8**11 - 1), ("x" * 101, 1, 1), ("y", 8**11, 5)])
def test_member_headers_are_tarfiles(name, size, mtime):
    """The filled-in template is tarfile's header, also past its limits (long names, huge sizes)."""
    import tarfile

    from engine.write import _member_info, _ustar, member_header

    try:
        want = _ustar(_member_info(name, size, mtime))
    except ValueError as exc:  # USTAR cannot hold it: the same error either way
        with pytest.raises(ValueError, match=str(exc)[:20]):
            member_header(name, size, mtime)
        return
    assert member_header(name, size, mtime) == want and len(want) == tarfile.BLOCKSIZE
