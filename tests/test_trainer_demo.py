"""trainer.demo and trainer.tiny: the offline tiny model and the demo's short CPU run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# The demo's training and generation, in a fresh process so its console is what a user sees.
DEMO_SCRIPT = """
import json, sys, torch
from trainer.demo import run_demo, run_generate
threads = torch.get_num_threads()
res = run_demo(sys.argv[1], sys.argv[2], steps=4)
res["threads_kept"] = torch.get_num_threads() == threads
res["pngs"] = run_generate(res, sys.argv[3])
print(json.dumps(res))
"""
# Lines a quiet console must not show: library notices a user cannot act on, bars of instant loads.
NOISE = re.compile(r"warn|accelerate|torch_dtype|float32|torchvision|Loading pipeline components|Loading weights|"
                   r"Writing model shards|kernels-community", re.IGNORECASE)
ALLOWED_NOISE: dict[str, str] = {}  # substring of an allowed line -> why a user may see it (none today)


def noise(stderr: str) -> list[str]:
    """The lines of `stderr` (progress bars split at carriage returns) that a quiet run must not print."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [x for x in lines if NOISE.search(x) and not any(ok in x for ok in ALLOWED_NOISE)]


def test_noise_finds_the_notices_a_quiet_run_must_not_print():
    stderr = ("There are modules in UNet2DConditionModel that should be kept in float32: []. ... set `torch_dtype`\n"
              "Loading pipeline components...: 100%|##| 5/5\rok line\nUserWarning: x\n"
              "Failed to load CPU gemm_4bit_forward from kernels-community: ...\n")
    assert len(noise(stderr)) == 4 and noise("saved /tmp/x/checkpoint-2\n") == []


@pytest.mark.slow
def test_run_demo(tmp_path):
    """run_demo trains from a brace pattern and leaves a model, a checkpoint, a ControlNet and a grid;
    run_generate draws with it; and the console shows no warning or loading bar while they run."""
    write_shards(tmp_path / "shards", n_shards=2, per_shard=6, size=128)
    proc = subprocess.run([sys.executable, "-c", DEMO_SCRIPT, str(tmp_path / "shards" / "{00000..00001}.tar"),
                           str(tmp_path / "demo"), str(tmp_path / "generate")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert noise(proc.stderr) == [], proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["threads_kept"]
    assert res["steps"] == 4 and res["final_loss"] is not None
    for key in ("model", "controlnet", "checkpoint", "validation_grid", "log"):
        assert Path(res[key]).exists(), key
    assert Path(res["model"]) == tmp_path / "demo" / "tiny-model"
    assert (Path(res["controlnet"]) / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "demo" / "loss.png").is_file() and (tmp_path / "demo" / "progress.png").is_file()
    # the demo's last step: pictures from the ControlNet it trained (bench/demo.py puts them in OUTPUT/generate/)
    from PIL import Image

    pngs = res["pngs"]
    assert str(tmp_path / "generate" / "p0_s0.png") in pngs and str(tmp_path / "generate" / "grid.png") in pngs
    with Image.open(tmp_path / "generate" / "p0_s0.png") as im:
        assert im.size == (64, 64)
