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
    assert cfg.data.pin_memory is True and parse("--no-pin-memory").data.pin_memory is False
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


def test_export_format():
    """--export-format picks the single file's key layout; diffusers' is the default."""
    assert parse().checkpoint.export_format == "diffusers"
    assert parse("--export-format", "original").checkpoint.export_format == "original"
    with pytest.raises(SystemExit):
        parse("--export-format", "ckpt")


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


def test_flags_this_device_cannot_run_are_one_line_not_a_traceback(tmp_path, capsys):
    """Found when the device is known (build_run), after the flags parsed: still one line and exit 2."""
    args = ["--shards", "s/{00000..00001}.tar", "--model", "m", "--output", str(tmp_path / "o")]
    assert main([*args, "--cuda-graphs", "--device", "cpu", "--mixed-precision", "no"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


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


# diffusers' spelling -> the same setting in ours (values chosen away from the defaults)
DIFFUSERS_FORMS = [
    (["--pretrained_model_name_or_path", "base"], ["--model", "base"]),
    (["--controlnet_model_name_or_path", "cn"], ["--controlnet", "cn"]),
    (["--output_dir", "out2"], ["--output", "out2"]),
    (["--train_batch_size", "3"], ["--train-batch-size", "3"]),
    (["--gradient_accumulation_steps", "2"], ["--gradient-accumulation-steps", "2"]),
    (["--learning_rate", "3e-5"], ["--learning-rate", "3e-5"]),
    (["--max_train_steps", "11"], ["--max-train-steps", "11"]),
    (["--mixed_precision", "bf16"], ["--mixed-precision", "bf16"]),
    (["--optimizer", "adamw", "--use_8bit_adam"], ["--optimizer", "adamw8bit"]),
    (["--no-gradient-checkpointing", "--gradient_checkpointing"], ["--gradient-checkpointing"]),
    (["--checkpointing_steps", "7"], ["--checkpointing-steps", "7"]),
    (["--checkpoints_total_limit", "5"], ["--checkpoints-total-limit", "5"]),
    (["--resume_from_checkpoint", "latest"], ["--resume", "latest"]),
    (["--validation_steps", "9"], ["--validation-steps", "9"]),
    (["--proportion_empty_prompts", "0.2"], ["--proportion-empty-prompts", "0.2"]),
    (["--resolution", "256"], ["--resolution", "256"]),
    (["--seed", "5"], ["--seed", "5"]),
    (["--lr_scheduler", "cosine"], ["--lr-scheduler", "cosine"]),
    (["--lr_warmup_steps", "4"], ["--lr-warmup-steps", "4"]),
    (["--max_grad_norm", "0.5"], ["--max-grad-norm", "0.5"]),
    (["--dataloader_num_workers", "2"], ["--dataloader-num-workers", "2"]),
    (["--adam_beta1", "0.8", "--adam_beta2", "0.99", "--adam_weight_decay", "0.1", "--adam_epsilon", "1e-6"],
     ["--adam-beta1", "0.8", "--adam-beta2", "0.99", "--adam-weight-decay", "0.1", "--adam-epsilon", "1e-6"]),
    (["--num_validation_images", "3"], ["--num-validation-images", "3"]),
]


@pytest.mark.parametrize("theirs,ours", DIFFUSERS_FORMS, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_diffusers_spellings_parse_to_the_same_config(theirs, ours):
    """Each flag of diffusers' train_controlnet.py that means something here gives the same config as ours."""
    assert parse(*theirs) == parse(*ours)
    # the alias really set something: away from the default, or (switches) away from what preceded it
    before = parse(*theirs[:-1]) if theirs[-1] in ("--use_8bit_adam", "--gradient_checkpointing") else parse()
    assert parse(*theirs) != before


def test_diffusers_validation_flags_take_several_values(tmp_path):
    """diffusers' --validation_prompt A B / --validation_image X Y equal our repeated flags."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    theirs = parse("--validation_prompt", "p", "q", "--validation_image", str(a), str(b))
    ours = parse("--validation-prompt", "p", "--validation-prompt", "q",
                 "--validation-image", str(a), "--validation-image", str(b))
    assert theirs == ours and theirs.validation.pairs() == [("p", str(a)), ("q", str(b))]


def test_diffusers_resume_by_checkpoint_name(tmp_path):
    """diffusers names a checkpoint inside --output_dir (`checkpoint-500`); that form resolves there too."""
    from trainer.checkpoint import resolve_resume

    with pytest.raises(FileNotFoundError, match="checkpoint-5"):
        resolve_resume("checkpoint-5", tmp_path)  # not there: refused with the name
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume("checkpoint-5", tmp_path)  # found inside --output, but incomplete


@pytest.mark.parametrize("flag,says", [
    (["--report_to", "wandb"], "OUTPUT/tensorboard"),
    (["--push_to_hub"], "hf upload"),
    (["--enable_xformers_memory_efficient_attention"], "SDPA"),
    (["--train_data_dir", "imgs"], "python -m engine shards"),
    (["--num_train_epochs", "3"], "--max-train-steps"),
    (["--dataset_name", "fusing/fill50k"], "--shards"),
    (["--scale_lr"], "--learning-rate"),
])
def test_unsupported_diffusers_flags_exit_2_naming_ours(flag, says, capsys):
    """A diffusers flag with no counterpart exits with status 2 and says what to use instead."""
    with pytest.raises(SystemExit) as exc:
        main([*REQUIRED, *flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag[0] in err and says in err


def test_every_diffusers_flag_is_accepted_or_refused():
    """No flag of diffusers' script is unknown: each is an alias here or refused with advice."""
    from trainer.flags import NOT_HERE, SAME_MEANING, SEVERAL_VALUES

    known = set(build_parser()._option_string_actions)
    assert set(SAME_MEANING) | set(SEVERAL_VALUES) | set(NOT_HERE) | {"--use_8bit_adam"} <= known
    assert all(NOT_HERE.values())


def test_help_shows_help_and_defaults_for_every_flag():
    """--help: every flag has a sentence, defaults are shown, no `section.FIELD` metavars."""
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "DATA." not in text and "OPTIM." not in text and "MODEL." not in text
    for needle in ("--train_batch_size N", "(default: 4)", "(default: 1e-05)", "(default: fp16)",
                   "(default: adamw8bit)", "--pretrained_model_name_or_path"):
        assert needle in text
    for action in parser._actions:
        assert action.help, action.option_strings
