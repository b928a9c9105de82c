"""Engine images/s at 1, 2, 4, ... workers on local files (no network in the way).

Builds a laion-profile corpus, lists its files by path (engine --local-root), and runs the whole
`python -m engine shards` command once per worker count, dedup on, default flags. Two rates per
run: whole command (Ray start and shutdown included) and steady (samples over the window from
the first shard's start to the last shard's end, from the shards' stats). Efficiency at N workers
= steady rate / (N x the 1-worker steady rate). Also reports CPU-ms per image per stage and the
largest peak RSS of a worker process.

    python -m bench.scaling [--n 3000] [--workers 1,2,4,8,16] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench import corpus
from bench.results import machine_line, update_section

HERE = Path(__file__).parent


def local_list(folder: Path, rows: int, out: Path) -> Path:
    """The corpus parquet, first `rows` rows (cycled when more than the corpus), URLs replaced by
    the files' absolute paths."""
    table = pq.read_table(folder / "corpus.parquet")
    table = pa.concat_tables([table] * -(-rows // len(table))).slice(0, rows)
    paths = [str((folder / "files" / u.rsplit("/", 1)[1]).resolve()) for u in table.column("URL").to_pylist()]
    table = table.set_column(table.column_names.index("URL"), "URL", pa.array(paths, pa.string()))
    pq.write_table(table, out)
    return out


def ensure_corpus(work: Path, n: int) -> Path:
    """The laion-profile corpus of `n` images under `work` (built once), its files in the page cache."""
    folder = work / f"corpus-{n}"
    if not (folder / "BUILT").exists():
        t = time.perf_counter()
        corpus.build_corpus(folder, "http://127.0.0.1:0", n_images=n, profile="laion", seed=0)
        (folder / "BUILT").write_text(f"{time.perf_counter() - t:.1f} s\n")
        print(f"built {n} images in {time.perf_counter() - t:.0f} s", flush=True)
    for f in (folder / "files").iterdir():
        f.read_bytes()  # page cache warm: the runs measure the engine, not the disk
    return folder


def shard_stats(out: Path) -> list[dict]:
    """Every shard's stats file."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("[0-9]*.stats.json"))]


def stage_ms(stats: list[dict], written: int) -> dict:
    """CPU-ms per written image by stage, summed over shards."""
    total: dict[str, float] = {}
    for s in stats:
        for stage, ms in s.get("cpu_ms", {}).items():
            total[stage] = total.get(stage, 0.0) + ms
    return {k: round(v / max(written, 1), 2) for k, v in total.items()}


def warm_kernels(folder: Path, work: Path) -> None:
    """One small untimed run first: it compiles Numba's kernels into engine/__pycache__ (a fresh checkout has
    none), so the first timed run does not pay the compiling (Ray workers have no fork server warming them)."""
    urls = local_list(folder, 100, work / "local-warm.parquet")
    run_engine(urls, folder, work / "out-warm", 1, 100, ["--runner", "local"])


def run_engine(urls: Path, root: Path, out: Path, workers: int, rows: int, extra: list[str]) -> dict:
    """One whole engine command; its rates, stage costs and memory."""
    shutil.rmtree(out, ignore_errors=True)
    shard = max(25, rows // (4 * workers))
    cmd = [sys.executable, "-m", "engine", "shards", str(urls), "--output", str(out), "--workers", str(workers),
           "--shard-size", str(shard), "--local-root", str(root), "--no-progress", *extra]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"engine exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    run = json.loads((out / "stats.json").read_text())
    stats = shard_stats(out)
    window = max(s["window"][1] for s in stats) - min(s["window"][0] for s in stats)
    written = run["outcomes"].get("ok", 0)
    return {"workers": workers, "rows": rows, "written": written, "seconds": round(seconds, 2),
            "img_s": round(written / seconds, 1), "steady_img_s": round(written / window, 1),
            "steady_rows_s": round(rows / window, 1), "cpu_ms_per_row": round(
                sum(s["cpu_ms"]["total"] for s in stats) / rows, 2),
            "window_s": round(window, 2), "busy_rows_s": busy_rate(stats), "shard_size": last_value(cmd, "--shard-size"),
            "load": round(load, 1),
            "cpu_ms": stage_ms(stats, written), "peak_rss_mb": max(s["peak_rss_mb"] for s in stats),
            "outcomes": run["outcomes"]}


def last_value(args: list[str], flag: str) -> int:
    """The value argparse gives an int flag repeated in `args`: the last `--flag N` or `--flag=N` wins (so the JSON
    names the shard size a run used when --engine-args overrides bench.scaling's own)."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return int(found)


def busy_rate(stats: list[dict]) -> float | None:
    """Rows/s while every worker process had a shard running: a long run's rate, free of the first shards'
    start and the last wave's tail (in a short run with a few shards a worker, idle workers at the end weigh
    on the steady figure; a run of thousands of shards hardly has a tail). None when no such window exists.

    A shard's rows are counted in proportion to the part of its window inside the all-busy window.
    """
    by_worker: dict[tuple, list] = {}
    for s in stats:
        by_worker.setdefault((s.get("host"), s.get("pid")), []).append(s["window"])
    start = max(min(w[0] for w in ws) for ws in by_worker.values())
    end = min(max(w[1] for w in ws) for ws in by_worker.values())
    if end <= start:
        return None
    rows = sum(s["rows"] * overlap(s["window"], start, end) for s in stats)
    return round(rows / (end - start), 1)


def overlap(window: list[float], start: float, end: float) -> float:
    """The share of a shard's [first start, last end] window that lies inside [start, end]."""
    inside = min(window[1], end) - max(window[0], start)
    return max(0.0, inside) / max(window[1] - window[0], 1e-9)


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, run every worker count, print and save."""
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="images in the corpus")
    ap.add_argument("--workers", default="1,2,4,8,16", help="worker counts, comma separated")
    ap.add_argument("--per-worker", type=int, default=400, help="rows per worker in each run (at most --n)")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "scaling")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--machine", default=None, help="machine label (default: bench.results.machine_line())")
    ap.add_argument("--save", action="store_true", help="write the engine-scaling section of bench/RESULTS.md")
    ap.add_argument("--add-record", type=Path, default=None, help="render a --json-out file from elsewhere; run nothing")
    ap.add_argument("--cycle", action="store_true", help="--per-worker rows even beyond --n (repeats are duplicates)")
    ap.add_argument("--long", type=int, default=0, help="then one run of this many rows (the corpus cycled: "
                    "repeats end as duplicates) at the largest worker count, for peak RSS over time")
    ap.add_argument("--engine-args", nargs=argparse.REMAINDER, default=[], help="extra engine flags (last)")
    a = ap.parse_args(argv)
    if a.add_record:
        update_section("engine-scaling", render(json.loads(a.add_record.read_text())))
        return
    folder = ensure_corpus(a.work, a.n)
    warm_kernels(folder, a.work)  # the 1-worker baseline must not be the run that compiles the kernels
    results = []
    for workers in [int(w) for w in a.workers.split(",")]:
        rows = a.per_worker * workers if a.cycle else min(a.n, a.per_worker * workers)
        urls = local_list(folder, rows, a.work / f"local-{rows}.parquet")
        r = run_engine(urls, folder, a.work / f"out-{workers}", workers, rows, a.engine_args)
        # rows/s: when rows outnumber the corpus, repeats end as duplicates (all CPU stages but the tar)
        base = results[0]["steady_rows_s"] / results[0]["workers"] if results else r["steady_rows_s"] / workers
        r["efficiency"] = round(r["steady_rows_s"] / (workers * base), 2)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"{'workers':>7} {'rows':>6} {'img/s (command)':>16} {'rows/s (steady)':>15} {'efficiency':>10} "
          f"{'CPU-ms/row':>10} {'peak RSS MB':>11}")
    for r in results:
        print(f"{r['workers']:>7} {r['rows']:>6} {r['img_s']:>16} {r['steady_rows_s']:>15} {r['efficiency']:>10} "
              f"{r['cpu_ms_per_row']:>10} {r['peak_rss_mb']:>11}")
    long = run_long(a, folder, max(r["workers"] for r in results)) if a.long else None
    rec = {"machine": a.machine or machine_line(), "date": time.strftime("%Y-%m-%d"), "n": a.n,
           "results": results, "long": long}
    if a.json_out:
        a.json_out.write_text(json.dumps(rec, indent=1))
    if a.save:
        update_section("engine-scaling", render(rec))


def render(rec: dict) -> str:
    """The engine-scaling section of bench/RESULTS.md."""
    lines = ["## Engine scaling on local files (`python -m bench.scaling`)", "",
             f"Machine: {rec['machine']}, {rec.get('date', '')}. Corpus: {rec.get('n', '?')} laion-profile JPEGs "
             "read from disk (`--local-root`), dedup on, default flags; one whole command per worker count. "
             "Steady = rows over the window from the first shard's start to the last shard's end (Ray start "
             "and shutdown excluded); efficiency = steady rows/s / (workers x the 1-worker figure).", "",
             "Rows/s (all busy) counts only the time in which every worker process had a shard running "
             "(bench.scaling.busy_rate: a long run's rate, without the last wave's tail).", "",
             "| workers | rows | img/s (whole command) | rows/s (steady) | efficiency | rows/s (all busy) |"
             " CPU-ms per row | cores busy | peak RSS per worker, MB | load at start |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["results"]:
        rate, cpu = r.get("steady_rows_s", r["steady_img_s"]), r.get("cpu_ms_per_row", r["cpu_ms"].get("total"))
        lines.append(f"| {r['workers']} | {r['rows']} | {r['img_s']} | {rate} | {r['efficiency']} "
                     f"| {r.get('busy_rows_s') or 'n/a'} | {cpu} "
                     f"| {rate * cpu / 1000:.1f} | {r['peak_rss_mb']} | {r['load']} |")
    long = rec.get("long")
    if long:
        lines += ["", f"Long run: {long['rows']} rows at {long['workers']} workers ({long['outcomes']}), "
                  f"{long['seconds']} s; peak RSS of a worker {long['rss_first_tenth_mb']} MB in the first tenth "
                  f"of shards, {long['rss_last_tenth_mb']} MB in the last."]
    return "\n".join(lines)


def run_long(a: argparse.Namespace, folder: Path, workers: int) -> dict:
    """A long run; peak RSS of the worker processes in its first and last tenth of shards."""
    urls = local_list(folder, a.long, a.work / f"local-{a.long}.parquet")
    out = a.work / "out-long"
    r = run_engine(urls, folder, out, workers, a.long, a.engine_args)
    stats = sorted(shard_stats(out), key=lambda s: s["window"][1])
    tenth = max(1, len(stats) // 10)
    r["rss_first_tenth_mb"] = max(s["peak_rss_mb"] for s in stats[:tenth])
    r["rss_last_tenth_mb"] = max(s["peak_rss_mb"] for s in stats[-tenth:])
    print("long run:", json.dumps(r), flush=True)
    return r


if __name__ == "__main__":
    main()
