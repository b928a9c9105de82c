"""GPU benchmark of the trainer: the full SD 1.5 architecture (random weights), 512x512, fp16 + 8-bit AdamW
+ gradient checkpointing, streamed from WebDataset shards; optionally diffusers' train_controlnet.py as
the peer at the same settings. Needs CUDA. Writes the "train" section of bench/RESULTS.md.

    python -m bench.train_bench [--steps 300] [--batch-size 8] [--peer-steps 150] [--no-peer]
    python -m bench.train_bench --record bench/.work/train/results.json   # write RESULTS.md from a saved run

The SD 1.5 configs below are the published ones (runwayml/stable-diffusion-v1-5 unet/vae config.json,
openai/clip-vit-large-patch14 text config); no hub is reachable from the benchmark machines, and the
compute of random weights is the same as of real ones. The tokenizer is the tiny offline one (its ids
are valid inputs of the 49,408-token embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def steady_rate(records: list[dict], batch: int, skip: int) -> float:
    """Samples/s between the first record past `skip` steps and the last (warm-up excluded)."""
    rs = [r for r in records if r["step"] >= skip]
    if len(rs) < 2:
        return float("nan")
    return (rs[-1]["step"] - rs[0]["step"]) * batch / (rs[-1]["time"] - rs[0]["time"])


def run_ours(model: Path, shards: str, steps: int, batch: int, workers: int, ckpt: bool = True,
             ckpt_unet: bool = True, validate: bool = True, skip: int = 50) -> dict:
    """Train with trainer.train in this process; return throughput and memory."""
    import gc

    import torch

    from trainer.config import (
        CheckpointConfig,
        DataConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        ValidationConfig,
    )
    from trainer.synthetic import first_condition
    from trainer.train import train

    out = WORK / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cond = first_condition(Path(shards.split("{")[0]) / "00000.tar", WORK / "cond.png")
    cfg = TrainConfig(
        output=str(out),
        data=DataConfig(shards=shards, resolution=512, train_batch_size=batch, num_workers=workers),
        model=ModelConfig(model=str(model), variant="fp16", gradient_checkpointing=ckpt,
                          gradient_checkpointing_unet=ckpt_unet),
        optim=OptimConfig(learning_rate=1e-5, optimizer="adamw8bit", gradient_accumulation_steps=1),
        checkpoint=CheckpointConfig(checkpointing_steps=10**6),
        validation=ValidationConfig(validation_steps=10**6, validation_prompt=["a photo"] if validate else [],
                                    validation_image=[str(cond)] if validate else [],
                                    num_validation_images=1, num_inference_steps=20),
        max_train_steps=steps, mixed_precision="fp16", device="cuda", log_every=10, seed=0,
    )
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with GpuMemoryPoller() as poll:
        result = train(cfg, enable_bar=False)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return {
        "steps": result.step, "batch": batch, "wall_s": round(wall, 1), "ckpt": ckpt, "ckpt_unet": ckpt_unet,
        "samples_per_s": round(steady_rate(records, batch, skip=skip), 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "peak_nvidia_smi_gib": round(poll.peak_mib / 1024, 2), "gpu_util_pct": poll.mean_util(),
        "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
        "loss_scale": records[-1]["loss_scale"], "failed_samples": records[-1]["failed_samples"],
        "validation_grid": str(result.validation_grids[-1]) if result.validation_grids else None,
        "checkpoint": str(result.checkpoints[-1]) if result.checkpoints else None,
    }


SWEEP = [  # (batch, steps, checkpoint ControlNet, checkpoint UNet)
    (1, 80, True, True), (4, 80, True, True), (8, 80, True, False), (8, 80, False, False),
    (16, 60, True, True), (32, 40, True, True),
]


def run_sweep(model: Path, shards: str, workers: int) -> list[dict]:
    """Throughput and peak memory over batch sizes and checkpointing choices (no validation)."""
    rows = []
    for batch, steps, ckpt, ckpt_unet in SWEEP:
        try:
            rows.append(run_ours(model, shards, steps, batch, workers, ckpt, ckpt_unet, validate=False, skip=20))
        except Exception as e:  # noqa: BLE001 - one failing size (say, out of memory) must not lose the rest
            rows.append({"batch": batch, "ckpt": ckpt, "ckpt_unet": ckpt_unet, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_profile(model: Path, shards: str, workers: int) -> None:
    """Where a step's time goes at small batches: the data stream alone, then cProfile of the loop."""
    import cProfile
    import pstats

    import torch

    from trainer.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from trainer.data import Position, build_loader
    from trainer.loop import train_loop
    from trainer.train import TrainResult, build_run

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
    run = build_run(cfg, TrainResult(output=WORK / "profile", step=0), enable_bar=False)
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

    from trainer.data import expand_shards

    rows = {"image": [], "conditioning_image": [], "text": []}
    for s in tarfile_samples([{"url": u} for u in expand_shards(shards)]):
        rows["image"].append(PILImage.open(io.BytesIO(s["jpg"])))
        rows["conditioning_image"].append(PILImage.open(io.BytesIO(s["cond.png"])).convert("RGB"))
        rows["text"].append(s.get("txt", b"").decode())
    folder.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "conditioning_image": Image(), "text": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def run_peer(model: Path, shards: str, steps: int, batch: int, workers: int, timeout: float) -> dict:
    """diffusers' examples/controlnet/train_controlnet.py at the same settings, in a subprocess."""
    data = peer_dataset(shards, WORK / "peer-data")
    out = WORK / "peer"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(PEER_SCRIPT), f"--pretrained_model_name_or_path={model}", "--variant=fp16",
           f"--train_data_dir={data}", f"--output_dir={out}", "--resolution=512", f"--train_batch_size={batch}",
           "--learning_rate=1e-5", "--mixed_precision=fp16", "--use_8bit_adam", "--gradient_checkpointing",
           f"--max_train_steps={steps}", "--checkpointing_steps=1000000", f"--dataloader_num_workers={workers}",
           "--report_to=tensorboard", "--seed=0", "--set_grads_to_none"]
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
    return {
        "steps": steps, "batch": batch, "wall_s": round(wall, 1),
        "samples_per_s": round(steady_rate(events, batch, skip=50), 2) if events else None,
        "peak_nvidia_smi_gib": round(poll.peak_mib / 1024, 2),
        "last_loss": events[-1]["loss"] if events else None,
    }


def gpu_name() -> str:
    """The card's name, as PyTorch reports it."""
    import torch

    return torch.cuda.get_device_name(0)


def sweep_markdown(rows: list[dict] | None, gpu: str = "") -> list[str]:
    """Table lines for the batch-size / checkpointing sweep, with the time per optimizer step."""
    if not rows:
        return []
    out = ["", f"Our trainer by batch size and gradient checkpointing ({gpu or 'same card'}; 40-80 steps each, "
           "the first 20 excluded; fp16 + 8-bit AdamW; one micro-batch per optimizer step):", "",
           "| batch | checkpointing | samples/s | s/step | peak allocated (torch) | peak reserved (torch) "
           "| peak nvidia-smi | mean GPU utilisation |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what = "ControlNet + UNet" if r["ckpt"] and r["ckpt_unet"] else "ControlNet only" if r["ckpt"] else "off"
        if "error" in r:
            out.append(f"| {r['batch']} | {what} | failed: {r['error'][:80]} | | | | | |")
        else:
            out.append(f"| {r['batch']} | {what} | {r['samples_per_s']} | {r['batch'] / r['samples_per_s']:.2f} | "
                       f"{r['peak_allocated_gib']} GiB | {r['peak_reserved_gib']} GiB | {r['peak_nvidia_smi_gib']} GiB "
                       f"| {r.get('gpu_util_pct')}% |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        small = min(ok, key=lambda r: r["peak_nvidia_smi_gib"])
        out += ["", f"Smallest footprint: batch {small['batch']} at {small['peak_nvidia_smi_gib']} GiB on the card "
                "(reach an effective batch of 32 with --gradient-accumulation-steps). Where the time per step "
                "barely changes with the batch, the step is bound by per-step host work (launching the kernels "
                "of ControlNet + UNet forward, backward and recomputation; the optimizer), not by the GPU: larger "
                "micro-batches are nearly free there. GPU utilisation is nvidia-smi's, sampled every 0.5 s over "
                "the whole run including model load and the final checkpoint."]
    return out


def markdown(res: dict) -> str:
    """The RESULTS.md section for a benchmark result dict."""
    if "ours" not in res:  # a sweep-only run
        return "\n".join(["## train: sweep (`python -m bench.train_bench --steps 0 --sweep`)", ""]
                         + sweep_markdown(res.get("sweep"), res["gpu"]))
    ours, peer = res["ours"], res.get("peer")
    lines = [
        "## train: ControlNet on the full SD 1.5 architecture (`make bench-train`)",
        "",
        f"Card: **{res['gpu']}**; torch {res['torch']}, diffusers {res['diffusers']}, bitsandbytes {res['bnb']}. "
        f"512x512, fp16 autocast + GradScaler, 8-bit AdamW, gradient checkpointing, batch {ours['batch']}, "
        f"random weights from the published SD 1.5 configs, data streamed from WebDataset shards "
        f"({res['workers']} DataLoader workers). Samples/s exclude the first 50 steps.",
        "",
        "| trainer | steps | samples/s | peak GPU memory (nvidia-smi) | peak allocated (torch) | last logged loss |",
        "|---|---|---|---|---|---|",
        f"| ctrlnet-forge `python -m trainer` | {ours['steps']} | {ours['samples_per_s']} | "
        f"{ours['peak_nvidia_smi_gib']} GiB | {ours['peak_allocated_gib']} GiB | {ours['last_loss']:.4f} |",
    ]
    if peer and "error" not in peer:
        lines.append(f"| diffusers `examples/controlnet/train_controlnet.py` | {peer['steps']} | "
                     f"{peer['samples_per_s']} | {peer['peak_nvidia_smi_gib']} GiB | n/a | "
                     f"{peer['last_loss'] if peer['last_loss'] is None else round(peer['last_loss'], 4)} |")
        if peer.get("samples_per_s") and ours.get("samples_per_s"):
            lines += ["", f"Throughput ratio ours / diffusers: **{ours['samples_per_s'] / peer['samples_per_s']:.2f}x**; "
                      f"peak memory ratio: **{ours['peak_nvidia_smi_gib'] / max(peer['peak_nvidia_smi_gib'], 1e-9):.2f}x**. "
                      "Our run also checkpoints the UNet (the peer checkpoints only the ControlNet), trading "
                      "compute for memory."]
    elif peer:
        lines += ["", f"Peer run failed: `{peer['error'].strip().splitlines()[-1][:200]}`"]
    else:
        lines += ["", "Peer (diffusers' train_controlnet.py) not run this time."]
    lines += sweep_markdown(res.get("sweep"), res.get("sweep_gpu", res["gpu"]))
    lines += [""] + [f"- {n}" for n in res.get("notes", [])] if res.get("notes") else []
    lines += ["", f"Wall time of our run including model load, a final checkpoint and validation: {ours['wall_s']} s; "
              f"first/last logged loss {ours['first_loss']:.4f} / {ours['last_loss']:.4f}, "
              f"final fp16 loss scale {ours['loss_scale']:.0f}, failed samples {ours['failed_samples']}."]
    return "\n".join(lines)


def save(res: dict) -> None:
    """results.json under bench/.work/train, and a copy in $OUT where the device tool collects files."""
    (WORK / "results.json").write_text(json.dumps(res, indent=2))
    if os.environ.get("OUT"):
        shutil.copy(WORK / "results.json", Path(os.environ["OUT"]) / "train_results.json")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or record a saved result) and update bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--shards", type=int, default=4, help="shards of 64 samples of 512x512 to generate")
    p.add_argument("--peer-steps", type=int, default=150)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-timeout", type=float, default=300)
    p.add_argument("--sweep", action="store_true", help="also sweep batch sizes and checkpointing choices")
    p.add_argument("--profile", action="store_true", help="only profile a small-batch step (prints, records nothing)")
    p.add_argument("--record", type=Path, default=None, help="write RESULTS.md from a saved results.json")
    args = p.parse_args(argv)
    from bench.results import update_section

    if args.record:
        update_section("train", markdown(json.loads(args.record.read_text())))
        return 0
    import bitsandbytes
    import diffusers
    import torch

    from trainer.synthetic import write_shards

    if not torch.cuda.is_available():
        print("bench-train needs a CUDA GPU", file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_shards(WORK / "shards", n_shards=args.shards, per_shard=64, size=512, seed=0)
    shards = str(WORK / "shards" / f"{{00000..{args.shards - 1:05d}}}.tar")
    model = build_sd15(WORK / "sd15")
    print(f"setup {time.perf_counter() - t0:.1f}s", flush=True)
    if args.profile:
        run_profile(model, shards, args.workers)
        return 0
    res = {"gpu": gpu_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "bnb": bitsandbytes.__version__, "workers": args.workers}
    if args.steps:
        res["ours"] = run_ours(model, shards, args.steps, args.batch_size, args.workers)
        print(json.dumps(res["ours"]), flush=True)
        save(res)  # the main result is safe before the peer starts
    if args.steps and not args.no_peer and PEER_SCRIPT.exists():
        torch.cuda.empty_cache()
        try:
            res["peer"] = run_peer(model, shards, args.peer_steps, args.batch_size, args.workers, args.peer_timeout)
        except Exception as e:  # noqa: BLE001 - the peer must never endanger the main result
            res["peer"] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res["peer"])[:3000], flush=True)
        save(res)
    if args.sweep:
        res["sweep"] = run_sweep(model, shards, args.workers)
    save(res)
    update_section("train", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
