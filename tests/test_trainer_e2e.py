"""The trainer end to end: the CLI in a real subprocess stopped by SIGINT and resumed, the output loaded by
diffusers' pipeline, and a learning check on a task only the conditioning map can solve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import list_checkpoints
from trainer.synthetic import first_condition, write_shards
from trainer.tiny import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parents[1]



def cli(*args: str) -> list[str]:
    """The trainer's command line, as a user types it."""
    return [sys.executable, "-m", "trainer", *args]


def read_log(path: Path) -> list[dict]:
    """Records of a train_log.jsonl (none if it does not exist yet)."""
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_sigint_checkpoint_resume_and_pipeline(tmp_path):
    """Ctrl-C saves a loadable checkpoint at a step boundary; --resume latest finishes; diffusers loads it."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    write_shards(tmp_path / "shards", n_shards=2, per_shard=6, size=48, cond_mode="RGB")
    model = build_tiny_model(tmp_path / "model")
    cond = first_condition(tmp_path / "shards" / "00000.tar", tmp_path / "cond.png")
    out = tmp_path / "out"
    common = ["--shards", str(tmp_path / "shards" / "{00000..00001}.tar"), "--model", str(model),
              "--output", str(out), "--device", "cpu", "--mixed-precision", "no", "--resolution", "32",
              "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--optimizer", "adamw8bit",
              "--learning-rate", "1e-4", "--checkpointing-steps", "1000", "--log-every", "1",
              "--dataloader-num-workers", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cli(*common, "--max-train-steps", "100000"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(read_log(out / "train_log.jsonl")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "--resume latest" in output
    found = list_checkpoints(out)
    assert len(found) == 1, output
    step, ckpt = found[0]
    assert step >= 2 and step == read_log(out / "train_log.jsonl")[-1]["step"]
    assert not (out / "controlnet").exists()  # interrupted: no final export
    ControlNetModel.from_pretrained(ckpt / "controlnet")
    # continue two more steps from it, with validation images on disk
    done = subprocess.run(cli(*common, "--max-train-steps", str(step + 2), "--resume", "latest",
                              "--validation-steps", "1000", "--validation-prompt", "a photo",
                              "--validation-image", str(cond), "--validation-inference-steps", "2",
                              "--num-validation-images", "1"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {ckpt}" in done.stdout
    assert [r["step"] for r in read_log(out / "train_log.jsonl")][-2:] == [step + 1, step + 2]
    grids = sorted((out / "validation").glob("step-*_grid.png"))
    assert [g.name for g in grids] == [f"step-{step + 2:06d}_grid.png"]
    assert (out / "validation" / f"step-{step + 2:06d}_p0_guess.png").exists()
    assert json.loads((out / f"checkpoint-{step + 2}" / "state.json").read_text())["config"]["max_train_steps"] \
        == step + 2
    # the exported ControlNet runs in diffusers' pipeline
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=controlnet, safety_checker=None,
                                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", image=torch.rand(1, 3, 32, 32), height=32, width=32, num_inference_steps=2,
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    from safetensors.torch import load_file

    single = load_file(str(out / "controlnet-fp16.safetensors"))
    assert single.keys() == controlnet.state_dict().keys()
    assert all(v.dtype == torch.float16 for v in single.values())


def test_learns_from_the_conditioning_map(tmp_path):
    """Images that are a pure function of their maps: after training, the true map beats a shuffled one.

    v-prediction, because at high noise its target is mostly -x_0, which only the map can tell.
    """
    from trainer.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from trainer.objective import controlnet_loss, encode_batch
    from trainer.train import build_run

    write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32, kind="blocks", captions=False)
    model = build_tiny_model(tmp_path / "model", prediction_type="v_prediction")
    cfg = TrainConfig(
        output=str(tmp_path / "out"),
        data=DataConfig(shards=str(tmp_path / "shards" / "{00000..00001}.tar"), resolution=32, train_batch_size=8,
                        num_workers=0, shuffle_buffer=32),
        # the cond map reaches the UNet only through the ControlNet; the unlocked decoder (the original's
        # sd_locked=False) lets a random, untrained UNet make use of the residuals within ~100 steps
        model=ModelConfig(model=str(model), gradient_checkpointing=False, unlock_decoder=True),
        optim=OptimConfig(learning_rate=3e-3, decoder_learning_rate=3e-3, optimizer="adamw",
                          gradient_accumulation_steps=1, lr_warmup_steps=10),
        checkpoint=CheckpointConfig(checkpointing_steps=10_000), max_train_steps=1, mixed_precision="no",
        device="cpu", log_every=50,
    )

    def losses(run, batch) -> tuple[float, float]:
        """Mean loss with the true maps and with maps rolled by one, over fixed noise and timesteps."""
        g = torch.Generator().manual_seed(123)
        true, shuffled = [], []
        with torch.no_grad():
            latents, text = encode_batch(run.models, batch, g)
            for _ in range(8):
                noise = torch.randn(latents.shape, generator=g)
                t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
                cond = batch["conditioning_pixel_values"]
                true.append(controlnet_loss(run.models, run.objective, latents, text, cond, noise, t).item())
                shuffled.append(controlnet_loss(run.models, run.objective, latents, text, cond.roll(1, 0),
                                                noise, t).item())
        return float(np.mean(true)), float(np.mean(shuffled))

    from trainer.loop import train_loop

    run = build_run(cfg, enable_bar=False)
    batch = next(iter(run.loader))
    before_true, before_shuffled = losses(run, batch)
    assert before_true == pytest.approx(before_shuffled)  # zero convolutions: the map has no effect yet
    run.cfg.max_train_steps = 120
    train_loop(run)
    after_true, after_shuffled = losses(run, batch)
    assert after_true < before_true
    assert after_true < 0.75 * after_shuffled, (before_true, after_true, after_shuffled)


# `python -m trainer` that sends itself a signal once the run's last line is printed: from an exit handler
# registered first (so it runs last), or from an object's __del__ that runs while the interpreter tears its modules
# down. A second Ctrl-C pressed just after `stopped at step N` (or one after `done`) lands in one of these ~1.5 s;
# the stress test hit them by chance, sent from here the signal lands there every time.
SIGNAL_AT_EXIT = """
import atexit, os, runpy, signal, sys
def send():
    os.kill(os.getpid(), signal.{name})
    sum(range(1000))  # Python runs its handler between two bytecodes
class Late:
    __del__ = lambda self: send()
if "{moment}" == "atexit":
    atexit.register(send)
else:
    late = Late()  # a global of __main__: deleted in the module teardown
sys.argv[0] = "trainer"
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("name", "moment"), [("SIGINT", "atexit"), ("SIGINT", "teardown"), ("SIGTERM", "teardown")])
def test_a_signal_while_the_finished_process_exits_is_quiet(tmp_path, name, moment):
    """Found killing runs at random moments (2 Ctrl-C 0.3 s apart, the first during validation): the run stopped,
    saved and said so, then the second Ctrl-C printed `Exception ignored in atexit callback` and a KeyboardInterrupt
    traceback, or killed the process by SIGINT (exit -2, not 130); a SIGTERM after `done` killed it (-15, not 0).
    The process now ends with the status its last line reported, and prints nothing more."""
    write_shards(tmp_path / "shards", n_shards=1, per_shard=4, size=32)
    model = build_tiny_model(tmp_path / "model")
    args = ["--shards", str(tmp_path / "shards" / "00000.tar"), "--model", str(model), "--output", str(tmp_path / "out"),
            "--device", "cpu", "--mixed-precision", "no", "--resolution", "32", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--optimizer", "adamw", "--max-train-steps", "1", "--no-progress",
            "--dataloader-num-workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    program = SIGNAL_AT_EXIT.replace("{name}", name).replace("{moment}", moment)
    done = subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("done: 1 steps")
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet")


def test_the_console_script_ends_like_python_m_trainer():
    """`ctrlnet-train` runs the same entry as `python -m trainer` (main, then the quiet exit above)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ctrlnet-train"] == "trainer.cli:entry"
    assert "entry()" in (ROOT / "trainer" / "__main__.py").read_text()


def retention_run(tmp_path: Path, steps: int) -> tuple[Path, list[str], dict]:
    """A tiny CPU run of `steps` steps that checkpoints every step and keeps one: (its output, flags, environment)."""
    write_shards(tmp_path / "shards", n_shards=1, per_shard=4, size=32)
    model = build_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--shards", str(tmp_path / "shards" / "00000.tar"), "--model", str(model), "--output", str(out),
            "--device", "cpu", "--mixed-precision", "no", "--resolution", "32", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--optimizer", "adamw", "--max-train-steps", str(steps),
            "--no-progress", "--dataloader-num-workers", "0", "--checkpointing-steps", "1",
            "--checkpoints-total-limit", "1"]
    return out, args, dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_with_hook(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` under a wrapper `script` (an audit hook that kills the run at some moment)."""
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


# `python -m trainer` killed (SIGKILL) inside checkpoint retention: after the first file of the checkpoint it
# deletes is gone. An audit hook sees shutil.rmtree start on a folder holding a state.json and the unlinks after it.
KILL_WHILE_PRUNING = """
import os, runpy, signal, sys
from pathlib import Path
seen = []
def hook(event, args):
    if event == "shutil.rmtree" and (Path(args[0]) / "state.json").is_file():
        seen.append(args[0])
    elif event == "os.remove" and seen:
        seen.append(args[0])
        if len(seen) == 3:  # the first file is gone, the second about to go
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv[0] = "trainer"
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_nothing_behind(tmp_path):
    """Found reading the retention code after the stress test's kills: prune deleted checkpoint-N in place, so a
    kill part-way (SIGKILL, or a second Ctrl-C landing between two unlinks: it comes right after a save, when users
    press it) left a checkpoint-N that is no longer complete, which no later run chose or removed (for SD 1.5 up to
    ~2 GB of optimizer state and weights). The folder is now renamed to a temporary name first, which the next run
    removes."""
    from trainer.checkpoint import is_complete

    out, args, env = retention_run(tmp_path, steps=3)
    killed = run_with_hook(KILL_WHILE_PRUNING, args, env)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2]  # checkpoint-1 was being deleted after checkpoint-2's save
    done = subprocess.run(cli(*args, "--resume", "latest"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in done.stdout
    left = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert left == ["checkpoint-3"] and is_complete(out / "checkpoint-3"), left


# Kills the run where the retention after checkpoint-2's save starts (checkpoint-1 about to be renamed aside).
KILL_BEFORE_RETENTION = """
import os, runpy, signal, sys
def hook(event, args):
    if event == "shutil.rmtree" and str(args[0]).endswith(".tmp-checkpoint-1.deleted"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv[0] = "trainer"
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


def test_a_kill_between_the_last_save_and_its_retention_keeps_the_limit(tmp_path):
    """Found by the kill-at-every-I/O-event sweep: killed after the last step's checkpoint was saved but before the
    retention that follows it, the run resumed at its last step, trained nothing, saved nothing, and so never
    pruned: one checkpoint over --checkpoints-total-limit stayed for good. A run resumed from its newest checkpoint
    at its last step now applies the retention (and redraws loss.png) before the export."""
    out, args, env = retention_run(tmp_path, steps=2)
    killed = run_with_hook(KILL_BEFORE_RETENTION, args, env)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    done = subprocess.run(cli(*args, "--resume", "latest"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in done.stdout
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


# Kills the run while it saves its step-2 validation images (the first sample written, the guess-mode one next).
KILL_WHILE_VALIDATING = """
import os, runpy, signal, sys
def hook(event, args):
    if event == "open" and "step-000002_p0_guess.png" in str(args[0]):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv[0] = "trainer"
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


def test_a_kill_while_validating_draws_that_step_on_resume(tmp_path):
    """Found by the kill-at-every-I/O-event sweep: a checkpoint is saved before its step's validation images, so a
    kill between the two (or a stop signal at that step, which skips them) lost that step's images for good: the
    resumed run went on from the next step, leaving a gap in validation/ and in progress.png. The resumed run now
    draws them first, the same images an uninterrupted run drew (same weights, same seed)."""
    write_shards(tmp_path / "shards", n_shards=1, per_shard=4, size=32)
    model = build_tiny_model(tmp_path / "model")
    cond = first_condition(tmp_path / "shards" / "00000.tar", tmp_path / "cond.png")
    out = tmp_path / "out"
    args = ["--shards", str(tmp_path / "shards" / "00000.tar"), "--model", str(model), "--output", str(out),
            "--device", "cpu", "--mixed-precision", "no", "--resolution", "32", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--optimizer", "adamw", "--max-train-steps", "3", "--no-progress",
            "--dataloader-num-workers", "0", "--checkpointing-steps", "1", "--validation-steps", "2",
            "--validation-prompt", "a photo", "--validation-image", str(cond), "--validation-inference-steps", "2",
            "--num-validation-images", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_VALIDATING, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    sample = out / "validation" / "step-000002_p0_s0.png"
    drawn = sample.read_bytes()  # written whole before the kill
    assert not (out / "validation" / "step-000002_grid.png").exists()
    done = subprocess.run(cli(*args, "--resume", "latest"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in done.stdout
    grids = sorted(g.name for g in (out / "validation").glob("step-*_grid.png"))
    assert grids == ["step-000002_grid.png", "step-000003_grid.png"]
    assert sample.read_bytes() == drawn
