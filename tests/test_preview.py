"""`python -m engine preview`: a grid of image / map / caption from shards read with webdataset's reader."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.preview import CELL, preview
from trainer.synthetic import write_shards

pytestmark = pytest.mark.quick


def add_broken_sample(tar_path):
    """Append a sample whose JPEG is truncated garbage (as a damaged shard might hold)."""
    with tarfile.open(tar_path, "a") as tar:
        for name, data in (("zzbroken.jpg", b"\xff\xd8\xff garbage"), ("zzbroken.txt", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_preview_grid_from_a_brace_pattern_counts_bad_samples(tmp_path):
    """Image and map side by side per cell; an undecodable sample is skipped and counted, not fatal."""
    write_shards(tmp_path / "shards", n_shards=2, per_shard=3, size=64)
    add_broken_sample(tmp_path / "shards" / "00000.tar")
    out = preview([str(tmp_path / "shards" / "{00000..00001}.tar")], str(tmp_path / "p.png"), samples=6, columns=3)
    assert out["samples"] == 6 and out["skipped"] == 1
    with Image.open(tmp_path / "p.png") as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape[1] == 3 * 2 * CELL and grid.shape[0] > 2 * CELL
    # the map half of the first cell is the shard's map (palette values), not the gray background
    cond = grid[:CELL, CELL:2 * CELL]
    assert len(np.unique(cond.reshape(-1, 3), axis=0)) <= 4 and not (cond == 128).all()


def test_preview_cli_on_a_folder_and_a_missing_shard(tmp_path, capsys):
    """The subcommand takes a folder; a shard that is not there exits 2 naming it."""
    write_shards(tmp_path / "shards", n_shards=1, per_shard=2, size=64)
    assert main(["preview", str(tmp_path / "shards"), "--output", str(tmp_path / "p.png")]) == 0
    assert "2 samples" in capsys.readouterr().out
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] == 2 * 2 * CELL
    assert main(["preview", str(tmp_path / "nope" / "00000.tar"), "--output", str(tmp_path / "q.png")]) == 2
    assert "nope" in capsys.readouterr().err
