"""The whole engine against the sample corpus on a real loopback server, local, process-pool and Ray runners.

Every row of the corpus carries the outcome the engine must give it; shards are read back with
webdataset's own reader and with `tar -tf`; a SIGKILLed run resumes to the same keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from engine import outcomes as O
from engine.condition import make_conditioner
from engine.config import EngineConfig, FetchConfig
from engine.palette import parse_palette
from engine.pipeline import run

from .conftest import run_rows

pytestmark = pytest.mark.slow
FAST = FetchConfig(timeout=1.5, connect_timeout=1.0, retries=1, backoff=0.05, max_bytes=8 * 1024 * 1024,
                   allow_private_network=True)  # the corpus is served on loopback
PALETTE = {tuple(c) for c in parse_palette("black,gray50,white")}


def corpus_rows(parquet: Path) -> list[dict]:
    """The corpus rows without the caption column (which holds deliberately invalid UTF-8)."""
    return pq.read_table(parquet, columns=["URL", "expected_outcome", "case", "source"]).to_pylist()


def engine_cfg(parquet: Path, out: Path, **kw) -> EngineConfig:
    return EngineConfig(inputs=(str(parquet),), output=str(out), shard_size=16, workers=2, fetch=FAST,
                        progress=False, **kw)


def read_samples(out: Path) -> dict[str, dict]:
    """All samples of all tars, decoded by webdataset itself."""
    tars = sorted(str(p) for p in out.glob("[0-9]*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False).decode("rgb8")}


def check_run(out: Path, corpus_parquet: Path) -> dict:
    """The promises of a finished run; returns its stats."""
    rows = corpus_rows(corpus_parquet)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == len(rows) and sum(stats["outcomes"].values()) == len(rows)
    table = run_rows(out)
    assert sorted(table.column("row").to_pylist()) == list(range(len(rows)))  # one record per input row
    got = dict(zip(table.column("row").to_pylist(), table.column("outcome").to_pylist(), strict=False))
    wrong = {(i, r["case"]): (got[i], r["expected_outcome"]) for i, r in enumerate(rows)
             if got[i] != r["expected_outcome"]}
    assert not wrong, f"(row, case): (got, expected) {wrong}"
    assert not list(out.glob("*.tmp"))
    for shard in out.glob("[0-9]*.stats.json"):
        s = json.loads(shard.read_text())
        assert sum(s["outcomes"].values()) == s["rows"]
    return stats


@pytest.fixture(params=["local", "ray", "processes"])
def any_run(request, corpus, tmp_path):
    """The shared local run, and fresh runs on a real local Ray and on worker processes."""
    if request.param == "local":
        return request.getfixturevalue("local_run")
    out = tmp_path / "shards"
    run(engine_cfg(corpus.parquet, out, runner=request.param))
    return out


def test_every_row_gets_its_expected_outcome(corpus, any_run):
    out = any_run
    stats = check_run(out, corpus.parquet)
    ok_keys = set(run_rows(out).filter(pa.compute.equal(run_rows(out).column("outcome"), "ok"))
                  .column("key").to_pylist())
    samples = read_samples(out)
    assert set(samples) == ok_keys and len(ok_keys) == stats["outcomes"][O.OK]
    for key, s in samples.items():
        assert s["jpg"].shape == (512, 512, 3)
        assert s["cond.png"].shape == (512, 512, 3)
        packed = np.unique(s["cond.png"].reshape(-1, 3).astype(np.uint32) @ np.array([65536, 256, 1], np.uint32))
        assert {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed} <= PALETTE
        assert isinstance(s["txt"], str) and "\n" not in s["txt"]
        assert s["json"]["url"].startswith("http") and s["json"]["key"] == key
    for tar in out.glob("[0-9]*.tar"):
        listed = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout
        names = listed.split()
        assert len(names) == 4 * len({n.split(".")[0] for n in names})
        assert {n.split(".", 1)[1] for n in names} <= {"jpg", "cond.png", "txt", "json"}


def test_a_body_compressed_unasked_names_its_coding(corpus, local_run):
    """A server's br (never in our Accept-Encoding) is left as it came, so the bytes look like no image; the row's
    reason says why (it said only "unknown format (starts ...)")."""
    rows = corpus_rows(corpus.parquet)
    (index,) = [i for i, r in enumerate(rows) if r["case"] == "brotli_unasked"]
    table = run_rows(local_run).to_pylist()
    (record,) = [r for r in table if r["row"] == index]
    assert record["outcome"] == O.UNSUPPORTED_FORMAT and "Content-Encoding br" in record["reason"], record


def test_exif_rotated_images_come_out_upright(corpus, local_run):
    out = local_run
    rows = corpus_rows(corpus.parquet)
    keys = dict(zip(run_rows(out).column("row").to_pylist(), run_rows(out).column("key").to_pylist(), strict=False))
    samples = read_samples(out)
    exif_rows = [i for i, r in enumerate(rows) if r["case"].startswith("exif_rotated")]
    assert exif_rows
    for i in exif_rows:
        from engine.crop import center_crop

        upright = np.asarray(Image.open(Path(corpus.root) / rows[i]["source"]).convert("RGB"))
        expected = center_crop(upright, 512).astype(int)
        got = samples[keys[i]]["jpg"].astype(int)
        assert np.abs(got - expected).mean() < 6, rows[i]["case"]
        assert np.abs(got - np.rot90(expected)).mean() > 2 * np.abs(got - expected).mean()


def test_the_conditioning_map_is_the_remap_of_the_crop(local_run):
    out = local_run
    remap = make_conditioner("palette", "black,gray50,white")
    raw = wds.WebDataset(sorted(str(p) for p in out.glob("[0-9]*.tar")), shardshuffle=False)
    for sample in list(raw)[:5]:
        import io

        crop = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        cond = np.asarray(Image.open(io.BytesIO(sample["cond.png"])).convert("RGB"))
        # the map was made from the crop before JPEG encoding: nearly all pixels agree after it
        assert (remap(crop) == cond).all(axis=2).mean() > 0.97


def test_rerun_of_a_complete_output_changes_nothing(corpus, local_run):
    out = local_run
    first = json.loads((out / "stats.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("[0-9]*")}
    again = run(engine_cfg(corpus.parquet, out, runner="local"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("[0-9]*")} == before
    assert again["outcomes"] == first["outcomes"]


def engine_cmd(parquet: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine", "shards", str(parquet), "--output", str(out), "--workers", "2",
            "--shard-size", "16", "--timeout", "1.5", "--retries", "1", "--max-bytes", str(8 << 20),
            "--no-progress", "--allow-private-network", *extra]


@pytest.mark.parametrize("runner", ["ray", "processes"])
def test_sigkill_midway_then_rerun_gives_the_same_keys(corpus, local_run, tmp_path, runner):
    """Kill the whole run (driver and workers) once some shards are done, then rerun; the keys
    must equal those of an uninterrupted run (the shared in-process one)."""
    whole, killed = local_run, tmp_path / "killed"
    proc = subprocess.Popen(engine_cmd(corpus.parquet, killed, "--runner", runner), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(killed.glob("*.stats.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total_shards = len(list(whole.glob("[0-9]*.stats.json")))
    done_at_kill = len(list(killed.glob("[0-9]*.stats.json")))
    assert 0 < done_at_kill < total_shards, "the kill must land midway"
    for tar in killed.glob("[0-9]*.tar"):
        with tarfile.open(tar) as t:  # a tar with a final name is always whole
            t.getmembers()
    rerun = subprocess.run(engine_cmd(corpus.parquet, killed, "--runner", runner), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_run(killed, corpus.parquet)
    assert set(read_samples(killed)) == set(read_samples(whole))
    assert not list(killed.glob("*.tmp"))


def test_workers_of_a_sigkilled_driver_end_quietly_and_a_rerun_finishes(corpus, local_run, tmp_path):
    """`--runner processes`: SIGKILL the driver alone (an OOM kill, `kill -9 PID`) once a shard is done.
    Its workers find their pipe broken at their next message and end within seconds without a
    traceback each (they printed BrokenPipeError's); the rerun finishes with the same keys."""
    import psutil

    out, log = tmp_path / "out", tmp_path / "log.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen(engine_cmd(corpus.parquet, out, "--runner", "processes"), stdout=sink, stderr=sink)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("[0-9]*.stats.json")):
        time.sleep(0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any(p.name() for p in tree), "the fork server and its workers run"
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"outlived the driver: {alive}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    rerun = subprocess.run(engine_cmd(corpus.parquet, out, "--runner", "processes"), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_run(out, corpus.parquet)
    assert set(read_samples(out)) == set(read_samples(local_run))
    assert not list(out.glob("*.tmp"))


def test_a_sigkilled_worker_fails_only_its_shard_which_is_retried(corpus, local_run, tmp_path):
    """`--runner processes`: SIGKILL one worker process mid-shard; its shard is retried on a fresh
    worker and the run finishes with every row's outcome and the keys of an uninterrupted run."""
    import psutil

    out = tmp_path / "out"
    proc = subprocess.Popen(engine_cmd(corpus.parquet, out, "--runner", "processes"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    workers: list = []
    while time.monotonic() < deadline and not (workers and list(out.glob("*.tmp"))):
        # the fork server is the driver's child; workers are its children
        workers = [w for c in psutil.Process(proc.pid).children() for w in c.children()]
        time.sleep(0.02)
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "failed (worker process died (signal 9)); retrying" in err
    check_run(out, corpus.parquet)
    assert set(read_samples(out)) == set(read_samples(local_run))


def test_cli_condition_writes_maps_at_the_images_own_size(tmp_path, astronaut):
    img = tmp_path / "photo.one.jpg"
    Image.fromarray(astronaut[:300, :450]).save(img, quality=95)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    res = subprocess.run([sys.executable, "-m", "engine", "condition", str(img), str(bad), "--output",
                          str(tmp_path / "maps")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "broken.png" in res.stderr  # reported, not fatal
    cond = np.asarray(Image.open(tmp_path / "maps" / "photo.one.png").convert("RGB"))
    rgb = np.asarray(Image.open(img).convert("RGB"))
    assert cond.shape == rgb.shape
    assert (cond == make_conditioner()(rgb)).all()


def test_cli_help_and_bad_flags():
    res = subprocess.run([sys.executable, "-m", "engine", "shards", "--help"], capture_output=True, text=True)
    for flag in ("--workers", "--shard-size", "--min-image-size", "--max-aspect-ratio", "--image-size",
                 "--timeout", "--retries", "--ray-address"):
        assert flag in res.stdout
    res = subprocess.run([sys.executable, "-m", "engine", "shards", "x.parquet", "--output", "o",
                          "--image-size", "500"], capture_output=True, text=True)
    assert res.returncode == 2 and "--image-size" in res.stderr


@pytest.mark.quick
def test_the_default_runner_is_processes_on_one_machine_and_ray_with_an_address():
    one = EngineConfig(inputs=("x",), output="o")
    assert one.runner == "processes" and dataclasses.replace(one, workers=1).runner == "processes"
    assert EngineConfig(inputs=("x",), output="o", ray_address="auto").runner == "ray"
    assert EngineConfig(inputs=("x",), output="o", runner="ray").runner == "ray"
    with pytest.raises(ValueError, match="--ray-address.*--runner local"):
        EngineConfig(inputs=("x",), output="o", ray_address="auto", runner="local")


@pytest.mark.parametrize(("runner", "stop", "status"), [("ray", signal.SIGINT, 130), ("processes", signal.SIGINT, 130),
                                                      ("ray", signal.SIGTERM, 143), ("processes", signal.SIGTERM, 143)])
def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(corpus, local_run, tmp_path, runner, stop, status):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) midway: exit 130 or 143 (128 + the signal, as a shell
    reports it; SIGTERM ended 130 too before) promptly, no temporary files, complete shards kept, and no worker
    process of this runner left behind."""
    import psutil

    out = tmp_path / "interrupted"
    # SIGINT at its default in the engine even when this test runs as a background job, whose shell hands
    # its children SIGINT ignored (Python then installs no KeyboardInterrupt handler and the run ends rc 0)
    proc = subprocess.Popen(engine_cmd(corpus.parquet, out, "--runner", runner), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("*.stats.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    if runner == "processes":  # Ray's own daemons take their time; ours must be gone with the driver
        assert children and not psutil.wait_procs(children, timeout=10)[1]
    assert "rerun the same command" in err
    assert not list(out.glob("*.tmp"))
    rerun = subprocess.run(engine_cmd(corpus.parquet, out, "--runner", runner), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_run(out, corpus.parquet)
    assert set(read_samples(out)) == set(read_samples(local_run))


def test_empty_input_and_a_busy_output_folder(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}), empty)
    stats = run(engine_cfg(empty, tmp_path / "out", runner="local"))
    assert stats["rows"] == 0 and stats["outcomes"] == {} and stats["shards_complete"] == 0
    from engine.pipeline import lock_output

    with lock_output(tmp_path / "out"):
        res = subprocess.run([sys.executable, "-m", "engine", "shards", str(empty), "--output",
                              str(tmp_path / "out"), "--runner", "local"], capture_output=True, text=True)
    assert res.returncode == 2 and "another run" in res.stderr


def test_resuming_with_another_shard_size_is_refused(corpus, local_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(local_run, out)
    res = subprocess.run(engine_cmd(corpus.parquet, out, "--runner", "local", "--shard-size", "8"),
                         capture_output=True, text=True, timeout=120)  # the last --shard-size wins
    assert res.returncode == 2 and "--shard-size: 16 was used, now 8" in res.stderr
