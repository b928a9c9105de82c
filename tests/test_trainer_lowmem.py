"""--low-memory on the tiny model (CPU, bf16): its loss curve matches the default setting's within noise."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer_helpers import tiny_assets, tiny_config
from trainer.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shards and a tiny model."""
    return tiny_assets(tmp_path_factory.mktemp("lowmem"), n_shards=2, per_shard=8, size=48, cond_mode="L")


def losses(assets, out, low_memory: bool, steps: int = 14) -> list[float]:
    """Per-step losses of a bf16 CPU run (same seed, data and draws), default or --low-memory."""
    cfg = tiny_config(assets, out, steps=steps, seed=1, mixed_precision="bf16", model={"low_memory": low_memory},
                      optim={"learning_rate": 2e-3, "optimizer": "adamw8bit", "gradient_accumulation_steps": 2})
    train(cfg, enable_bar=False)
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_low_memory_matches_default_loss_curve(assets, tmp_path):
    """Same curve within bf16 noise: step by step close, the same overall descent, and bf16 weights exported."""
    default = torch.tensor(losses(assets, tmp_path / "default", False))
    low = torch.tensor(losses(assets, tmp_path / "low", True))
    print("default", [round(x, 4) for x in default.tolist()], "\nlow    ", [round(x, 4) for x in low.tolist()])
    assert ((low - default).abs() / default).max() < 0.03  # observed: under 0.2%
    assert abs(low[-6:].mean() - default[-6:].mean()) < 0.05 * default[-6:].mean()
    assert low[-6:].mean() < 0.9 * low[:4].mean() and default[-6:].mean() < 0.9 * default[:4].mean()
    assert (tmp_path / "low" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
