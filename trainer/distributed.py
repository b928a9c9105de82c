"""Several processes (`torchrun --nproc_per_node=N -m trainer ...`): process group, DDP wrapping, agreement.

One process per device. torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) starts
a process group: NCCL on CUDA, gloo on the CPU. Every rank draws the random numbers of the whole global
batch and keeps its own rows (trainer.objective), and reads its share of every global batch from its
own tars (trainer.data's lanes), so N processes with batch B train exactly like one process with batch N x B. Rank 0
alone writes checkpoints, logs, validation images and the export; the others wait at a barrier.
Without torchrun's environment nothing here starts anything and the run is the single-process one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    """Global rank; rank 0 writes everything."""
    size: int = 1
    """Number of processes (torchrun's WORLD_SIZE)."""
    local_rank: int = 0
    """Rank on this host: the CUDA device index."""
    launcher: int | None = None
    """Under torchrun, the pid of the launcher that started this process (see launcher_watch)."""

    @property
    def main(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0


def world_from_env() -> World:
    """The world torchrun describes in the environment (one process when it does not)."""
    import trainer

    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")),
                 trainer.PARENT_AT_START if size > 1 else None)


def init(world: World, device: torch.device) -> torch.device:
    """Start the process group (nccl on CUDA, gloo on the CPU); the device of this rank."""
    if world.size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        with launcher_watch(world):
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def launcher_gone(launcher: int | None) -> bool:
    """Whether torchrun's launcher `launcher` (World.launcher) has died: its ranks, in sessions of their own, are
    then children of another process. False for one process (launcher None)."""
    return launcher is not None and os.getppid() != launcher


@contextlib.contextmanager
def launcher_watch(world: World, every: float = 0.25):
    """While the process group starts: the ranks meet at a store torchrun's launcher holds, so with the launcher
    killed first (SIGKILL, the OOM killer) they waited for each other up to init's 30-minute timeout. This process
    then ends in one line instead; nothing was trained or written yet. (After init, trainer.loop's per-step check
    stops the ranks, saved.)"""
    if world.launcher is None:
        yield
        return
    met = threading.Event()

    def gone() -> None:
        print(f"error: rank {world.rank}: the torchrun launcher is gone before the processes met; nothing was "
              "trained or written: run the command again", file=sys.stderr, flush=True)
        os._exit(143)  # the main thread may be inside the store's C++ wait: nothing else ends it

    def watch() -> None:
        while not met.wait(every):
            if launcher_gone(world.launcher):
                gone()

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    try:
        yield
    except dist.DistError:  # a rank already connected to the launcher's store loses the connection instead
        if launcher_gone(world.launcher):
            gone()
        raise
    finally:
        met.set()
        thread.join()


def shutdown(world: World) -> None:
    """Leave the process group (all ranks together)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (no-op for one process)."""
    if world.size > 1:
        dist.barrier()


def wrap(models, world: World, device: torch.device, only_mid_control: bool, unlock_decoder: bool):
    """The models with the trained ones (ControlNet; UNet with --unlock-decoder) in DDP; weights shared.

    With --only-mid-control the down-block residuals are zeroed, so their weights get no gradient:
    DDP must then look for unused parameters.
    """
    if world.size == 1:
        return models
    ids = [device.index] if device.type == "cuda" else None
    ddp = {"controlnet": DistributedDataParallel(models.controlnet, device_ids=ids,
                                                 find_unused_parameters=only_mid_control)}
    if unlock_decoder:
        ddp["unet"] = DistributedDataParallel(models.unet, device_ids=ids, find_unused_parameters=True)
    return dataclasses.replace(models, **ddp)


def no_sync(models, skip: bool):
    """DDP's no_sync on every wrapped model when `skip` (accumulation micro-steps): no all-reduce there."""
    stack = contextlib.ExitStack()
    if skip:
        for m in (models.controlnet, models.unet):
            m = getattr(m, "_orig_mod", m)  # under torch.compile
            if isinstance(m, DistributedDataParallel):
                stack.enter_context(m.no_sync())
    return stack


def all_sum(world: World, *tensors: torch.Tensor) -> None:
    """Sum tensors over the ranks, in place."""
    if world.size > 1:
        for t in tensors:
            dist.all_reduce(t)


def agree_max(world: World, device: torch.device, *values: int) -> list[int]:
    """The largest of each value over the ranks, in one all-reduce: what any rank saw (a stop signal, a run of
    failed batches), every rank acts on at the same step (else the others hang in their next all-reduce)."""
    if world.size == 1:
        return list(values)
    flags = torch.tensor(values, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def gather(world: World, obj) -> list:
    """Every rank's `obj`, in rank order (all ranks must call it)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
