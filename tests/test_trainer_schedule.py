"""trainer.schedule: when the Checkpointer and the Validator write (the runs themselves: test_trainer_train/e2e)."""

from __future__ import annotations

from trainer.config import CheckpointConfig, DataConfig, ModelConfig, TrainConfig, ValidationConfig
from trainer.schedule import Checkpointer, Validator


def config(tmp_path, prompts: list[str]) -> TrainConfig:
    """Checkpoints every 3 steps, validation every 4; prompts or none."""
    image = tmp_path / "cond.png"
    image.write_bytes(b"")
    return TrainConfig(output=str(tmp_path), data=DataConfig(shards="s.tar"), model=ModelConfig(model="tiny"),
                       checkpoint=CheckpointConfig(checkpointing_steps=3, checkpoints_total_limit=2),
                       validation=ValidationConfig(validation_steps=4, validation_prompt=prompts,
                                                   validation_image=[str(image)] if prompts else []))


def test_checkpoints_on_schedule_and_at_a_stop(tmp_path):
    """Every --checkpointing-steps, and at whatever step a stop signal arrives."""
    ckpt = Checkpointer.of(config(tmp_path, []))
    assert (ckpt.every, ckpt.keep) == (3, 2)
    assert [s for s in range(1, 10) if ckpt.due(s, stopping=False)] == [3, 6, 9]
    assert ckpt.due(5, stopping=True)


def test_validation_on_schedule_never_at_a_stop_nor_without_prompts(tmp_path):
    """Every --validation-steps while running; a stop skips it; no --validation-prompt, never."""
    val = Validator.of(config(tmp_path, ["a house"]))
    assert val.output == tmp_path / "validation"
    assert [s for s in range(1, 10) if val.due(s, stopping=False)] == [4, 8]
    assert not val.due(8, stopping=True)
    idle = Validator.of(config(tmp_path, []))
    assert not any(idle.due(s, stopping=False) for s in range(1, 10))
