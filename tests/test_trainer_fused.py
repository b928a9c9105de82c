"""trainer.fused: the flat-buffer 8-bit AdamW equals bitsandbytes' per-tensor AdamW8bit; stochastic rounding."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from trainer.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from trainer.fused import FusedAdamW8bit, stochastic_round_

pytestmark = pytest.mark.quick


def net() -> torch.nn.Module:
    """Tensors above and below bitsandbytes' 4096-element 8-bit threshold, none a multiple of 256 long."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 301), torch.nn.LayerNorm(301), torch.nn.Linear(301, 53))


def groups(m: torch.nn.Module) -> list[dict]:
    """Two parameter groups with their own learning rates (as with --unlock-decoder)."""
    ps = list(m.parameters())
    return [{"params": ps[:3], "lr": 3e-3}, {"params": ps[3:], "lr": 1e-3}]


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """A few steps of a regression with zero_grad / backward / step."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(16, 37, generator=gen)).pow(2).mean().backward()
        opt.step()


def test_same_weights_as_adamw8bit_and_resume_from_its_state():
    """Block-aligned flat buffers give bit-identical weights; a per-tensor state dict converts on load."""
    a, b = net(), net()
    kw = dict(lr=1e-3, weight_decay=1e-2)
    per_tensor, fused = bnb.optim.AdamW8bit(groups(a), **kw), FusedAdamW8bit(groups(b), **kw)
    assert sorted(g["bits"] for g in fused.param_groups) == [8, 8, 32, 32]
    train(a, per_tensor, 6)
    train(b, fused, 6)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
        storages = {f.grad.untyped_storage().data_ptr() for f in fused.flat_params()}
        assert q.grad.untyped_storage().data_ptr() in storages  # the gradient is a view of a flat one
    fused.zero_grad()
    assert all(p.grad is None for p in b.parameters()) and all(f.grad is None for f in fused.flat_params())
    c = net()
    resumed = FusedAdamW8bit(groups(c), **kw)
    c.load_state_dict(a.state_dict())
    resumed.load_state_dict(per_tensor.state_dict())
    train(a, per_tensor, 3, seed=2)
    train(c, resumed, 3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_state_dict_round_trip_keeps_dtypes_and_rounding_stream():
    """uint8 codes stay uint8 on load (PyTorch's own loader would cast them), bf16 rounding resumes exactly."""
    a = net().to(torch.bfloat16)
    opt = FusedAdamW8bit(groups(a), lr=1e-3)
    train_bf16(a, opt, 2)
    sd = opt.state_dict()
    b = net().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    again = FusedAdamW8bit(groups(b), lr=1e-3)
    again.load_state_dict(sd)
    assert {v.dtype for s in again.state.values() for v in s.values() if torch.is_tensor(v)} == {
        torch.uint8, torch.float32}
    train_bf16(a, opt, 2)
    train_bf16(b, again, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def train_bf16(m: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """`train` with bf16 inputs."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(16, 37, generator=gen).bfloat16()).float().pow(2).mean().backward()
        opt.step()


def test_stochastic_rounding_is_unbiased():
    """Each value goes to one of its two bf16 neighbours, on average to itself (round-to-nearest would not)."""
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # a quarter of the way to the next bf16
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x.clone(), torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7 * 1.0}
    assert out.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert x.bfloat16().float().mean().item() == 1.0  # nearest rounding loses the increment entirely


def test_low_memory_flag_checks(tmp_path):
    """--low-memory implies bf16; flags that defeat it are refused with an error naming them."""
    def cfg(mp="fp16", opt="adamw8bit", **model):
        return TrainConfig(output=str(tmp_path), data=DataConfig(shards="x.tar"), mixed_precision=mp,
                           model=ModelConfig(model="m", low_memory=True, **model),
                           optim=OptimConfig(optimizer=opt))

    assert cfg().mixed_precision == "bf16"
    with pytest.raises(ValueError, match="--no-gradient-checkpointing"):
        cfg(gradient_checkpointing=False)
    with pytest.raises(ValueError, match="--unlock-decoder"):
        cfg(unlock_decoder=True)
    with pytest.raises(ValueError, match="--mixed-precision no"):
        cfg(mp="no")
    with pytest.raises(ValueError, match="--optimizer adamw"):
        cfg(opt="adamw")


def test_models_and_buffers_are_freed_with_the_optimizer():
    """The gradient hooks must not tie optimizer and models into a cycle the collector cannot free."""
    import gc
    import weakref

    m = net()
    opt = FusedAdamW8bit(groups(m), lr=1e-3)
    train(m, opt, 1)
    flat = weakref.ref(opt.flat_params()[0])
    del m, opt
    gc.collect()
    assert flat() is None


def test_flat_gradients_attach_at_first_gradient_and_later_ones_fire_no_hooks():
    """Flat gradients appear at a step's first gradient (not at forward), its hooks are then off for the rest of
    the step and every accumulation pass, and zero_grad frees the gradients and arms the hooks again;
    accumulated passes still equal bitsandbytes' per-tensor AdamW8bit bit for bit."""
    a, b = net(), net()
    per_tensor, fused = bnb.optim.AdamW8bit(groups(a), lr=1e-3), FusedAdamW8bit(groups(b), lr=1e-3)
    hooks = lambda: sum(len(p._post_accumulate_grad_hooks or {}) for p in b.parameters())  # noqa: E731
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):
        for m, opt, gen in ((a, per_tensor, gen_a), (b, fused, gen_b)):
            opt.zero_grad()
            loss = m(torch.randn(16, 37, generator=gen)).pow(2).mean()
            if opt is fused:
                assert all(f.grad is None for f in fused.flat_params())  # not beside the forward's activations
                assert hooks() == len(fused.model_params)
            for _ in range(3):  # accumulation passes
                loss.backward(retain_graph=True)
            if opt is fused:
                assert hooks() == 1  # the first gradient's parameter keeps its hook (autograd was iterating it)
                assert all(f.grad is not None for f in fused.flat_params())
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    fused.zero_grad()
    assert hooks() == len(fused.model_params) and all(f.grad is None for f in fused.flat_params())


def test_finite_guard_uses_the_clipping_norm_once():
    """With a clipping norm the guard decides on it (no second pass over the gradients) and forgets it after."""
    from trainer.fused import FiniteGuard

    w = torch.nn.Parameter(torch.ones(4))
    opt, guard = torch.optim.SGD([w], lr=0.5), FiniteGuard()
    w.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    guard.norm = torch.nn.utils.clip_grad_norm_([w], 1.0)
    guard.step(opt)
    assert torch.equal(w.detach(), torch.ones(4)) and guard.norm is None  # inf gradient: step skipped
    w.grad = torch.ones(4)
    guard.norm = torch.tensor(float("nan"))  # the norm alone decides, whatever the gradients hold
    guard.step(opt)
    assert torch.equal(w.detach(), torch.ones(4))
    guard.step(opt)  # no norm: min/max of the (finite) gradients, the step is taken
    assert torch.equal(w.detach(), torch.full((4,), 0.5))
