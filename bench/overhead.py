"""Whole-process-tree CPU seconds and wall seconds of small engine runs (issue 10's overhead).

    python -m bench.overhead [--n 300] [--workers 2] [--repeat 2] [--runner processes ray local] [-- ENGINE ARGS]

Runs `python -m engine shards` on the first N rows of bench.engine_bench's cached corpus served on
loopback, and on a 1-row list (fixed cost, less a bare `python -c pass`); prints CPU and wall."""

from __future__ import annotations

import argparse
import os
import sys

import pyarrow.parquet as pq

from . import engine_bench as EB


def measure(urls, tag: str, a: argparse.Namespace, runner: str) -> tuple[float, float, int]:
    """(wall s, tree CPU s, ok) of one engine run."""
    run = argparse.Namespace(workers=a.workers, concurrency=64, shard_size=a.shard_size, image_size=512,
                             engine_args=["--runner", runner, *a.engine_args])
    r = EB.run_engine(urls, EB.WORK / "run" / f"oh-{tag}-{runner}", run)
    return r.seconds, r.cpu_s, r.ok


def main(argv: list[str] | None = None) -> None:
    """Measure each runner `repeat` times on N rows and on 1 row."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=75)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--runner", nargs="+", default=["processes", "ray", "local"])
    ap.add_argument("engine_args", nargs="*")
    a = ap.parse_args(argv)
    folder = EB.cached_corpus(2000, 0)
    with EB.ServerPool(folder, 1) as server:
        full = EB.url_list(folder, server.base_url, EB.WORK / "run" / "oh-urls.parquet")
        n = full.with_name("oh-n.parquet")
        pq.write_table(pq.read_table(full).slice(0, a.n), n)
        one = full.with_name("oh-one.parquet")
        pq.write_table(pq.read_table(full).slice(0, 1), one)
        bare = min(EB.timed([sys.executable, "-c", "pass"], one.with_suffix(".log")) for _ in range(3))
        for _ in range(a.repeat):
            for runner in a.runner:
                w1, c1, _ = measure(one, "one", a, runner)
                wn, cn, ok = measure(n, "n", a, runner)
                print(f"{runner:6s} load {os.getloadavg()[0]:.1f}  1 row: fixed {w1 - bare:.2f} s wall, "
                      f"{c1:.2f} CPU-s | {a.n} rows: {wn:.2f} s wall, {cn:.2f} CPU-s, "
                      f"{1e3 * cn / max(ok, 1):.1f} CPU-ms/img, ok {ok}", flush=True)


if __name__ == "__main__":
    main()
