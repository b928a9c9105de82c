"""Paths that need CUDA: fp16 with a GradScaler, bitsandbytes' 8-bit AdamW on the GPU, SDPA flash attention.

Skipped on machines without CUDA (CI); run on the lent GPU with `pytest tests/test_trainer_gpu.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer_helpers import tiny_assets, tiny_config
from trainer.config import TrainConfig
from trainer.synthetic import first_condition
from trainer.train import train

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shards, a tiny model and a validation map."""
    root = tmp_path_factory.mktemp("gpu")
    assets = tiny_assets(root, n_shards=2, per_shard=8, size=64)
    return {**assets, "cond": first_condition(root / "shards" / "00000.tar", root / "cond.png")}


def config(assets, output, precision="fp16", optimizer="adamw8bit", steps=6, resume=None, **kw) -> TrainConfig:
    """A short CUDA run with gradient checkpointing and validation at the end."""
    return tiny_config(
        assets, output, steps=steps, seed=0, mixed_precision=precision, device="cuda",
        data={"resolution": 64, "train_batch_size": 4, "num_workers": 2, "shuffle_buffer": 256},
        model={"gradient_checkpointing": True, **kw},
        optim={"learning_rate": 1e-4, "optimizer": optimizer, "gradient_accumulation_steps": 2},
        checkpoint={"checkpointing_steps": 3, "resume": resume},
        validation={"validation_prompt": ["a photo"], "validation_image": [str(assets["cond"])],
                    "num_validation_images": 1, "num_inference_steps": 3},
    )


def log(output) -> list[dict]:
    """The run's JSONL records."""
    return [json.loads(x) for x in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision,optimizer", [("fp16", "adamw8bit"), ("bf16", "adamw8bit"), ("fp16", "adamw")])
def test_cuda_training_runs(assets, tmp_path, precision, optimizer):
    """Finite losses, a GradScaler scale in fp16, GPU memory logged, validation images written."""
    result = train(config(assets, tmp_path, precision, optimizer), enable_bar=False)
    records = log(tmp_path)
    assert result.step == 6 and len(records) == 6
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)
    assert all(r["gpu_mem_gb"] > 0 for r in records)
    if precision == "fp16":
        assert records[-1]["loss_scale"] > 1.0  # real loss scaling
    assert result.validation_grids and result.validation_grids[-1].exists()
    print(precision, optimizer, [round(r["loss"], 4) for r in records], "scale", records[-1]["loss_scale"])


def test_cuda_resume_restores_8bit_state(assets, tmp_path):
    """The 8-bit optimizer state goes back onto the GPU; the resumed run matches the straight one closely."""
    from safetensors.torch import load_file

    train(config(assets, tmp_path / "a", steps=6), enable_bar=False)
    first = config(assets, tmp_path / "b", steps=6)
    first.max_train_steps = 3
    train(first, enable_bar=False)
    train(config(assets, tmp_path / "b", steps=6, resume="latest"), enable_bar=False)
    a = load_file(str(tmp_path / "a" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print("max weight difference straight vs resumed on CUDA:", worst)
    assert worst < 1e-3  # CUDA kernels (atomics in conv backward) need not be bitwise deterministic
    la, lb = [r["loss"] for r in log(tmp_path / "a")], [r["loss"] for r in log(tmp_path / "b")]
    assert la[:3] == lb[:3]


def test_attention_runs_on_flash_kernel(assets):
    """The UNet's attention goes through SDPA, and runs with only the flash backend allowed (fp16)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unet = UNet2DConditionModel.from_pretrained(assets["model"], subfolder="unet").cuda().half()
    unet.set_attn_processor(AttnProcessor2_0())
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    text = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = unet(x, torch.tensor([10, 500], device="cuda"), encoder_hidden_states=text).sample
    assert torch.isfinite(out).all()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = unet(x, torch.tensor([10, 500], device="cuda"), encoder_hidden_states=text).sample
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_fp16_overflow_steps_are_skipped(assets, tmp_path, monkeypatch):
    """A huge initial loss scale overflows fp16 gradients: the scaler skips those steps and backs off."""
    import trainer.train as tt

    monkeypatch.setattr(tt, "build_scaler", lambda *args, **kw: torch.amp.GradScaler("cuda", init_scale=2.0**40))
    result = train(config(assets, tmp_path, steps=4), enable_bar=False)
    records = log(tmp_path)
    assert result.step == 4
    assert records[-1]["loss_scale"] < 2.0**40  # backed off after overflowing steps


def test_cuda_out_of_memory_prints_the_flags_that_lower_memory(assets, tmp_path, capsys):
    """A real CUDA OOM (the process may use ~0.1% of the card) exits 4 with advice, not a traceback."""
    from trainer.cli import main

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.001)
    try:
        code = main(["--shards", assets["shards"], "--model", str(assets["model"]), "--output", str(tmp_path),
                     "--resolution", "512", "--train-batch-size", "64", "--max-train-steps", "1",
                     "--dataloader-num-workers", "0", "--no-progress"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    err = capsys.readouterr().err
    assert code == 4 and "CUDA ran out of memory" in err and "--train-batch-size 32" in err


def test_cuda_precomputed_merged_compiled_run(assets, tmp_path):
    """Precomputed shards, merged micro-batches, selective checkpointing and torch.compile on CUDA; mfu logged."""
    from trainer.precompute import PrecomputeConfig, precompute

    precompute(PrecomputeConfig(shards=assets["shards"], model=str(assets["model"]), output=str(tmp_path / "pre"),
                                device="cuda", resolution=64))
    cfg = config(assets, tmp_path / "run", steps=4, checkpoint_levels=1, compile=True)
    cfg.data.shards = str(tmp_path / "pre" / "{00000..00001}.tar")
    cfg.data.train_batch_size, cfg.optim.merge_micro_batches = 2, 2
    result = train(cfg, enable_bar=False)
    records = log(tmp_path / "run")
    assert result.step == 4 and all(r["loss"] < 10 for r in records)
    assert all(0 < r["mfu"] < 1 for r in records)
    print("precomputed + merged + compiled:", [(round(r["loss"], 4), round(r["mfu"], 5)) for r in records])


def test_cuda_channels_last_compiled_run_without_pin_thread(assets, tmp_path):
    """--channels-last with torch.compile, and --no-pin-memory (synchronous copies from shared memory), on CUDA."""
    cfg = config(assets, tmp_path / "run", steps=3, checkpoint_levels=1, compile=True, channels_last=True)
    cfg.data.pin_memory = False
    result = train(cfg, enable_bar=False)
    records = log(tmp_path / "run")
    assert result.step == 3 and all(r["loss"] < 10 for r in records)
    assert all(0 < r["host_busy"] <= 1.05 for r in records)


def test_cuda_graphs_train_like_the_eager_step(assets, tmp_path):
    """--cuda-graphs (ControlNet + UNet as one graph, replayed as CUDA graphs) trains, checkpoints and validates
    like the eager step: the same losses within fp16 noise at the same seed (accumulation 2: two replays a step)."""
    eager = config(assets, tmp_path / "eager", steps=4, checkpoint_levels=1)
    graphs = config(assets, tmp_path / "graphs", steps=4, checkpoint_levels=1, cuda_graphs=True)
    assert train(eager, enable_bar=False).step == 4 and train(graphs, enable_bar=False).step == 4
    a, b = log(tmp_path / "eager"), log(tmp_path / "graphs")
    print("eager / cuda graphs:", [(round(x["loss"], 4), round(y["loss"], 4)) for x, y in zip(a, b, strict=True)])
    torch.testing.assert_close([y["loss"] for y in b], [x["loss"] for x in a], rtol=0.05, atol=1e-3)
    assert (tmp_path / "graphs" / "checkpoint-3").is_dir()
