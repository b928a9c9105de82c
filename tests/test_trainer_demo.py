"""trainer.demo and trainer.tiny: the offline tiny model and the demo's short CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.demo import run_demo
from trainer.synthetic import write_shards
from trainer.tiny import build_tiny_model


@pytest.mark.quick
def test_tiny_model_loads_as_a_pipeline(tmp_path):
    """The tiny folder is a valid SD pipeline folder, built without any download."""
    from diffusers import StableDiffusionPipeline

    folder = build_tiny_model(tmp_path / "m")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ids = pipe.tokenizer("the cat and the dog").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size
    assert pipe.vae.config.scaling_factor > 1  # calibrated to unit-variance latents


@pytest.mark.slow
def test_run_demo(tmp_path):
    """run_demo trains from a brace pattern and leaves a model, a checkpoint, a ControlNet and a grid."""
    write_shards(tmp_path / "shards", n_shards=2, per_shard=6, size=128)
    threads = torch.get_num_threads()
    res = run_demo(str(tmp_path / "shards" / "{00000..00001}.tar"), str(tmp_path / "demo"), steps=4)
    assert torch.get_num_threads() == threads
    assert res["steps"] == 4 and res["final_loss"] is not None
    for key in ("model", "controlnet", "checkpoint", "validation_grid", "log"):
        assert Path(res[key]).exists(), key
    assert Path(res["model"]) == tmp_path / "demo" / "tiny-model"
    assert (Path(res["controlnet"]) / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "demo" / "loss.png").is_file() and (tmp_path / "demo" / "progress.png").is_file()
    # the demo's last step: pictures from the ControlNet it trained (bench/demo.py puts them in OUTPUT/generate/)
    from PIL import Image

    from trainer.demo import run_generate

    pngs = run_generate(res, tmp_path / "generate")
    assert str(tmp_path / "generate" / "p0_s0.png") in pngs and str(tmp_path / "generate" / "grid.png") in pngs
    with Image.open(tmp_path / "generate" / "p0_s0.png") as im:
        assert im.size == (64, 64)
