"""`train(cfg)`: the API behind the CLI. Builds a run from small build_* steps, resumes, loops, exports."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.atomic import write_text_atomic
from trainer.config import TrainConfig
from trainer.data import ShardSetError, build_loader, precomputed_meta
from trainer.distributed import World, init, shutdown, world_from_env, wrap
from trainer.interrupts import unraised_signal
from trainer.lanes import resume_position
from trainer.loop import Run, StopSignal, effective_batch, train_loop
from trainer.metrics import RunLog, SilentLog, measure_matmul_flops
from trainer.models import DTYPES, Models, load_models, param_groups
from trainer.objective import Denoiser, Objective
from trainer.optim import build_optimizer, build_scaler, grad_params
from trainer.schedule import Checkpointer, Validator


@dataclass
class TrainResult:
    """What a run left on disk and where it ended."""

    output: Path
    step: int
    stopped_by_signal: int | None = None
    checkpoints: list[Path] = field(default_factory=list)
    validation_grids: list[Path] = field(default_factory=list)
    controlnet: Path | None = None
    log: Path | None = None
    last_loss: float | None = None


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when available; a clear error when CUDA is asked for but absent."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but no CUDA device is visible: pass --device cpu --mixed-precision no")
    return torch.device(name)


class SetupError(ValueError):
    """Flags this device or these shards cannot run, found before any step (the CLI: one line, exit 2)."""


def build_run(cfg: TrainConfig, enable_bar: bool = True, world: World | None = None) -> Run:
    """Models, optimizer, scaler and generator; state restored from --resume; then the data stream."""
    world = world or World()
    device = init(world, resolve_device(cfg.device))
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise SetupError("fp16 training needs CUDA: pass --mixed-precision no (or bf16) on the CPU")
    if cfg.model.cuda_graphs and (device.type != "cuda" or world.size > 1):
        raise SetupError("--cuda-graphs needs one CUDA device and one process (not the CPU, not torchrun): "
                         "use --compile there")
    weight_dtype = DTYPES[cfg.mixed_precision]
    torch.manual_seed(cfg.seed)
    meta = precomputed_meta(cfg.data.shards, cfg.data.resolution)
    models = load_models(cfg.model, device, weight_dtype, precomputed=meta is not None)
    if meta is not None:
        check_precomputed(meta, models, cfg.model.model)
    elif cfg.model.low_memory and device.type == "cuda":
        raise SetupError("--low-memory needs precomputed shards (no VAE or text encoder on the GPU): run "
                         "`python -m trainer precompute --shards ... --model ... --output DIR` and train on DIR")
    groups = param_groups(models, cfg.model, cfg.optim.learning_rate, cfg.optim.decoder_learning_rate)
    optimizer = build_optimizer(groups, cfg.optim)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume loads scheduled ones
    scaler = build_scaler(cfg.mixed_precision, device, bf16_grads=cfg.model.low_memory)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    checkpoints = Checkpointer.of(cfg)
    state = checkpoints.resume(cfg, world, models, optimizer, scaler, generator)
    loader = build_loader(cfg.data, models.tokenizer, cfg.seed,
                          resume_position(state), pin_memory=device.type == "cuda" and cfg.data.pin_memory, rank=world.rank, world=world.size)
    state.extra["data_layout"] = dataclasses.asdict(loader.dataset.layout)  # kept by every checkpoint
    log = (RunLog(Path(cfg.output), state.step, cfg.max_train_steps, enable_bar) if world.main
           else SilentLog(Path(cfg.output), state.step, cfg.max_train_steps))
    step_models = wrap(models, world, device, cfg.model.only_mid_control, cfg.model.unlock_decoder)
    return Run(
        cfg=cfg, models=models, objective=Objective(models.noise_scheduler), optimizer=optimizer, scaler=scaler,
        generator=generator, loader=loader, state=state, log=log, device=device, weight_dtype=weight_dtype,
        params=grad_params(optimizer, groups), base_lrs=base_lrs,
        checkpoints=checkpoints, validation=Validator.of(cfg),
        step_models=step_models_of(cfg, step_models, world),
        peak_flops=measure_matmul_flops(device), world=world, stream=loader.dataset,
        failed_synced=state.failed_samples,
    )


def check_precomputed(meta: dict, models: Models, model: str) -> None:
    """Precomputed latents and embeddings must fit the UNet being trained; the error says what to redo."""
    unet = models.unet.config
    if meta["latent_channels"] != unet.in_channels or meta["text_dim"] != unet.cross_attention_dim:
        raise ShardSetError(f"the shards were precomputed with {meta.get('model')} ({meta['latent_channels']} latent channels, "
                            f"{meta['text_dim']}-d text) but --model {model} expects {unet.in_channels} and "
                            f"{unet.cross_attention_dim}: run `python -m trainer precompute --model {model}` again")


def step_models_of(cfg: TrainConfig, models: Models, world: World) -> Models | None:
    """The models the step calls: graphed (--cuda-graphs), compiled (--compile), DDP-wrapped, or None (the plain ones)."""
    if cfg.model.cuda_graphs:
        return graphed(models, cfg.model.only_mid_control)
    if cfg.model.compile:
        return compiled(models)
    return models if world.size > 1 else None


def graphed(models: Models, only_mid_control: bool) -> Models:
    """--cuda-graphs: ControlNet and UNet compiled as one module in mode "reduce-overhead" (CUDA graphs)."""
    denoiser = Denoiser(models.controlnet, models.unet, only_mid_control)
    return dataclasses.replace(models, denoiser=torch.compile(denoiser, mode="reduce-overhead"))


def compiled(models: Models) -> Models:
    """The same models with the ControlNet and UNet wrapped by torch.compile (weights shared)."""
    return dataclasses.replace(models, controlnet=torch.compile(models.controlnet), unet=torch.compile(models.unet))


def train(cfg: TrainConfig, enable_bar: bool = True) -> TrainResult:
    """Train a ControlNet as configured; return what was written where."""
    output, world = Path(cfg.output), world_from_env()
    if world.main:
        output.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(cfg.to_dict(), indent=2)
        print(f"resolved config:\n{resolved}", flush=True)
        write_text_atomic(output / "train_config.json", resolved)
    run = build_run(cfg, enable_bar and world.main, world)
    run.log.note(f"effective batch {effective_batch(run)} = batch {cfg.data.train_batch_size} x accumulation "
                 f"{cfg.optim.gradient_accumulation_steps} x {world.size} process(es)")
    result = TrainResult(output=output, step=0, log=output / "train_log.jsonl")
    try:
        run.validation.catch_up(run)  # a resumed step's images that a kill left undrawn
        with StopSignal(launcher=world.launcher) as stop:
            stop.requested = unraised_signal()  # a signal while loading whose exception Python dropped: step 1 stops
            run.stop = stop
            result.step = train_loop(run).step
        result.stopped_by_signal = stop.agreed  # the loop saved a checkpoint at the step where it stopped
        if stop.agreed is None:  # a stopped run saved its checkpoint in the loop, and ends there
            result.controlnet = run.checkpoints.finish(run)
            run.validation.finish(run)
    finally:
        run.log.close()
    if result.stopped_by_signal is None:
        shutdown(world)
    # A stopped run ends without shutdown's barrier and teardown: its ranks already met at the stop's checkpoint
    # barrier, and in CI runs a rank left there after its peer had gone (torchrun's launcher killed, or a signal)
    # hung in that last barrier or destroy_process_group, never saying it had stopped.
    result.checkpoints, result.validation_grids = run.checkpoints.saved, run.validation.grids
    result.last_loss = _last_loss(output / "train_log.jsonl")
    return result


def _last_loss(path: Path) -> float | None:
    """The loss of the last JSONL record, if any."""
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["loss"] if lines else None
