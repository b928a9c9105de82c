"""Output to (and parquet input from) an S3-compatible server started here (moto's server mode on 127.0.0.1), through the
same checks as a local folder: the samples of a local run, read back with webdataset's own reader;
a SIGKILLed run resumed without rewriting a done shard or losing a row; a rerun with other flags
refused; a bad endpoint or bucket a one-line error; the single-writer lease, and a run that loses it
mid-run marking nothing more; each s3:// input listed, opened and read once per run (moto's request log).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from engine import objinput
from engine import storage as S
from engine.pipeline import run

from .conftest import run_rows
from .test_engine_e2e import check_run, engine_cfg, engine_cmd, read_samples


def objects(client, prefix: str) -> dict[str, tuple[int, str]]:
    """name -> (size, ETag) of every object under bucket/prefix/ (an object store's listing)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix + "/")
    found = {o["Key"].removeprefix(prefix + "/"): (o["Size"], o["ETag"]) for p in pages for o in p.get("Contents", [])}
    return {k: v for k, v in found.items() if k}  # "": the empty folder marker pyarrow puts after a delete


def download(client, prefix: str, folder: Path) -> Path:
    """Every object under bucket/prefix/ into `folder` (to read it as a local run's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in objects(client, prefix):
        client.download_file("bucket", f"{prefix}/{name}", str(folder / name))
    return folder


def s3_cmd(parquet: Path, prefix: str, endpoint: str, *extra: str) -> list[str]:
    """The engine CLI into s3://bucket/prefix (the e2e tests' flags)."""
    cmd = engine_cmd(parquet, Path("unused"), "--s3-endpoint", endpoint, *extra)
    cmd[cmd.index("unused")] = f"s3://bucket/{prefix}"
    return cmd


@pytest.mark.slow
def test_a_run_into_s3_gives_the_samples_of_a_local_run(corpus, s3, local_run, tmp_path, capsys):
    endpoint, client = s3
    client.upload_file(str(corpus.parquet), "bucket", "in/corpus.parquet")  # the input is read from the store too
    stats = run(engine_cfg("s3://bucket/in/", "s3://bucket/first", runner="local", s3_endpoint=endpoint))
    names = objects(client, "first")
    assert json.loads(client.get_object(Bucket="bucket", Key="first/run.json")["Body"].read())["inputs"][0]["path"] \
        == "s3://bucket/in/corpus.parquet"
    assert {"run.json", "stats.json", "README.md"} <= set(names)
    assert S.LEASE not in names and ".driver-token" not in names and not [n for n in names if n.endswith(".tmp")]
    got = download(client, "first", tmp_path / "got")
    check_run(got, corpus.parquet)
    assert stats["outcomes"] == json.loads((local_run / "stats.json").read_text())["outcomes"]
    assert set(read_samples(got)) == set(read_samples(local_run))
    assert run_rows(got).column("key").to_pylist() == run_rows(local_run).column("key").to_pylist()
    # webdataset streams the tars straight from the store as well (how a trainer reads them)
    url = (f"pipe:{sys.executable} -c \"import boto3,sys; boto3.client('s3', endpoint_url='{endpoint}')"
           ".download_fileobj('bucket', sys.argv[1], sys.stdout.buffer)\" first/{}")
    tars = [url.format(n) for n in sorted(names) if n.endswith(".tar")]
    assert {s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)} == set(read_samples(local_run))
    # a rerun into the finished store (the CLI, in this process; the same input as a local file) changes
    # no shard object and is accepted
    from engine.cli import main

    assert main(s3_cmd(corpus.parquet, "first", endpoint, "--runner", "local")[3:]) == 0
    after = objects(client, "first")
    assert {n: v for n, v in after.items() if n[0].isdigit()} == {n: v for n, v in names.items() if n[0].isdigit()}
    # another output-affecting flag is refused as on disk, and nothing is changed
    capsys.readouterr()
    assert main(s3_cmd(corpus.parquet, "first", endpoint, "--runner", "local", "--palette", "black,white")[3:]) == 2
    assert "--palette: black,gray50,white was used, now black,white" in capsys.readouterr().err
    assert objects(client, "first") == after


@pytest.mark.slow
def test_a_sigkilled_run_into_s3_resumes_without_rewriting_or_losing_anything(corpus, s3, local_run):
    endpoint, client = s3
    proc = subprocess.Popen(s3_cmd(corpus.parquet, "killed", endpoint, "--runner", "processes"),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sum(n.endswith(".stats.json") for n in objects(client, "killed")) < 2:
        time.sleep(0.2)  # each look is a listing the server answers on this process's CPU
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = {n: v for n, v in objects(client, "killed").items() if n[0].isdigit()}
    markers = {n for n in at_kill if n.endswith(".stats.json")}
    total = len(list(local_run.glob("[0-9]*.stats.json")))
    assert 0 < len(markers) < total, "the kill must land midway"
    assert S.LEASE in objects(client, "killed")  # the killed driver's lease: stale (dead process), taken over
    rerun = subprocess.run(s3_cmd(corpus.parquet, "killed", endpoint, "--runner", "processes"),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = objects(client, "killed")
    for marker in markers:  # a shard done at the kill is never written again
        name = marker.removesuffix(".stats.json")
        for part in (marker, f"{name}.tar", f"{name}.parquet"):
            assert after[part] == at_kill[part], part
    got = download(client, "killed", Path(str(local_run) + "-killed"))
    check_run(got, corpus.parquet)
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in got.glob("[0-9]*.tar")), shardshuffle=False)]
    assert len(keys) == len(set(keys)) and set(keys) == set(read_samples(local_run))
    assert S.LEASE not in after


def test_a_bad_endpoint_or_bucket_is_one_clear_line(s3, tmp_path, capsys):
    from engine.cli import main

    endpoint, _ = s3
    pq.write_table(pa.table({"URL": ["http://example.com/a.jpg"], "TEXT": ["a"]}), tmp_path / "in.parquet")
    for out, flags, says in (("s3://bucket/x", ["--s3-endpoint", "http://127.0.0.1:1"], "Could not connect"),
                             ("s3://no-such-bucket/x", ["--s3-endpoint", endpoint], "bucket no-such-bucket does not exist"),
                             (str(tmp_path / "local"), ["--s3-endpoint", endpoint], "--s3-endpoint is for")):
        code = main(["shards", str(tmp_path / "in.parquet"), "--output", out, "--runner", "local", "--no-progress", *flags])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "local").exists()


def test_the_lease_keeps_a_second_writer_out_and_a_dead_ones_lease_is_taken_over(s3, monkeypatch):
    endpoint, client = s3
    monkeypatch.setattr("engine.lease.SETTLE_S", 0.05)  # engine/lease.py reads it
    store = S.ObjectStore("s3://bucket/leased", endpoint)
    with store.lock() as lease:
        with pytest.raises(RuntimeError, match="another run .* is writing to s3://bucket/leased"):
            with S.ObjectStore("s3://bucket/leased", endpoint).lock():
                pass
        # a run on another host that renewed its lease just now holds the store too
        store.write_json(S.LEASE, {**lease, "run": "theirs", "host": "elsewhere", "pid": 1, "renewed": time.time()})
        with pytest.raises(RuntimeError, match="elsewhere pid 1"):
            S.ObjectStore("s3://bucket/leased", endpoint)._take()
    assert S.LEASE in objects(client, "leased")  # not ours any more: left alone on the way out
    # ... but not once its lease is older than LEASE_TTL_S (even with a live pid of this host: pids are
    # reused), nor when it was this host's and its process is gone
    for stale in ({"host": "elsewhere", "pid": 1, "renewed": time.time() - S.LEASE_TTL_S - 1},
                  {"host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time() - S.LEASE_TTL_S - 1},
                  {"host": socket.gethostname(), "pid": 2**22 + 7, "renewed": time.time()}):
        store.write_json(S.LEASE, {"run": "old", **stale})
        with store.lock() as lease:
            assert json.loads(store.read(S.LEASE))["run"] == lease["run"] != "old"
    assert S.LEASE not in objects(client, "leased")


def staged(store, lease: str | None):
    """A shard 00000 built in a staging folder of `store` for the run `lease` (stand-in files)."""
    staging = store.stage_shard(lease)
    for ext, data in ((".tar", b"t" * 10), (".parquet", b"p" * 5), (".stats.json", b"{}")):
        (staging.folder / f"00000{ext}").write_bytes(data)
    return staging


def test_a_shard_is_marked_done_only_under_its_own_runs_lease(s3, tmp_path):
    from engine.write import ShardWriteError

    endpoint, client = s3
    store = S.ObjectStore("s3://bucket/takeover", endpoint)
    store.write_json(S.LEASE, {"run": "first"})
    before = staged(store, "first")  # staged while its run held the lease, committed after it lost it
    store.write_json(S.LEASE, {"run": "second"})
    after = staged(store, "first")  # staged after: the run compares with its own id, not the holder's
    for staging in (before, after):
        with pytest.raises(ShardWriteError, match=r"not marked done: another run \(second\) holds the lease"):
            staging.commit("00000")
        staging.close()
        assert not staging.folder.exists()
        assert set(objects(client, "takeover")) == {S.LEASE}  # nothing of the shard uploaded, no marker
    staging = staged(store, "second")  # the holder's own shard goes through, marker included
    staging.commit("00000")
    staging.close()
    assert objects(client, "takeover")["00000.tar"][0] == 10 and "00000.stats.json" in objects(client, "takeover")


TAKEN_OVER = """
import sys, time
from engine import storage as S
from engine.config import EngineConfig
from engine.pipeline import run

parquet, output, endpoint, runner, after = sys.argv[1:]
other = S.ObjectStore(output, endpoint)  # the other run's own client


def take(status):
    if status["shard"] == int(after):
        other.write_json(S.LEASE, {"run": "theirs", "host": "elsewhere", "pid": 1, "renewed": time.time()})


try:
    run(EngineConfig(inputs=(parquet,), output=output, shard_size=2, workers=1, runner=runner, progress=False,
                     s3_endpoint=endpoint), on_shard=take)
except S.StoreLost as exc:
    print(exc)
"""


def run_taken_over(*args: str) -> str:
    """An engine run (shards of 2 rows, one at a time) whose lease another run (another host, renewed
    just now) takes over once shard `after` is done: what it stopped with. In a fresh process (the
    fork server of `processes` starts with the AWS variables of the `s3` fixture), engine modules only."""
    done = subprocess.run([sys.executable, "-c", TAKEN_OVER, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("runner, after", [("processes", 0), ("local", 2)])
def test_a_run_that_loses_its_lease_mid_run_marks_nothing_more_done(s3, tmp_path, runner, after):
    endpoint, client = s3
    parquet = tmp_path / "in.parquet"  # rows refused before any request (blocked_address): quick shards
    pq.write_table(pa.table({"URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(6)], "TEXT": ["a"] * 6}), parquet)
    prefix = f"lost-{after}"
    output = f"s3://bucket/{prefix}"
    error = run_taken_over(str(parquet), output, endpoint, runner, str(after))  # processes: forked workers
    assert f"another run (elsewhere pid 1) took over the lease {S.LEASE} of {output}" in error, error
    assert "marks nothing more done" in error, error
    assert f"[{after + 1} shards complete, {4 - 2 * after} of 6 rows pending]" in error, error
    names = objects(client, prefix)
    # the shards done before the takeover are kept; none after it uploaded anything; the summary and card,
    # which would overwrite the new holder's, are not written; its lease is left as the other run wrote it
    assert {n for n in names if n[0].isdigit()} == \
        {f"{i:05d}.{ext}" for i in range(after + 1) for ext in ("tar", "parquet", "stats.json")}, names
    assert "stats.json" not in names and "README.md" not in names
    assert json.loads(client.get_object(Bucket="bucket", Key=f"{prefix}/{S.LEASE}")["Body"].read())["run"] == "theirs"
    client.delete_object(Bucket="bucket", Key=f"{prefix}/{S.LEASE}")  # that run is gone: a rerun finishes
    from engine.config import EngineConfig

    stats = run(EngineConfig(inputs=(str(parquet),), output=output, shard_size=2, runner="local", progress=False,
                             s3_endpoint=endpoint))
    assert stats["shards_complete"] == 3 and stats["outcomes"] == {"blocked_address": 6}
    assert objects(client, prefix)["00000.tar"] == names["00000.tar"]  # the kept shard is not redone


class RequestLog(logging.Handler):
    """What moto's server was asked (werkzeug logs every request it serves): (method, object key or
    "list PREFIX") -> how many times."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"(GET|HEAD|PUT|POST|DELETE) /bucket(\S*) HTTP", record.getMessage())
        if found:
            key, _, query = found[2].lstrip("/").partition("?")
            listed = "list-type" in query and "list " + parse_qs(query).get("prefix", [""])[0]
            self.seen[found[1], listed or key] += 1


def requests_of(call) -> tuple[object, Counter]:
    """What `call()` returned, and the requests moto's server saw while it ran (RequestLog)."""
    werkzeug, log = logging.getLogger("werkzeug"), RequestLog()
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(log)
    try:
        result = call()
    finally:
        werkzeug.removeHandler(log)
    return result, log.seen


def test_each_s3_input_is_listed_opened_and_read_once_per_run(s3, tmp_path, monkeypatch):
    endpoint, client = s3
    small = [f"once/{i}.parquet" for i in range(3)]  # a prefix of its own: the server is shared
    for i, key in enumerate(small):
        pq.write_table(pa.table({"URL": [f"http://127.0.0.1:9/{i}-{j}.jpg" for j in range(5)], "TEXT": ["a"] * 5}),
                       tmp_path / "small.parquet")
        client.upload_file(str(tmp_path / "small.parquet"), "bucket", key)
    wide = tmp_path / "wide.parquet"  # a footer longer than the tail read at the open (75 row groups of 10 columns)
    rows = 300
    pq.write_table(pa.table({"URL": [f"http://127.0.0.1:9/w{j}.jpg" for j in range(rows)], "TEXT": ["a"] * rows,
                             **{f"c{k}": list(range(rows)) for k in range(8)}}), wide, row_group_size=4)
    assert pq.read_metadata(wide).serialized_size > objinput.TAIL
    client.upload_file(str(wide), "bucket", "once/wide.parquet")
    from engine.config import EngineConfig

    monkeypatch.setattr("engine.lease.SETTLE_S", 0.05)
    cfg = EngineConfig(inputs=("s3://bucket/once/",), output="s3://bucket/once-out", shard_size=100, workers=1,
                       runner="local", progress=False, s3_endpoint=endpoint)
    for attempt in ("first run", "rerun"):  # the rerun asks again: nothing is kept across runs
        stats, seen = requests_of(lambda: run(cfg))
        assert stats["outcomes"] == {"blocked_address": 315}
        assert seen[("HEAD", "once-out/run.json")] == 1, attempt  # read once (none on the first run), then written
        seen = Counter({k: n for k, n in seen.items() if k[1].startswith(("once/", "list once/"))})
        assert seen.pop(("GET", "list once/")) == 1, attempt  # the prefix listed once
        for key in small:  # stat (HEAD) once, then one read of the whole object: footer and rows
            assert (seen.pop(("HEAD", key)), seen.pop(("GET", key))) == (1, 1), attempt
        # stat once; the tail, the rest of the long footer, then the rows in one coalesced read
        assert (seen.pop(("HEAD", "once/wide.parquet")), seen.pop(("GET", "once/wide.parquet"))) == (1, 3), attempt
        assert not seen, (attempt, seen)
    recorded = json.loads(client.get_object(Bucket="bucket", Key="once-out/run.json")["Body"].read())["inputs"]
    data = wide.read_bytes()  # run.json's footer hash is the one folders were made with (resume compares it)
    length = int.from_bytes(data[-8:-4], "little")
    assert recorded[-1]["footer"] == hashlib.sha256(data[-8 - length:-8]).hexdigest()[:16]
    assert [(d["name"], d["rows"], d["bytes"]) for d in recorded] == \
        [(f"{i}.parquet", 5, client.head_object(Bucket="bucket", Key=k)["ContentLength"]) for i, k in enumerate(small)] \
        + [("wide.parquet", rows, wide.stat().st_size)]


KILL_WHILE_STAGING = """
import os, runpy, signal, sys
def hook(event, args):
    # the shard's tar renamed into place in its local staging folder, before any upload
    if event == "os.rename" and "ctrlnet-shard-" in str(args[1]) and str(args[1]).endswith(".tar"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = ["engine", *sys.argv[1:]]
runpy.run_module("engine", run_name="__main__", alter_sys=True)
"""


def test_a_kill_mid_shard_leaves_no_staging_folder_after_the_rerun(s3, tmp_path):
    """Found by a kill sweep at every file event: a run into an object store killed while a shard was
    staged locally left that folder (the partial tar, parquet and marker) in the temporary folder for good;
    no later run removed it. Now a shard's first staging removes those of dead processes of this host,
    and keeps those of live ones."""
    from .conftest import encode, photo, scaled

    prefix = "ctrlnet-shard-"  # engine.storage.STAGING_PREFIX, spelt out: the test runs on the code before it too

    endpoint, client = s3
    photos, tmp = tmp_path / "photos", tmp_path / "tmp"
    photos.mkdir()
    tmp.mkdir()
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        (photos / f"{i}.jpg").write_bytes(encode(scaled(photo(name), 600, 520)))
    live = tmp / f"{prefix}{socket.gethostname()}-{os.getpid()}-keep"  # this live process's: it stays
    live.mkdir()
    root = Path(__file__).resolve().parents[1]
    args = ["shards", str(photos), "--output", "s3://bucket/staged", "--s3-endpoint", endpoint, "--runner", "local",
            "--shard-size", "2", "--no-progress"]
    env = {**os.environ, "TMPDIR": str(tmp)}
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_STAGING, *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = sorted(p.name for p in tmp.glob(f"{prefix}*") if p != live)
    assert any(".tar." in p.name for n in left for p in (tmp / n).iterdir()), left  # the kill's leftovers
    rerun = subprocess.run([sys.executable, "-m", "engine", *args], cwd=root, env=env, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert [p.name for p in tmp.glob(f"{prefix}*")] == [live.name]
    assert json.loads(client.get_object(Bucket="bucket", Key="staged/stats.json")["Body"].read())["outcomes"] == {"ok": 3}
