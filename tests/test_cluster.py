"""The engine on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and
worker nodes, each its own raylet with one CPU), against the loopback sample corpus.

Tasks must land on both nodes (the node ids in the shards' stats say where), the samples must be
the same as a one-node run's, dedup must hold across nodes, and a node killed mid-run must cost
nothing but a retry: no lost row, no partial shard.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from engine import outcomes as O
from engine.config import DedupConfig, EngineConfig, FetchConfig
from engine.pipeline import PENDING, OutputError, completed, run
from engine.rayrun import check_shared_output, write_token

from .conftest import run_rows
from .test_s3 import download, objects

pytestmark = pytest.mark.slow
FAST = FetchConfig(timeout=1.5, connect_timeout=1.0, retries=1, backoff=0.05, max_bytes=8 * 1024 * 1024,
                   allow_private_network=True)  # the corpus is served on loopback


@pytest.fixture(scope="module")
def cluster():
    """A head node and one worker node, one CPU each, so two shard tasks must spread over both."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def cfg(inputs: Path, out: Path, address: str | None, dedup: bool = False, **kw) -> EngineConfig:
    """An engine run over `inputs`: on the cluster at `address`, or in-process when None."""
    runner = {"ray_address": address, "runner": "ray"} if address else {"runner": "local"}
    return EngineConfig(inputs=(str(inputs),), output=str(out), shard_size=kw.pop("shard_size", 8),
                        workers=kw.pop("workers", 2), fetch=FAST, progress=False,
                        dedup=DedupConfig(enabled=dedup), **runner, **kw)


def corpus_case(corpus, outcome: str) -> pa.Table:
    """The corpus rows expected to end as `outcome`."""
    table = pq.read_table(corpus.parquet)
    return table.filter(pc.equal(table.column("expected_outcome"), outcome))


@pytest.fixture(scope="module")
def good_rows(corpus, tmp_path_factory) -> Path:
    """16 good rows of the corpus twice over: every image has an exact duplicate in another shard."""
    good = corpus_case(corpus, O.OK).slice(0, 16)
    path = tmp_path_factory.mktemp("inputs") / "doubled.parquet"
    pq.write_table(pa.concat_tables([good, good]), path)
    return path


@pytest.fixture(scope="module")
def slow_shards(corpus, tmp_path_factory) -> Path:
    """Shards of 6 rows: 5 good ones and one that drips a byte a second until the timeout, so every
    shard is still running seconds after it starts (a kill lands in the middle of one)."""
    good, drip = corpus_case(corpus, O.OK), corpus_case(corpus, O.TIMEOUT)
    drip = drip.filter(pc.equal(drip.column("case"), "drip")).slice(0, 1)
    path = tmp_path_factory.mktemp("inputs") / "slow.parquet"
    pq.write_table(pa.concat_tables(t for i in range(7) for t in (good.slice(5 * i, 5), drip)), path)
    return path


def outcomes_by_row(out: Path) -> dict[int, str]:
    """Each input row's outcome."""
    t = run_rows(out)
    return dict(zip(t.column("row").to_pylist(), t.column("outcome").to_pylist(), strict=True))


def ok_keys(out: Path) -> set[str]:
    """Keys of the samples written (by the rows' records) and present in the tars."""
    t = run_rows(out)
    return set(t.filter(pc.equal(t.column("outcome"), O.OK)).column("key").to_pylist())


def node_ids(cluster) -> set[str]:
    """The ids of the cluster's live nodes."""
    return {cluster.head_node.node_id} | {n.node_id for n in cluster.worker_nodes}


def shard_nodes(out: Path) -> dict[int, str]:
    """Which Ray node wrote each complete shard."""
    return {i: s["node_id"] for i, s in completed(out).items()}


def check_whole(out: Path, rows: int) -> None:
    """No partial shard: no temporary left, every stats file vouches for its tar and parquet."""
    assert not list(out.glob("*.tmp"))
    markers = {int(p.name.split(".")[0]) for p in out.glob("[0-9]*.stats.json")}
    assert markers == set(completed(out))  # completed() checks tar and parquet against the stats
    assert sorted(run_rows(out).column("row").to_pylist()) == list(range(rows))


def test_shards_run_on_both_nodes_and_match_a_one_node_run(cluster, corpus, tmp_path):
    rows = pq.read_metadata(corpus.parquet).num_rows
    stats = run(cfg(corpus.parquet, tmp_path / "cluster", cluster.address))
    one = run(cfg(corpus.parquet, tmp_path / "one", None))
    assert stats["outcomes"] == one["outcomes"] and PENDING not in stats["outcomes"]
    assert set(shard_nodes(tmp_path / "cluster").values()) == node_ids(cluster)
    assert outcomes_by_row(tmp_path / "cluster") == outcomes_by_row(tmp_path / "one")
    assert ok_keys(tmp_path / "cluster") == ok_keys(tmp_path / "one")
    check_whole(tmp_path / "cluster", rows)
    assert not (tmp_path / "cluster" / ".driver-token").exists()


def test_dedup_holds_across_nodes(cluster, good_rows, tmp_path):
    rows = pq.read_metadata(good_rows).num_rows
    stats = run(cfg(good_rows, tmp_path / "cluster", cluster.address, dedup=True))
    one = run(cfg(good_rows, tmp_path / "one", None, dedup=True))
    assert set(shard_nodes(tmp_path / "cluster").values()) == node_ids(cluster)
    assert stats["written"] == one["written"] == rows // 2
    t = run_rows(tmp_path / "cluster")
    kept = t.filter(pc.equal(t.column("outcome"), O.OK))
    assert len(set(kept.column("content_hash").to_pylist())) == kept.num_rows  # no exact pair
    urls = kept.column("url").to_pylist()
    assert len(set(urls)) == len(urls)  # each image (two rows each) kept exactly once
    assert stats["outcomes"].get(O.DUPLICATE_EXACT, 0) + stats["outcomes"].get(O.DUPLICATE_NEAR, 0) == rows // 2
    check_whole(tmp_path / "cluster", rows)


def test_a_node_killed_mid_run_loses_nothing(cluster, slow_shards, tmp_path, capfd):
    """A third node joins, takes shards, and is killed (raylet and workers) when another node has
    finished a shard (it is then busy with one of its own: every shard lasts seconds); its shard
    is retried on the others or left pending, and a rerun finishes the folder. On a loaded box the
    kill can land while the doomed node holds no running shard (nothing to retry): the scenario is
    then run again, up to five times, so the retry path is always exercised once (one CI run on the
    2-core box missed three times in a row)."""
    table = pq.read_table(slow_shards, columns=["expected_outcome"])
    for attempt in range(5):
        out = tmp_path / f"cluster{attempt}"
        stats = kill_a_node_during(cluster, cfg(slow_shards, out, cluster.address, workers=3, shard_size=6))
        assert not list(out.glob("*.tmp"))
        assert {int(p.name.split(".")[0]) for p in out.glob("[0-9]*.stats.json")} == set(completed(out))
        if stats["outcomes"].get(PENDING):  # retries ran out: the rerun redoes exactly the rest
            stats = run(cfg(slow_shards, out, cluster.address, workers=3, shard_size=6))
        assert PENDING not in stats["outcomes"]
        check_whole(out, table.num_rows)
        assert outcomes_by_row(out) == dict(enumerate(table.column("expected_outcome").to_pylist()))
        assert len(ok_keys(out)) == stats["written"] == 35
        if "retrying" in capfd.readouterr().err:  # the kill hit a running shard
            return
    pytest.fail("in five runs the killed node never held a running shard")


def kill_a_node_during(cluster, config) -> dict:
    """Run `config` on the cluster plus a node that is killed once another node has finished a shard and this one
    runs a shard (a worker of its raylet titled with the shard task): on the loaded 2-core box the kill, sent at the
    first finished shard alone, often found the node between shards or still starting its worker, with nothing to
    retry (five misses in a row in one CI run). A node never seen busy is removed after the run."""
    import time

    import psutil

    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    raylet = psutil.Process(doomed.all_processes["raylet"][0].process.pid)
    finished, killed, over = threading.Event(), threading.Event(), threading.Event()

    def busy() -> bool:
        try:
            return any("_shard_task" in " ".join(w.cmdline()) for w in raylet.children(recursive=True))
        except psutil.Error:
            return False

    def watch() -> None:
        while not over.is_set():
            if finished.is_set() and busy():
                killed.set()
                cluster.remove_node(doomed, allow_graceful=False)
                return
            time.sleep(0.02)

    def note_finished(status: dict) -> None:
        if status.get("stats", {}).get("node_id", doomed.node_id) != doomed.node_id:
            finished.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stats = run(config, on_shard=note_finished)
    finally:
        over.set()
        watcher.join()
    if not killed.is_set():
        cluster.remove_node(doomed)
    return stats


def test_each_node_uploads_its_own_shards_to_an_object_store(cluster, corpus, s3, tmp_path):
    """An s3:// --output needs no shared folder: tasks on both nodes upload their shards (the AWS
    variables travel in the runtime_env), which match a one-node run's."""
    endpoint, client = s3
    rows = pq.read_metadata(corpus.parquet).num_rows
    stats = run(cfg(corpus.parquet, "s3://bucket/cluster", cluster.address, s3_endpoint=endpoint))
    got = download(client, "cluster", tmp_path / "got")
    one = run(cfg(corpus.parquet, tmp_path / "one", None))
    assert stats["outcomes"] == one["outcomes"] and PENDING not in stats["outcomes"]
    assert set(shard_nodes(got).values()) == node_ids(cluster)
    assert ok_keys(got) == ok_keys(tmp_path / "one")
    check_whole(got, rows)
    assert not {".driver-token", ".lock.json"} & set(objects(client, "cluster"))


def test_a_node_that_does_not_see_the_output_is_named(cluster, tmp_path):
    """A folder each node has on its own disk (here: the token differs from the driver's) is refused."""
    out = tmp_path / "local-only"
    out.mkdir()
    ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
    try:
        write_token(out, "the-driver's")
        check_shared_output(str(out), "the-driver's")  # every node sees the same folder: accepted
        with pytest.raises(OutputError, match="shared filesystem"):
            check_shared_output(str(out), "another run's")
    finally:
        ray.shutdown()


def test_an_address_where_no_ray_listens_is_refused_at_once(tmp_path, good_rows):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"--ray-address 127.0.0.1:{port}: no Ray head"):
        run(cfg(good_rows, tmp_path / "out", f"127.0.0.1:{port}"))
    assert not ray.is_initialized()


def test_a_relative_output_is_made_absolute_before_it_travels(tmp_path, good_rows, monkeypatch):
    pq.write_table(pq.read_table(good_rows).slice(0, 2), tmp_path / "two.parquet")
    monkeypatch.chdir(tmp_path)
    stats = run(EngineConfig(inputs=("two.parquet",), output="rel", shard_size=64, workers=1,
                             fetch=FAST, progress=False, runner="local"))
    assert stats["config"]["output"] == str(tmp_path / "rel")
    assert json.loads(next(Path(tmp_path / "rel").glob("[0-9]*.stats.json")).read_text())["host"]
