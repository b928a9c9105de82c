"""The trainer's half of `make demo`: a tiny model, a short CPU run, a checkpoint and a validation image.

`run_demo(shards, output)` builds a tiny SD-shaped model with random weights into output/tiny-model,
trains a ControlNet on it from the given shards for a few steps on the CPU, and returns where
everything landed. It needs no network and finishes in a minute or two on two cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from engine import sample as S
from trainer.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
)
from trainer.data import expand_shards
from trainer.synthetic import first_condition
from trainer.tiny import build_tiny_model
from trainer.train import train


def demo_config(shards: str, output: Path, model: Path, cond: Path, steps: int, resolution: int) -> TrainConfig:
    """The demo's run: fp32 on the CPU, plain AdamW, a checkpoint and validation at the end."""
    return TrainConfig(
        output=str(output),
        # the tiny model trains on the 512 px shards at `resolution` (64): resized on purpose, so --resize
        data=DataConfig(shards=shards, resolution=resolution, resize=True, train_batch_size=2, num_workers=1,
                        shuffle_buffer=32),
        model=ModelConfig(model=str(model), gradient_checkpointing=False),
        optim=OptimConfig(learning_rate=5e-4, optimizer="adamw", gradient_accumulation_steps=1),
        checkpoint=CheckpointConfig(checkpointing_steps=max(1, steps // 2), checkpoints_total_limit=2),
        validation=ValidationConfig(validation_steps=max(1, steps // 2), validation_prompt=["a photo"],
                                    validation_image=[str(cond)], num_validation_images=1, num_inference_steps=4),
        max_train_steps=steps, mixed_precision="no", device="cpu", log_every=10, seed=0,
    )


def run_demo(shards: str, output: str, steps: int = 200, resolution: int = 64) -> dict:
    """Build the tiny model, train `steps` steps from `shards` (brace pattern), return paths and figures."""
    output = Path(output)
    started = time.perf_counter()
    model = build_tiny_model(output / "tiny-model")
    cond = first_condition(expand_shards(shards), output / "validation-cond.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's ops are too small for threads to pay off
    try:
        result = train(demo_config(shards, output, model, cond, steps, resolution), enable_bar=False)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(x) for x in Path(result.log).read_text().splitlines()]
    return {
        "model": str(model),
        "shards": shards,
        "controlnet": str(result.controlnet),
        "checkpoint": str(result.checkpoints[-1]) if result.checkpoints else None,
        "validation_grid": str(result.validation_grids[-1]) if result.validation_grids else None,
        "log": str(result.log),
        "steps": result.step,
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": result.last_loss,
        "samples_per_s": round(records[-1]["samples_per_s"], 1) if records else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def first_photo(shards: str, dest: Path) -> Path:
    """Save the first photo (`.jpg` member) of the shards to `dest`: the demo's picture to generate from."""
    from webdataset.tariterators import tarfile_samples

    for sample in tarfile_samples([{"url": u} for u in expand_shards(shards)]):
        if S.JPG in sample:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(sample[S.JPG])
            return dest
    raise ValueError(f"no photo in {shards}")


def run_generate(result: dict, output: str | Path) -> list[str]:
    """`python -m trainer generate` with the ControlNet the demo trained, from a photo of its shards."""
    from trainer.generate import main as generate_main

    output = Path(output)
    photo = first_photo(result["shards"], output / "photo.jpg")
    args = ["--controlnet", str(Path(result["controlnet"]).parent), "--model", result["model"], "--image", str(photo),
            "--prompt", "a photo", "--output", str(output), "--steps", "4", "--device", "cpu", "--dtype", "fp32"]
    if generate_main(args) not in (0, 1):  # 1: came out black/NaN, reported by generate itself
        raise RuntimeError(f"generate failed: python -m trainer generate {' '.join(args)}")
    return sorted(str(p) for p in output.glob("*.png"))


if __name__ == "__main__":  # pragma: no cover - `python -m trainer.demo SHARDS OUTPUT`
    import sys

    print(json.dumps(run_demo(sys.argv[1], sys.argv[2]), indent=2))
