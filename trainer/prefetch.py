"""Batches on the GPU before the step asks for them: a one-batch-ahead copy on a side CUDA stream.

The DataLoader (pin_memory=True, the default) receives and pins batches in its own thread; here batch
n+1's copy to the device is issued on a side stream (non_blocking, from pinned memory) before step n
runs, so the copy overlaps step n's kernels and the training thread spends no time on it. Under
--no-pin-memory the same call copies from the workers' shared memory and returns when the copy is done. On the CPU the batches
pass through unchanged. The entries describing the stream (trainer.data.META_KEYS) stay on the host:
the loop reads them without a device sync.

`Lookahead` lets the loop receive the next batch from the DataLoader (unpickling, shared-memory handles,
the next copy's launch: host work in the training thread) while the GPU still runs the current step's
backward, instead of after GradScaler's one host sync per step, when the GPU would wait for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from trainer.data import META_KEYS


def prefetch(batches: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """The batches in order, each already on `device` (CUDA) when handed out; on other devices unchanged."""
    it = iter(batches)
    if device.type != "cuda":
        yield from it
        return
    side, first = torch.cuda.Stream(device), next(it, None)
    if first is None:
        return
    pending = _copy(first, device, side)
    for batch in it:
        current = _ready(pending, device, side)
        pending = _copy(batch, device, side)  # the next batch's copy overlaps this batch's step
        yield current
    yield _ready(pending, device, side)


def _copy(batch: dict, device: torch.device, side: torch.cuda.Stream) -> dict:
    """Start copying a batch's tensors to the device on the side stream."""
    with torch.cuda.stream(side):
        return moved(batch, device, non_blocking=True)


def moved(batch: dict, device: torch.device, non_blocking: bool = False, copy: bool = False) -> dict:
    """The batch's tensors on `device` (copied anew even there, with copy): each storage copied once, whole, and
    its tensors rebuilt as the same views (dtype, shape, strides, offset) of the copy; the stream's entries
    (META_KEYS) stay where they are.

    A tensor copied alone whose strides `to` does not keep (a view with gaps: the latent mean, every other block
    of the collated latents) is first gathered into a contiguous host copy in the training thread: 8-20 ms a
    tensor of a batch of 8 at 512 px on a lent H200's host, profiled (bench/RESULTS.md "train"), on the step's
    critical path. A packed worker batch (trainer/packing.py) is one storage: one transfer of one pinned buffer.
    Every storage of a collated batch is covered by its tensors, so copying storages whole copies nothing extra.
    """
    copies, out = {}, {}
    for k, v in batch.items():
        if k in META_KEYS or (v.device.type == device.type and not copy):
            out[k] = v
            continue
        storage = v.untyped_storage()
        if storage.data_ptr() not in copies:
            whole = torch.empty(0, dtype=torch.uint8, device=v.device).set_(storage)
            copies[storage.data_ptr()] = whole.to(device, non_blocking=non_blocking, copy=copy)
        out[k] = copies[storage.data_ptr()].view(v.dtype).as_strided(v.shape, v.stride(), v.storage_offset())
    return out


def _ready(batch: dict, device: torch.device, side: torch.cuda.Stream) -> dict:
    """Make the compute stream wait for the batch's copy, and keep its memory until the compute stream is done."""
    main = torch.cuda.current_stream(device)
    main.wait_stream(side)
    for k, v in batch.items():
        if k not in META_KEYS and v.is_cuda:
            v.record_stream(main)  # the caching allocator must not hand this memory to the side stream early
    return batch


class Lookahead:
    """An iterator whose next item can be pulled early (`stage`) and is handed out later, in order."""

    def __init__(self, items: Iterable):
        self._it, self._held = iter(items), []

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self):
        return self._held.pop() if self._held else next(self._it)

    def stage(self) -> None:
        """Pull the next item now (nothing when one is held already or the items are exhausted)."""
        if not self._held:
            self._held.extend(itertools.islice(self._it, 1))
