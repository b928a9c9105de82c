"""Optimizer (8-bit AdamW from bitsandbytes, or PyTorch's AdamW), learning-rate schedule, loss scaler."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the parameter groups; `adamw8bit` keeps both moments in 8 bits (about 4x less memory)."""
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise RuntimeError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                               "or pass --optimizer adamw") from e
        if cfg.fused_optimizer:
            from trainer.fused import FusedAdamW8bit

            return FusedAdamW8bit(groups, lr=cfg.learning_rate, **kw)
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, **kw)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, **kw)


def grad_params(optimizer: torch.optim.Optimizer, groups: list[dict]) -> list[torch.nn.Parameter]:
    """What gradient clipping runs over: the fused optimizer's few flat buffers, else every parameter."""
    flat = getattr(optimizer, "flat_params", None)
    return flat() if flat else [p for g in groups for p in g["params"]]


def lr_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (linear warmup, then the shape)."""
    warm = cfg.lr_warmup_steps
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if cfg.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Scale each group's peak learning rate; a function of the step alone, so resume needs no state."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor


def build_scaler(mixed_precision: str, device: torch.device, bf16_grads: bool = False) -> torch.amp.GradScaler:
    """A GradScaler in every precision: it also skips steps whose gradients are not finite.

    With bf16 gradients (--low-memory) trainer.fused.FiniteGuard does that part alone.

    fp16 needs real loss scaling. For bf16 and fp32 the scale starts at 1 and never grows (a power of
    two either way, so scaling is exact) and the scaler is only the guard against non-finite steps.
    """
    if bf16_grads:
        from trainer.fused import FiniteGuard

        return FiniteGuard()
    if mixed_precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)
