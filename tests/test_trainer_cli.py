"""trainer.cli and trainer.config: flag names, defaults (the tutorial's recipe), errors that name the flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser, config_from_args, main
from trainer.config import TrainConfig

pytestmark = pytest.mark.quick
REQUIRED = ["--shards", "s/{00000..00001}.tar", "--model", "m", "--output", "o"]


def parse(*extra: str) -> TrainConfig:
    """Parse a command line into the typed config."""
    return config_from_args(build_parser().parse_args([*REQUIRED, *extra]))


def test_defaults_follow_the_recipe():
    """fp16, 512 px, lr 1e-5, 8-bit AdamW, gradient checkpointing, effective batch 32, 50% empty prompts."""
    cfg = parse()
    assert cfg.mixed_precision == "fp16" and cfg.data.resolution == 512
    assert cfg.optim.learning_rate == 1e-5 and cfg.optim.optimizer == "adamw8bit"
    assert cfg.model.gradient_checkpointing is True
    assert cfg.data.train_batch_size * cfg.optim.gradient_accumulation_steps >= 32
    assert cfg.data.proportion_empty_prompts == 0.5
    assert cfg.checkpoint.checkpointing_steps == 500 and cfg.checkpoint.checkpoints_total_limit == 3


def test_every_interface_flag():
    """The names other tools rely on parse into the right fields."""
    cfg = parse("--max-train-steps", "7", "--train-batch-size", "3", "--gradient-accumulation-steps", "2",
                "--learning-rate", "2e-5", "--mixed-precision", "bf16", "--optimizer", "adamw",
                "--no-gradient-checkpointing", "--checkpointing-steps", "5", "--checkpoints-total-limit", "none",
                "--resume", "latest", "--validation-steps", "4", "--proportion-empty-prompts", "0.1",
                "--resolution", "256", "--seed", "9", "--device", "cpu", "--unlock-decoder", "--only-mid-control",
                "--decoder-learning-rate", "1e-6", "--lr-scheduler", "cosine", "--lr-warmup-steps", "3")
    assert (cfg.max_train_steps, cfg.data.train_batch_size, cfg.optim.gradient_accumulation_steps) == (7, 3, 2)
    assert (cfg.optim.learning_rate, cfg.mixed_precision, cfg.optim.optimizer) == (2e-5, "bf16", "adamw")
    assert cfg.model.gradient_checkpointing is False
    assert (cfg.checkpoint.checkpointing_steps, cfg.checkpoint.checkpoints_total_limit) == (5, None)
    assert cfg.checkpoint.resume == "latest" and cfg.validation.validation_steps == 4
    assert (cfg.data.proportion_empty_prompts, cfg.data.resolution, cfg.seed, cfg.device) == (0.1, 256, 9, "cpu")
    assert cfg.model.unlock_decoder and cfg.model.only_mid_control and cfg.optim.decoder_learning_rate == 1e-6
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_repeatable_validation_flags(tmp_path):
    """--validation-prompt and --validation-image repeat; one of either is broadcast."""
    img = tmp_path / "c.png"
    img.write_bytes(b"x")
    cfg = parse("--validation-prompt", "a", "--validation-prompt", "b", "--validation-image", str(img))
    assert cfg.validation.pairs() == [("a", str(img)), ("b", str(img))]


@pytest.mark.parametrize("args,flag", [
    (["--mixed-precision", "fp16", "--device", "cpu"], "--mixed-precision"),
    (["--resolution", "100"], "--resolution"),
    (["--proportion-empty-prompts", "2"], "--proportion-empty-prompts"),
    (["--validation-prompt", "a"], "--validation-image"),
    (["--validation-prompt", "a", "--validation-image", "/no/such.png"], "--validation-image"),
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
])
def test_errors_name_the_flag(args, flag, capsys):
    """Bad combinations exit with status 2 and a message naming the flag to change."""
    assert main([*REQUIRED, *args]) == 2
    assert flag in capsys.readouterr().err


def test_help_runs_as_a_module():
    """`python -m trainer --help` lists the interface flags."""
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0
    for flag in ("--shards", "--max-train-steps", "--gradient-checkpointing", "--no-gradient-checkpointing",
                 "--resume", "--validation-prompt", "--only-mid-control", "--unlock-decoder"):
        assert flag in out.stdout


def test_out_of_memory_advice_names_the_flags_that_lower_memory():
    """The advice printed on CUDA OOM: halve the batch keeping the effective batch, and this run's savers."""
    from trainer.cli import memory_advice

    cfg = config_from_args(build_parser().parse_args([
        "--shards", "s.tar", "--model", "m", "--output", "o", "--train-batch-size", "8",
        "--gradient-accumulation-steps", "4", "--optimizer", "adamw", "--no-gradient-checkpointing",
        "--mixed-precision", "no", "--resolution", "768"]))
    advice = memory_advice(cfg)
    for flag in ("--train-batch-size 4 --gradient-accumulation-steps 8", "--gradient-checkpointing",
                 "--optimizer adamw8bit", "--mixed-precision fp16", "--resolution 384"):
        assert flag in advice
    defaults = memory_advice(config_from_args(build_parser().parse_args(["--shards", "s", "--model", "m",
                                                                         "--output", "o"])))
    assert "--optimizer" not in defaults and "--gradient-checkpointing" not in defaults  # already on
