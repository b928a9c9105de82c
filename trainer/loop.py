"""The training loop: one function that reads like the algorithm, and the small state it runs on."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.checkpoint import TrainState
from trainer.config import TrainConfig
from trainer.data import META_KEYS, ShardDataError, ShardStream
from trainer.distributed import World, agree_max, all_sum, gather, launcher_gone, no_sync
from trainer.fused import FiniteGuard
from trainer.lanes import merge_lanes, record_lanes
from trainer.metrics import RunLog, gpu_memory_gb, mfu
from trainer.models import Models, autocast
from trainer.objective import Objective, step_loss
from trainer.optim import lr_factor, set_lr
from trainer.prefetch import Lookahead, prefetch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the steps concerned were skipped, the run stops."""


class StopSignal:
    """SIGINT/SIGTERM ask the loop to save a checkpoint at the next step boundary and stop.

    A second Ctrl-C interrupts at once. Outside the main thread (where handlers cannot be set) it is
    a plain flag.
    """

    def __init__(self, launcher: int | None = None) -> None:
        self.launcher = launcher
        """Under torchrun, the pid of the launcher that started this rank (see launcher_gone)."""
        self.requested: int | None = None
        """The signal this process received (set by the handler at any moment)."""
        self.agreed: int | None = None
        """The signal every rank agreed on after a step (trainer.loop.train_loop): the loop stops there, saved.
        Under torchrun a signal can reach one rank after that step's agreement and another rank before it: acting on
        `requested` alone, the first would leave the loop while the other trains on, waiting for it in a collective."""
        self.forced = False
        """A second Ctrl-C came (its KeyboardInterrupt may have been dropped: see __exit__)."""
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = signum

    def launcher_gone(self) -> bool:
        """True, and a stop requested as by SIGTERM, once torchrun's launcher has died (SIGKILL, the OOM killer).

        torchrun starts each rank in a session of its own and forwards signals itself: with the launcher gone
        nothing stops the ranks, which trained on to the end, writing into --output, while a rerun with --resume
        latest wrote there too. The rank is then the child of another process: it stops at the next step, saved.
        """
        if not launcher_gone(self.launcher):
            return False
        self.launcher = None
        self.requested = self.requested or int(signal.SIGTERM)
        return True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        # A second Ctrl-C raised inside a __del__ or weakref callback (the DataLoader iterator's, joining its workers)
        # is dropped by Python: unless the loop stopped anyway, it still stops the run here, before the export.
        if self.forced and exc_type is None and self.agreed is None:
            raise KeyboardInterrupt


@dataclass
class DroppedRun:
    """This rank's stand-in batches in a row (trainer.data: its own share of the global batch all failed)."""

    length: int = 0
    """Stand-ins in a row up to the latest batch (a lane with nothing readable counts --max-failed-batches)."""
    peak: int = 0
    """The longest run since the ranks last agreed on it (once a step, trainer.loop.check_dropped)."""
    why: str = ""
    """The latest stand-in's reason: shard, member and what is wrong with it."""

    def see(self, batch: dict) -> None:
        """Count a batch in: a stand-in lengthens the run, a batch of the rank's own samples ends it."""
        dropped = int(batch.get("dropped", 0))
        self.length = self.length + dropped if dropped else 0
        self.peak = max(self.peak, self.length)
        if "error" in batch:
            self.why = bytes(batch["error"].tolist()).decode(errors="replace")


class Scheduled(Protocol):
    """What the loop asks after every step: trainer.schedule's Checkpointer and Validator."""

    def due(self, step: int, stopping: bool) -> bool:
        """Whether to write at this step (`stopping`: a stop signal was seen)."""

    def write(self, run: Run) -> object:
        """Write what this step needs (a checkpoint, validation images)."""


@dataclass
class Run:
    """What the loop touches; built by trainer.train.build_run."""

    cfg: TrainConfig
    models: Models
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    loader: torch.utils.data.DataLoader
    state: TrainState
    log: RunLog
    device: torch.device
    weight_dtype: torch.dtype
    params: list[torch.nn.Parameter]
    base_lrs: list[float]
    checkpoints: Scheduled
    """When to save a checkpoint, and the saving (trainer.schedule.Checkpointer)."""
    validation: Scheduled
    """When to draw validation images, and the drawing (trainer.schedule.Validator)."""
    step_models: Models | None = None
    """The models the training step calls (compiled ones with --compile); default: `models`."""
    peak_flops: float | None = None
    """Dense fp16 matmul FLOP/s measured on this device at start (CUDA only): the MFU denominator."""
    flops_per_sample: float | None = None
    """FLOPs of forward + backward (recomputation included) per sample, counted on the first pass."""
    stop: StopSignal = field(default_factory=StopSignal)
    world: World = field(default_factory=World)
    """This process among the torchrun processes (one process: rank 0 of 1)."""
    stream: ShardStream | None = None
    """The loader's dataset: converts the stream's batch count into global samples."""
    failed_synced: int = 0
    """failed_samples as of the last sum over the ranks (trainer.loop.sync_failed)."""
    dropped: DroppedRun = field(default_factory=DroppedRun)
    """This rank's run of stand-in batches, which stops every rank at --max-failed-batches."""

    def autocast(self):
        """Autocast to the low-precision dtype; nothing in fp32 runs."""
        if self.cfg.model.low_memory:  # --low-memory: weights and inputs are bf16 already, no casts
            return contextlib.nullcontext()
        return autocast(self.device, self.weight_dtype)


def next_pass(run: Run, batches, merge: int) -> dict:
    """The next `merge` micro-batches, concatenated on the host; the data position follows the last one."""
    t0 = time.perf_counter()
    st, parts = run.state, [next(batches) for _ in range(merge)]
    run.log.waited(time.perf_counter() - t0)
    for batch in parts:
        st.batches, st.epoch, st.offset = batch["position"].tolist()  # CPU tensor: no device sync
        st.failed_samples += int(batch["failed"])
        record_lanes(st.extra, batch["lanes"])
        run.dropped.see(batch)
    if run.stream is not None:  # the position in global samples: a resume on any number of processes
        st.samples = run.stream.samples_after(st.batches)
    if merge == 1:
        return parts[0]
    return merged(parts)


def merged(parts: list[dict]) -> dict:
    """Micro-batches concatenated into one pass. A blank stand-in among real micro-batches is replaced by a
    repeat of the first real one (it would teach black images); a pass of stand-ins only stays blank."""
    own = [p for p in parts if "blank" not in p]
    if own:
        parts = [p if "blank" not in p else own[0] for p in parts]
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in META_KEYS}
    return tensors if own else tensors | {"blank": True}


def pass_loss(run: Run, batch: dict, merge: int, passes: int, sync: bool = True) -> torch.Tensor:
    """Forward and backward of one pass (compiled models with --compile); FLOPs counted before the first.

    Under torchrun the gradients are all-reduced only when `sync` (the last pass of an optimizer step). A pass
    of blank stand-ins only (a rank with no decoded sample yet, trainer.data) takes part with weight 0.
    """
    if run.flops_per_sample is None:
        run.flops_per_sample = count_flops(run, batch, merge)
    models = run.step_models or run.models
    if models.denoiser is not None:  # --cuda-graphs: the last pass's graph outputs are no longer read
        torch.compiler.cudagraph_mark_step_begin()
    with no_sync(models, not sync):
        with run.autocast():
            loss = step_loss(models, run.objective, batch, run.generator,  # on the device already: trainer.prefetch
                             run.cfg.model.only_mid_control, chunks=merge, share=(run.world.rank, run.world.size))
        if "blank" in batch:
            loss = loss * 0.0  # nothing to learn from black images; the all-reduce still needs this rank's gradients
        run.scaler.scale(loss / passes).backward()
    return loss.detach()


def count_flops(run: Run, batch: dict, merge: int) -> float:
    """FLOPs per sample of forward + backward (recomputation included) on the eager models.

    A dry pass over the first sample of the batch (per-sample FLOPs do not depend on the batch size;
    one sample keeps the pass's memory small) on a copy of the generator, its gradients dropped: the
    run itself is untouched (counting inside the real pass changes its kernels' dispatch and would
    break bitwise resume).
    """
    gen = torch.Generator(device=run.generator.device)
    gen.set_state(run.generator.get_state())
    one = {k: v[:1] for k, v in batch.items() if k not in META_KEYS}
    with FlopCounterMode(display=False) as counter:
        with run.autocast():
            loss = step_loss(run.models, run.objective, one, gen,
                             run.cfg.model.only_mid_control)  # run.models: never the DDP wrappers
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)  # through the optimizer: the fused one's grads are views of its flat buffers
    return float(counter.get_total_flops())


def train_loop(run: Run) -> TrainState:
    """Optimise until max_train_steps or a stop signal; checkpoint and validate when their schedules say."""
    cfg, st = run.cfg, run.state
    merge = cfg.optim.merge_micro_batches
    passes = cfg.optim.gradient_accumulation_steps // merge
    batches = Lookahead(prefetch(run.loader, run.device))  # on CUDA each batch is on the device before its step
    loss_sum = torch.zeros((), device=run.device)
    nonfinite = torch.zeros((), dtype=torch.int32, device=run.device)
    while st.step < cfg.max_train_steps and run.stop.agreed is None:
        set_lr(run.optimizer, run.base_lrs, lr_factor(st.step, cfg.optim, cfg.max_train_steps))
        for i in range(passes):
            loss = pass_loss(run, next_pass(run, batches, merge), merge, passes, sync=i == passes - 1)
            loss_sum += loss * merge  # the log averages over micro-batches
            nonfinite += (~torch.isfinite(loss)).int()
        t0 = time.perf_counter()
        batches.stage()  # received while the GPU runs this backward, not after scaler.step's sync
        run.log.waited(time.perf_counter() - t0)
        run.scaler.unscale_(run.optimizer)
        clip_gradients(run)
        run.scaler.step(run.optimizer)  # skips the step when any gradient is inf/NaN
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        # Agreed, like the stop: the rank that notices first may not be rank 0, the one that prints. Asked first:
        # noticing it requests the stop, which this step's agreement must carry.
        orphaned = int(run.stop.launcher_gone())
        stop, dropped, orphaned = agree_max(run.world, run.device, run.stop.requested or 0, run.dropped.peak, orphaned)
        if orphaned:
            run.log.note("the torchrun launcher is gone: stopping at this step (every rank, checkpoint saved)")
        run.stop.agreed = stop or None  # a signal seen after this (while saving, validating) stops the next step
        check_dropped(run, dropped)
        run.log.advance()
        if st.step % cfg.log_every == 0 or st.step == cfg.max_train_steps:
            log_step(run, loss_sum, nonfinite)
        stopping = run.stop.agreed is not None
        if run.checkpoints.due(st.step, stopping):
            run.checkpoints.write(run)
        if run.validation.due(st.step, stopping):
            run.validation.write(run)
    return st


def clip_gradients(run: Run) -> None:
    """Clip the gradients' global norm to --max-grad-norm (0: off); FiniteGuard's finiteness check reuses the norm,
    which is inf or NaN exactly when some gradient is (or their squares overflow: a step not worth taking)."""
    if run.cfg.optim.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm)
        if isinstance(run.scaler, FiniteGuard):
            run.scaler.norm = norm


def log_step(run: Run, loss_sum: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """The one host sync: mean loss since the last log, lr, throughput, memory; stop on NaN/inf."""
    cfg, st = run.cfg, run.state
    steps = st.step - run.log.last_step
    samples_per_step = effective_batch(run)
    all_sum(run.world, loss_sum, nonfinite)  # every rank stops on NaN alike; the loss is the global mean
    sync_failed(run)
    bad = int(nonfinite.item())
    if bad:
        raise NonFiniteLossError(
            f"the loss was NaN/inf in {bad} micro-batch(es) between steps {run.log.last_step + 1} and "
            f"{st.step}; those updates were skipped, not trained on. Resume from the last checkpoint "
            f"(--resume latest) with a lower --learning-rate, or --mixed-precision bf16 / no instead of fp16.")
    scalars = {
        "loss": loss_sum.item() / max(1, steps * cfg.optim.gradient_accumulation_steps * run.world.size),
        "lr": run.optimizer.param_groups[0]["lr"],
        "samples_per_s": (rate := run.log.rate(st.step, samples_per_step)),
        "data_wait": run.log.data_wait(),
        "host_busy": run.log.host_busy[0],
        "process_cpu": run.log.host_busy[1],
        "mfu": mfu(rate, run.flops_per_sample, run.peak_flops),
        "gpu_mem_gb": gpu_memory_gb(run.device),
        "loss_scale": float(run.scaler.get_scale()),
        "failed_samples": st.failed_samples,
        "effective_batch": samples_per_step,
    }
    run.log.log(st.step, scalars)
    loss_sum.zero_()


def effective_batch(run: Run) -> int:
    """Samples per optimizer step over all processes: per-rank batch x accumulation x world size."""
    return run.cfg.data.train_batch_size * run.cfg.optim.gradient_accumulation_steps * run.world.size


def check_dropped(run: Run, longest: int) -> None:
    """Stop every rank together, with one message, once some rank's run of stand-ins (`longest`, agreed over the
    ranks) reaches --max-failed-batches; the message is the reason of the rank with the longest run."""
    limit = run.cfg.data.max_failed_batches
    if longest < limit:
        run.dropped.peak = run.dropped.length
        return
    rank, (_, why) = max(enumerate(gather(run.world, (run.dropped.peak, run.dropped.why))), key=lambda r: r[1][0])
    why = " ".join(why.split())  # one line: the CLI prints the last line of the error
    raise ShardDataError(
        f"rank {rank} of {run.world.size}: {why}; no sample of its share decoded in {longest} batches in a row "
        f"(--max-failed-batches {limit}; it stood in for them with its last batch or a blank one, all counted as "
        "failed): check that its shards hold KEY.jpg and KEY.cond.png images")


def sync_failed(run: Run) -> None:
    """Under torchrun, failed_samples becomes the count of all ranks (each adds its failures since the last sum)."""
    if run.world.size == 1:
        return
    delta = torch.tensor(run.state.failed_samples - run.failed_synced, device=run.device)
    all_sum(run.world, delta)
    run.state.failed_samples = run.failed_synced = run.failed_synced + int(delta.item())


def gather_lanes(run: Run) -> None:
    """Under torchrun every rank learns where all lanes stand (each rank reads its own; rank 0 checkpoints them
    all): only before a checkpoint, where every rank calls it."""
    if run.world.size > 1:
        run.state.extra["data_lanes"] = merge_lanes(gather(run.world, run.state.extra.get("data_lanes", {})))
