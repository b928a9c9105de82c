"""Throughput levers that must not change the math: merged micro-batches, and the MFU bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import tiny_assets, tiny_config
from trainer.config import ModelConfig, TrainConfig
from trainer.loop import train_loop
from trainer.train import build_run, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shards and a tiny model."""
    return tiny_assets(tmp_path_factory.mktemp("merge"), n_shards=2, per_shard=6, size=40)


def config(assets, output, batch=1, accum=4, merge=1, seed=2, steps=3) -> TrainConfig:
    """A short fp32 CPU run with 8-bit-free AdamW and gradient checkpointing on."""
    return tiny_config(assets, output, steps=steps, seed=seed, data={"train_batch_size": batch},
                       model={"gradient_checkpointing": True},
                       optim={"gradient_accumulation_steps": accum, "merge_micro_batches": merge})


def run(assets, output, **kw) -> tuple[list[dict], dict]:
    """Train; return the JSONL records and the final ControlNet weights."""
    train(config(assets, output, **kw), enable_bar=False)
    records = [json.loads(x) for x in (output / "train_log.jsonl").read_text().splitlines()]
    return records, load_file(str(output / "controlnet" / "diffusion_pytorch_model.safetensors"))


def first_step_grads(assets, output, **kw) -> list[torch.Tensor]:
    """The accumulated gradients of the first optimizer step (before clipping and the update)."""
    from trainer.loop import next_pass, pass_loss

    cfg = config(assets, output, **kw)
    r = build_run(cfg, enable_bar=False)
    batches, merge = iter(r.loader), cfg.optim.merge_micro_batches
    passes = cfg.optim.gradient_accumulation_steps // merge
    for _ in range(passes):
        pass_loss(r, next_pass(r, batches, merge), merge, passes)
    r.log.close()
    return [p.grad.clone() for p in r.params]


@pytest.mark.parametrize(("batch", "accum", "merge"), [(1, 4, 4), (2, 4, 2)])
def test_merged_micro_batches_are_the_same_math(assets, tmp_path, batch, accum, merge):
    """batch x accum run as fewer, larger passes: same gradients, losses and weights within float tolerance."""
    g0 = first_step_grads(assets, tmp_path / "g0", batch=batch, accum=accum)
    g1 = first_step_grads(assets, tmp_path / "g1", batch=batch, accum=accum, merge=merge)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
    base, w0 = run(assets, tmp_path / "a", batch=batch, accum=accum)
    merged, w1 = run(assets, tmp_path / "b", batch=batch, accum=accum, merge=merge)
    torch.testing.assert_close([r["loss"] for r in merged], [r["loss"] for r in base], rtol=1e-5, atol=1e-7)
    # Adam divides by sqrt(v): where a gradient is ~0, float noise moves a weight by a fraction of lr per step,
    # so bound the worst element by a tenth of the steps' total lr and require the typical one to agree
    diff = torch.cat([(w1[k] - w0[k]).abs().flatten() for k in w0])
    assert diff.max().item() < 0.1 * 3 * 1e-3 and diff.mean().item() < 1e-7
    other, _ = run(assets, tmp_path / "c", batch=batch, accum=accum, merge=merge, seed=3)
    assert [r["loss"] for r in other] != [r["loss"] for r in base]


def test_flops_are_counted_once_per_sample(assets, tmp_path):
    """The first pass counts FLOPs per sample (the same at any batch size); records carry `mfu`."""
    per_sample = []
    for batch in (1, 2):
        cfg = config(assets, tmp_path / f"f{batch}", batch=batch, accum=2, steps=1)
        r = build_run(cfg, enable_bar=False)
        train_loop(r)
        r.log.close()
        per_sample.append(r.flops_per_sample)
        record = json.loads((tmp_path / f"f{batch}" / "train_log.jsonl").read_text().splitlines()[-1])
        assert "mfu" in record and record["mfu"] is None  # no matmul rate is measured off CUDA
        assert 0.0 <= record["data_wait"] <= 1.0  # the share of the step the loop spent waiting for batches
        # the training thread computed on the CPU for part of the window; the process (torch's intra-op threads
        # and the loader's included) at least as much
        assert 0.0 < record["host_busy"] <= 1.05 and record["process_cpu"] >= record["host_busy"] - 0.01
    assert per_sample[0] > 1e6
    assert per_sample[1] == pytest.approx(per_sample[0], rel=0.02)


def test_checkpoint_levels_select_blocks_and_keep_the_loss(assets):
    """--checkpoint-levels 1 recomputes only full-resolution blocks; the loss is the same either way."""
    from trainer.models import load_models
    from trainer.objective import Objective, step_loss

    losses = []
    for levels in (None, 1):
        models = load_models(ModelConfig(model=str(assets["model"]), checkpoint_levels=levels), torch.device("cpu"),
                             torch.float32)
        on = [getattr(m, "gradient_checkpointing", None) for m in models.controlnet.down_blocks]
        up = [getattr(m, "gradient_checkpointing", None) for m in models.unet.up_blocks]
        assert (on, up) == (([True, True], [True, True]) if levels is None else ([True, False], [False, True]))
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
                 "conditioning_pixel_values": torch.rand(2, 3, 32, 32, generator=g)}
        losses.append(step_loss(models, Objective(models.noise_scheduler), batch, g))
    torch.testing.assert_close(losses[0], losses[1])


def test_channels_last_runs_the_same_math(assets):
    """--channels-last puts the trainable and frozen UNets' weights and inputs in NHWC; loss and gradients match."""
    from trainer.models import load_models
    from trainer.objective import Objective, step_loss

    out = []
    for channels_last in (False, True):
        models = load_models(ModelConfig(model=str(assets["model"]), channels_last=channels_last),
                             torch.device("cpu"), torch.float32)
        conv = models.controlnet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
                 "conditioning_pixel_values": torch.rand(2, 3, 32, 32, generator=g)}
        loss = step_loss(models, Objective(models.noise_scheduler), batch, g)
        loss.backward()
        out.append((loss.detach(), conv.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-3, atol=1e-6)


def test_one_denoiser_module_runs_the_same_math(assets, tmp_path):
    """--cuda-graphs' Denoiser (ControlNet and UNet as one module, what torch.compile graphs whole) gives the loss and
    gradients of the two models called apart, bitwise, eager on the CPU; --cuda-graphs off CUDA is refused up front."""
    import dataclasses

    from trainer.models import load_models
    from trainer.objective import Denoiser, Objective, step_loss
    from trainer.train import build_run

    models = load_models(ModelConfig(model=str(assets["model"])), torch.device("cpu"), torch.float32)
    out = []
    for denoiser in (None, Denoiser(models.controlnet, models.unet)):
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
                 "conditioning_pixel_values": torch.rand(2, 3, 32, 32, generator=g)}
        models.controlnet.zero_grad(set_to_none=True)
        loss = step_loss(dataclasses.replace(models, denoiser=denoiser), Objective(models.noise_scheduler), batch, g)
        loss.backward()
        out.append((loss.detach(), models.controlnet.conv_in.weight.grad.clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    cfg = config(assets, tmp_path)
    cfg.model.cuda_graphs = True
    with pytest.raises(ValueError, match="--cuda-graphs needs one CUDA device"):
        build_run(cfg, enable_bar=False)
