"""`--runner ray` (the default with --ray-address): one Ray task per shard, on a local Ray or a cluster.

The only module that imports Ray, and only pipeline.make_runner imports it: a run on worker
processes or threads never loads Ray. The dedup index and progress counter are actors on the
driver's node; every node must see --output (checked with a token file before any shard starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import dedup as D
from . import storage as S
from .config import EngineConfig
from .counter import ProgressCounter
from .plan import Shard
from .runners import OutputError, Progress, RunnerLost, settle
from .stopping import Interrupted

TOKEN_FILE = ".driver-token"  # this run's random token: a task writes only where it finds it (same folder)
PROBE_TIMEOUT = 300.0  # seconds for every node to answer the shared-folder check (runtime_env setup included)


class RayRunner:
    """One Ray task per shard, a bounded number in flight, failed tasks retried by the driver.

    On a cluster (`--ray-address`) the tasks run on any node and write straight into --output, so
    every node must see that folder at the same path (a shared filesystem): a node that does not
    is named before any shard starts. The dedup index and progress actors live on the driver's
    node, whose loss ends the run anyway; a worker node lost mid-run only fails its shards, which
    are retried elsewhere or left pending for a rerun."""

    def __init__(self, cfg: EngineConfig, lease: str | None = None):
        self.cfg, self.lease = cfg, lease  # lease: the run id its shards are marked done under (object stores)
        self.token = uuid.uuid4().hex

    def __enter__(self):
        self.sigterm = sigterm_handler()
        if not ray.is_initialized():
            join_check(self.cfg.ray_address)
            try:
                ray.init(include_dashboard=False, log_to_driver=True, logging_level="ERROR",
                         **ray_init_args(self.cfg))
            except ConnectionError as exc:  # an OSError, which the CLI would blame on the disk
                raise RuntimeError(f"--ray-address {self.cfg.ray_address}: {exc}") from None
            except SystemExit as exc:  # Ray's own handler (below) met a SIGTERM during ray.init
                if exc.code == signal.SIGTERM and self.sigterm is not None:
                    raise Interrupted(signal.SIGTERM) from None
                raise
            finally:
                put_back_sigterm(self.sigterm)
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
        with contextlib.suppress(OSError):  # a store gone mid-run: its error is the run's, Ray still stops
            S.store_of(self.cfg).delete(TOKEN_FILE)
        if self.owns_ray:
            ray.shutdown()
            put_back_sigterm(self.sigterm)
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
        client = self.client()

        def submit(shard: Shard, attempt: int) -> None:
            ref = task.remote(shard, attempt, self.cfg, client, self.progress_actor, self.token, self.lease)
            in_flight[ref] = (shard, attempt)

        try:
            with deferred_signals() as stopped:
                self._loop(shards, progress, on_done, in_flight, limit, submit, stopped)
        except BaseException:
            if not self.owns_ray:  # a local Ray dies with ray.shutdown(); cancelling its tasks first races them
                for ref in in_flight:
                    ray.cancel(ref, force=True)
            raise

    def _loop(self, shards, progress, on_done, in_flight: dict, limit: int, submit, stopped) -> None:
        """Submit and settle shards until all have a status; a deferred Ctrl-C or SIGTERM ends it between Ray calls."""
        exhausted = False
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
            self._drain(progress)
            for ref in ready:
                shard, attempt = in_flight.pop(ref)
                again = settle(self.cfg, shard, attempt, _result(ref, shard), progress, on_done)
                if again:
                    submit(shard, again)
            if stopped():
                raise Interrupted(stopped())
        self._drain(progress)
        if stopped():  # the signal came with the last shard: the run still ends as interrupted, as asked
            raise Interrupted(stopped())

    def _drain(self, progress: Progress) -> None:
        """Move the counter actor's counts (by shard and attempt) onto the progress display."""
        try:
            counts = ray.get(self.progress_actor.take.remote())
        except ray.exceptions.RayActorError as exc:  # its process died: the run cannot dedup or count on
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunnerLost(f"the Ray actor holding the dedup index and progress counts died mid-run ({cause}); "
                             "rerun the same command to resume") from None
        for shard, attempt, rows, written in counts:
            progress.add(rows, written, shard, attempt)


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C (SIGINT) and SIGTERM only set a flag while the run loop calls Ray; the loop raises KeyboardInterrupt
    between calls (within its 0.5 s wait). Raised inside ray.wait or ray.get, the interrupt can trip a check in
    Ray's core worker and end the driver with exit 1 and a C++ stack trace instead of the clean exit 130 (seen
    once in CI). A second signal acts at once. Yields the flag's reader (the first signal's number, 0 before
    any); off the main thread, nothing changes."""
    hit: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h not in (signal.SIG_IGN, None)}  # an ignored signal stays so

    def note(signum, _frame) -> None:
        hit.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield lambda: hit[0] if hit else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def sigterm_handler():
    """The SIGTERM handler in place before Ray starts (the CLI's: the clean exit 143), or None off the main thread
    or where Python installed none."""
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGTERM)
    return handler if callable(handler) or handler in (signal.SIG_IGN, signal.SIG_DFL) else None


def put_back_sigterm(handler) -> None:
    """Reinstall `handler` for SIGTERM. ray.init replaces it with its own (sys.exit(15): exit 15, no message), and
    after ray.shutdown Ray's core worker leaves SIGTERM at its default action (death by the signal, exit -15, no
    message) while Python still names Ray's handler; either way a scheduler's stop outside the run loop skipped
    the CLI's one line and exit 143 (found by killing `--runner ray` runs at random moments)."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


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

    def add(self, rows: int, written: int, shard: int = -1, attempt: int = 1) -> None:
        """Count what a task finished."""
        with self.counter_lock:
            self.counter.add(rows, written, shard, attempt)

    def take(self) -> list[tuple[int, int, int, int]]:
        """The counts since the last take, and reset."""
        with self.counter_lock:
            return self.counter.take()


def _ray_call(actor, method, *args):
    """How the dedup client calls an index actor (`method`: a DedupShard method) from inside a task."""
    return ray.get(getattr(actor, method.__name__).remote(*args))


def _shard_task(shard: Shard, attempt: int, cfg: EngineConfig, client, progress_actor, token: str,
                lease: str | None = None) -> dict:
    """The Ray task body: one shard, progress sent to the driver's counter actor; refused on a node
    whose --output is not the driver's folder (a node that joined without the shared filesystem).
    `lease`: the driver's run id, the only one the shard is marked done under on an object store."""
    host = socket.gethostname()
    if not sees_token(S.store_of(cfg), token):
        fix = "check its --s3-endpoint and credentials there" if S.is_url(cfg.output) else "mount the shared folder there"
        return {"shard": shard.shard_id, "ok": False,
                "error": f"{host} does not see the driver's --output {cfg.output}: {fix}"}
    origin = {"host": host, "node_id": ray.get_runtime_context().get_node_id()}
    from .shard import process_shard  # imported in the worker only, not by the driver

    return process_shard(shard, cfg, client.claim if client else None,
                         lambda rows, written: progress_actor.add.remote(rows, written, shard.shard_id, attempt), origin,
                         lease)


def _result(ref, shard: Shard) -> dict:
    """A task's status record, or a failed one when its worker died."""
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 -- a dead worker is a failed attempt, not a crash
        return {"shard": shard.shard_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
