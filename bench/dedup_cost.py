"""What dedup costs the whole engine: images/s with dedup on and off, alternating, in one run.

Same laion-profile corpus, server and settings as bench/engine_bench.py; only `--no-dedup` differs.
Figures go to the "dedup-cost" section of bench/RESULTS.md.

    python -m bench.dedup_cost [--n 2000] [--workers N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os

from bench.engine_bench import WORK, ServerPool, cached_corpus, run_engine, url_list, warm_page_cache
from bench.results import machine_line, update_section


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; the engine-run fields mirror bench/engine_bench.py's."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images in the corpus")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each setting, alternating; the best counts")
    ap.add_argument("--no-save", dest="save", action="store_false")
    a = ap.parse_args(argv)
    a.concurrency, a.image_size, a.engine_args = 64, 512, []
    a.shard_size = max(50, a.n // (4 * a.workers))
    return a


def main(argv: list[str] | None = None) -> None:
    """Run the engine with dedup on and off, alternating, and record the cost."""
    a = parse_args(argv)
    folder = cached_corpus(a.n, 0)
    warm_page_cache(folder)
    best = {"on": 0.0, "off": 0.0}
    with ServerPool(folder, 1) as srv:
        urls = url_list(folder, srv.base_url, WORK / "run" / "urls.parquet")
        for _ in range(a.repeat):
            for setting, extra in (("on", []), ("off", ["--no-dedup"])):
                a.engine_args = extra
                run = run_engine(urls, WORK / "run" / f"engine-dedup-{setting}", a)
                best[setting] = max(best[setting], run.images_per_s)
                print(f"dedup {setting:3s}: {run.ok}/{run.rows} ok in {run.seconds:.1f} s = "
                      f"{run.images_per_s:.1f} img/s", flush=True)
    cost = 1 - best["on"] / best["off"]
    print(f"dedup costs {100 * cost:.1f}% of the engine's images/s")
    if a.save:
        update_section(f"dedup-cost-{os.cpu_count()}c", f"""
## What dedup costs the engine (`python -m bench.dedup_cost`)

Machine: {machine_line()}. Corpus: {a.n} laion-profile JPEGs from the loopback server, {a.workers} workers,
shards of {a.shard_size}; best of {a.repeat} alternating runs each. Dedup on = content, pixel and
perceptual hashes of every image plus batched claims against the index actor.

| dedup | images/s |
|---|---|
| on | {best['on']:.1f} |
| off | {best['off']:.1f} |

Cost: **{100 * cost:.1f}%** of images/s (budget: at most 10%).
""")


if __name__ == "__main__":
    main()
