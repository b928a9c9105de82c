"""`python -m trainer --shards PATTERN --model MODEL --output DIR [options]` (also `ctrlnet-train`).

Flag names follow diffusers' train_controlnet.py where one exists. The parser is derived from
trainer.config.TrainConfig (engine/options.py): each flag's `dest` is its `section.field`, its default
and help text are the field's, so the parser and the dataclasses cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from engine import options
from engine.stopping import exit_now, exit_status, main_thread
from trainer import interrupts
from trainer.config import TrainConfig
from trainer.flags import add_diffusers_spellings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: a flag per field of TrainConfig and its sections (defaults: the tutorial's
    recipe: fp16, 512 px, lr 1e-5, 8-bit Adam, effective batch 32), plus diffusers' other forms."""
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train a ControlNet from WebDataset shards. "
                                "Pictures from the result: python -m trainer generate --help",
                                formatter_class=options.HelpFormatter)
    options.add_options(p, TrainConfig)
    add_diffusers_spellings(p)
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The typed configuration of a parsed command line (its dataclasses check it)."""
    return options.from_args(TrainConfig, ns)


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
    if not m.low_memory:
        tips.append("--low-memory (bf16 weights and gradients, fused 8-bit AdamW: SD 1.5 in about 4.1 GiB)")
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


def interrupted_message(output: str) -> str:
    """What an interrupted run leaves: the newest complete checkpoint, or that there is none."""
    try:
        newest = newest_checkpoint(output)
    except Exception:  # noqa: BLE001 - interrupted inside `import torch`: a second import fails half-way
        return ("interrupted while starting: no checkpoint of this run was written (--resume latest continues "
                "from an earlier complete one, if any)")
    if newest is None:
        return "interrupted before any checkpoint was complete: none was written; rerun the same command to start again"
    # not "before the current step's checkpoint": stopped in the final export, that checkpoint is the newest
    return f"interrupted; the newest complete checkpoint is {newest} (continue with --resume latest)"


def newest_checkpoint(output: str) -> Path | None:
    """The newest complete checkpoint folder of the run in `output`, if any."""
    from trainer.checkpoint import list_checkpoints

    found = list_checkpoints(Path(output))
    return found[-1][1] if found else None


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank of this torchrun died (killed, out of
    memory, its host gone): gloo says so in a RuntimeError from its transport (the source path in the message:
    gloo/transport/tcp/pair.cc), NCCL and the store in torch.distributed.DistError. Only in a run of several
    processes; gloo's other errors (a shape that differs between ranks, say) keep their traceback."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or "gloo/transport/" in str(e)


def peer_lost_message(e: BaseException, output: str) -> str:
    """One line for the ranks that outlive a lost peer: which rank, the library's own first line (cut), and where
    the run can continue from (nothing of the step in flight is saved: its gradients never met)."""
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    first = first.split("] ", 1)[-1].split(". ", 1)[0][:160]  # gloo prefixes its source path and line
    newest = newest_checkpoint(output)
    where = (f"the newest complete checkpoint is {newest}: rerun the same command with --resume latest"
             if newest else "no checkpoint was complete yet: rerun the same command to start again")
    return f"rank {os.environ.get('RANK', '?')}: another process of this run stopped ({first}); {where}"


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and exit 0 when done, 130/143 when stopped by SIGINT/SIGTERM (checkpoint saved)."""
    command = subcommand(argv)
    if command is not None:
        return command
    # a signal while the flags are read, torch imports and the models load, or during the final save and export,
    # stops at once (a half-written checkpoint is never resumed: trainer.checkpoint) and says what is left; in the
    # loop trainer.loop.StopSignal takes over and saves first
    interrupts.forget()
    old = {s: signal.signal(s, interrupts.interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread() else {}
    unraisable, sys.unraisablehook = sys.unraisablehook, interrupts.unraisable_hook(sys.unraisablehook)
    cfg = None
    try:
        try:
            cfg = config_from_args(build_parser().parse_args(argv))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run_training(cfg)
    except KeyboardInterrupt as e:  # Interrupted, or the loop's second Ctrl-C
        print(f"\n{interrupted_message(cfg.output) if cfg else 'interrupted: nothing was written'}", file=sys.stderr)
        return exit_status(e)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sys.unraisablehook = unraisable


def entry() -> None:
    """`python -m trainer` and `ctrlnet-train`: main(), then the process ends with its exit status, quietly even
    when a second Ctrl-C lands in torch's and diffusers' exit handlers (engine.stopping.exit_now)."""
    exit_now(main())


def run_training(cfg: TrainConfig) -> int:
    """Train; each known failure is one line on stderr and its exit status (2 data/settings, 3 NaN, 4 memory,
    5 another rank of a torchrun lost)."""
    import torch

    from trainer.checkpoint import CheckpointNotFoundError, ResumeMismatchError
    from trainer.data import ShardDataError, ShardSetError
    from trainer.loop import NonFiniteLossError
    from trainer.models import UnsafeWeightsError
    from trainer.train import SetupError, train

    try:
        result = train(cfg, enable_bar=cfg.progress)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ShardDataError as e:  # from a DataLoader worker it arrives wrapped in the worker's traceback
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('trainer.data.ShardDataError: ')}",
              file=sys.stderr)
        return 2
    except (ResumeMismatchError, UnsafeWeightsError, ShardSetError, CheckpointNotFoundError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: {str(e).splitlines()[0]}\n{memory_advice(cfg)}", file=sys.stderr)
        return 4
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors too
        if not peer_lost(e):
            raise
        print(f"error: {peer_lost_message(e, cfg.output)}", file=sys.stderr)
        return 5
    if result.stopped_by_signal is not None:
        print(f"stopped at step {result.step}; checkpoint saved. Continue with --resume latest", flush=True)
        return 128 + int(result.stopped_by_signal)
    where = f"ControlNet in {result.controlnet}" if result.controlnet else "rank 0 wrote the ControlNet"  # torchrun
    print(f"done: {result.step} steps; {where}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    entry()
