"""Pipeline: the driver. Plans shards, hands them to a runner, resumes, totals.

Runners (same interface): `processes` (procs.py, the default on one machine), `ray` (rayrun.py,
the default with --ray-address; the only module that imports Ray, loaded only then) and `local`
(runners.py, threads of this process). A shard is done when its stats file exists and agrees with
its tar and parquet; a rerun of the same command skips done shards and redoes the rest, after
checking (engine/fingerprint.py) that it is the same run: same settings, same inputs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import card, prestart
from . import dedup as D
from . import fingerprint as F
from . import outcomes as O
from .config import EngineConfig
from .plan import iter_shards
from .runners import LocalRunner, OutputError, Progress
from .write import fsync_dir, remove_stale_tmp, shard_name, tar_problem, write_json

PENDING = "pending"  # rows of shards that are not complete (failed or interrupted): rerun to finish


def completed(output: Path) -> dict[int, dict]:
    """Stats of every complete shard in `output` whose files agree with them, by shard id."""
    done = {}
    for path in output.glob("[0-9][0-9][0-9][0-9][0-9]*.stats.json"):
        try:
            stats = json.loads(path.read_text())
            if path.name == f"{shard_name(int(stats['shard']))}.stats.json" and trusted(output, stats):
                done[int(stats["shard"])] = stats
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError):
            continue  # unreadable means not done; the shard is redone
    return done


def trusted(output: Path, stats: dict) -> bool:
    """Whether a shard's tar, parquet and stats agree: sizes, rows and `ok` keys (no image read).

    Shards written before the stats held file sizes get their tar's member list checked instead."""
    name = shard_name(int(stats["shard"]))
    tar, parquet = output / f"{name}.tar", output / f"{name}.parquet"
    outcomes = stats["outcomes"]
    if sum(outcomes.values()) != stats["rows"] or outcomes.get(O.OK, 0) != stats["written"]:
        return False
    if not (tar.is_file() and parquet.is_file()):
        return False
    sizes = {"tar_bytes": tar.stat().st_size, "parquet_bytes": parquet.stat().st_size}
    if any(stats.get(k, n) != n for k, n in sizes.items()):
        return False
    legacy = "tar_bytes" not in stats
    table = pq.read_table(parquet, columns=["key", "outcome"] if legacy else ["outcome"])
    ok = pc.fill_null(pc.equal(table.column("outcome"), O.OK), False)
    if table.num_rows != stats["rows"] or (pc.sum(ok).as_py() or 0) != stats["written"]:
        return False
    return not legacy or tar_problem(tar, table.filter(ok).column("key").to_pylist()) is None


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


def check_rerun(cfg: EngineConfig, out: Path, now: dict, done: dict[int, dict], rows: int) -> None:
    """Refuse, before any file is touched, a rerun that would mix its shards with another run's."""
    recorded = F.load(out)
    if recorded is not None:
        F.check(out, recorded, now)
    else:  # made before run.json existed: the fields the shards' stats hold
        check_compatible(cfg, done)
    check_plan(cfg, done, rows)


def rebuild_index(client: D.DedupClient | None, output: Path, done: dict[int, dict]) -> int:
    """Reload the hashes of images already written, so a resumed run stays duplicate-free."""
    if client is None or not done:
        return 0
    # Streamed: millions of hashes never sit in a Python list at once.
    return client.load(D.iter_rebuild_items([output / f"{shard_name(i)}.parquet" for i in sorted(done)]))


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


def usable_output(out: Path) -> None:
    """Create the output folder if needed; a clear OutputError naming --output when it cannot be used."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file, not a folder: choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--output {out} cannot be created: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--output {out} is not writable by this user: choose another folder")


def lock_output(out: Path):
    """Hold an exclusive lock on the output folder (released by the OS even on SIGKILL)."""
    try:  # opened without truncating: an existing .lock is left exactly as it is
        handle = os.fdopen(os.open(out / ".lock", os.O_WRONLY | os.O_CREAT, 0o644), "w")
    except OSError as exc:
        raise OutputError(f"--output {out} is not writable: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(f"another run is writing to {out}; wait for it or choose another --output") from None
    return handle


def run(cfg: EngineConfig, on_shard: Callable[[dict], None] | None = None) -> dict:
    """Make (or finish) the shards of `cfg`; returns and writes the run's stats.json."""
    # Absolute before the config travels: a Ray worker's working folder is not the driver's.
    # Inputs and --local-root are read by workers too (lists, image files), so they go absolute as well.
    if cfg.runner == "processes":  # the fork server imports the shard stages while this process plans
        prestart.start()
    cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output),
                              inputs=tuple(os.path.abspath(p) for p in cfg.inputs),
                              local_roots=tuple(os.path.abspath(p) for p in cfg.local_roots))
    out = Path(cfg.output)
    usable_output(out)
    with lock_output(out):
        return _run(cfg, out, on_shard)


def start_run(cfg: EngineConfig, out: Path) -> tuple[int, dict[int, dict]]:
    """Check that this run may write into `out` (nothing is changed if not), then record it.

    Returns the input rows and the done shards."""
    now = F.fingerprint(cfg)
    rows = sum(d["rows"] for d in now["inputs"])
    done = completed(out)
    check_rerun(cfg, out, now, done, rows)
    if not (out / F.RUN_FILE).exists():
        write_json(now, out / F.RUN_FILE)
        fsync_dir(out)
    remove_stale_tmp(out)
    return rows, done


def make_runner(cfg: EngineConfig):
    """The --runner: worker processes of this machine, Ray tasks, or threads of this process.
    Imported here, not at the top: a run loads only its own runner (Ray never, unless asked)."""
    if cfg.runner == "processes":
        from .procs import ProcessRunner

        return ProcessRunner(cfg)
    if cfg.runner == "ray":
        from .rayrun import RayRunner

        return RayRunner(cfg)
    return LocalRunner(cfg)


def _run(cfg: EngineConfig, out: Path, on_shard: Callable[[dict], None] | None) -> dict:
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
            if done:  # asked only then: the process runner builds its index while the run starts
                rebuild_index(runner.client(), out, dict(done))
            runner.run(todo, progress, finished)
    finally:
        progress.close()
        remove_stale_tmp(out)
        result = totals(cfg, rows, done, failures, time.monotonic() - start, progress.written)
        try:
            write_json(result, out / "stats.json")
        except OSError as exc:  # the shards are safe; only this summary is missing
            result["unsaved"] = f"could not write {out / 'stats.json'}: {exc}"
        card.write_card(out, cfg, result)  # README.md: features for datasets.load_dataset(OUTPUT), counts
    return result
