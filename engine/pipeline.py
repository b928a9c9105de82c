"""Pipeline: the driver. Plans shards, hands them to a runner, resumes, totals.

Runners (same interface): `processes` (procs.py, the default on one machine), `ray` (rayrun.py,
the default with --ray-address; the only module that imports Ray, loaded only then) and `local`
(runners.py, threads of this process). A shard is done when its stats file exists and agrees with
its tar and parquet; a rerun of the same command skips done shards and redoes the rest, after
checking (engine/fingerprint.py) that it is the same run: same settings, same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable

import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import card, objinput, prestart
from . import dedup as D
from . import fingerprint as F
from . import outcomes as O
from . import storage as S
from .claims import iter_rebuild_items
from .config import EngineConfig
from .plan import check_inputs, iter_shards
from .runners import LocalRunner, Progress
from .sample import STATS_SUFFIX, shard_name
from .storage import OutputError, lock_output, usable_output  # noqa: F401 -- moved there, still importable here
from .write import tar_problem

PENDING = "pending"  # rows of shards that are not complete (failed or interrupted): rerun to finish


def completed(output) -> dict[int, dict]:
    """Stats of every complete shard in `output` (a folder or a Store) whose files agree with them, by shard id."""
    done = {}
    output = S.as_store(output)
    for name in output.names(S.MARKER):
        try:
            stats = json.loads(output.read(name) or b"")
            if name == f"{shard_name(int(stats['shard']))}{STATS_SUFFIX}" and trusted(output, stats):
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


def check_rerun(cfg: EngineConfig, out, now: dict, done: dict[int, dict], rows: int) -> dict | None:
    """Refuse, before any file is touched, a rerun that would mix its shards with another run's.
    Returns the recorded run.json (None: there is none yet)."""
    recorded = F.load(out)
    if recorded is not None:
        F.check(S.as_store(out).url, recorded, now)
    else:  # made before run.json existed: the fields the shards' stats hold
        check_compatible(cfg, done)
    check_plan(cfg, done, rows)
    return recorded


def rebuild_index(client: D.DedupClient | None, output, done: dict[int, dict]) -> int:
    """Reload the hashes of images already written, so a resumed run stays duplicate-free."""
    if client is None or not done:
        return 0
    output = S.as_store(output)
    # Streamed: millions of hashes never sit in a Python list at once, nor open files.
    return client.load(iter_rebuild_items(output.local(n) or output.open(n)
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
    if cfg.runner == "processes":  # the fork server imports the shard stages while this process plans
        prestart.start()
    cfg = dataclasses.replace(cfg, output=S.absolute(cfg.output),
                              inputs=tuple(S.absolute(p) for p in cfg.inputs),
                              local_roots=tuple(os.path.abspath(p) for p in cfg.local_roots))
    objinput.input_endpoint = cfg.s3_endpoint  # for s3:// inputs, which only this driver reads
    store = S.store_of(cfg)  # a folder or an object store (engine/storage.py)
    with objinput.run_scope():  # each s3:// input listed and opened once in this run
        check_inputs(cfg.inputs, cfg.url_col, cfg.caption_col)  # unusable inputs: refused before --output is made
        with store.lock():
            return _run(cfg, store, on_shard)  # store.held: the lease's run id, carried to every shard


def start_run(cfg: EngineConfig, out: S.LocalStore | S.ObjectStore) -> tuple[int, dict[int, dict]]:
    """Check that this run may write into `out` (nothing is changed if not), then record it.

    Returns the input rows and the done shards."""
    now = F.fingerprint(cfg)
    rows = sum(d["rows"] for d in now["inputs"])
    done = completed(out)
    if check_rerun(cfg, out, now, done, rows) is None:  # run.json read once, there
        out.write_json(F.RUN_FILE, now)
    out.tidy()
    return rows, done


def make_runner(cfg: EngineConfig, lease: str | None = None):
    """The --runner: worker processes of this machine, Ray tasks, or threads of this process, each
    shard marked done only under the run id `lease` (an object store's, engine/lease.py).
    Imported here, not at the top: a run loads only its own runner (Ray never, unless asked)."""
    if cfg.runner == "processes":
        from .procs import ProcessRunner

        return ProcessRunner(cfg, lease)
    if cfg.runner == "ray":
        from .rayrun import RayRunner

        return RayRunner(cfg, lease)
    return LocalRunner(cfg, lease)


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

    start, stopped = time.monotonic(), None
    try:
        with make_runner(cfg, out.held) as runner:
            if done:  # asked only then: the process runner builds its index while the run starts
                rebuild_index(runner.client(), out, dict(done))
            runner.run(todo, progress, finished)
    except (S.StoreLost, S.RunnerLost) as exc:  # said once the closing writes are tried, with what the run leaves
        stopped = exc
    finally:
        progress.close()
        out.tidy()
        result = totals(cfg, rows, done, failures, time.monotonic() - start, progress.written)
        try:
            if out.lease_taken():  # another run holds the store now: its summary is not overwritten
                raise OSError(out.lost)
            out.write_json("stats.json", result)
        except OSError as exc:  # the shards are safe; only this summary is missing
            result["unsaved"] = f"could not write {out.url}/stats.json: {exc}"
        card.write_card(out, cfg, result)  # README.md: features for datasets.load_dataset(OUTPUT), counts
    if stopped or out.lost:  # lost: also a lease taken over once the last shard was marked
        raise (type(stopped) if stopped else S.StoreLost)(f"{stopped or out.lost} [{len(done)} shards complete, "
                          f"{result['outcomes'].get(PENDING, 0)} of {rows} rows pending]") from None
    return result
