"""loss.png: drawn with Pillow from train_log.jsonl, raw and smoothed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trainer.plots import RAW, SMOOTH, read_losses, smooth, write_loss_png

pytestmark = pytest.mark.quick


def test_loss_png_has_raw_and_smoothed_curves(tmp_path):
    """A noisy falling loss: the PNG opens, holds both curve colours, and bad lines are skipped."""
    rng = np.random.default_rng(0)
    lines = [json.dumps({"step": s, "loss": float(1 / s + rng.normal(0, 0.05))}) for s in range(1, 300)]
    lines += ["not json", json.dumps({"step": 300, "loss": float("nan")})]
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    steps, losses = read_losses(tmp_path / "train_log.jsonl")
    assert steps == list(range(1, 300))
    path = write_loss_png(tmp_path)
    with Image.open(path) as im:
        pixels = {tuple(p) for p in np.asarray(im.convert("RGB")).reshape(-1, 3)}
    assert RAW in pixels and SMOOTH in pixels


def test_smoothing_is_debiased_and_an_empty_log_still_draws(tmp_path):
    """The EMA starts at the first value and lags behind a step; no records gives a blank chart, not a crash."""
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([0.0] * 5 + [1.0] * 5)
    assert s[0] == 0.0 and 0 < s[-1] < 1
    with Image.open(write_loss_png(tmp_path)) as im:
        assert im.size == (800, 400)


def test_progress_png_rows_are_pairs_and_columns_are_steps(tmp_path):
    """Validation PNGs of 3 steps x 2 pairs make a 3 x 2 sheet, each image in its own cell."""
    from trainer.plots import write_progress_png

    val = tmp_path / "validation"
    val.mkdir()
    assert write_progress_png(tmp_path) is None  # nothing validated yet
    colours = {}
    for step in (500, 1000, 1500):
        for pair in (0, 1):
            colours[(pair, step)] = (step // 10 % 256, 100 * pair, 50)
            Image.new("RGB", (32, 32), colours[(pair, step)]).save(val / f"step-{step:06d}_p{pair}_s0.png")
            Image.new("RGB", (32, 32), "white").save(val / f"step-{step:06d}_p{pair}_s1.png")  # not in the sheet
    with Image.open(write_progress_png(tmp_path, cell=64)) as im:
        sheet = np.asarray(im.convert("RGB"))
    assert sheet.shape == (16 + 2 * 64, 3 * 64, 3)
    for (pair, step), colour in colours.items():
        col = (500, 1000, 1500).index(step)
        assert tuple(sheet[16 + pair * 64 + 32, col * 64 + 32]) == colour


def test_a_validation_image_cut_short_leaves_its_cell_blank(tmp_path):
    """A validation PNG cut short (a kill while Pillow wrote it, before they were written through a rename) made
    every later progress sheet raise, and with it the resumed run at its next validation step."""
    from trainer.plots import write_progress_png

    val = tmp_path / "validation"
    val.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(val / "step-000010_p0_s0.png")
    whole = val / "step-000020_p0_s0.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(whole)
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(OSError):  # what the sheet met
        Image.open(whole).convert("RGB")
    with Image.open(write_progress_png(tmp_path, cell=32)) as im:
        sheet = np.asarray(im.convert("RGB"))
    assert tuple(sheet[16 + 16, 16]) == (200, 10, 10)
    assert tuple(sheet[16 + 16, 32 + 16]) == (255, 255, 255)  # the cut image's cell, blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.png", "validation"]  # no temporary left


def test_a_run_start_removes_the_temporaries_of_killed_plot_writes(tmp_path):
    """trainer.checkpoint.prune (each run's start, each save) removes what a kill between writing and renaming
    leaves of loss.png, progress.png and the validation images, and nothing else of those folders."""
    from engine.atomic import tmp_path as atomic_tmp
    from trainer.checkpoint import prune

    (tmp_path / "validation").mkdir()
    left = [atomic_tmp(tmp_path / "loss.png"), atomic_tmp(tmp_path / "progress.png"),
            atomic_tmp(tmp_path / "validation" / "step-000010_p0_s1.png"),
            atomic_tmp(tmp_path / "validation" / "step-000010_grid.png")]
    kept = [tmp_path / "loss.png", tmp_path / "validation" / "step-000010_p0_s0.png",
            tmp_path / "validation" / "notes.0a1b2c3d.tmp", tmp_path / "photo.png.0a1b2c3d.tmp"]
    for p in left + kept:
        p.write_bytes(b"x")
    prune(tmp_path, None)
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
