"""CUDA check of trainer.fused: the flat-buffer 8-bit AdamW against bitsandbytes' AdamW8bit per tensor.

340 tensors (as many as the SD 1.5 ControlNet has), the same steps on both: prints milliseconds per
step of each and whether the weights after them are bitwise equal.

    python -m bench.fused_optim
"""

from __future__ import annotations

import json
import time

import torch


def net() -> torch.nn.Module:
    """170 linear layers: 340 parameter tensors (weights 8-bit, biases with fp32 states)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(170)]).cuda()


def timed(make, steps: int = 30, warm: int = 10) -> tuple[float, list[torch.Tensor]]:
    """ms per zero_grad/forward/backward/step after `warm` steps, and the final weights."""
    m = net()
    opt = make(m)
    x = torch.randn(64, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for i in range(steps):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (steps - warm) * 1e3, [p.detach().clone() for p in m.parameters()]


def main() -> None:
    """Run both optimizers and print one JSON line."""
    import bitsandbytes as bnb

    from trainer.fused import FusedAdamW8bit

    per_ms, per_w = timed(lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=1e-3))
    fused_ms, fused_w = timed(lambda m: FusedAdamW8bit([{"params": list(m.parameters()), "lr": 1e-3}], lr=1e-3))
    equal = all(torch.equal(a, b) for a, b in zip(per_w, fused_w, strict=True))
    print("FUSED_OPTIM", json.dumps({"per_tensor_ms_per_step": round(per_ms, 2), "fused_ms_per_step": round(fused_ms, 2),
                                     "bitwise_equal": equal}), flush=True)


if __name__ == "__main__":
    main()
