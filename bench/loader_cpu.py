"""CPU cost of the shard loader: training-process and worker CPU time per batch (no GPU needed).

`python -m bench.loader_cpu [--workers 2] [--batches 300]` writes synthetic shards once, then in a fresh
process for each repeat iterates trainer.data's DataLoader and prints CPU ms a batch: `main` is the
training process (time.process_time: receiving batches), `workers` the DataLoader workers (their
rusage once they are joined: reading tars and decoding). `--baseline DIR` runs another checkout's
loader (DIR on PYTHONPATH) alternately in the same invocation, and the ratios go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/ctrlnet-bench/loader"))


def measure(shards: str, workers: int, batches: int, batch: int, resolution: int) -> dict:
    """Iterate the loader in this process; CPU ms a batch in this process and in its workers."""
    from trainer.config import DataConfig
    from trainer.data import Position, build_loader
    from trainer.tiny import build_tiny_tokenizer

    cfg = DataConfig(shards=shards, resolution=resolution, train_batch_size=batch, num_workers=workers)
    it = iter(build_loader(cfg, build_tiny_tokenizer(WORK / "tok"), 0, Position(), pin_memory=False))
    for _ in range(5):  # workers started, first batches queued
        next(it)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    main_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    del it  # joins the workers, so their CPU time shows in RUSAGE_CHILDREN
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"main_ms_per_batch": 1000 * main_s / batches, "workers_ms_per_batch": 1000 * (kids.ru_utime + kids.ru_stime)
            / (batches + 5), "batches_per_s": batches / wall_s}


def main() -> None:
    """Write the shards, run `--repeats` fresh processes, print each and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout (its root folder) whose loader runs alongside")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shards = str(WORK / "shards" / "{00000..00007}.tar")
    if args.child:
        print(json.dumps(measure(shards, args.workers, args.batches, args.batch, args.resolution)))
        return
    if not (WORK / "shards" / "00007.tar").exists():
        from trainer.synthetic import write_shards

        write_shards(WORK / "shards", n_shards=8, per_shard=200, size=96)
    from bench.results import checkouts, run_alternately

    child = ["--workers", str(args.workers), "--batches", str(args.batches), "--batch", str(args.batch),
             "--resolution", str(args.resolution)]
    runs = run_alternately(str(Path(__file__).resolve()), child, checkouts(args.baseline), args.repeats)
    med = {name: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]} for name, rs in runs.items()}
    print("median", json.dumps(med))
    if args.baseline:
        report(med, args)


def report(med: dict, args) -> None:
    """The loader-cpu section of bench/RESULTS.md: CPU ms a batch, this loader against the baseline."""
    from bench.results import machine_line, update_section

    this, base = med["this"], med["baseline"]
    lines = ["## loader-cpu: CPU time a batch of the shard loader (`python -m bench.loader_cpu --baseline DIR`)", "",
             f"{machine_line()}; {args.workers} DataLoader workers, batch {args.batch}, {args.resolution} px, 8 tars x 200 "
             f"synthetic samples, {args.batches} batches, median of {args.repeats} fresh processes a loader, run "
             "alternately in one invocation. `main`: the training process (receiving batches); `workers`: all "
             "DataLoader workers (reading tars, decoding).", "",
             "| loader | main CPU ms/batch | workers CPU ms/batch |", "|---|---|---|",
             f"| baseline ({args.baseline}) | {base['main_ms_per_batch']:.2f} | {base['workers_ms_per_batch']:.2f} |",
             f"| this (lanes, packed batches) | {this['main_ms_per_batch']:.2f} | {this['workers_ms_per_batch']:.2f} |",
             f"| ratio | **{this['main_ms_per_batch'] / base['main_ms_per_batch']:.2f}x** | "
             f"**{this['workers_ms_per_batch'] / base['workers_ms_per_batch']:.2f}x** |", "",
             "The GPU figure (loader against batches already on the GPU, goal >= 97%) comes from `make bench-train`: "
             "bench/train_bench.py runs trainer.loop, which takes its batches through this loader and "
             "trainer/prefetch.py."]
    update_section("loader-cpu", "\n".join(lines))

if __name__ == "__main__":
    main()
