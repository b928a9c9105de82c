"""Host CPU of the training step: training-thread CPU ms per optimizer step of trainer.loop on the tiny model.

`python -m bench.step_cpu [--baseline DIR] [--low-memory]` writes synthetic shards and the tiny model once,
then in a fresh process for each repeat runs `train_loop` (one torch thread, DataLoader workers decoding
elsewhere) and prints the training thread's CPU time (time.thread_time) per step after the first ones:
the per-batch and per-step host work the loop, autograd hooks and the optimizer add around the compute.
`--optimizer-only` times trainer.fused.FusedAdamW8bit alone instead: zero_grad, `--accumulation` forward and
backward passes (the step itself left out) over 340 small tensors (as many as SD 1.5's ControlNet has), so its hooks and calls
are most of the figure. `--baseline DIR` runs another checkout alternately in the same invocation. The tiny model's compute is
part of the figure, so compare variants by their difference or ratio in one invocation, never across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/ctrlnet-bench/step"))


def measure(args) -> dict:
    """Run train_loop in this process; training-thread CPU ms a step after `--warm` steps."""
    import torch

    from trainer.config import TrainConfig
    from trainer.loop import train_loop
    from trainer.train import build_run

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict({
        "output": str(WORK / f"out-{os.getpid()}"), "device": "cpu", "seed": 1, "log_every": 10**6,
        "mixed_precision": "bf16", "max_train_steps": args.warm + args.steps,
        "data": {"shards": str(WORK / "shards" / "{00000..00003}.tar"), "resolution": 32,
                 "train_batch_size": args.batch, "num_workers": 2, "shuffle_buffer": 4},
        "model": {"model": str(WORK / "model"), "low_memory": args.low_memory},
        "optim": {"optimizer": "adamw8bit", "gradient_accumulation_steps": args.accumulation},
        "checkpoint": {"checkpointing_steps": 10**6}, "validation": {"validation_steps": 10**6}})
    run = build_run(cfg, enable_bar=False)
    marks, advance = [], run.log.advance  # the loop calls it once at the end of every step

    def mark() -> None:
        marks.append(time.thread_time())
        advance()

    run.log.advance = mark
    train_loop(run)
    run.log.close()
    ms = 1000 * (marks[-1] - marks[args.warm - 1]) / (len(marks) - args.warm)  # workers started, FLOPs counted
    return {"thread_cpu_ms_per_step": ms}


def measure_optimizer(args) -> dict:
    """Training-thread CPU ms a step of FusedAdamW8bit over 170 Linear(64, 64) layers (340 tensors)."""
    import torch

    from trainer.fused import FusedAdamW8bit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(170)])
    opt = FusedAdamW8bit([{"params": list(m.parameters()), "lr": 1e-4}], lr=1e-4)
    x, spent = torch.randn(args.batch, 64), 0.0
    for i in range(args.warm + args.steps):
        t0 = time.thread_time()
        opt.zero_grad()
        for _ in range(args.accumulation):
            m(x).pow(2).mean().backward()
        spent += (time.thread_time() - t0) * (i >= args.warm)
        opt.step()  # bitsandbytes' CPU kernels: long and noisy here, the same in both checkouts
    return {"thread_cpu_ms_per_step": 1000 * spent / args.steps}


def main() -> None:
    """Write the assets, run `--repeats` fresh processes per variant alternately, print each and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--low-memory", action="store_true", help="bf16 weights, FiniteGuard (--low-memory)")
    ap.add_argument("--optimizer-only", action="store_true", help="time FusedAdamW8bit alone (340 tensors)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout (its root folder) run alternately")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_optimizer(args) if args.optimizer_only else measure(args)))
        return
    if not (WORK / "model").exists():
        from trainer.synthetic import write_shards
        from trainer.tiny import build_tiny_model

        write_shards(WORK / "shards", n_shards=4, per_shard=50, size=48)
        build_tiny_model(WORK / "model")
    from bench.results import checkouts, run_alternately

    child = [a for a in sys.argv[1:] if a != "--baseline" and a != args.baseline]
    results = run_alternately(str(Path(__file__).resolve()), child, checkouts(args.baseline), args.repeats)
    runs = {name: [r["thread_cpu_ms_per_step"] for r in rs] for name, rs in results.items()}
    for stat, pick in (("median", lambda v: sorted(v)[len(v) // 2]), ("min", min)):  # min: least disturbed by load
        got = {name: pick(v) for name, v in runs.items()}
        ratio = f", ratio this/baseline {got['this'] / got['baseline']:.3f}" if args.baseline else ""
        print(f"{stat} thread CPU ms/step", json.dumps({k: round(v, 3) for k, v in got.items()}) + ratio)


if __name__ == "__main__":
    main()
