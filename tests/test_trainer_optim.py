"""trainer.optim: AdamW variants, the warmup/schedule shape, and the scaler as a guard in every precision."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import OptimConfig
from trainer.optim import build_optimizer, build_scaler, lr_factor, set_lr

pytestmark = pytest.mark.quick


def test_optimizers():
    """adamw8bit is bitsandbytes' AdamW8bit, adamw PyTorch's; both take parameter groups with own lrs."""
    p, q = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))
    groups = [{"params": [p], "lr": 1e-3}, {"params": [q], "lr": 1e-4}]
    eight = build_optimizer(groups, OptimConfig(optimizer="adamw8bit", fused_optimizer=False))
    assert type(eight).__name__ == "AdamW8bit" and [g["lr"] for g in eight.param_groups] == [1e-3, 1e-4]
    fused = build_optimizer(groups, OptimConfig(optimizer="adamw8bit"))  # the default: trainer.fused
    assert type(fused).__name__ == "FusedAdamW8bit" and [g["lr"] for g in fused.param_groups] == [1e-3, 1e-4]
    plain = build_optimizer([{"params": [p]}], OptimConfig(optimizer="adamw", learning_rate=2e-5))
    assert isinstance(plain, torch.optim.AdamW) and plain.param_groups[0]["lr"] == 2e-5
    assert OptimConfig(learning_rate=1e-5).decoder_learning_rate == pytest.approx(1e-6)


@pytest.mark.parametrize("shape,mid,end", [("constant", 1.0, 1.0), ("linear", 0.5, 0.0), ("cosine", 0.5, 0.0)])
def test_lr_schedule(shape, mid, end):
    """Linear warmup to the peak, then the named shape; a pure function of the step."""
    cfg = OptimConfig(lr_scheduler=shape, lr_warmup_steps=10)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(mid)
    assert lr_factor(110, cfg, 110) == pytest.approx(end, abs=1e-12)
    assert math.isclose(lr_factor(10, cfg, 110), 1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr(opt, [3e-4], 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.5e-4)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_scaler_skips_nonfinite_steps(precision):
    """Outside fp16 the scaler scales by 1 (exact) and still refuses to step on inf/NaN gradients."""
    scaler = build_scaler(precision, torch.device("cpu"))
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scaler.scale((p * float("nan")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3))  # the NaN step was skipped
    opt.zero_grad()
    loss = (p * 2).sum()
    assert scaler.scale(loss).item() == loss.item() * scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert not torch.equal(p.detach(), torch.ones(3))  # a finite step goes through
