"""`python -m trainer precompute`: shards round-trip, and training on them follows on-the-fly training."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from webdataset.tariterators import tarfile_samples

from tests.trainer_helpers import tiny_assets, tiny_config
from trainer.cli import main as cli_main
from trainer.config import TrainConfig
from trainer.data import ShardStream, load_pair
from trainer.precompute import PrecomputeConfig, npy_load, precompute
from trainer.train import build_run, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
RES = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two shards of photos, a tiny model, and their precomputed shards."""
    root = tmp_path_factory.mktemp("pre")
    assets = tiny_assets(root, n_shards=2, per_shard=5, size=48)
    assert cli_main(["precompute", "--shards", assets["shards"], "--model", str(assets["model"]), "--output",
                     str(root / "pre"), "--device", "cpu", "--batch-size", "3", "--resolution", str(RES)]) == 0
    return {**assets, "root": root, "pre": str(root / "pre" / "{00000..00001}.tar")}


def read(path) -> list[dict]:
    """Samples of one tar, read back with webdataset's own reader."""
    return list(tarfile_samples([{"url": str(path)}]))


def test_round_trip(assets):
    """Same keys in the same order, txt/json kept, latents and embeddings equal to the encoders' output."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(assets["model"], subfolder="vae")
    te = CLIPTextModel.from_pretrained(assets["model"], subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(assets["model"], subfolder="tokenizer")
    for i in range(2):
        src, out = read(assets["root"] / "shards" / f"{i:05d}.tar"), read(assets["root"] / "pre" / f"{i:05d}.tar")
        assert [s["__key__"] for s in src] == [s["__key__"] for s in out]
        for s, o in zip(src, out, strict=True):
            assert o["txt"] == s["txt"] and o["json"] == s["json"] and "jpg" not in o
            img, cond = load_pair(s, RES)
            latent = npy_load(o["latent.npy"])
            assert latent.dtype == np.float16 and latent.shape == (2, 4, RES // 4, RES // 4)
            with torch.no_grad():
                px = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
                dist = vae.encode(px).latent_dist
                ids = tok([s["txt"].decode()], padding="max_length", max_length=77, return_tensors="pt").input_ids
                text = te(ids)[0][0]
            np.testing.assert_allclose(latent[0], dist.mean[0].numpy(), rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(latent[1], dist.std[0].numpy(), rtol=2e-3, atol=1e-6)
            np.testing.assert_allclose(npy_load(o["text.npy"]), text.numpy(), rtol=2e-3, atol=2e-3)
            from PIL import Image
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(o["cond.png"])).convert("RGB")), cond)
    meta = json.loads((assets["root"] / "pre" / "precompute.json").read_text())
    assert meta["resolution"] == RES and (assets["root"] / "pre" / "empty_prompt.npy").is_file()


def test_rerun_skips_finished_shards_and_counts_bad_samples(assets, tmp_path):
    """A re-run leaves complete shards alone; an undecodable sample is skipped and counted."""
    src = tarfile.open(assets["root"] / "shards" / "00000.tar")
    with tarfile.open(tmp_path / "bad.tar", "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            data = b"\xff\xd8 broken" if m.name.endswith("00001.jpg") else data
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    cfg = PrecomputeConfig(shards=str(tmp_path / "bad.tar"), model=str(assets["model"]), output=str(tmp_path / "o"),
                           device="cpu", resolution=RES)
    first = precompute(cfg)
    assert first["samples"] == 4 and first["failed"] == 1 and len(read(tmp_path / "o" / "00000.tar")) == 4
    again = precompute(cfg)
    assert again["skipped_shards"] == 1 and again["samples"] == 0


def config(assets, shards, output, seed=5, p_empty=0.5) -> TrainConfig:
    """A short fp32 CPU run, 2 micro-batches of 2 per step, half the captions dropped."""
    return tiny_config(assets, output, shards=shards, steps=4, seed=seed,
                       data={"resolution": RES, "proportion_empty_prompts": p_empty},
                       model={"gradient_checkpointing": False}, optim={"gradient_accumulation_steps": 2})


def losses(result) -> list[float]:
    """The logged losses of a run."""
    return [json.loads(x)["loss"] for x in (result.output / "train_log.jsonl").read_text().splitlines()]


def test_training_on_precomputed_shards_matches_on_the_fly(assets, tmp_path):
    """Same seed: the same losses within fp16 storage noise; another seed differs far more."""
    fly = losses(train(config(assets, assets["shards"], tmp_path / "fly"), enable_bar=False))
    pre = losses(train(config(assets, assets["pre"], tmp_path / "pre"), enable_bar=False))
    other = losses(train(config(assets, assets["pre"], tmp_path / "other", seed=6), enable_bar=False))
    np.testing.assert_allclose(pre, fly, rtol=5e-3)
    assert max(abs(a - b) / b for a, b in zip(other, fly, strict=True)) > 0.05


def test_precomputed_run_keeps_encoders_off_the_device(assets, tmp_path):
    """The loader detects precomputed shards; the VAE encoder is gone and the text encoder stays on the CPU."""
    cfg = config(assets, assets["pre"], tmp_path / "r")
    run = build_run(cfg, enable_bar=False)
    assert run.models.vae.encoder is None and run.models.text_encoder.device.type == "cpu"
    batch = next(iter(run.loader))
    assert {"latent_mean", "latent_std", "encoder_hidden_states"} <= batch.keys() and "pixel_values" not in batch
    run.log.close()


@pytest.mark.parametrize("p_empty", [0.0, 0.5, 1.0])
def test_caption_dropout_on_precomputed_shards(assets, p_empty):
    """Dropped captions get the stored empty-prompt embedding, at the requested rate."""
    stream = ShardStream(config(assets, assets["pre"], "unused", p_empty=p_empty).data, None, 0)
    empty = torch.from_numpy(stream.meta["empty_prompt"])
    rows = torch.cat([b["encoder_hidden_states"] for b, _ in zip(iter(stream), range(20), strict=False)])
    share = (rows == empty).flatten(1).all(dim=1).float().mean().item()
    assert {0.0: share == 0.0, 1.0: share == 1.0, 0.5: 0.3 < share < 0.7}[p_empty], share


def test_blank_stand_in_matches_a_precomputed_batch(assets):
    """The blank batch a torchrun rank stands in with before its first decoded one (trainer.data) has the shapes and
    dtypes of a real precomputed batch (the tiny VAE's latents are a quarter of the image, SD's an eighth)."""
    stream = ShardStream(config(assets, assets["pre"], "unused").data, None, 0)
    real, blank = next(iter(stream)), stream._blank(stream.cfg.train_batch_size)
    for key, value in blank.items():
        assert (value.shape, value.dtype) == (real[key].shape, real[key].dtype), key


def test_resolution_mismatch_names_the_flag(assets, tmp_path):
    """Training precomputed shards at another resolution fails with the flag to change."""
    cfg = config(assets, assets["pre"], tmp_path / "x")
    cfg.data.resolution = 64
    with pytest.raises(ValueError, match="--resolution 32"):
        ShardStream(cfg.data, None, 0)


def test_precomputed_shards_without_their_meta_fail_clearly(assets, tmp_path):
    """Precomputed tars copied away from precompute.json are refused with the reason, not skipped as bad."""
    import shutil

    shutil.copy(assets["root"] / "pre" / "00000.tar", tmp_path / "00000.tar")
    cfg = config(assets, str(tmp_path / "00000.tar"), tmp_path / "x")
    with pytest.raises(RuntimeError, match="precompute.json"):
        next(iter(ShardStream(cfg.data, None, 0)))


def test_precomputed_for_another_model_is_refused(assets, tmp_path):
    """Shards whose text width does not fit the UNet name the model to precompute with."""
    import shutil

    shutil.copytree(assets["root"] / "pre", tmp_path / "pre")
    meta = json.loads((tmp_path / "pre" / "precompute.json").read_text())
    (tmp_path / "pre" / "precompute.json").write_text(json.dumps(meta | {"text_dim": 768}))
    cfg = config(assets, str(tmp_path / "pre" / "{00000..00001}.tar"), tmp_path / "r")
    with pytest.raises(ValueError, match="precompute --model"):
        build_run(cfg, enable_bar=False)
