"""trainer.prefetch and the packed worker batches: what the training process receives is what was collated."""

from __future__ import annotations

import pytest
import torch

from trainer.packing import pack, unpack
from trainer.prefetch import Lookahead, moved, prefetch

pytestmark = pytest.mark.quick


def batches(n: int) -> list[dict]:
    """Batches shaped like the precomputed ones (fp16, uint8, a scalar and the stream's entries)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 4, 8, 8, generator=g).half()
    return [{"latent_mean": latents[:, 0], "latent_std": latents[:, 1],  # views of one storage, as collated
             "conditioning_pixel_values": torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8,
                                                        generator=g).permute(0, 3, 1, 2),  # channels-last strides
             "input_ids": torch.randint(0, 500, (2, 77), generator=g), "failed": torch.tensor(i),
             "odd": torch.zeros(3, dtype=torch.uint8),
             "position": torch.tensor([i + 1, 0, 2 * i]), "lanes": torch.tensor([[0, 0, 2 * i, 2 * i + 2]])}
            for i in range(n)]


def test_pack_round_trip():
    """Every tensor comes back with its dtype, shape and values, as views of one buffer."""
    for batch in batches(3):
        packed = pack(batch)
        assert list(packed) == ["packed", "spec"] and packed["packed"].dtype == torch.uint8
        back = unpack(packed)
        assert back.keys() == batch.keys()
        for k, v in batch.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
            assert back[k].stride() == v.stride(), k  # memory layout kept: kernels see the same input
            assert back[k].untyped_storage().data_ptr() == packed["packed"].untyped_storage().data_ptr()


def test_packed_buffer_is_sent_as_a_handle():
    """A worker's queue pickles the packed buffer in place: it is in shared memory already, so the reduction does
    not move it into a fresh segment (a second copy of every batch, which a plain buffer gets)."""
    from multiprocessing.reduction import ForkingPickler

    buf = pack(batches(1)[0])["packed"]
    ptr = buf.data_ptr()
    ForkingPickler.dumps(buf)
    assert buf.is_shared() and buf.data_ptr() == ptr
    plain = torch.zeros(64, dtype=torch.uint8)
    ptr = plain.data_ptr()
    ForkingPickler.dumps(plain)
    assert plain.data_ptr() != ptr  # what the check above would catch: the reduction copied it


def test_dataloader_passes_the_views_through_unrebuilt():
    """The worker's default_convert and the pin thread's pin_memory hand the packed batch's views on as they are
    (rebuilding their nested tuples cost the training process's pin thread GIL time every batch)."""
    from torch.utils.data._utils.collate import default_convert
    from torch.utils.data._utils.pin_memory import pin_memory

    spec = pack(batches(1)[0])["spec"]
    assert pin_memory(spec) is spec and default_convert(spec) is spec


@pytest.mark.parametrize("packed", [True, False])
def test_moved_copies_each_storage_once_and_keeps_the_views(packed):
    """A batch (a worker's packed one, or one collated in the training process) is copied storage by storage: every
    tensor comes out with its values, dtype, shape and strides (no gather into a contiguous host copy first), the
    latents' two views still share one copy, and the stream's entries are not copied."""
    batch = batches(1)[0]
    src = unpack(pack(batch)) if packed else batch
    out = moved(src, torch.device("cpu"), copy=True)
    storages = {v.untyped_storage().data_ptr() for k, v in out.items() if k not in ("position", "failed", "lanes")}
    assert len(storages) == (1 if packed else 4)  # latents (two views), map, ids, odd
    assert not storages & {v.untyped_storage().data_ptr() for v in src.values()}
    for k, v in batch.items():
        assert out[k].dtype == v.dtype and out[k].stride() == v.stride() and torch.equal(out[k], v), k
    assert out["latent_mean"].untyped_storage().data_ptr() == out["latent_std"].untyped_storage().data_ptr()
    assert all(out[k] is src[k] for k in ("position", "failed", "lanes"))


def test_prefetch_on_the_cpu_passes_batches_through():
    """On the CPU the loop gets the very batch objects the loader made, in order."""
    src = batches(4)
    assert all(a is b for a, b in zip(prefetch(src, torch.device("cpu")), src, strict=True))


def test_lookahead_pulls_one_item_early_and_keeps_the_order():
    """stage() takes exactly one item from the source ahead of time; the items still come out in order, once each."""
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    it = Lookahead(source())
    assert next(it) == 0 and pulled == [0]
    it.stage()
    it.stage()  # a second stage while one is held pulls nothing more
    assert pulled == [0, 1]
    assert next(it) == 1 and pulled == [0, 1]
    assert list(it) == [2, 3, 4]
    it.stage()  # exhausted: nothing to stage, and iteration stays finished
    assert list(it) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_on_cuda_hands_out_device_batches():
    """On CUDA every batch arrives on the device with the same values; the stream's entries stay on the host."""
    src = [{k: v.pin_memory() for k, v in b.items()} for b in batches(5)]
    device = torch.device("cuda")
    got = list(prefetch(src, device))
    assert len(got) == 5
    for a, b in zip(src, got, strict=True):
        for k, v in a.items():
            on_host = k in ("position", "failed", "lanes")
            assert b[k].is_cuda != on_host and torch.equal(b[k].cpu(), v), k
