"""trainer.data: shards from webdataset's TarWriter (the engine's sample format) become batches."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import ShardDataError, ShardStream, build_loader, expand_shards
from trainer.lanes import Layout, Position, plan_layout, record_lanes
from trainer.synthetic import write_shards
from trainer.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny offline CLIP tokenizer."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of five 48 px samples with grayscale (mode L) maps."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, n_shards=3, per_shard=5, size=48, cond_mode="L")
    return str(root / "{00000..00002}.tar")


def cfg(shards, **kw) -> DataConfig:
    """A small data config."""
    return DataConfig(**{"shards": shards, "resolution": 32, "train_batch_size": 2, "num_workers": 0,
                         "shuffle_buffer": 4, "proportion_empty_prompts": 0.0, **kw})


def take(loader, n: int) -> list[dict]:
    """The first n batches of a loader."""
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_expand_shards():
    """Brace ranges, lists joined by ::, and pipe: URLs pass through."""
    assert expand_shards("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_shards("a.tar::b/{1,2}.tar") == ["a.tar", "b/1.tar", "b/2.tar"]
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(ValueError, match="--shards"):
        expand_shards("")


def test_batch_layout(shards, tokenizer):
    """Pixels in [-1, 1], grayscale maps become 3 channels in [0, 1], token ids padded to 77."""
    (batch,) = take(build_loader(cfg(shards), tokenizer, 0, Position(), False), 1)
    px, cond, ids = batch["pixel_values"], batch["conditioning_pixel_values"], batch["input_ids"]
    assert px.shape == (2, 3, 32, 32) and px.dtype == torch.float32
    assert -1.0 <= px.min() < 0 < px.max() <= 1.0
    assert cond.shape == (2, 3, 32, 32) and 0.0 <= cond.min() and cond.max() <= 1.0
    assert torch.equal(cond[:, 0], cond[:, 1])  # the L map replicated into RGB
    assert set((cond * 255).round().unique().tolist()) <= {0.0, 128.0, 255.0}  # NEAREST keeps palette values
    assert ids.shape == (2, 77) and ids[0, 0] == tokenizer.bos_token_id
    assert batch["position"].tolist() == [1, 0, 2]


def test_stream_is_the_same_for_any_worker_count(shards, tokenizer):
    """0, 1 and 2 workers on the lanes of a 2-worker run deliver identical batches in identical order, across an
    epoch boundary (a fresh 2-worker run chooses those lanes; a resume keeps them whatever the worker count)."""
    assert build_loader(cfg(shards, num_workers=2), tokenizer, 5, Position(), False).dataset.layout == Layout(1, 2, 2)
    start = Position(layout=Layout(1, 2, 2))
    runs = [take(build_loader(cfg(shards, num_workers=w), tokenizer, 5, start, False), 10) for w in (0, 1, 2)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["input_ids"], b["input_ids"])
    epochs = [b["position"][1].item() for b in runs[0]]
    assert epochs[0] == 0 and epochs[-1] >= 1  # 15 samples an epoch, 20 taken


def test_epochs_are_reshuffled(shards, tokenizer):
    """Epoch 1 visits the samples in another order than epoch 0, and the seed changes the order."""
    batches = take(build_loader(cfg(shards, train_batch_size=5), tokenizer, 0, Position(), False), 6)
    e0 = torch.cat([b["pixel_values"] for b in batches[:3]])
    e1 = torch.cat([b["pixel_values"] for b in batches[3:]])
    assert not torch.equal(e0, e1)
    assert torch.allclose(e0.sum(), e1.sum(), rtol=1e-4)  # same samples, other order
    other_seed = take(build_loader(cfg(shards, train_batch_size=5), tokenizer, 1, Position(), False), 1)
    assert not torch.equal(batches[0]["pixel_values"], other_seed[0]["pixel_values"])


def test_resume_position_continues_the_stream(shards, tokenizer):
    """Starting at a recorded position yields exactly the batches that followed it."""
    loader = build_loader(cfg(shards, num_workers=2), tokenizer, 0, Position(), False)
    full = take(loader, 12)
    b, e, o = full[6]["position"].tolist()
    extra = {}
    for batch in full[:7]:
        record_lanes(extra, batch["lanes"])
    start = Position(b, e, o, layout=loader.dataset.layout, lanes={int(k): v[:2] for k, v in extra["data_lanes"].items()})
    rest = take(build_loader(cfg(shards, num_workers=1), tokenizer, 0, start, False), 5)
    for a, r in zip(full[7:], rest, strict=True):
        assert torch.equal(a["pixel_values"], r["pixel_values"])
        assert a["position"].tolist() == r["position"].tolist()


def test_caption_drop_rate(shards, tokenizer):
    """proportion_empty_prompts=0.5 drops about half of the captions to the empty prompt."""
    stream = ShardStream(cfg(shards, proportion_empty_prompts=0.5, train_batch_size=5), tokenizer, 0)
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    ids = torch.cat([b["input_ids"] for b in itertools.islice(iter(stream), 40)])
    share = (ids == empty).all(dim=1).float().mean().item()
    assert 0.35 < share < 0.65


def test_bad_samples_are_counted_and_skipped(tmp_path, tokenizer):
    """A corrupt JPEG and a sample without a map are replaced and counted; the run goes on."""
    write_shards(tmp_path, n_shards=1, per_shard=6, size=40)
    src = tarfile.open(tmp_path / "00000.tar")
    members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tmp_path / "00001.tar", "w") as dst:
        for m, data in members:
            if m.name == "0000000002.jpg":
                data = b"\xff\xd8 not a jpeg"
            if m.name == "0000000004.cond.png":
                continue
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    batches = take(build_loader(cfg(str(tmp_path / "00001.tar"), train_batch_size=3, shuffle_buffer=1),
                                tokenizer, 0, Position(), False), 4)
    assert sum(int(b["failed"]) for b in batches[:2]) == 2
    assert all(b["pixel_values"].shape[0] == 3 for b in batches)


def test_pipe_urls(shards, tokenizer):
    """`pipe:cat ...` shards stream like local files."""
    first = shards.replace("{00000..00002}", "00000")
    a = take(build_loader(cfg(first), tokenizer, 0, Position(), False), 2)
    b = take(build_loader(cfg(f"pipe:cat {first}"), tokenizer, 0, Position(), False), 2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"])


def test_no_readable_samples_is_an_error(tmp_path, tokenizer):
    """An empty shard set fails loudly instead of spinning forever."""
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(RuntimeError, match="no readable samples"):
        take(build_loader(cfg(str(tmp_path / "empty.tar")), tokenizer, 0, Position(), False), 1)


def test_resize_crop_keeps_the_center():
    """Non-square images: shorter side to the resolution, then a center crop."""
    from trainer.data import resize_crop

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 30:50] = 255
    out = resize_crop(Image.fromarray(img), 20, Image.NEAREST)
    assert out.shape == (20, 20, 3)
    assert out[:, 5:15].min() == 255 and out[:, :3].max() == 0


def rewrite_shard(src_tar, dst_tar, change) -> None:
    """Copy a shard member by member; `change(name, data)` returns new bytes, or None to drop the member."""
    with tarfile.open(src_tar) as src, tarfile.open(dst_tar, "w") as dst:
        for m in src.getmembers():
            data = change(m.name, src.extractfile(m).read())
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))


@pytest.mark.timeout(60)  # a spin (the old behaviour) fails here instead of hanging the suite
@pytest.mark.parametrize("workers", [0, 2])
def test_shards_without_maps_stop_with_an_error_naming_shard_and_member(tmp_path, tokenizer, workers):
    """No cond.png anywhere: after --max-failed-batches empty batches the stream raises, naming both."""
    write_shards(tmp_path / "src", n_shards=1, per_shard=3, size=40)
    rewrite_shard(tmp_path / "src" / "00000.tar", tmp_path / "00003.tar",
                  lambda name, data: None if name.endswith(".cond.png") else data)
    loader = build_loader(cfg(str(tmp_path / "00003.tar"), max_failed_batches=4, num_workers=workers),
                          tokenizer, 0, Position(), False)
    with pytest.raises(ShardDataError) as e:
        take(loader, 1)
    assert "00003.tar: no cond.png" in str(e.value) and "--max-failed-batches 4" in str(e.value)


def test_one_good_sample_per_batch_keeps_the_run_going(tmp_path, tokenizer):
    """Failures alone do not stop a run while every batch still has a decodable sample."""
    write_shards(tmp_path / "src", n_shards=1, per_shard=8, size=40)
    rewrite_shard(tmp_path / "src" / "00000.tar", tmp_path / "00000.tar",
                  lambda name, data: None if name.endswith(".cond.png") and int(name[:10]) % 2 else data)
    batches = take(build_loader(cfg(str(tmp_path / "00000.tar"), max_failed_batches=1, shuffle_buffer=1),
                                tokenizer, 0, Position(), False), 12)
    assert sum(int(b["failed"]) for b in batches) == 12


def test_max_failed_batches_is_checked():
    """The limit must be positive, and the error names the flag."""
    with pytest.raises(ValueError, match="--max-failed-batches"):
        DataConfig(shards="x.tar", max_failed_batches=0)


def logged_shards(root, n: int, per_shard: int) -> str:
    """n tars behind `pipe:` URLs that append `$TAG $PPID NAME` to root/opens.log each time a tar is opened."""
    write_shards(root, n_shards=n, per_shard=per_shard, size=40)
    log = root / "opens.log"
    return "::".join(f"pipe:echo \"$TAG $PPID {i:05d}\" >> {log}; cat {root}/{i:05d}.tar" for i in range(n))


def opens_by_reader(root) -> dict[str, list[str]]:
    """The tars each reader (tag and process) opened, in order."""
    readers: dict[str, list[str]] = {}
    for line in (root / "opens.log").read_text().splitlines():
        tag, pid, name = line.split()
        readers.setdefault(f"{tag}/{pid}", []).append(name)
    return readers


def test_each_tar_is_read_once_an_epoch_with_two_workers(tmp_path, tokenizer, monkeypatch):
    """2 DataLoader workers over 6 tars: each worker opens only its own 3 tars an epoch, together every tar once."""
    monkeypatch.setenv("TAG", "w")
    shards = logged_shards(tmp_path, 6, 4)  # 24 samples an epoch: 12 batches of 2
    loader = build_loader(cfg(shards, num_workers=2), tokenizer, 0, Position(), False)
    assert loader.dataset.layout == Layout(1, 2, 2)
    take(loader, 36)  # 3 epochs (the workers read ahead into a 4th)
    workers = list(opens_by_reader(tmp_path).values())
    assert len(workers) == 2
    for e in range(3):
        chunks = [w[3 * e:3 * e + 3] for w in workers]
        assert sorted(chunks[0] + chunks[1]) == [f"{i:05d}" for i in range(6)], (e, workers)


def test_ranks_read_disjoint_tars(tmp_path, tokenizer, monkeypatch):
    """2 ranks (simulated: rank and world given) x 1 worker over 4 tars: each rank opens only its own tars."""
    shards = logged_shards(tmp_path, 4, 3)
    for r in range(2):
        monkeypatch.setenv("TAG", f"rank{r}")
        stream = ShardStream(cfg(shards, train_batch_size=1), tokenizer, 0, rank=r, world=2)
        assert stream.layout == Layout(2, 1, 2)
        batches = take(stream, 12)  # 2 epochs of 12 samples, 1 a rank a batch
        assert {lane for b in batches for lane in b["lanes"][:, 0].tolist()} == {r}
    readers = opens_by_reader(tmp_path)
    rank0, rank1 = (next(v for k, v in readers.items() if k.startswith(f"rank{r}/")) for r in range(2))
    for e in range(2):
        assert sorted(rank0[2 * e:2 * e + 2] + rank1[2 * e:2 * e + 2]) == [f"{i:05d}" for i in range(4)]


def test_lane_layout_for_few_tars():
    """Fewer tars than processes x workers: workers share a process's lanes; fewer than processes: one lane."""
    assert plan_layout(16, 2, 4, 8) == Layout(2, 4, 8)
    assert plan_layout(5, 2, 4, 8) == Layout(2, 2, 8)  # 2 workers a lane
    assert plan_layout(3, 2, 4, 8) == Layout(2, 1, 8)  # a process's 4 workers share its lane
    assert plan_layout(1, 2, 4, 8) == Layout(1, 1, 8)  # every worker reads the tar, decodes its own samples
    assert plan_layout(3, 1, 0, 2) == Layout(1, 1, 2)
    assert [Layout(2, 2, 4).lane(i) for i in range(8)] == [0, 1, 0, 1, 2, 3, 2, 3]


def test_unequal_tars_resume_exactly_with_workers(tmp_path, tokenizer):
    """Tars of 7, 2, 5 and 1 samples, 2 workers: lanes run through their epochs at their own pace, and a
    resume from any recorded position (here on 1 or 2 workers) continues with exactly the same batches."""
    for i, n in enumerate((7, 2, 5, 1)):
        write_shards(tmp_path / str(i), n_shards=1, per_shard=n, size=40)
    shards = "::".join(str(tmp_path / str(i) / "00000.tar") for i in range(4))
    loader = build_loader(cfg(shards, num_workers=2, train_batch_size=3), tokenizer, 1, Position(), False)
    full = take(loader, 14)  # 42 samples: about 3 epochs of 15
    for cut, workers in ((5, 2), (8, 1)):
        extra = {}
        for batch in full[:cut]:
            record_lanes(extra, batch["lanes"])
        b, e, o = full[cut - 1]["position"].tolist()
        start = Position(b, e, o, layout=loader.dataset.layout,
                         lanes={int(k): v[:2] for k, v in extra["data_lanes"].items()})
        rest = take(build_loader(cfg(shards, num_workers=workers, train_batch_size=3), tokenizer, 1, start, False), 4)
        for a, r in zip(full[cut:cut + 4], rest, strict=True):
            assert torch.equal(a["pixel_values"], r["pixel_values"])
            assert set(map(tuple, a["lanes"].tolist())) <= set(map(tuple, r["lanes"].tolist()))  # lanes alike


def test_shards_recorded_at_another_size_stop_unless_resize(tmp_path, tokenizer):
    """Stats saying 48 px against --resolution 32: an error naming both and the flags; --resize streams 32 px."""
    import json

    from engine import sample as S

    paths = write_shards(tmp_path, n_shards=2, per_shard=4, size=48)
    for i, path in enumerate(paths):  # what the engine writes beside each tar (engine/shard.py stats)
        Path(S.stats_path(str(path))).write_text(json.dumps({"shard": i, S.IMAGE_SIZE: 48 if i else 32}))
    pattern = str(tmp_path / "{00000..00001}.tar")
    with pytest.raises(ValueError) as e:
        ShardStream(cfg(pattern), tokenizer, 0)
    assert "00001.stats.json" in str(e.value) and "48 px" in str(e.value)
    assert "--resolution is 32" in str(e.value) and "pass --resolution 48, or --resize" in str(e.value)
    (batch,) = take(build_loader(cfg(pattern, resize=True), tokenizer, 0, Position(), False), 1)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["conditioning_pixel_values"].shape == (2, 3, 32, 32)
    (batch,) = take(build_loader(cfg(str(paths[1]), resolution=48), tokenizer, 0, Position(), False), 1)
    assert batch["pixel_values"].shape == (2, 3, 48, 48)


def test_the_demo_trains_below_the_shards_recorded_size(tmp_path, tokenizer):
    """`make demo` trains its tiny model at 64 px on the engine's 512 px shards: its config must say --resize."""
    import json

    from engine import sample as S
    from trainer.demo import demo_config

    (path,) = write_shards(tmp_path, n_shards=1, per_shard=4, size=96)
    Path(S.stats_path(str(path))).write_text(json.dumps({"shard": 0, S.IMAGE_SIZE: 96}))
    (tmp_path / "c.png").write_bytes(b"")  # only checked to exist here
    data = demo_config(str(path), tmp_path / "out", tmp_path, tmp_path / "c.png", steps=2, resolution=32).data
    (batch,) = take(build_loader(data, tokenizer, 0, Position(), False), 1)
    assert batch["pixel_values"].shape[-2:] == (32, 32)
