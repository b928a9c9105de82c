"""`python -m trainer --shards PATTERN --model MODEL --output DIR [options]` (also `ctrlnet-train`).

Flag names follow diffusers' train_controlnet.py where one exists. Each flag's `dest` is
`section.field` of trainer.config.TrainConfig, so the parser and the dataclasses cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys

from trainer.config import (
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
)
from trainer.flags import add_diffusers_spellings, document

SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
            "checkpoint": CheckpointConfig, "validation": ValidationConfig}


def _limit(text: str) -> int | None:
    """`--checkpoints-total-limit none` keeps every checkpoint."""
    return None if text.lower() in ("none", "0") else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults: the tutorial's recipe: fp16, 512 px, lr 1e-5, 8-bit Adam, effective batch 32)."""
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train a ControlNet from WebDataset shards. "
                                            "Pictures from the result: python -m trainer generate --help",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument("--shards", dest="data.shards", required=True,
                   help="shard pattern, e.g. 'shards/{00000..00063}.tar' (quote it); pipe: URLs work")
    g.add_argument("--resolution", dest="data.resolution", type=int, default=512)
    g.add_argument("--train-batch-size", dest="data.train_batch_size", type=int, default=4)
    g.add_argument("--proportion-empty-prompts", dest="data.proportion_empty_prompts", type=float, default=0.5)
    g.add_argument("--shuffle-buffer", dest="data.shuffle_buffer", type=int, default=256)
    g.add_argument("--dataloader-num-workers", dest="data.num_workers", type=int, default=4)
    g.add_argument("--max-failed-batches", dest="data.max_failed_batches", type=int, default=50,
                   help="stop with an error after this many batches in a row in which no sample decoded")
    g.add_argument("--resize", dest="data.resize", action="store_true",
                   help="resize samples whose shards' stats record another size than --resolution (default: stop)")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model.model", required=True,
                   help="diffusers folder, hub id, or one .safetensors checkpoint (original layout) of an SD 1.x/2.x model")
    g.add_argument("--revision", dest="model.revision", default=None)
    g.add_argument("--variant", dest="model.variant", default=None, help="weight variant, e.g. fp16")
    g.add_argument("--controlnet", dest="model.controlnet", default=None,
                   help="existing ControlNet to continue training (default: initialise from the UNet)")
    g.add_argument("--gradient-checkpointing", dest="model.gradient_checkpointing",
                   action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--gradient-checkpointing-unet", dest="model.gradient_checkpointing_unet",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="with --gradient-checkpointing, also recompute the frozen UNet (less memory, slower)")
    g.add_argument("--unlock-decoder", dest="model.unlock_decoder", action="store_true",
                   help="also train the UNet's decoder half (the original's sd_locked=False)")
    g.add_argument("--only-mid-control", dest="model.only_mid_control", action="store_true",
                   help="feed only the middle-block residual to the UNet (the original's only_mid_control)")
    g.add_argument("--checkpoint-levels", dest="model.checkpoint_levels", type=int, default=None,
                   help="checkpoint only the blocks at this many highest resolutions (default: all)")
    g.add_argument("--compile", dest="model.compile", action="store_true",
                   help="torch.compile the ControlNet and UNet (minutes of compiling at start)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--learning-rate", dest="optim.learning_rate", type=float, default=1e-5)
    g.add_argument("--decoder-learning-rate", dest="optim.decoder_learning_rate", type=float, default=None,
                   help="lr of the unlocked decoder (default: learning rate / 10)")
    g.add_argument("--optimizer", dest="optim.optimizer", choices=OPTIMIZERS, default="adamw8bit")
    g.add_argument("--adam-beta1", dest="optim.adam_beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", dest="optim.adam_beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", dest="optim.adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam-epsilon", dest="optim.adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", dest="optim.max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient-accumulation-steps", dest="optim.gradient_accumulation_steps", type=int, default=8)
    g.add_argument("--merge-micro-batches", dest="optim.merge_micro_batches", type=int, default=1,
                   help="run this many accumulated micro-batches as one pass (same math, more memory)")
    g.add_argument("--lr-scheduler", dest="optim.lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    g.add_argument("--lr-warmup-steps", dest="optim.lr_warmup_steps", type=int, default=0)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing-steps", dest="checkpoint.checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints-total-limit", dest="checkpoint.checkpoints_total_limit", type=_limit, default=3)
    g.add_argument("--resume", dest="checkpoint.resume", default=None, metavar="{latest,PATH}",
                   help="continue from the newest complete checkpoint in --output, or from a checkpoint folder")
    g.add_argument("--export-format", dest="checkpoint.export_format", choices=("diffusers", "original"),
                   default="diffusers")
    g = p.add_argument_group("validation")
    g.add_argument("--validation-steps", dest="validation.validation_steps", type=int, default=500)
    g.add_argument("--validation-prompt", dest="validation.validation_prompt", action="append", default=[])
    g.add_argument("--validation-image", dest="validation.validation_image", action="append", default=[])
    g.add_argument("--num-validation-images", dest="validation.num_validation_images", type=int, default=2)
    g.add_argument("--validation-inference-steps", dest="validation.num_inference_steps", type=int, default=20)
    g.add_argument("--guess-mode", dest="validation.guess_mode", action=argparse.BooleanOptionalAction, default=True,
                   help="also sample each validation image with the empty prompt in guess mode")
    a("--output", dest="output", required=True, help="folder for checkpoints, validation images, logs")
    a("--max-train-steps", dest="max_train_steps", type=int, default=10_000)
    a("--mixed-precision", dest="mixed_precision", choices=MIXED_PRECISIONS, default="fp16")
    a("--seed", dest="seed", type=int, default=0)
    a("--device", dest="device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    a("--log-every", dest="log_every", type=int, default=10)
    a("--no-progress", dest="no_progress", action="store_true", help="no progress bar (logs still written)")
    add_diffusers_spellings(p)
    document(p)
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Group the parsed `section.field` values into the typed configuration."""
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    top: dict = {}
    for key, value in vars(ns).items():
        if key == "no_progress":
            continue
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
        else:
            top[key] = value
    return TrainConfig(**top, **{name: SECTIONS[name](**kw) for name, kw in sections.items()})


def memory_advice(cfg: TrainConfig) -> str:
    """What lowers GPU memory, with this run's values (printed on CUDA out of memory)."""
    d, m, o = cfg.data, cfg.model, cfg.optim
    tips = [f"--train-batch-size {max(1, d.train_batch_size // 2)} --gradient-accumulation-steps "
            f"{o.gradient_accumulation_steps * 2} (same effective batch, half the activations; now "
            f"{d.train_batch_size} x {o.gradient_accumulation_steps})"]
    if not m.gradient_checkpointing or not m.gradient_checkpointing_unet:
        tips.append("--gradient-checkpointing --gradient-checkpointing-unet (recompute activations in backward)")
    if o.optimizer != "adamw8bit":
        tips.append("--optimizer adamw8bit (8-bit optimizer states)")
    if cfg.mixed_precision == "no":
        tips.append("--mixed-precision fp16 (or bf16): frozen parts in half precision")
    if m.unlock_decoder:
        tips.append("drop --unlock-decoder (trains and stores the UNet decoder too)")
    tips.append(f"--resolution {max(8, d.resolution // 2 // 8 * 8)} (now {d.resolution}; activations scale with its square)")
    return "CUDA ran out of memory. Flags that lower memory:\n  " + "\n  ".join(tips)


def subcommand(argv: list[str] | None) -> int | None:
    """Run `python -m trainer generate|precompute ...` and return its status; None for a training run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        from trainer.generate import main as generate_main

        return generate_main(argv[1:])
    if argv[:1] == ["precompute"]:  # VAE latents and caption embeddings once: see trainer.precompute
        from trainer.precompute import main as precompute_main

        return precompute_main(argv[1:])
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and exit 0 when done, 130/143 when stopped by SIGINT/SIGTERM (checkpoint saved)."""
    command = subcommand(argv)
    if command is not None:
        return command
    ns = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from trainer.checkpoint import ResumeMismatchError
    from trainer.data import ShardDataError
    from trainer.loop import NonFiniteLossError
    from trainer.models import UnsafeWeightsError
    from trainer.train import train

    try:
        result = train(cfg, enable_bar=not ns.no_progress)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ShardDataError as e:  # from a DataLoader worker it arrives wrapped in the worker's traceback
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('trainer.data.ShardDataError: ')}",
              file=sys.stderr)
        return 2
    except (ResumeMismatchError, UnsafeWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: {str(e).splitlines()[0]}\n{memory_advice(cfg)}", file=sys.stderr)
        return 4
    if result.stopped_by_signal is not None:
        print(f"stopped at step {result.step}; checkpoint saved. Continue with --resume latest", flush=True)
        return 128 + int(result.stopped_by_signal)
    print(f"done: {result.step} steps; ControlNet in {result.controlnet}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
