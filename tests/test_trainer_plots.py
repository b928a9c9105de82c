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
