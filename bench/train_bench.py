"""GPU benchmark of the trainer beside diffusers' train_controlnet.py, in one process run on one card.

The full SD 1.5 architecture (random weights), 512x512, fp16 + 8-bit AdamW + gradient checkpointing, the
same 320 samples for both (ours: shards precomputed with `python -m trainer precompute`; the peer: the
same images as a datasets parquet), at the tutorial's flags (batch 1 x accumulation 4) and at batch 8.
Needs CUDA and the peer script in bench/.peers/ (see PEER_SCRIPT). Writes the "train" section of
bench/RESULTS.md.

    python -m bench.train_bench [--cases final|explore|NAME,...] [--steps-scale 1.0]
    python -m bench.train_bench --record bench/.work/train/results.json   # write RESULTS.md from a saved run
    python -m bench.train_bench --profile                                  # cProfile of a batch-1 step

The SD 1.5 configs below are the published ones (runwayml/stable-diffusion-v1-5 unet/vae config.json,
openai/clip-vit-large-patch14 text config); no hub is reachable from the benchmark machines, and the
compute of random weights is the same as of real ones. The tokenizer is the tiny offline one (its ids
are valid inputs of the 49,408-token embedding).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

WORK = Path("bench/.work/train")
PEER_SCRIPT = Path("bench/.peers/diffusers/examples/controlnet/train_controlnet.py")

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}


def build_sd15(folder: Path) -> Path:
    """Write an SD 1.5-shaped diffusers folder with random weights (fp16 variant files) to `folder`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    build_tiny_tokenizer(folder / "tokenizer")
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on the CPU
        parts = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
    for name, model in parts.items():
        model.half().save_pretrained(folder / name, variant="fp16")
    DDPMScheduler.from_config(SD15_SCHEDULER).save_pretrained(folder / "scheduler")  # tolerates DDIM-only keys
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


class GpuMemoryPoller:
    """Peak GPU memory in use on the card and mean utilisation (nvidia-smi, every 0.5 s), for any process."""

    def __init__(self) -> None:
        self.peak_mib, self.util, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
                used, util = (int(x) for x in out.split(",")[:2])
                self.peak_mib = max(self.peak_mib, used)
                if used > 2048:  # only while a model is on the card
                    self.util.append(util)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def mean_util(self) -> float | None:
        """Mean GPU utilisation (%) over the samples taken while a model was loaded."""
        return round(sum(self.util) / len(self.util), 1) if self.util else None

    def __enter__(self) -> GpuMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def steady_rate(records: list[dict], samples_per_step: int, skip: int) -> float:
    """Samples/s between the first record past `skip` steps and the last (warm-up and compiling excluded)."""
    rs = [r for r in records if r["step"] >= skip]
    if len(rs) < 2:
        return float("nan")
    return (rs[-1]["step"] - rs[0]["step"]) * samples_per_step / (rs[-1]["time"] - rs[0]["time"])


def record_rates(records: list[dict], samples_per_step: int) -> list[list]:
    """(step, samples/s since the previous record, data_wait, host_busy, process_cpu) of every record: where a
    run slowed down, and whether the training thread (host_busy near 1: bound by host work) or waiting did it."""
    return [[b["step"], round((b["step"] - a["step"]) * samples_per_step / (b["time"] - a["time"]), 1),
             round(b.get("data_wait", 0.0), 3), b.get("host_busy"), b.get("process_cpu")]
            for a, b in itertools.pairwise(records)]


# name -> settings. "tutorial": batch 1 x accumulation 4 with checkpointing (ours runs it as one pass of 4);
# "b8": batch 8 with checkpointing. levels: checkpoint only the blocks at that many highest resolutions.
CASES = {
    "ours-tutorial": dict(kind="ours", batch=1, accum=4, merge=4, steps=200, resident_steps=80),
    "ours-tutorial-1x4": dict(kind="ours", batch=1, accum=4, merge=1, steps=60),
    "ours-tutorial-compile": dict(kind="ours", batch=1, accum=4, merge=4, compile=True, steps=260),
    "ours-b8": dict(kind="ours", batch=8, steps=160),
    "ours-b8-l2": dict(kind="ours", batch=8, levels=2, steps=160),
    "ours-b8-l1": dict(kind="ours", batch=8, levels=1, steps=160, resident_steps=60),
    "ours-b8-l1-compile": dict(kind="ours", batch=8, levels=1, compile=True, steps=400, resident_steps=100),
    # the same without the DataLoader's pin-memory thread (is its GIL use what the loader phase loses?)
    "ours-b8-l1-compile-nopin": dict(kind="ours", batch=8, levels=1, compile=True, pin=False, steps=400,
                                     resident_steps=100),
    "ours-b8-l1-compile-cl": dict(kind="ours", batch=8, levels=1, compile=True, channels_last=True, steps=400,
                                  resident_steps=100),
    # the whole micro-step's ControlNet + UNet replayed as CUDA graphs (the compiled step is host-bound: MFU goal)
    "ours-b8-l1-graphs": dict(kind="ours", batch=8, levels=1, cuda_graphs=True, steps=400, resident_steps=100),
    "ours-tutorial-graphs": dict(kind="ours", batch=1, accum=4, merge=4, cuda_graphs=True, steps=260, resident_steps=80),
    "ours-best-b16-graphs": dict(kind="ours", batch=16, levels=0, cuda_graphs=True, steps=160),
    "ours-best-b32-graphs": dict(kind="ours", batch=32, levels=0, cuda_graphs=True, steps=100),
    # attention without cuDNN's kernels (flash instead): the host work a call costs, and the GPU's
    "ours-b8-l1-compile-nocudnn": dict(kind="ours", batch=8, levels=1, compile=True, sdpa="no-cudnn", steps=400,
                                       resident_steps=100),
    "ours-b8-l2-compile": dict(kind="ours", batch=8, levels=2, compile=True, steps=300),
    # the best-throughput setting (MFU goal): no checkpointing, larger micro-batches, memory no object
    "ours-best-b16": dict(kind="ours", batch=16, levels=0, compile=True, steps=160),
    "ours-best-b32": dict(kind="ours", batch=32, levels=0, compile=True, steps=100),
    "ours-best-b16-cl": dict(kind="ours", batch=16, levels=0, compile=True, channels_last=True, steps=160),
    "ours-tutorial-unfused": dict(kind="ours", batch=1, accum=4, merge=4, fused=False, steps=120),
    "ours-lowmem": dict(kind="ours", batch=1, accum=4, low_memory=True, steps=60),
    "ours-lowmem-merged": dict(kind="ours", batch=1, accum=4, merge=4, low_memory=True, steps=100),
    "fits-lowmem": dict(kind="fits", budgets=(8, 12, 24), low_memory=True),
    "fits-default": dict(kind="fits", budgets=(8, 12, 24)),
    "fits-lowmem-8": dict(kind="fits", budgets=(8,), low_memory=True),
    "peer-tutorial": dict(kind="peer", batch=1, accum=4, steps=50),
    "peer-b8": dict(kind="peer", batch=8, steps=100),
}
PRESETS = {
    "explore": ["ours-tutorial", "ours-b8-l2", "ours-b8-l1", "ours-b8"],
    "final": ["peer-tutorial", "peer-b8", "ours-b8-l1-compile", "ours-tutorial", "ours-tutorial-unfused",
              "ours-lowmem", "ours-lowmem-merged", "fits-lowmem"],
    # the goals' rows in one call of under 10 minutes (with --steps-scale 0.5 on an H200)
    # (batch 8 with CUDA graphs since session 20: 84.4 samples/s against the compiled step's 61.3)
    "one-run": ["peer-b8", "ours-b8-l1-graphs", "peer-tutorial", "ours-tutorial", "ours-lowmem"],
    "memory": ["ours-lowmem", "ours-lowmem-merged", "fits-lowmem", "fits-default"],
    # CUDA graphs against the compiled step and diffusers, in one call of under 10 minutes (--steps-scale 0.5)
    "graphs": ["peer-b8", "ours-b8-l1-graphs", "ours-b8-l1-compile", "ours-tutorial-graphs"],
    # the MFU goal's setting: no checkpointing, micro-batches of 32, CUDA graphs (about 4.5 minutes on an H200)
    "mfu": ["ours-best-b32-graphs"],
}


def resident_batches(loader, device, n: int = 16):
    """The loader's first n batches moved to the GPU once, then repeated: the 'data already on the GPU' case."""
    from trainer.prefetch import moved

    it = iter(loader)
    cached = [moved(next(it), device) for _ in range(n)]  # the same device layout as the loader phase's batches
    return itertools.cycle(cached)


def run_ours(model: Path, shards: str, workers: int, batch: int, steps: int, accum: int = 1, merge: int = 1,
             levels: int | None = None, compile: bool = False, resident_steps: int = 0, skip: int = 20,
             low_memory: bool = False, fused: bool = True, pin: bool = True, channels_last: bool = False,
             log_every: int = 5, trace: int = 0, name: str = "ours", sdpa: str | None = None,
             cuda_graphs: bool = False) -> dict:
    """Train with trainer.loop in this process (no validation, no export); return throughput, memory, MFU.

    With resident_steps, the same run then continues that many steps on 16 batches already on the GPU:
    the loader's rate against the rate with no loading at all. With trace (and resident_steps), `trace` more
    steps of each phase run under torch.profiler (bench/trace_summary.py), outside the rates. sdpa="no-cudnn"
    keeps PyTorch's attention off its cuDNN kernels for the run (flash or memory-efficient ones instead).
    """
    import gc

    import torch

    if sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            return run_ours(model, shards, workers, batch, steps, accum, merge, levels, compile, resident_steps, skip,
                            low_memory, fused, pin, channels_last, log_every, trace, name,
                            cuda_graphs=cuda_graphs) | {"sdpa": sdpa}
        finally:
            torch.backends.cuda.enable_cudnn_sdp(True)

    from trainer.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from trainer.loop import train_loop
    from trainer.train import build_run

    out = WORK / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        output=str(out),
        data=DataConfig(shards=shards, resolution=512, train_batch_size=batch, num_workers=workers,
                        pin_memory=pin),
        model=ModelConfig(model=str(model), variant="fp16", gradient_checkpointing=True, checkpoint_levels=levels,
                          compile=compile, low_memory=low_memory, channels_last=channels_last,
                          cuda_graphs=cuda_graphs),
        optim=OptimConfig(learning_rate=1e-5, optimizer="adamw8bit", gradient_accumulation_steps=accum,
                          merge_micro_batches=merge, fused_optimizer=fused),
        checkpoint=CheckpointConfig(checkpointing_steps=10**6), max_train_steps=steps, mixed_precision="fp16",
        device="cuda", log_every=log_every, seed=0,
    )
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with GpuMemoryPoller() as poll:
        run = build_run(cfg, enable_bar=False)
        train_loop(run)
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        traces, phases = {}, []
        if resident_steps:
            traces["loader"] = traced(run, trace, f"{name}-loader")
            phases = alternate(run, resident_steps, ROUNDS)
            traces["resident"] = traced(run, trace, f"{name}-resident")
        run.log.close()
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    loading = [r for r in records if r["step"] <= steps]
    rate = steady_rate(loading, batch * accum, skip=skip)
    on_gpu = phase_rate(records, phases, "resident", batch * accum) if resident_steps else None
    again = phase_rate(records, phases, "loader", batch * accum) if resident_steps else None
    res = {
        "steps": steps, "batch": batch, "accum": accum, "merge": merge, "levels": levels, "compile": compile,
        "low_memory": low_memory, "fused": fused, "pin": pin, "channels_last": channels_last, "cuda_graphs": cuda_graphs,
        "wall_s": round(time.perf_counter() - t0, 1), "samples_per_s": round(rate, 2),
        "resident_samples_per_s": round(on_gpu, 2) if on_gpu else None,
        "loader_again_samples_per_s": round(again, 2) if again else None,
        "loader_vs_resident": round(again / on_gpu, 3) if on_gpu else None,
        "peak_allocated_gib": round(allocated / 2**30, 2), "peak_reserved_gib": round(reserved / 2**30, 2),
        "peak_nvidia_smi_gib": round(poll.peak_mib / 1024, 2), "gpu_util_pct": poll.mean_util(),
        "flops_per_sample": run.flops_per_sample, "peak_flops": run.peak_flops,
        "mfu": round(rate * run.flops_per_sample / run.peak_flops, 4),
        "data_wait": round(statistics.fmean([r["data_wait"] for r in loading if r["step"] > skip] or [0.0]), 3),
        "rates": record_rates(records, batch * accum),
        "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "loss_scale": records[-1]["loss_scale"],
    }
    if trace:
        res["traces"] = traces
    del run
    return res


ROUNDS = 2
"""Resident and loader phases alternate this many times after the main run: both see the same drift of the
card's and host's speed, which moved 5-step records by +-15% within a run."""
PHASE_SKIP = 10
"""Steps at the start of each phase left out of its rate (the loader's workers restart at each phase)."""


def alternate(run, resident_steps: int, rounds: int) -> list[tuple[str, int, int]]:
    """Continue the run in 2 x rounds phases of resident_steps // rounds steps: batches already on the GPU,
    then the loader again, and so on. Returns (kind, first step, last step) of each phase."""
    import torch

    from trainer.loop import train_loop

    loader, resident = run.loader, resident_batches(run.loader, run.device)
    phases = []
    for i in range(2 * rounds):
        kind, first = ("resident", resident) if i % 2 == 0 else ("loader", loader), run.state.step
        run.loader = kind[1]
        run.cfg.max_train_steps += resident_steps // rounds
        train_loop(run)
        torch.cuda.synchronize()
        phases.append((kind[0], first, run.state.step))
    run.loader = resident
    return phases


def phase_rate(records: list[dict], phases: list[tuple[str, int, int]], kind: str, samples_per_step: int) -> float:
    """Samples/s over the phases of one kind, each without its first PHASE_SKIP steps."""
    samples = seconds = 0.0
    for k, first, last in phases:
        if k != kind:
            continue
        for a, b in itertools.pairwise(records):
            if a["step"] >= first + PHASE_SKIP and b["step"] <= last:
                samples += (b["step"] - a["step"]) * samples_per_step
                seconds += b["time"] - a["time"]
    return samples / seconds if seconds else float("nan")


def traced(run, steps: int, name: str) -> dict | None:
    """`steps` more steps of the run under torch.profiler; the gzipped Chrome trace goes to WORK/traces (and
    $OUT when set), its summary (bench/trace_summary.py) is returned. None when steps is 0."""
    if not steps:
        return None
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.trace_summary import summarize
    from trainer.loop import train_loop

    run.cfg.max_train_steps += steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_loop(run)
        torch.cuda.synchronize()
    raw = WORK / "traces" / f"{name}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    packed = raw.with_suffix(".json.gz")
    packed.write_bytes(gzip.compress(raw.read_bytes(), 6))
    raw.unlink()
    if os.environ.get("OUT"):
        shutil.copy(packed, Path(os.environ["OUT"]) / packed.name)
    return summarize(trace, steps)


def peak_at(model: Path, shards: str, workers: int, batch: int, low_memory: bool) -> float:
    """Peak allocated GiB of a short run at micro-batch `batch` (accumulation 1); inf when it runs out."""
    import torch

    r = run_ours(model, shards, workers, batch, steps=3, skip=0, low_memory=low_memory, log_every=1)
    torch.cuda.empty_cache()
    return r["peak_allocated_gib"]


def largest_batches(model: Path, shards: str, workers: int, budgets, low_memory: bool = False) -> dict:
    """The largest micro-batch whose measured peak allocated memory stays within each budget (GiB).

    Doubling, then bisection, every candidate measured with a 3-step run (peaks are deterministic).
    """
    import torch

    peaks: dict[int, float] = {}

    def fits(b: int, budget: float) -> bool:
        if b not in peaks:
            try:
                peaks[b] = peak_at(model, shards, workers, b, low_memory)
            except torch.OutOfMemoryError:  # more than the card itself: does not fit
                peaks[b] = float("inf")
        return peaks[b] <= budget

    found = {}
    for budget in budgets:
        lo, hi = 0, 1
        while fits(hi, budget) and hi <= 512:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, budget) else (lo, mid)
        found[f"{budget}"] = lo
    return {"low_memory": low_memory, "largest_batch": found, "peaks_gib": {str(b): p for b, p in sorted(peaks.items())}}


PEER_WRAPPER = """import atexit, json, runpy, sys, torch
atexit.register(lambda: print("PEER_MEMORY " + json.dumps({
    "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}), flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_peer(model: Path, data: Path, workers: int, batch: int, steps: int, accum: int = 1,
             timeout: float = 400) -> dict:
    """diffusers' examples/controlnet/train_controlnet.py at the same settings, in a subprocess."""
    out = WORK / "peer"
    shutil.rmtree(out, ignore_errors=True)
    (WORK / "peer_wrap.py").write_text(PEER_WRAPPER)
    cmd = [sys.executable, str(WORK / "peer_wrap.py"), str(PEER_SCRIPT), f"--pretrained_model_name_or_path={model}",
           "--variant=fp16", f"--train_data_dir={data}", f"--output_dir={out}", "--resolution=512",
           f"--train_batch_size={batch}", f"--gradient_accumulation_steps={accum}", "--learning_rate=1e-5",
           "--mixed_precision=fp16", "--use_8bit_adam", "--gradient_checkpointing", f"--max_train_steps={steps}",
           "--checkpointing_steps=1000000", f"--dataloader_num_workers={workers}", "--report_to=tensorboard",
           "--seed=0", "--set_grads_to_none"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.perf_counter()
    with GpuMemoryPoller() as poll:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for f in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f.parent))
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            events = [{"step": e.step, "time": e.wall_time, "loss": e.value} for e in acc.Scalars("loss")]
    memory = next((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                   if line.startswith("PEER_MEMORY ")), {})
    return {
        "steps": steps, "batch": batch, "accum": accum, "wall_s": round(wall, 1),
        "samples_per_s": round(steady_rate(events, batch * accum, skip=10), 2) if events else None,
        "peak_nvidia_smi_gib": round(poll.peak_mib / 1024, 2), "gpu_util_pct": poll.mean_util(),
        "last_loss": events[-1]["loss"] if events else None, **memory,
    }


def run_profile(model: Path, shards: str, workers: int) -> None:
    """Where a step's time goes at small batches: the data stream alone, then cProfile of the loop."""
    import cProfile
    import pstats

    import torch

    from trainer.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from trainer.data import Position, build_loader
    from trainer.loop import train_loop
    from trainer.train import build_run

    for batch in (1, 8):
        dc = DataConfig(shards=shards, resolution=512, train_batch_size=batch, num_workers=workers)
        from trainer.tiny import build_tiny_tokenizer

        it = iter(build_loader(dc, build_tiny_tokenizer(WORK / "tok"), 0, Position(), pin_memory=True))
        for _ in range(5):
            next(it)
        t0 = time.perf_counter()
        for _ in range(100):
            next(it)
        print(f"data only, batch {batch}: {100 / (time.perf_counter() - t0):.1f} batches/s", flush=True)
        del it
    cfg = TrainConfig(
        output=str(WORK / "profile"), data=DataConfig(shards=shards, resolution=512, train_batch_size=1,
                                                      num_workers=workers),
        model=ModelConfig(model=str(model), variant="fp16"),
        optim=OptimConfig(optimizer="adamw8bit", gradient_accumulation_steps=1),
        checkpoint=CheckpointConfig(checkpointing_steps=10**6), max_train_steps=10, mixed_precision="fp16",
        device="cuda", log_every=1000)
    run = build_run(cfg, enable_bar=False)
    train_loop(run)
    torch.cuda.synchronize()
    run.cfg.max_train_steps = 30
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    train_loop(run)
    torch.cuda.synchronize()
    prof.disable()
    print(f"loop, batch 1: {(time.perf_counter() - t0) / 20:.3f} s/step", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def peer_dataset(shards: str, folder: Path) -> Path:
    """The shards as a parquet dataset with image / conditioning_image / text columns (what the peer reads)."""
    import io

    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from webdataset.tariterators import tarfile_samples

    from engine import sample as S
    from trainer.data import expand_shards

    rows = {"image": [], "conditioning_image": [], "text": []}
    for s in tarfile_samples([{"url": u} for u in expand_shards(shards)]):
        rows["image"].append(PILImage.open(io.BytesIO(s[S.JPG])))
        rows["conditioning_image"].append(PILImage.open(io.BytesIO(s[S.COND])).convert("RGB"))
        rows["text"].append(s.get(S.TXT, b"").decode())
    folder.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "conditioning_image": Image(), "text": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def gpu_name() -> str:
    """The card's name, as PyTorch reports it."""
    import torch

    return torch.cuda.get_device_name(0)


def setting_of(name: str) -> str:
    """'tutorial', 'b8' or 'best' from a case name."""
    if "best" in name:
        return "best"  # measured against diffusers' batch-8 rate per sample, at no memory bound
    return "tutorial" if "tutorial" in name or "lowmem" in name else "b8"  # lowmem: batch 1 x 4 too


def ours_flags(r: dict) -> str:
    """The trainer flags a row of ours ran with."""
    flags = f"--train-batch-size {r['batch']} --gradient-accumulation-steps {r['accum']}"
    flags += f" --merge-micro-batches {r['merge']}" if r.get("merge", 1) > 1 else ""
    flags += f" --checkpoint-levels {r['levels']}" if r.get("levels") is not None else ""
    flags += " --compile" if r.get("compile") else ""
    flags += " --cuda-graphs" if r.get("cuda_graphs") else ""
    flags += " --low-memory" if r.get("low_memory") else ""
    flags += " --no-fused-optimizer" if r.get("fused") is False else ""
    flags += " --no-pin-memory" if r.get("pin") is False else ""
    flags += " --channels-last" if r.get("channels_last") else ""
    return flags


TITLE = "## train: ours vs diffusers' train_controlnet.py, full SD 1.5 architecture (`make bench-train`)"


def markdown(res: dict, title: str = TITLE) -> str:
    """The RESULTS.md section for a benchmark result dict."""
    runs = res["runs"]
    peers = {setting_of(n): r for n, r in runs.items() if n.startswith("peer") and "error" not in r}
    lines = [
        title,
        "",
        f"Card: **{res['gpu']}**; torch {res['torch']}, diffusers {res['diffusers']}, bitsandbytes {res['bnb']}; "
        f"measured fp16 matmul rate {res['peak_tflops']:.0f} TFLOP/s (the MFU denominator). "
        f"{res.get('runs_note', 'All rows from one process run on one card.')} 512x512, fp16 autocast + GradScaler, 8-bit AdamW, gradient checkpointing, "
        "random weights from the published SD 1.5 configs, the same 320 samples (ours: shards precomputed "
        f"with `python -m trainer precompute`; diffusers: the same images as a parquet dataset), {res['workers']} "
        "DataLoader workers. Samples/s exclude warm-up (first 20 steps for ours, 10 for diffusers; compiling "
        "falls in the warm-up). MFU = samples/s x FLOPs per sample (torch.utils.flop_counter on our step, "
        "recomputation included) / matmul rate; diffusers' MFU uses the FLOPs of our step at the same setting.",
        "",
        "| setting | trainer and flags | samples/s | vs diffusers | peak allocated | peak reserved | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        if name.startswith("fits"):
            continue
        if "error" in r:
            lines.append(f"| {setting_of(name)} | {name}: failed `{r['error'].strip().splitlines()[-1][:120]}` "
                         "| | | | | |")
            continue
        peer = peers.get({"best": "b8"}.get(setting_of(name), setting_of(name)))
        if name.startswith("peer"):
            ours = [o for n, o in runs.items() if n.startswith("ours") and setting_of(n) == setting_of(name)
                    and "error" not in o]
            fps = ours[0]["flops_per_sample"] if ours else None
            mfu = f"{r['samples_per_s'] * fps / res['peak_flops']:.1%}" if fps and r["samples_per_s"] else "n/a"
            what = f"diffusers, batch {r['batch']} x accumulation {r['accum']}"
            ratio = "1.00x"
        else:
            what, mfu = f"ours `{ours_flags(r)}`", f"{r['mfu']:.1%}"
            ratio = f"**{r['samples_per_s'] / peer['samples_per_s']:.2f}x**" if peer and peer.get("samples_per_s") \
                else "n/a"
        lines.append(f"| {setting_of(name)} | {what} | {r['samples_per_s']} | {ratio} | "
                     f"{r.get('peak_allocated_gib', 'n/a')} GiB | {r.get('peak_reserved_gib', 'n/a')} GiB | {mfu} |")
    lines += fits_lines(runs)
    if any("loader_again_samples_per_s" in r for r in runs.values()):
        lines += ["", f"Data loading against batches already on the GPU: the same run continued in {2 * ROUNDS} "
                  "alternating phases (16 batches kept on the GPU, then the shard loader again; the first "
                  f"{PHASE_SKIP} steps of each left out):"]
    else:  # a run saved before the phases alternated
        lines += ["", "Data loading against batches already on the GPU (the same run continued on 16 resident batches):"]
    lines += [f"- {n}: loader {r.get('loader_again_samples_per_s', r['samples_per_s'])} samples/s, "
              f"resident {r['resident_samples_per_s']}: "
              f"**{r['loader_vs_resident']:.1%}**" for n, r in runs.items() if r.get("loader_vs_resident")]
    lines += ["", "Reproduce on your own GPU: put diffusers' `examples/controlnet/train_controlnet.py` at "
              f"`{PEER_SCRIPT}`, then `python -m bench.train_bench --cases one-run --steps-scale 0.5` (the goals' "
              "rows, about 8.5 minutes on an H200), or `--cases final` (every row, about 15 minutes; "
              "`--cases explore` runs the eager variants, `--cases memory` the `--low-memory` rows and the "
              "largest-batch search)."]
    lines += [""] + [f"- {n}" for n in res.get("notes", [])] if res.get("notes") else []
    return "\n".join(lines)


def fits_lines(runs: dict) -> list[str]:
    """The largest-batch search results: budget -> largest micro-batch, with the measured peaks."""
    out = []
    for name, r in runs.items():
        if name.startswith("fits") and "largest_batch" in r:
            what = "`--low-memory`" if r["low_memory"] else "default flags (fp16, full checkpointing)"
            fit = ", ".join(f"{b} GiB: **{n}**" for b, n in r["largest_batch"].items())
            peaks = ", ".join(f"{b}: {p} GiB" for b, p in r["peaks_gib"].items())
            out += ["", f"Largest micro-batch within a peak-allocated budget, {what}: {fit} (measured peaks by batch: {peaks})."]
    return out


def save(res: dict) -> None:
    """results.json under bench/.work/train, and a copy in $OUT where the device tool collects files."""
    (WORK / "results.json").write_text(json.dumps(res, indent=2))
    if os.environ.get("OUT"):
        shutil.copy(WORK / "results.json", Path(os.environ["OUT"]) / "train_results.json")


def setup(n_shards: int, workers: int) -> tuple[Path, str, str, Path]:
    """SD 1.5-shaped model, shards, their precomputed version and the peer's parquet (same samples)."""
    from trainer.precompute import PrecomputeConfig, precompute
    from trainer.synthetic import write_shards

    WORK.mkdir(parents=True, exist_ok=True)
    write_shards(WORK / "shards", n_shards=n_shards, per_shard=64, size=512, seed=0)
    shards = str(WORK / "shards" / f"{{00000..{n_shards - 1:05d}}}.tar")
    model = build_sd15(WORK / "sd15")
    shutil.rmtree(WORK / "pre", ignore_errors=True)
    precompute(PrecomputeConfig(shards=shards, model=str(model), output=str(WORK / "pre"), device="cuda",
                                batch_size=32, resolution=512, variant="fp16"))
    pre = str(WORK / "pre" / f"{{00000..{n_shards - 1:05d}}}.tar")
    try:
        peer_data = peer_dataset(shards, WORK / "peer-data")
    except Exception as e:  # noqa: BLE001 - without `datasets` ours still runs; the peer rows say why not
        print(f"no peer dataset: {type(e).__name__}: {e}", flush=True)
        peer_data = None
    return model, shards, pre, peer_data


def run_case(name: str, model: Path, pre: str, peer_data: Path, workers: int, scale: float, trace: int = 0) -> dict:
    """One named case of CASES (trace: steps of each phase to profile, for cases with a resident phase)."""
    spec = dict(CASES[name])
    kind, steps = spec.pop("kind"), max(30, int(spec.pop("steps", 30) * scale))
    try:
        if kind == "peer":
            return run_peer(model, peer_data, workers, steps=steps, **spec)
        if kind == "fits":
            return largest_batches(model, pre, workers, **spec)
        return run_ours(model, pre, workers, steps=steps, trace=trace if spec.get("resident_steps") else 0,
                        name=name, **spec)
    except Exception as e:  # noqa: BLE001 - one failing case (out of memory, say) must not lose the rest
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or record a saved result) and update bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="final", help=f"a preset ({', '.join(PRESETS)}) or case names joined by ,")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's step count")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--shards", type=int, default=5, help="shards of 64 samples of 512x512 to generate")
    p.add_argument("--profile", action="store_true", help="only profile a small-batch step (prints, records nothing)")
    p.add_argument("--trace", type=int, default=0,
                   help="profile this many more steps with the loader and on resident batches (torch.profiler; "
                        "summaries in results.json, gzipped traces in bench/.work/train/traces)")
    p.add_argument("--record", type=Path, default=None, help="write RESULTS.md from a saved results.json")
    p.add_argument("--section", default="train",
                   help="with --record: the RESULTS.md section to write (another name keeps the 'train' table and "
                        "adds one under its own heading, e.g. a later call's rows)")
    p.add_argument("--title", default=None, help="with --record and --section: that section's heading")
    p.add_argument("--compile-cache", type=Path, default=None,
                   help="torch.compile artifacts: loaded before the runs when the file exists, saved after (same card and "
                        "torch only; saves the ~3-5 minutes of compiling on a rerun)")
    args = p.parse_args(argv)
    from bench.results import update_section

    if args.record:
        update_section(args.section, markdown(json.loads(args.record.read_text()), args.title or TITLE))
        return 0
    import bitsandbytes
    import diffusers
    import torch

    from trainer.metrics import measure_matmul_flops

    if not torch.cuda.is_available():
        print("bench-train needs a CUDA GPU", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    model, shards, pre, peer_data = setup(args.shards, args.workers)
    print(f"setup {time.perf_counter() - t0:.1f}s", flush=True)
    if args.profile:
        run_profile(model, shards, args.workers)
        return 0
    peak = measure_matmul_flops(torch.device("cuda"))
    res = {"gpu": gpu_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "bnb": bitsandbytes.__version__, "workers": args.workers, "peak_flops": peak, "peak_tflops": peak / 1e12,
           "runs": {}}
    names = PRESETS.get(args.cases, args.cases.split(","))
    if args.compile_cache and args.compile_cache.exists():
        torch.compiler.load_cache_artifacts(args.compile_cache.read_bytes())
    for name in names:
        if name.startswith("peer") and not PEER_SCRIPT.exists():
            res["runs"][name] = {"error": f"no peer script at {PEER_SCRIPT}"}
            continue
        res["runs"][name] = run_case(name, model, pre, peer_data, args.workers, args.steps_scale, args.trace)
        print(name, json.dumps(res["runs"][name])[:1500], flush=True)
        save(res)
    if args.compile_cache and (saved := torch.compiler.save_cache_artifacts()):
        args.compile_cache.write_bytes(saved[0])
    update_section("train", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
