"""Pipeline: the driver. Plans shards, runs them on Ray (or in-process), resumes, totals.

Only this module knows about Ray. `LocalRunner` has the same shape as `RayRunner`, so the stages
and end-to-end tests run without a cluster too. A shard is done when its stats file exists and
agrees with its tar and parquet; a rerun of the same command skips done shards and redoes the
rest, after checking (engine/fingerprint.py) that it is the same run: same settings, same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import card
from . import dedup as D
from . import fingerprint as F
from . import outcomes as O
from . import storage as S
from .config import EngineConfig
from .counter import ProgressCounter
from .plan import Shard, iter_shards
from .storage import OutputError, lock_output, usable_output  # noqa: F401 -- moved there, still importable here
from .write import shard_name, tar_problem

PENDING = "pending"  # rows of shards that are not complete (failed or interrupted): rerun to finish
TOKEN_FILE = ".driver-token"  # this run's random token: a task writes only where it finds it (same folder)
PROBE_TIMEOUT = 300.0  # seconds for every node to answer the shared-folder check (runtime_env setup included)


class Progress:
    """Rows finished and samples written, as the live bar and the final summary see them."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.start, self.rows, self.written = time.monotonic(), 0, 0
        self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, disable=not enabled,
                        smoothing=0.1, file=sys.stderr)

    def add(self, rows: int, written: int) -> None:
        """Count finished rows and written samples."""
        self.rows += rows
        self.written += written
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.update(rows)
        self.bar.set_postfix_str(
            f"{self.written / elapsed:.1f} img/s, ok {100 * self.written / max(self.rows, 1):.0f}%", refresh=False)

    def close(self) -> None:
        """Stop drawing."""
        self.bar.close()


class LocalRunner:
    """Runs shards on threads of this process (no Ray start: ~2 s less fixed cost); same interface
    as RayRunner."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.index = [D.DedupShard(cfg.dedup.near_distance) for _ in range(cfg.dedup.index_shards)] \
            if cfg.dedup.enabled else []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def client(self) -> D.DedupClient | None:
        """The dedup index as plain objects."""
        return D.DedupClient(self.index, D.direct_call) if self.index else None

    def attempts(self, shard: Shard, claim, report) -> dict:
        """One shard, retried up to `max_retries` times like the Ray runner's; the last status."""
        from .shard import process_shard  # here, not at the top: the Ray driver never needs it

        for _ in range(self.cfg.max_retries + 1):
            status = process_shard(shard, self.cfg, claim, report, {"host": socket.gethostname()})
            if status["ok"]:
                break
        return status

    def run(self, shards: Iterator[Shard], progress: Progress, on_done: Callable[[dict], None]) -> None:
        """Process `workers` shards at once on threads of this process (the CPU stages release the
        GIL), a failed one up to `max_retries` more times; statuses go to `on_done` on this thread."""
        client = self.client()
        claim = client.claim if client else None
        lock = threading.Lock()

        def report(rows: int, written: int) -> None:
            with lock:
                progress.add(rows, written)

        with ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="shard") as pool:
            running: set = set()
            for shard in shards:
                if len(running) >= self.cfg.workers:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_done(future.result())
                running.add(pool.submit(self.attempts, shard, claim, report))
            for future in as_completed(running):
                on_done(future.result())


class RayRunner:
    """One Ray task per shard, a bounded number in flight, failed tasks retried by the driver.

    On a cluster (`--ray-address`) the tasks run on any node and write straight into --output, so
    every node must see that folder at the same path (a shared filesystem): a node that does not
    is named before any shard starts. The dedup index and progress actors live on the driver's
    node, whose loss ends the run anyway; a worker node lost mid-run only fails its shards, which
    are retried elsewhere or left pending for a rerun."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.token = uuid.uuid4().hex

    def __enter__(self):
        if not ray.is_initialized():
            join_check(self.cfg.ray_address)
            try:
                ray.init(include_dashboard=False, log_to_driver=True, logging_level="ERROR",
                         **ray_init_args(self.cfg))
            except ConnectionError as exc:  # an OSError, which the CLI would blame on the disk
                raise RuntimeError(f"--ray-address {self.cfg.ray_address}: {exc}") from None
            self.owns_ray = True
        else:
            self.owns_ray = False
        here = driver_node()
        # Threaded actors: searches run in parallel; the shard's own lock keeps claims atomic.
        # The first index shard also counts progress: every actor is a process of its own.
        self.index = [ray.remote(IndexAndCounter if i == 0 else D.DedupShard)
                      .options(num_cpus=0, max_concurrency=8, scheduling_strategy=here)
                      .remote(self.cfg.dedup.near_distance)
                      for i in range(self.cfg.dedup.index_shards)] if self.cfg.dedup.enabled else []
        self.progress_actor = self.index[0] if self.index else \
            ray.remote(ProgressCounter).options(num_cpus=0, scheduling_strategy=here).remote()
        try:
            write_token(S.store_of(self.cfg), self.token)
            check_shared_output(S.store_of(self.cfg), self.token)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        S.store_of(self.cfg).delete(TOKEN_FILE)
        if self.owns_ray:
            ray.shutdown()
        return False

    def client(self) -> D.DedupClient | None:
        """The dedup index as Ray actors (the client travels into every task)."""
        return D.DedupClient(self.index, _ray_call) if self.index else None

    def run(self, shards: Iterator[Shard], progress: Progress, on_done: Callable[[dict], None]) -> None:
        """Keep `workers` tasks (plus a small queue) in flight until every shard has a status."""
        task = ray.remote(_shard_task).options(num_cpus=1, max_retries=0)
        in_flight: dict = {}
        limit = self.cfg.workers + max(1, self.cfg.workers // 4)
        shards = iter(shards)
        exhausted = False
        client = self.client()

        def submit(shard: Shard, attempt: int) -> None:
            in_flight[task.remote(shard, self.cfg, client, self.progress_actor, self.token)] = (shard, attempt)

        try:
            while in_flight or not exhausted:
                while not exhausted and len(in_flight) < limit:
                    shard = next(shards, None)
                    if shard is None:
                        exhausted = True
                        break
                    submit(shard, 1)
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                progress.add(*ray.get(self.progress_actor.take.remote()))
                for ref in ready:
                    shard, attempt = in_flight.pop(ref)
                    status = _result(ref, shard)
                    if not status["ok"] and attempt <= self.cfg.max_retries:
                        print(f"shard {shard_name(shard.shard_id)} attempt {attempt} failed "
                              f"({status.get('error', '')[:200]}); retrying", file=sys.stderr)
                        submit(shard, attempt + 1)
                    else:
                        on_done(status)
            progress.add(*ray.get(self.progress_actor.take.remote()))
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise


def join_check(address: str | None) -> None:
    """Refuse at once a --ray-address host:port where nothing listens: ray.init would wait for it
    for many minutes."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"--ray-address {address}: no Ray head answers there ({exc}); start one with "
                           "`ray start --head` or give the address it printed") from None


def ray_init_args(cfg: EngineConfig) -> dict:
    """ray.init's arguments: a local Ray of `workers` CPUs, or the cluster at --ray-address with this
    engine package shipped to every worker (runtime_env py_modules), so nodes need only the
    dependencies installed, not this checkout."""
    if not cfg.ray_address:
        # Our own Ray ("local"): a plain ray.init() would join any cluster `ray start` left running here.
        return {"address": "local", "num_cpus": cfg.workers}
    package = str(Path(__file__).resolve().parent)
    return {"address": cfg.ray_address,
            "runtime_env": {"py_modules": [package], "excludes": ["__pycache__", "*.pyc"],
                            **S.credentials_env(cfg)}}


def driver_node() -> NodeAffinitySchedulingStrategy:
    """Pin to the driver's own node: its loss ends the run anyway, a worker node's must not."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def write_token(out, token: str) -> None:
    """Leave this run's token in --output (a folder or a Store), where tasks look for it before writing."""
    S.as_store(out).write_json(TOKEN_FILE, {"token": token, "host": socket.gethostname()})


def sees_token(output, token: str) -> bool:
    """Whether `output` on this machine is the driver's folder or store (holds this run's token)."""
    try:
        return json.loads(S.as_store(output).read(TOKEN_FILE) or b"").get("token") == token
    except (OSError, ValueError, AttributeError):
        return False


def _probe(output, token: str) -> tuple[str, bool]:
    """Ray task on one node: (its host name, whether it sees the driver's --output)."""
    store = S.as_store(output)
    return socket.gethostname(), sees_token(store, token) and (store.remote or os.access(store.url, os.W_OK | os.X_OK))


def check_shared_output(output, token: str) -> None:
    """Refuse to start when a live node cannot write to the driver's --output folder."""
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if len(nodes) < 2:
        return  # one machine: the driver's own folder
    probe = ray.remote(_probe)
    refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
            .remote(output, token) for n in nodes]
    blind = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            host, ok = ray.get(ref, timeout=PROBE_TIMEOUT)
        except ray.exceptions.GetTimeoutError as exc:
            raise OutputError(f"Ray node {node} did not answer the --output check in {PROBE_TIMEOUT:.0f} s") from exc
        except ray.exceptions.RayError:
            continue  # the node left the cluster meanwhile: it runs no shard
        if not ok:
            blind.append(f"{host} (node {node[:12]})")
    if blind and S.as_store(output).remote:
        raise OutputError(f"--output {S.as_store(output).url} cannot be read from {', '.join(blind)}: every node "
                          "uploads its own shards, so each needs the endpoint reachable and the credentials "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws) the driver has")
    if blind:
        raise OutputError(
            f"--output {S.as_store(output).url} is not the driver's folder on {', '.join(blind)}: on a Ray cluster every "
            "node writes its shards straight into --output, so mount one shared filesystem (NFS, CephFS, "
            "Lustre...) at the same path on every node and give that path")


class IndexAndCounter(D.DedupShard):
    """A dedup index shard that is also the progress counter: one Ray worker process less per run
    (each costs ~1-2 CPU-s of imports and a second of start-up)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.counter = ProgressCounter()
        self.counter_lock = threading.Lock()  # the actor is threaded (max_concurrency)

    def add(self, rows: int, written: int) -> None:
        """Count what a task finished."""
        with self.counter_lock:
            self.counter.add(rows, written)

    def take(self) -> tuple[int, int]:
        """The counts since the last take, and reset."""
        with self.counter_lock:
            return self.counter.take()


def _ray_call(actor, method, *args):
    """How the dedup client calls an index actor (`method`: a DedupShard method) from inside a task."""
    return ray.get(getattr(actor, method.__name__).remote(*args))


def _shard_task(shard: Shard, cfg: EngineConfig, client, progress_actor, token: str) -> dict:
    """The Ray task body: one shard, progress sent to the driver's counter actor; refused on a node
    whose --output is not the driver's folder (a node that joined without the shared filesystem)."""
    host = socket.gethostname()
    if not sees_token(S.store_of(cfg), token):
        fix = "check its --s3-endpoint and credentials there" if S.is_url(cfg.output) else "mount the shared folder there"
        return {"shard": shard.shard_id, "ok": False,
                "error": f"{host} does not see the driver's --output {cfg.output}: {fix}"}
    origin = {"host": host, "node_id": ray.get_runtime_context().get_node_id()}
    from .shard import process_shard  # imported in the worker only, not by the driver

    return process_shard(shard, cfg, client.claim if client else None,
                         lambda rows, written: progress_actor.add.remote(rows, written), origin)


def _result(ref, shard: Shard) -> dict:
    """A task's status record, or a failed one when its worker died."""
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 -- a dead worker is a failed attempt, not a crash
        return {"shard": shard.shard_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def completed(output) -> dict[int, dict]:
    """Stats of every complete shard in `output` (a folder or a Store) whose files agree with them, by shard id."""
    done = {}
    output = S.as_store(output)
    for name in output.names(S.MARKER):
        try:
            stats = json.loads(output.read(name) or b"")
            if name == f"{shard_name(int(stats['shard']))}.stats.json" and trusted(output, stats):
                done[int(stats["shard"])] = stats
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError):
            continue  # unreadable means not done; the shard is redone
    return done


def trusted(output, stats: dict) -> bool:
    """Whether a shard's tar, parquet and stats agree: sizes, rows and `ok` keys (no image read).

    Shards written before the stats held file sizes get their tar's member list checked instead."""
    name, output = shard_name(int(stats["shard"])), S.as_store(output)
    tar, parquet = f"{name}.tar", f"{name}.parquet"
    outcomes = stats["outcomes"]
    if sum(outcomes.values()) != stats["rows"] or outcomes.get(O.OK, 0) != stats["written"]:
        return False
    sizes = {"tar_bytes": output.size(tar), "parquet_bytes": output.size(parquet)}
    if None in sizes.values() or any(stats.get(k, n) != n for k, n in sizes.items()):
        return False
    legacy = "tar_bytes" not in stats
    if legacy and output.local(tar) is None:
        return False  # no object store held shards before the stats recorded sizes
    with output.open(parquet) as f:
        table = pq.read_table(f, columns=["key", "outcome"] if legacy else ["outcome"])
    ok = pc.fill_null(pc.equal(table.column("outcome"), O.OK), False)
    if table.num_rows != stats["rows"] or (pc.sum(ok).as_py() or 0) != stats["written"]:
        return False
    return not legacy or tar_problem(output.local(tar), table.filter(ok).column("key").to_pylist()) is None


def check_compatible(cfg: EngineConfig, done: dict[int, dict]) -> None:
    """Refuse to resume into shards cut or cropped differently (their keys and rows would not match).

    The check of folders made before run.json existed; run.json compares every setting."""
    for stats in done.values():
        for field, flag, value in (("shard_size", "--shard-size", cfg.shard_size),
                                   ("image_size", "--image-size", cfg.image.image_size)):
            if stats.get(field, value) != value:
                raise F.RunMismatch(f"{cfg.output} holds shards made with {flag} {stats[field]}, not {value}: "
                                    f"rerun with {flag} {stats[field]} or choose another --output")


def check_plan(cfg: EngineConfig, done: dict[int, dict], rows: int) -> None:
    """Refuse done shards that these inputs would not produce (rows counted twice or never)."""
    for shard_id, stats in sorted(done.items()):
        first = shard_id * cfg.shard_size
        expected = max(0, min(cfg.shard_size, rows - first))
        if stats.get("first_row", first) != first or stats["rows"] != expected:
            raise F.RunMismatch(
                f"{cfg.output} holds shard {shard_name(shard_id)} of {stats['rows']} rows from row "
                f"{stats.get('first_row', first)}, but the inputs ({rows} rows) give it {expected} rows from row "
                f"{first}: the folder was made from other inputs; rerun with those or choose another --output")


def check_rerun(cfg: EngineConfig, out, now: dict, done: dict[int, dict], rows: int) -> None:
    """Refuse, before any file is touched, a rerun that would mix its shards with another run's."""
    recorded = F.load(out)
    if recorded is not None:
        F.check(S.as_store(out).url, recorded, now)
    else:  # made before run.json existed: the fields the shards' stats hold
        check_compatible(cfg, done)
    check_plan(cfg, done, rows)


def rebuild_index(client: D.DedupClient | None, output, done: dict[int, dict]) -> int:
    """Reload the hashes of images already written, so a resumed run stays duplicate-free."""
    if client is None or not done:
        return 0
    output = S.as_store(output)
    # Streamed: millions of hashes never sit in a Python list at once, nor open files.
    return client.load(D.iter_rebuild_items(output.local(n) or output.open(n)
                                            for n in (f"{shard_name(i)}.parquet" for i in sorted(done))))


def totals(cfg: EngineConfig, rows: int, done: dict[int, dict], failures: list[dict], seconds: float,
           written_now: int) -> dict:
    """The run's stats.json: outcome counts over every row, which always add up to `rows`."""
    outcomes: Counter = Counter()
    clusters: Counter = Counter()
    examples: dict[str, str] = {}
    for stats in done.values():
        outcomes.update(stats["outcomes"])
        for c in stats.get("duplicate_clusters", []):
            clusters[c["owner"]] += c["count"]
            examples.setdefault(c["owner"], c["example_url"])
    finished = sum(outcomes.values())
    if finished > rows:  # check_rerun refuses such folders first; a count over 100% is never printed
        raise F.RunMismatch(f"{cfg.output} holds outcomes of {finished} rows but the inputs have {rows}: "
                            "it mixes runs; choose another --output")
    if rows > finished:
        outcomes[PENDING] = rows - finished
    return {
        "rows": rows, "outcomes": dict(sorted(outcomes.items())), "shards_complete": len(done),
        "shards_failed": [{"shard": f["shard"], "error": f.get("error", "")} for f in failures],
        "written": outcomes.get("ok", 0), "seconds": round(seconds, 2),
        "images_per_s": round(written_now / seconds, 2) if seconds else 0.0,
        "duplicate_clusters": [{"owner": k, "count": n, "example_url": examples[k]}
                               for k, n in clusters.most_common(20)],
        "config": cfg.to_dict(),
    }


def run(cfg: EngineConfig, on_shard: Callable[[dict], None] | None = None) -> dict:
    """Make (or finish) the shards of `cfg`; returns and writes the run's stats.json."""
    # Absolute before the config travels: a Ray worker's working folder is not the driver's.
    # Inputs and --local-root are read by workers too (lists, image files), so they go absolute as well.
    cfg = dataclasses.replace(cfg, output=S.absolute(cfg.output),
                              inputs=tuple(S.absolute(p) for p in cfg.inputs),
                              local_roots=tuple(os.path.abspath(p) for p in cfg.local_roots))
    S.input_endpoint = cfg.s3_endpoint  # for s3:// inputs, which only this driver reads
    store = S.store_of(cfg)  # a folder or an object store (engine/storage.py)
    with store.lock():
        return _run(cfg, store, on_shard)


def start_run(cfg: EngineConfig, out: S.LocalStore | S.ObjectStore) -> tuple[int, dict[int, dict]]:
    """Check that this run may write into `out` (nothing is changed if not), then record it.

    Returns the input rows and the done shards."""
    now = F.fingerprint(cfg)
    rows = sum(d["rows"] for d in now["inputs"])
    done = completed(out)
    check_rerun(cfg, out, now, done, rows)
    if out.read(F.RUN_FILE) is None:
        out.write_json(F.RUN_FILE, now)
    out.tidy()
    return rows, done


def make_runner(cfg: EngineConfig):
    """The --runner: Ray tasks, worker processes of this machine, or threads of this process."""
    if cfg.runner == "processes":
        from .procs import ProcessRunner

        return ProcessRunner(cfg)
    return RayRunner(cfg) if cfg.runner == "ray" else LocalRunner(cfg)


def _run(cfg: EngineConfig, out: S.LocalStore | S.ObjectStore, on_shard: Callable[[dict], None] | None) -> dict:
    """`run` once the output folder is ours."""
    rows, done = start_run(cfg, out)
    todo = (s for s in iter_shards(cfg.inputs, cfg.shard_size, cfg.url_col, cfg.caption_col)
            if s.shard_id not in done)
    progress = Progress(rows, sum(s["rows"] for s in done.values()), cfg.progress)
    failures: list[dict] = []

    def finished(status: dict) -> None:
        if status["ok"]:
            done[status["shard"]] = status["stats"]
        else:
            failures.append(status)
        if on_shard:
            on_shard(status)

    start = time.monotonic()
    try:
        with make_runner(cfg) as runner:
            rebuild_index(runner.client(), out, dict(done))
            runner.run(todo, progress, finished)
    finally:
        progress.close()
        out.tidy()
        result = totals(cfg, rows, done, failures, time.monotonic() - start, progress.written)
        try:
            out.write_json("stats.json", result)
        except OSError as exc:  # the shards are safe; only this summary is missing
            result["unsaved"] = f"could not write {out.url}/stats.json: {exc}"
        card.write_card(out, cfg, result)  # README.md: features for datasets.load_dataset(OUTPUT), counts
    return result
