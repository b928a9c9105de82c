"""A worker runs shard after shard in one process: nothing of a finished shard may outlive it (issue 10).

Objects caught in a reference cycle are freed only by Python's cyclic collector, whose full pass is
rare in a long-lived worker: a cycle holding a shard's rows kept them alive across many shards and
fragmented the worker's heap, so its peak RSS crept over a long run. These tests run shards with the
collector off and look at what only it could free."""

from __future__ import annotations

import gc
from collections import Counter

from engine import dedup as D
from engine.config import EngineConfig, FetchConfig
from engine.plan import iter_shards
from engine.shard import process_shard

FAST = FetchConfig(timeout=1.5, connect_timeout=1.0, retries=1, backoff=0.05, max_bytes=8 * 1024 * 1024,
                   allow_private_network=True)  # the corpus is served on loopback


def cyclic_garbage(run) -> Counter:
    """Types (module.name) of the objects that `run()` creates and leaves for the cyclic collector alone.

    Objects that existed before are left out: an earlier test's abandoned thread (tests/test_s3_failures.py
    leaves stalled gs:// calls behind by design) may end during `run()` and drop what it held."""
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects()}
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept in gc.garbage
        gc.collect()
        return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage if id(o) not in before)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_finished_shards_leave_no_cycles_behind(corpus, tmp_path):
    """Every row kind of the corpus (good photos, bad bodies, HTTP errors, duplicates), twice: no
    engine object, no ctypes library object is left in a cycle, however many shards ran."""
    cfg = EngineConfig(inputs=(str(corpus.parquet),), output=str(tmp_path), shard_size=16, workers=1,
                       fetch=FAST, progress=False, runner="local")
    client = D.DedupClient([D.DedupShard(cfg.dedup.near_distance)], D.direct_call)
    shards = list(iter_shards(cfg.inputs, cfg.shard_size))
    process_shard(shards[0], cfg, client.claim)  # first use: imports, kernels and caches load here

    def run_all():
        for offset in (100, 200):  # the second pass finds every image already claimed: duplicates
            for s in shards:
                status = process_shard(type(s)(s.shard_id + offset, s.first_row, s.table, s.roots, s.kinds),
                                       cfg, client.claim)
                assert status["ok"], status

    left = cyclic_garbage(run_all)
    ours = {k: n for k, n in left.items() if k.startswith(("engine.", "ctypes.", "_ctypes."))}
    assert ours == {}, f"left for the cyclic collector: {ours}"
