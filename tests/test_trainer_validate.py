"""trainer.validate: validation images and a grid on disk, guess mode, mid-only inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ModelConfig, ValidationConfig
from trainer.models import load_models
from trainer.tiny import build_tiny_model
from trainer.validate import mid_only, run_validation

pytestmark = [pytest.mark.quick, pytest.mark.usefixtures("one_torch_thread")]



def test_validation_writes_pngs_and_grid(tmp_path):
    """Two pairs x (2 samples + guess mode): 6 PNGs named by step, and a 2 x 4 grid."""
    models = load_models(ModelConfig(model=str(build_tiny_model(tmp_path / "m")), gradient_checkpointing=False),
                         torch.device("cpu"), torch.float32)
    maps = []
    for i in range(2):
        arr = np.zeros((40, 40), np.uint8)
        arr[:, 20 * i:20 * i + 20] = 255
        Image.fromarray(arr, "L").save(tmp_path / f"c{i}.png")
        maps.append(str(tmp_path / f"c{i}.png"))
    cfg = ValidationConfig(validation_prompt=["a", "b"], validation_image=maps, num_validation_images=2,
                           num_inference_steps=2)
    models.controlnet.train()
    out = run_validation(models, cfg, 12, tmp_path / "val", 32, torch.device("cpu"), torch.float32, seed=0)
    names = sorted(p.name for p in out["images"])
    assert names == ["step-000012_p0_guess.png", "step-000012_p0_s0.png", "step-000012_p0_s1.png",
                     "step-000012_p1_guess.png", "step-000012_p1_s0.png", "step-000012_p1_s1.png"]
    grid = Image.open(out["grid"])
    assert grid.size == (4 * 32, 2 * 32)
    assert models.controlnet.training  # put back into training mode
    assert not out["all_black"]


def test_mid_only_zeroes_down_residuals(tmp_path):
    """Inside mid_only the ControlNet returns zero down residuals and the same mid residual."""
    models = load_models(ModelConfig(model=str(build_tiny_model(tmp_path / "m")), gradient_checkpointing=False),
                         torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in models.controlnet.parameters():
            p.add_(0.1)
    args = (torch.randn(1, 4, 8, 8), torch.tensor([5]))
    kw = dict(encoder_hidden_states=torch.randn(1, 77, 32), controlnet_cond=torch.rand(1, 3, 32, 32))
    down, mid = models.controlnet(*args, **kw, return_dict=False)
    with mid_only(models.controlnet):
        down0, mid0 = models.controlnet(*args, **kw, return_dict=False)
    assert all(d.abs().sum() > 0 for d in down) and all(d.abs().sum() == 0 for d in down0)
    torch.testing.assert_close(mid0, mid)
    assert "forward" not in vars(models.controlnet)  # restored
