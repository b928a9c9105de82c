"""One shared-memory buffer per batch: how a DataLoader worker sends a batch and the training process rebuilds it.

Each tensor a worker sends costs the training process a shared-memory handle to receive and a buffer
to pin; pack puts a batch's tensors in one uint8 buffer and unpack gives them back as views of it
(trainer/data.py packs in its workers and unpacks in its DataLoader). The buffer is allocated in shared
memory, so sending it moves a handle only: torch.multiprocessing.reductions.reduce_storage copies a
storage into fresh shared memory only when it is not shared already (`_share_fd_cpu_` /
`_share_filename_cpu_` return the existing segment), as DataLoader's default_collate does in workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Views:
    """How to rebuild each tensor of a packed batch from its buffer: (key, dtype, shape, stride, storage offset,
    byte start) per tensor.

    One opaque object, so DataLoader's default_convert (in the worker) and pin_memory (in the training
    process's pin thread, holding the GIL) pass it through instead of rebuilding its ~100 nested tuples
    every batch (0.18 and 0.25 ms a batch, measured).
    """

    entries: tuple


def pack(batch: dict) -> dict:
    """A batch's tensors in one uint8 buffer (their storages, 16-byte aligned, shared ones once) and how to
    rebuild each view with its strides (a permuted map keeps its memory layout, so kernels see the same input).

    Each tensor a worker sends costs the training process a shared-memory handle to receive and a
    buffer to pin; one buffer a batch keeps that host time small while the step runs (bench/loader_cpu.py).
    """
    spec, starts, offset = [], {}, 0
    for key, value in batch.items():
        storage = value.untyped_storage()
        if storage.data_ptr() not in starts:
            offset = -(-offset // 16) * 16
            starts[storage.data_ptr()] = (offset, storage)
            offset += storage.nbytes()
        spec.append((key, value.dtype, tuple(value.shape), value.stride(), value.storage_offset(),
                     starts[storage.data_ptr()][0]))
    buf = shared_bytes(-(-offset // 16) * 16)  # a whole number of elements of any dtype
    for start, storage in starts.values():
        buf[start:start + storage.nbytes()] = torch.empty(0, dtype=torch.uint8).set_(storage)
    return {"packed": buf, "spec": Views(tuple(spec))}


def shared_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory under torch.multiprocessing's sharing strategy."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


def unpack(batch: dict) -> dict:
    """The tensors of a packed batch, as views of its (pinned) buffer; other batches unchanged."""
    if "packed" not in batch:
        return batch
    buf, out = batch["packed"], {}
    for key, dtype, shape, stride, offset, start in batch["spec"].entries:
        size = dtype.itemsize
        out[key] = buf.view(dtype).as_strided(shape, stride, start // size + offset)
    return out
