"""What the trainer tests build alike: synthetic shards with a tiny model, and a short TrainConfig."""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig
from trainer.synthetic import write_shards
from trainer.tiny import build_tiny_model


def tiny_assets(root: Path, n_shards: int, per_shard: int, size: int, **shard_kw) -> dict:
    """`n_shards` synthetic shards under root/shards (their brace pattern as "shards") and a tiny model."""
    write_shards(root / "shards", n_shards=n_shards, per_shard=per_shard, size=size, **shard_kw)
    pattern = str(root / "shards" / f"{{00000..{n_shards - 1:05d}}}.tar")
    return {"shards": pattern, "model": build_tiny_model(root / "model")}


def tiny_config(assets: dict, output: Path, *, steps: int, seed: int = 3, shards: str | None = None,
                **changes) -> TrainConfig:
    """A short fp32 CPU run at 32 px with AdamW at 1e-3, logging every step, no checkpoint or validation on
    schedule. `changes`: a dict per section (data=, model=, ...) updates its fields; other keys the run's own."""
    run = {
        "output": str(output),
        "data": {"shards": shards or assets["shards"], "resolution": 32, "train_batch_size": 2, "num_workers": 0,
                 "shuffle_buffer": 4},
        "model": {"model": str(assets["model"])},
        "optim": {"learning_rate": 1e-3, "optimizer": "adamw"},
        "checkpoint": {"checkpointing_steps": 1000},
        "validation": {"validation_steps": 1000},
        "max_train_steps": steps, "mixed_precision": "no", "device": "cpu", "log_every": 1, "seed": seed,
    }
    for key, value in changes.items():
        run[key] = {**run[key], **value} if isinstance(run.get(key), dict) else value
    return TrainConfig.from_dict(run)
