"""End-to-end runs of trainer.train on the CPU: resume is bitwise exact, retention, NaN reporting."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import tiny_assets, tiny_config
from trainer.checkpoint import list_checkpoints
from trainer.config import TrainConfig
from trainer.loop import NonFiniteLossError
from trainer.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]



@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shards with grayscale maps, and a tiny model."""
    return tiny_assets(tmp_path_factory.mktemp("train"), n_shards=3, per_shard=5, size=48, cond_mode="L")


def config(assets, output, steps, workers=0, resume=None, optimizer="adamw", **kw) -> TrainConfig:
    """A small fp32 CPU run; every optimizer step is 2 micro-batches of 2 samples."""
    return tiny_config(
        assets, output, steps=steps, seed=kw.pop("seed", 3), data={"num_workers": workers},
        model={"gradient_checkpointing": kw.pop("ckpt", False), "unlock_decoder": kw.pop("unlock_decoder", False)},
        optim={"learning_rate": kw.pop("lr", 1e-3), "optimizer": optimizer, "gradient_accumulation_steps": 2,
               "lr_scheduler": "cosine", "lr_warmup_steps": 2},
        checkpoint={"checkpointing_steps": kw.pop("every", 3), "checkpoints_total_limit": 2, "resume": resume},
        **kw,
    )


def weights(folder) -> dict[str, torch.Tensor]:
    """The ControlNet weights saved in a diffusers folder."""
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Same keys, and every tensor identical bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_bitwise_identical(assets, tmp_path, optimizer):
    """2N steps in one go == N steps, stop, resume, N more (resumed on another worker count, 8-bit Adam too)."""
    straight = train(config(assets, tmp_path / "a", 6, workers=2, optimizer=optimizer), enable_bar=False)
    # the cosine schedule spans 6 steps in both runs, so the first leg is cut by a stop at step 3; the data
    # lanes are those of the first leg's 2 workers, which the resume on 0 workers keeps
    first = config(assets, tmp_path / "b", 6, workers=2, optimizer=optimizer)
    first.max_train_steps = 3
    train(first, enable_bar=False)
    resumed = train(config(assets, tmp_path / "b", 6, resume="latest", optimizer=optimizer), enable_bar=False)
    assert straight.step == resumed.step == 6
    a, b = weights(tmp_path / "a" / "controlnet"), weights(tmp_path / "b" / "controlnet")
    assert_bitwise_equal(a, b)
    # and so is the last checkpoint's training state, RNG states included: the DataLoader drew its workers' seed
    # from the global CPU generator after a resume had restored it, so every resume moved rng/cpu on by one draw
    state = "checkpoint-6/training_state.safetensors"
    assert_bitwise_equal(load_file(str(tmp_path / "a" / state)), load_file(str(tmp_path / "b" / state)))
    # training moved the weights: the comparison is not between two untouched initialisations
    ckpt3 = weights(tmp_path / "b" / "checkpoint-3" / "controlnet")
    assert any(not torch.equal(a[k], ckpt3[k]) for k in a)
    # both runs logged the same losses for the same steps
    la = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["step"] for r in la] == list(range(1, 7))
    for rec in la:
        assert {"step", "loss", "lr", "samples_per_s"} <= rec.keys()
    # retention: only the last two complete checkpoints remain
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [3, 6]


def test_resume_with_unlocked_decoder(assets, tmp_path):
    """With --unlock-decoder the decoder trains, is checkpointed, restored and exported as a full UNet."""
    straight = train(config(assets, tmp_path / "a", 4, unlock_decoder=True, every=2), enable_bar=False)
    first = config(assets, tmp_path / "b", 4, unlock_decoder=True, every=2)
    first.max_train_steps = 2
    train(first, enable_bar=False)
    train(config(assets, tmp_path / "b", 4, unlock_decoder=True, every=2, resume="latest"), enable_bar=False)
    assert straight.step == 4
    assert (tmp_path / "a" / "checkpoint-4" / "unet_decoder.safetensors").exists()
    ua = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    ub = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_bitwise_equal(ua, ub)
    original = load_file(str(assets["model"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(ua["conv_out.weight"], original["conv_out.weight"])  # decoder trained
    assert torch.equal(ua["conv_in.weight"], original["conv_in.weight"])  # encoder stayed locked


def test_nonfinite_loss_is_reported_not_trained_on(assets, tmp_path):
    """An absurd learning rate blows the loss up: the run stops with the step and advice."""
    cfg = config(assets, tmp_path / "nan", 30, lr=1e12, every=1000)
    cfg.optim.max_grad_norm = 0.0
    with pytest.raises(NonFiniteLossError, match=r"--learning-rate"):
        train(cfg, enable_bar=False)


def test_resume_path_must_be_complete(assets, tmp_path):
    """--resume PATH to a folder without a finished manifest is refused."""
    (tmp_path / "x" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(config(assets, tmp_path / "x", 2, resume=str(tmp_path / "x" / "checkpoint-5")), enable_bar=False)
    shutil.rmtree(tmp_path / "x")


REFERENCE = Path(__file__).with_name("assets") / "trainer_reference_losses.json"


def test_loss_curve_matches_the_reference(assets, tmp_path):
    """8 fixed-seed steps reproduce the loss curve kept in tests/assets (catches silent objective changes).

    Regenerate after an intended change with TRAINER_REFERENCE_UPDATE=1.
    """
    train(config(assets, tmp_path, 8, every=1000), enable_bar=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    if os.environ.get("TRAINER_REFERENCE_UPDATE"):
        REFERENCE.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    reference = json.loads(REFERENCE.read_text())["losses"]
    assert len(losses) == len(reference) == 8
    # loose enough for another CPU's or libjpeg's rounding, far tighter than any change of the objective
    assert losses == pytest.approx(reference, rel=1e-2)
    assert losses[-1] < losses[0]


def test_resume_after_a_crash_rewrites_the_log(assets, tmp_path):
    """Steps logged after the checkpoint a resume starts from are replaced, not duplicated."""
    cfg = config(assets, tmp_path, 4, every=2)
    train(cfg, enable_bar=False)
    import shutil as sh

    sh.rmtree(tmp_path / "checkpoint-4")  # as if the run died between step 2's checkpoint and the end
    train(config(assets, tmp_path, 4, every=2, resume="latest"), enable_bar=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(assets, tmp_path, capsys):
    """`--resume checkpoint-2` of a run that went on to step 6, now to stop at 5: checkpoint-4 and -6 belong to the
    abandoned run. Left as they were, the retention kept the old checkpoint-6 and deleted this run's checkpoint-4,
    and a later `--resume latest` continued the old run at 6 under a log that ends at 5."""
    out = tmp_path / "run"
    train(config(assets, out, 2, every=2), enable_bar=False)
    shutil.copytree(out / "checkpoint-2", tmp_path / "kept" / "checkpoint-2")  # the retention will remove it
    train(config(assets, out, 6, every=2, resume="latest"), enable_bar=False)  # keeps checkpoint-4, checkpoint-6
    capsys.readouterr()
    train(config(assets, out, 5, every=2, resume=str(tmp_path / "kept" / "checkpoint-2")), enable_bar=False)
    assert "set aside 2 newer checkpoint(s)" in capsys.readouterr().out
    assert [n for n, _ in list_checkpoints(out)] == [4, 5]  # this run's: 4 again, and the last step
    assert sorted(p.name for p in out.glob("*.superseded*")) == ["checkpoint-4.superseded", "checkpoint-6.superseded"]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_a_rerun_removes_what_a_killed_export_left(assets, tmp_path):
    """Found SIGKILLing the CLI at random moments: a kill during the final export left `controlnet.<8 hex>.tmp/`
    (a whole ControlNet: 1.4 GB for SD 1.5) beside controlnet/, and the resume that finished the run kept it, as
    every later one would. These are engine.atomic's temporaries between writing and renaming (a kill while the
    log is rewritten at a resume leaves `train_log.jsonl.<8 hex>.tmp`); a run's start now removes the ones of its
    own outputs, and nothing else."""
    from diffusers import ControlNetModel

    from engine.atomic import stage
    from engine.atomic import tmp_path as atomic_tmp
    from trainer.export import save_single_file

    out = tmp_path / "run"
    train(config(assets, out, 3), enable_bar=False)
    net = ControlNetModel.from_pretrained(str(out / "controlnet"))
    # what export_final and RunLog's rewrite leave when killed before their renames, written by the same calls
    net.save_pretrained(atomic_tmp(out / "controlnet"), safe_serialization=True)
    stage(out / "controlnet-fp16.safetensors", lambda tmp: save_single_file(net, tmp))
    stage(out / "train_log.jsonl", lambda tmp: tmp.write_text('{"step": 1}\n'))
    (out / "notes.0a1b2c3d.tmp").write_text("not the run's")
    assert len(list(out.glob("*.tmp"))) == 4
    train(config(assets, out, 4, resume="latest"), enable_bar=False)
    assert [p.name for p in out.glob("*.tmp")] == ["notes.0a1b2c3d.tmp"]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_resume_at_the_last_step_keeps_its_checkpoint(assets, tmp_path):
    """Found in the kill-and-resume stress: a run stopped during its final export was resumed from checkpoint-30 at
    step 30, and saved checkpoint-30 again before exporting ("saved .../checkpoint-30"): the same state rewritten
    (GBs for SD 1.5), the complete folder deleted before the copy's rename (a kill there left no checkpoint of that
    step). The resumed step's checkpoint now counts as saved; the export is written."""
    out = tmp_path / "run"
    train(config(assets, out, 3), enable_bar=False)
    before = (out / "checkpoint-3").stat().st_ino
    shutil.rmtree(out / "controlnet")  # as if the run was stopped in its export
    (out / "controlnet-fp16.safetensors").unlink()
    resumed = train(config(assets, out, 3, resume="latest"), enable_bar=False)
    assert resumed.step == 3 and (out / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "checkpoint-3").stat().st_ino == before  # the very folder, not a rewritten copy
    assert_bitwise_equal(weights(out / "controlnet"), weights(out / "checkpoint-3" / "controlnet"))
