"""What a run writes besides training, and when: a Checkpointer and a Validator that own their schedule.

After every optimizer step the loop asks each `due(step, stopping)` and, if so, calls its `write`
(trainer.loop.Scheduled is all the loop knows of them); once the loop ends without a stop signal,
train() calls `finish`, which writes the last step unless the schedule just did. Rank 0 writes;
the other ranks wait at a barrier, so all leave together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    prune,
    resolve_resume,
    save_checkpoint,
    set_aside_newer,
)
from trainer.config import TrainConfig
from trainer.distributed import World, agree_max, barrier
from trainer.export import export_final
from trainer.loop import Run, gather_lanes, sync_failed
from trainer.models import Models, decoder_state
from trainer.plots import write_loss_png, write_progress_png
from trainer.validate import run_validation


@dataclass
class Checkpointer:
    """Checkpoints every --checkpointing-steps, at a stop signal and at the end; keeps the newest
    --checkpoints-total-limit; resumes from --resume; exports the final ControlNet."""

    output: Path
    every: int
    """--checkpointing-steps."""
    keep: int | None
    """--checkpoints-total-limit (None: keep all)."""
    saved: list[Path] = field(default_factory=list)
    """The checkpoints this process saved, oldest first."""
    last_step: int | None = None
    """The step of the last one saved (None before the first)."""

    @classmethod
    def of(cls, cfg: TrainConfig) -> Checkpointer:
        """The checkpointer a config asks for."""
        return cls(Path(cfg.output), cfg.checkpoint.checkpointing_steps, cfg.checkpoint.checkpoints_total_limit)

    def resume(self, cfg: TrainConfig, world: World, models: Models, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, generator: torch.Generator) -> TrainState:
        """Restore the checkpoint --resume names (a fresh state when none); stale temporary folders go first."""
        if world.main:
            prune(self.output, None)  # temporary folders of a crashed save
        barrier(world)
        ckpt = resolve_resume(cfg.checkpoint.resume, self.output)
        if ckpt is None:
            if cfg.checkpoint.resume and world.main:
                print(f"--resume {cfg.checkpoint.resume}: no complete checkpoint in {self.output}, starting fresh",
                      flush=True)
            return TrainState()
        unet = models.unet if cfg.model.unlock_decoder else None
        state = load_checkpoint(ckpt, models.controlnet, optimizer, scaler, generator, unet=unet, config=cfg.to_dict())
        if world.main:
            print(f"resumed from {ckpt} at step {state.step}", flush=True)
            set_aside = set_aside_newer(self.output, state.step)  # none with --resume latest: it took the newest
            if set_aside:
                print(f"set aside {len(set_aside)} newer checkpoint(s) of the run this one replaces, kept as "
                      f"{', '.join(p.name for p in set_aside)} (--resume latest and the retention skip them; delete "
                      "them when not needed)", flush=True)
        self.last_step = state.step  # saved already: `finish` at this step (a run stopped in its export) keeps it
        return state

    def due(self, step: int, stopping: bool) -> bool:
        """Every --checkpointing-steps, and at a stop signal (the run then resumes where it stopped)."""
        return step % self.every == 0 or stopping

    def write(self, run: Run) -> Path:
        """Checkpoint the current step and prune old ones (rank 0 writes; the others wait)."""
        path = self.output / f"checkpoint-{run.state.step}"
        sync_failed(run)  # the checkpoint holds every rank's failed samples
        gather_lanes(run)  # and where every rank's lanes stand
        if run.world.main:
            decoder = decoder_state(run.models) if run.cfg.model.unlock_decoder else None
            path = save_checkpoint(self.output, run.state, run.models.controlnet, run.optimizer, run.scaler,
                                   run.generator, run.cfg.to_dict(), decoder=decoder)
            self.tidy()
            run.log.note(f"saved {path}")
        barrier(run.world)
        self.saved.append(path)
        self.last_step = run.state.step
        return path

    def newest_step(self) -> int | None:
        """The step of the newest complete checkpoint in the output folder, if any."""
        found = list_checkpoints(self.output)
        return found[-1][0] if found else None

    def tidy(self) -> None:
        """What follows each save (rank 0): keep the newest --checkpoints-total-limit, redraw loss.png."""
        prune(self.output, self.keep)
        write_loss_png(self.output)

    def finish(self, run: Run) -> Path | None:
        """The last step's checkpoint (unless just saved), then the final export; its folder on rank 0."""
        if self.last_step != run.state.step:
            self.write(run)
        elif run.world.main and not self.saved and self.newest_step() == run.state.step:
            # resumed from the newest checkpoint at its last step: a kill between that checkpoint's save and the
            # retention after it left one checkpoint over --checkpoints-total-limit (and loss.png a step behind),
            # which nothing else removed
            self.tidy()
        folder = None
        if run.world.main:
            folder = export_final(run.models, self.output, run.cfg.model.unlock_decoder,
                                  run.cfg.checkpoint.export_format)
        barrier(run.world)
        return folder


@dataclass
class Validator:
    """Validation images every --validation-steps and at the end, when --validation-prompt was given."""

    output: Path
    """Where the images go (OUTPUT/validation)."""
    every: int
    """--validation-steps."""
    enabled: bool
    """True when there is something to draw (--validation-prompt given)."""
    grids: list[Path] = field(default_factory=list)
    """The grids drawn by this process (rank 0), oldest first."""
    last_step: int | None = None
    """The step of the last drawing (None before the first)."""

    @classmethod
    def of(cls, cfg: TrainConfig) -> Validator:
        """The validator a config asks for."""
        return cls(Path(cfg.output) / "validation", cfg.validation.validation_steps,
                   bool(cfg.validation.validation_prompt))

    def due(self, step: int, stopping: bool) -> bool:
        """Every --validation-steps, unless stopping (the checkpoint comes first)."""
        return self.enabled and step % self.every == 0 and not stopping

    def write(self, run: Run) -> None:
        """Write the current step's images (rank 0 draws; the others wait)."""
        if run.world.main:
            cfg = run.cfg
            out = run_validation(run.models, cfg.validation, run.state.step, self.output, cfg.data.resolution,
                                 run.device, run.weight_dtype, cfg.seed, cfg.model.only_mid_control)
            self.grids.append(out["grid"])
            write_progress_png(self.output.parent)
            if out["all_black"]:
                run.log.note(f"warning: validation images of step {run.state.step} are all black")
        barrier(run.world)
        self.last_step = run.state.step

    def catch_up(self, run: Run) -> None:
        """A resumed run first draws its checkpoint's step when that step was due and its grid is missing: the
        checkpoint is saved before the images, so a kill in between (or a stop signal there, which skips them) lost
        them for good, a gap in the validation folder and the progress sheet. Same weights, same seed: the images
        an uninterrupted run drew."""
        step = run.state.step
        if not step or not self.due(step, stopping=False):
            return
        missing = int(run.world.main and not (self.output / f"step-{step:06d}_grid.png").exists())
        if agree_max(run.world, run.device, missing)[0]:  # rank 0 looked; every rank takes part alike
            self.write(run)

    def finish(self, run: Run) -> None:
        """The last step's images, unless just drawn."""
        if self.enabled and self.last_step != run.state.step:
            self.write(run)
