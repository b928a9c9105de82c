"""Several processes: torchrun with gloo on the CPU trains like one process with the global batch."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import tiny_assets, tiny_config
from trainer.checkpoint import list_checkpoints
from trainer.config import (
    DataConfig,
    TrainConfig,
)
from trainer.data import ShardStream, raw_epoch
from trainer.lanes import Layout, Position, record_lanes
from trainer.synthetic import first_condition, write_shards
from trainer.tiny import build_tiny_tokenizer
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shards (15 samples an epoch) and a tiny model."""
    root = tmp_path_factory.mktemp("ddp")
    assets = tiny_assets(root, n_shards=3, per_shard=5, size=48, cond_mode="L")
    return {**assets, "tokenizer": build_tiny_tokenizer(root / "tok")}


def data_config(assets, batch: int) -> DataConfig:
    """The shards at 32 px with a small shuffle buffer."""
    return DataConfig(shards=assets["shards"], resolution=32, train_batch_size=batch, shuffle_buffer=4,
                      proportion_empty_prompts=0.5)


def take(stream: ShardStream, n: int) -> list[dict]:
    """The first n batches of a stream."""
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_ranks_split_each_global_batch(assets):
    """Rank r of 2 gets rows r, r+2 of the one-process batch of 4 read on the two ranks' lanes: every sample once,
    captions alike; each rank reads its own lane (its own tars), the one process both."""
    tok = assets["tokenizer"]
    ranks = [ShardStream(data_config(assets, 2), tok, 7, rank=r, world=2) for r in range(2)]
    assert ranks[0].layout == ranks[1].layout == Layout(2, 1, 4)  # 3 tars: one lane per rank
    whole = take(ShardStream(data_config(assets, 4), tok, 7, Position(layout=ranks[0].layout)), 5)  # crosses an epoch
    ranks = [take(stream, 5) for stream in ranks]
    for b, batch in enumerate(whole):
        for r in range(2):
            for key in ("pixel_values", "conditioning_pixel_values", "input_ids"):
                assert torch.equal(batch[key][r::2], ranks[r][b][key]), (b, r, key)
            assert batch["position"][0] == ranks[r][b]["position"][0]  # global batches
            assert ranks[r][b]["lanes"][:, 0].tolist() == [r]  # rank r reads lane r only
            assert ranks[r][b]["lanes"].tolist()[0] == batch["lanes"].tolist()[r]  # where its lane stands


def test_resume_on_another_world_size_continues_at_the_same_sample(assets):
    """A position in global samples (here 6: not a whole global batch of 4) is the same data for 1 or 2 processes."""
    tok = assets["tokenizer"]
    one = ShardStream(data_config(assets, 2), tok, 7)
    whole = take(one, 6)
    pos, extra = whole[2]["position"].tolist(), {}  # after samples 0..5
    for batch in whole[:3]:
        record_lanes(extra, batch["lanes"])
    start = Position(batches=pos[0], epoch=pos[1], offset=pos[2], samples=one.samples_after(pos[0]),
                     layout=one.layout, lanes={int(k): v[:2] for k, v in extra["data_lanes"].items()})
    assert start.samples == 6
    ranks = [take(ShardStream(data_config(assets, 1), tok, 7, start, rank=r, world=2), 3) for r in range(2)]
    for k in range(3):  # global batch k of the resumed pair == one-process batch 3 + k
        got = torch.cat([ranks[0][k]["pixel_values"], ranks[1][k]["pixel_values"]])
        assert torch.equal(whole[3 + k]["pixel_values"], got)


def test_a_rank_whose_share_fails_borrows_from_the_global_batch(tmp_path, assets):
    """Odd samples lack cond.png: rank 1 of 2 (batch 1) takes rank 0's sample and counts it, so ranks stay in step."""
    write_shards(tmp_path / "src", n_shards=1, per_shard=8, size=40)
    with tarfile.open(tmp_path / "src" / "00000.tar") as src, tarfile.open(tmp_path / "00000.tar", "w") as dst:
        for m in src.getmembers():
            if not (m.name.endswith(".cond.png") and int(m.name[:10]) % 2):
                dst.addfile(m, io.BytesIO(src.extractfile(m).read()))
    data = DataConfig(shards=str(tmp_path / "00000.tar"), resolution=32, train_batch_size=1, shuffle_buffer=1,
                      max_failed_batches=1)
    ranks = [take(ShardStream(data, assets["tokenizer"], 0, rank=r, world=2), 6) for r in range(2)]
    for b0, b1 in zip(*ranks, strict=True):
        assert torch.equal(b0["pixel_values"], b1["pixel_values"]) and torch.equal(b0["position"], b1["position"])
        assert (int(b0["failed"]), int(b1["failed"])) == (0, 1)


def single_config(assets, output: Path) -> TrainConfig:
    """One process, batch 4, 4 accumulation steps, fp32 AdamW on the CPU."""
    return tiny_config(assets, output, steps=2, seed=3, optim={"gradient_accumulation_steps": 4},
                       data={"train_batch_size": 4, "num_workers": 4, "proportion_empty_prompts": 0.5})


def torchrun_cmd(assets, output: Path, extra: list[str], entry: tuple[str, ...] = ("-m", "trainer")) -> list[str]:
    """`torchrun --nproc_per_node=2 -m trainer` (or `entry`) with batch 2 per process (gloo); `extra` flags win."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry,
           "--shards", assets["shards"], "--model", str(assets["model"]), "--output", str(output),
           "--resolution", "32", "--train-batch-size", "2", "--shuffle-buffer", "4",
           "--proportion-empty-prompts", "0.5", "--learning-rate", "1e-3", "--optimizer", "adamw",
           "--gradient-accumulation-steps", "4", "--lr-scheduler", "constant", "--lr-warmup-steps", "0",
           "--checkpointing-steps", "1000", "--validation-steps", "1000", "--mixed-precision", "no",
           "--device", "cpu", "--log-every", "1", "--seed", "3", "--no-progress", *extra]


def run_torchrun(assets, output: Path, extra: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """torchrun_cmd run to its end."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_cmd(assets, output, extra), capture_output=True, text=True, env=env, timeout=timeout)


def torchrun(assets, output: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """run_torchrun, which must succeed."""
    proc = run_torchrun(assets, output, extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def spoil(src: Path, dst: Path, bad) -> None:
    """Copy a tar, with junk bytes instead of the image and map of the samples `bad(index)` picks."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith((".jpg", ".cond.png")) and bad(int(m.name[:10]) % 1000):
                data = b"not an image " * 8
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def rank1_reads(urls: list[str], bad: str) -> int:
    """A seed under which lane 1 (rank 1 of 2, one worker each) reads tar `bad` in epoch 0."""
    return next(s for s in range(100)
                if next(raw_epoch(urls, s, 0, 1, lambda exn: True, lane=1, lanes=2))["__url__"] == bad)


def spoiled_pair(root: Path, good: int = 0) -> tuple[str, int]:
    """Two tars of 8 samples: 00000.tar good, 00001.tar whose samples after the first `good` do not decode; their
    pattern, and a seed that gives 00001.tar to rank 1 in epoch 0."""
    write_shards(root / "src", n_shards=2, per_shard=8, size=40)
    (root / "src" / "00000.tar").rename(root / "00000.tar")
    spoil(root / "src" / "00001.tar", root / "00001.tar", lambda i: i >= good)
    urls = [str(root / "00000.tar"), str(root / "00001.tar")]
    return str(root / "{00000..00001}.tar"), rank1_reads(urls, urls[1])


@pytest.fixture(scope="module")
def spoiled(tmp_path_factory, assets):
    """The tiny model on spoiled_pair's shards, 00001.tar all garbage, and the seed."""
    shards, seed = spoiled_pair(tmp_path_factory.mktemp("spoiled"))
    return {**assets, "shards": shards, "seed": seed}


@pytest.mark.parametrize("good", [0, 2])
def test_a_rank_whose_share_fails_stands_in_and_stays_in_step(assets, tmp_path, good):
    """Rank 1 reads only its own tar, garbage after its first `good` samples: in step with rank 0 it yields its last
    batch again (before its first: a blank one), counted as failed, and never drops or raises alone (that would
    leave rank 0 waiting in its next all-reduce)."""
    shards, seed = spoiled_pair(tmp_path, good)
    data = DataConfig(shards=shards, resolution=32, train_batch_size=2, shuffle_buffer=1, max_failed_batches=1)
    ranks = [take(ShardStream(data, assets["tokenizer"], seed, rank=r, world=2), 3) for r in range(2)]
    own = good // 2  # rank 1's batches of its own samples
    for b, (b0, b1) in enumerate(zip(*ranks, strict=True)):
        assert torch.equal(b0["position"][:1], b1["position"][:1])  # the same global batch
        assert (int(b0["dropped"]), int(b0["failed"]), "blank" in b0) == (0, 0, False)
        if b < own:
            assert (int(b1["dropped"]), int(b1["failed"])) == (0, 0)
            continue
        assert (int(b1["dropped"]), int(b1["failed"]), "blank" in b1) == (1, 2, not own)
        assert b1["pixel_values"].shape == b0["pixel_values"].shape
        if own:  # its last batch again
            assert torch.equal(b1["pixel_values"], ranks[1][own - 1]["pixel_values"])
        assert "00001.tar" in bytes(b1["error"].tolist()).decode()


def test_a_rank_with_nothing_readable_stands_in_at_the_limit(assets, tmp_path):
    """Tars that are not tars: under torchrun the lane's error becomes stand-ins that reach --max-failed-batches at
    once (every rank then stops together), not an exception on one rank."""
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes(b"\x00junk" * 700)
    data = DataConfig(shards=str(tmp_path / "{00000..00001}.tar"), resolution=32, train_batch_size=2,
                      max_failed_batches=7)
    for batch in take(ShardStream(data, assets["tokenizer"], 0, rank=1, world=2), 2):
        assert (int(batch["dropped"]), "blank" in batch) == (7, True)
        assert "no readable samples" in bytes(batch["error"].tolist()).decode()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_rank_whose_tars_all_fail_stops_every_rank_with_one_message(spoiled, tmp_path):
    """Under torchrun rank 1's garbage tar stops both ranks together at --max-failed-batches (no hang), each
    printing the error that names the tar and the flag."""
    proc = run_torchrun(spoiled, tmp_path / "out", [
        "--seed", str(spoiled["seed"]), "--max-failed-batches", "3", "--gradient-accumulation-steps", "1",
        "--max-train-steps", "6", "--dataloader-num-workers", "1"], timeout=150)
    assert proc.returncode != 0
    # every rank raises the same error at the same step; torchrun SIGTERMs the others once one exits, and two
    # ranks' lines can interleave (seen in CI): at least one, all alike
    errors = re.findall(r"error: (rank 1 of 2: .*?KEY\.cond\.png images)", proc.stderr)
    assert errors and len(set(errors)) == 1, proc.stderr[-3000:]
    assert "00001.tar" in errors[0] and "--max-failed-batches 3" in errors[0]
    logs = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]  # step 3 reached the limit before its log
    assert logs[-1]["failed_samples"] == 4  # rank 1's 2 samples a step


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_minority_of_failed_samples_is_counted_over_the_ranks(assets, tmp_path):
    """Two of 16 samples (in one rank's tar) do not decode: the run finishes, failed_samples counts both."""
    write_shards(tmp_path / "src", n_shards=2, per_shard=8, size=40)
    (tmp_path / "src" / "00000.tar").rename(tmp_path / "00000.tar")
    spoil(tmp_path / "src" / "00001.tar", tmp_path / "00001.tar", lambda i: i in (2, 5))
    shards = {**assets, "shards": str(tmp_path / "{00000..00001}.tar")}
    torchrun(shards, tmp_path / "out", ["--gradient-accumulation-steps", "1", "--max-train-steps", "4",
                                        "--dataloader-num-workers", "0"])  # 4 global batches of 4: one epoch
    logs = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and logs[-1]["failed_samples"] == 2


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_doubled_batch(assets, tmp_path):
    """2 gloo processes x batch 2 end with the weights of 1 process x batch 4.

    4 accumulation micro-batches merged in pairs: 2 passes a step, the first under no_sync. One tar of 15
    samples: fewer tars than processes, so both runs read one shared lane and see the same data (with
    tars enough each rank reads its own lanes: test_ranks_split_each_global_batch).
    """
    write_shards(tmp_path / "shards", n_shards=1, per_shard=15, size=48, cond_mode="L")
    assets = assets | {"shards": str(tmp_path / "shards" / "00000.tar")}
    cfg = single_config(assets, tmp_path / "one")
    cfg.optim.lr_scheduler, cfg.optim.lr_warmup_steps = "constant", 0
    train(cfg, enable_bar=False)
    proc = torchrun(assets, tmp_path / "two", ["--max-train-steps", "2", "--merge-micro-batches", "2"])
    one = load_file(str(tmp_path / "one" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    start = load_file(str(Path(assets["model"]) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert one.keys() == two.keys()
    # Not bitwise: the all-reduce sums in another order than one batch's mean, and Adam magnifies the last
    # bits of near-zero gradients. The gap is measured against how far training moved the weights
    # (about 3e-4 of it here; a wrong split of samples or noise makes it of order 1).
    gap = torch.cat([(two[k] - one[k]).flatten() for k in one]).norm()
    moved = torch.cat([(one[k] - start[k]).flatten() for k in one if k in start]).norm()
    assert moved > 0.1 and gap < 2e-3 * moved, (gap, moved)
    logs = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["effective_batch"] == 16 for r in logs)
    for a, b in zip(logs, ones, strict=True):  # the logged loss is the mean over both processes
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert "effective batch 16 = batch 2 x accumulation 4 x 2 process(es)" in proc.stdout
    assert proc.stdout.count(f"ControlNet in {tmp_path / 'two' / 'controlnet'}") == 1  # rank 1 said "in None"
    assert "done: 2 steps; rank 0 wrote the ControlNet" in proc.stdout
    state = json.loads((tmp_path / "two" / "checkpoint-2" / "state.json").read_text())
    assert state["samples"] == 32  # 2 steps x 16 samples, counted globally
    # one process resumes the two processes' run: it continues at global sample 32 (8 samples a step now)
    resume = single_config(assets, tmp_path / "two")
    resume.data.train_batch_size, resume.checkpoint.resume, resume.max_train_steps = 2, "latest", 3
    resume.optim.lr_scheduler, resume.optim.lr_warmup_steps = "constant", 0
    train(resume, enable_bar=False)
    after = json.loads((tmp_path / "two" / "checkpoint-3" / "state.json").read_text())
    stream = ShardStream(data_config(assets, 2), assets["tokenizer"], 3)
    expected = take(stream, 20)[-1]["position"].tolist()  # after 40 samples in one process from the start
    assert after["samples"] == 40 and [after["epoch"], after["offset"]] == expected[1:]


def test_two_ranks_draw_a_resumed_steps_missing_validation_images(assets, tmp_path):
    """A resumed run first draws its checkpoint's step's images when they are missing (a kill between that
    checkpoint and its images: trainer.schedule.Validator.catch_up); rank 0 looks and both ranks agree on it in one
    all-reduce, so neither waits for the other. The missing grid is made by removing it after a finished run."""
    cond = first_condition(Path(assets["shards"].split("{")[0]) / "00000.tar", tmp_path / "cond.png")
    out = tmp_path / "out"
    flags = ["--checkpointing-steps", "1", "--validation-steps", "2", "--validation-prompt", "a photo",
             "--validation-image", str(cond), "--validation-inference-steps", "2", "--num-validation-images", "1",
             "--gradient-accumulation-steps", "1"]
    torchrun(assets, out, ["--max-train-steps", "2", *flags])
    grid = out / "validation" / "step-000002_grid.png"
    assert grid.is_file()
    grid.unlink()
    proc = torchrun(assets, out, ["--max-train-steps", "3", "--resume", "latest", *flags])
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout
    assert sorted(g.name for g in (out / "validation").glob("step-*_grid.png")) == \
        ["step-000002_grid.png", "step-000003_grid.png"]


def stopped_pair(proc: subprocess.Popen, tree: list[int], timeout: int = 120) -> str:
    """The output of a torchrun launcher once it and both ranks have ended (the processes of `tree` all killed if
    they outlive `timeout`: a rank left waiting in a collective for its peer, or training on alone)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):  # the launcher's children as they are now, if it lives
            tree = tree + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree + [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the ranks were still running {timeout} s after the signal: {proc.communicate()[0][-3000:]}")


def assert_both_stopped_saved(output: str, out: Path) -> int:
    """Both ranks said they stopped at the same step with its checkpoint saved, and it is there, complete; the step."""
    steps = re.findall(r"stopped at step (\d+); checkpoint saved", output)
    assert len(steps) == 2 and len(set(steps)) == 1, output[-4000:]
    assert "DataLoader worker" not in output and "[rank" not in output, output[-4000:]  # no rank's traceback
    step = int(steps[0])
    assert list_checkpoints(out)[-1] == (step, out / f"checkpoint-{step}")
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1] == step
    return step


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigterm_to_torchrun_saves_a_checkpoint_with_dataloader_workers(assets, tmp_path):
    """torchrun passes a SIGTERM (or Ctrl-C) on to each rank's whole process group: its DataLoader workers died
    of it ("DataLoader worker is killed by signal: Terminated" on both ranks, no checkpoint). They now run in a
    process group of their own: both ranks stop at the same step, save it and say so."""
    out = tmp_path / "out"
    proc = start_torchrun(assets, out, ["--max-train-steps", "1000", "--dataloader-num-workers", "1"])
    tree = training(proc, out)
    proc.send_signal(signal.SIGTERM)
    assert_both_stopped_saved(stopped_pair(proc, tree), out)


def start_torchrun(assets, out: Path, extra: list[str], entry: tuple[str, ...] = ("-m", "trainer")) -> subprocess.Popen:
    """A 2-process torchrun of the tiny model (or of a wrapper script `entry`), one optimizer step per batch, output
    piped (read by stopped_pair)."""
    return subprocess.Popen(torchrun_cmd(assets, out, [*extra, "--gradient-accumulation-steps", "1"], entry=entry),
                            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def training(proc: subprocess.Popen, out: Path) -> list[int]:
    """Once torchrun's run has logged two steps: the pids of its ranks and their workers."""
    log = out / "train_log.jsonl"
    while proc.poll() is None and len(log.read_text().splitlines() if log.exists() else []) < 2:
        time.sleep(0.1)
    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ranks_whose_launcher_was_killed_stop_with_a_checkpoint(assets, tmp_path):
    """torchrun starts each rank in a session of its own: when the launcher was SIGKILLed (or OOM-killed) the ranks
    trained on to the end unseen, writing into --output (a rerun with --resume latest wrote there too). Now they
    notice, stop at the same step, save it and say so."""
    out = tmp_path / "out"
    proc = start_torchrun(assets, out, ["--max-train-steps", "400", "--dataloader-num-workers", "0"])
    tree = training(proc, out)
    proc.kill()
    output = stopped_pair(proc, tree)
    assert "the torchrun launcher is gone" in output
    assert_both_stopped_saved(output, out)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_killed_rank_leaves_one_line_on_the_other(assets, tmp_path):
    """A rank SIGKILLed mid-run (the OOM killer, a lost host): the other's next collective fails. It printed gloo's
    RuntimeError as a traceback; now it says in one line that another process stopped and where to resume from."""
    out = tmp_path / "out"
    proc = start_torchrun(assets, out, ["--max-train-steps", "400", "--dataloader-num-workers", "0",
                                        "--checkpointing-steps", "1"])
    tree = training(proc, out)
    rank1 = [pid for pid in tree if psutil.Process(pid).environ().get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    output = stopped_pair(proc, tree)
    line = re.search(r"error: rank 0: another process of this run stopped \((.+)\); the newest complete checkpoint "
                     r"is (\S+): rerun the same command with --resume latest", output)
    assert line, output[-4000:]
    assert "[rank" not in output, output[-4000:]  # no rank's traceback
    assert Path(line.group(2)) == list_checkpoints(out)[-1][1]


# Rank 0 never sees its launcher gone: only rank 1 can notice (as when it checks first, the launcher dying between).
RANK0_BLIND = """
import os, sys
import trainer.loop as loop
if os.environ["RANK"] == "0":
    loop.StopSignal.launcher_gone = lambda self: False
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_launcher_gone_that_rank_1_noticed_is_said_by_rank_0(assets, tmp_path):
    """Only rank 0 prints, and it printed the reason only when it had noticed the launcher gone itself: when rank 1
    noticed first, both ranks stopped, saved, without a word of why. The reason is agreed with the stop now."""
    script, out = tmp_path / "rank0_blind.py", tmp_path / "out"
    script.write_text(RANK0_BLIND)
    proc = start_torchrun(assets, out, ["--max-train-steps", "400", "--dataloader-num-workers", "0"],
                          entry=(str(script),))
    tree = training(proc, out)
    proc.kill()
    output = stopped_pair(proc, tree)
    assert "the torchrun launcher is gone" in output, output[-3000:]
    assert_both_stopped_saved(output, out)


# Rank 0 marks that it is inside init_process_group; rank 1 gets there only once the launcher is gone (a rank still
# loading when torchrun's launcher was killed). The launcher holds the store they meet at.
EARLY_KILL = """
import os, sys, time
from pathlib import Path
import trainer
import trainer.distributed as d
real = d.dist.init_process_group
def marked(*args, **kwargs):
    if os.environ["RANK"] == "0":
        Path(os.environ["MARK"]).touch()
    else:
        while os.getppid() == trainer.PARENT_AT_START:
            time.sleep(0.05)
    return real(*args, **kwargs)
d.dist.init_process_group = marked
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ranks_whose_launcher_was_killed_before_they_met_end_in_one_line(assets, tmp_path):
    """A launcher killed before the ranks had all started their process group left the ones already waiting there
    (and those that came later) waiting for each other up to init's 30-minute timeout. Each now ends in one line."""
    script, mark, out = tmp_path / "early_kill.py", tmp_path / "rank0-in-init", tmp_path / "out"
    script.write_text(EARLY_KILL)
    cmd = torchrun_cmd(assets, out, ["--dataloader-num-workers", "0"], entry=(str(script),))
    proc = subprocess.Popen(cmd, env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MARK": str(mark)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not mark.exists() and proc.poll() is None:
        time.sleep(0.05)
    tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    time.sleep(0.5)
    proc.kill()
    output = stopped_pair(proc, tree, timeout=60)
    for rank in (0, 1):
        assert f"error: rank {rank}: the torchrun launcher is gone before the processes met" in output, output[-3000:]
    assert "Traceback" not in output and not list_checkpoints(out), output[-3000:]


# Rank 1 receives SIGTERM while the checkpoint of step 2 is written: after that step's agreement, so rank 0 never
# hears of it there (as when torchrun's signal reaches one rank just before, the other just after a step's end).
LATE_SIGNAL = """
import os, signal, sys
import trainer.schedule as schedule
real = schedule.gather_lanes
def late(run):
    if run.world.rank == 1 and run.state.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(run)
schedule.gather_lanes = late
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_signal_one_rank_sees_after_a_step_stops_both_at_the_next(assets, tmp_path):
    """A stop signal that reaches rank 1 after a step's agreement made it leave the loop alone (and say it had
    saved that step) while rank 0 trained on and waited for it in the next all-reduce. It is now agreed at the next
    step: both ranks stop there, save it and say so."""
    script = tmp_path / "late_signal.py"
    script.write_text(LATE_SIGNAL)
    out = tmp_path / "out"
    proc = start_torchrun(assets, out, ["--max-train-steps", "6", "--checkpointing-steps", "2",
                                        "--dataloader-num-workers", "0"], entry=(str(script),))
    assert assert_both_stopped_saved(stopped_pair(proc, []), out) == 3
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
