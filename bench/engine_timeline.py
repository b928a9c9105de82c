"""Where a whole engine run's wall time goes: CPU per process and idle cores before, between and after shards.

    python -m bench.engine_timeline [--n 2000] [--workers 2] [--repeat 1] [-- ENGINE ARGS]

Runs `python -m engine shards` as bench.engine_bench does (its cached corpus on loopback, shards of
n / (4 x workers)), samples the whole box's busy cores from /proc/stat every 50 ms and every process
of the run's tree with psutil, then prints: CPU seconds of the driver, the fork server and each
worker; when the first shard started and the last ended (the shards' stats windows); and the idle
core-seconds before the first shard, inside the shards' span and after it. Idle counts the whole box,
so other work on it hides idle time: read it on a quiet box (`uptime` is printed)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq

from . import engine_bench as EB

TICK = 0.05  # seconds between samples


def busy_cores() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of the box so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def role(p: psutil.Process, root: psutil.Process) -> str:
    """driver, fork server, worker or other (the resource tracker)."""
    if p.pid == root.pid:
        return "driver"
    line = " ".join(p.cmdline())
    if "forkserver" in line and p.ppid() == root.pid:
        return "fork server"
    return "worker" if "forkserver" in line else "other"


def watch(proc: subprocess.Popen) -> tuple[list[tuple[float, float]], dict]:
    """Until `proc` ends: [(seconds since start, idle cores)] and {(pid, role): CPU seconds}."""
    cores, samples, cpu = os.cpu_count() or 1, [], {}
    root, start, last = psutil.Process(proc.pid), time.time(), busy_cores()
    while proc.poll() is None:
        time.sleep(TICK)
        now = busy_cores()
        if now[0] > last[0]:
            samples.append((time.time() - start, cores * (now[1] - last[1]) / (now[0] - last[0])))
        last = now
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                t = p.cpu_times()
                cpu[(p.pid, role(p, root))] = t.user + t.system
            except psutil.Error:
                pass
    return samples, cpu


def idle_between(samples: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Idle core-seconds sampled in [lo, hi)."""
    return sum(idle * TICK for t, idle in samples if lo <= t < hi)


def one_run(urls, out, a: argparse.Namespace) -> None:
    """Run the engine once and print its timeline."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "engine", "shards", str(urls), "--output", str(out), "--workers", str(a.workers),
           "--concurrency", "64", "--shard-size", str(a.shard_size), "--image-size", "512", "--min-image-size", "512",
           "--max-aspect-ratio", "2", "--timeout", "10", "--retries", "2", "--no-progress",
           "--allow-private-network", *a.engine_args]
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples, cpu = watch(proc)
    wall = time.time() - start
    shards = [json.loads(p.read_text()) for p in sorted(out.glob("[0-9]*.stats.json"))]
    ok = sum(s["written"] for s in shards)
    first = min(s["window"][0] for s in shards) - start
    last = max(s["window"][1] for s in shards) - start
    by_role: dict[str, list[float]] = {}
    for (_, kind), seconds in sorted(cpu.items()):
        by_role.setdefault(kind, []).append(seconds)
    print(f"{ok} ok in {wall:.2f} s = {ok / wall:.1f} img/s; tree CPU {sum(cpu.values()):.2f} s "
          f"({1000 * sum(cpu.values()) / max(ok, 1):.2f} ms/img): "
          + ", ".join(f"{k} {' / '.join(f'{s:.2f}' for s in v)}" for k, v in by_role.items()))
    print(f"first shard at {first:.2f} s, last shard done at {last:.2f} s, exit {wall - last:.2f} s later")
    print(f"idle core-s: before the first shard {idle_between(samples, 0, first):.2f}, during the shards "
          f"{idle_between(samples, first, last):.2f}, after {idle_between(samples, last, wall + 1):.2f}")
    for s in shards:
        print(f"  shard {s['shard']} pid {s.get('pid')}: {s['window'][0] - start:.2f}-{s['window'][1] - start:.2f} s, "
              f"{s['written']} written, {s['cpu_ms']['total'] / 1000:.2f} CPU-s")


def main(argv: list[str] | None = None) -> None:
    """Serve the corpus, run the engine `repeat` times, print each run's timeline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="rows of the bench corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--server", choices=("auto", "nginx", "aiohttp"), default="auto", help="as bench.engine_bench")
    ap.add_argument("engine_args", nargs="*", help="extra engine flags (after --)")
    a = ap.parse_args(argv)
    a.shard_size = EB.default_shard_size(a.n, a.workers)
    folder = EB.cached_corpus(2000, 0)
    a.server_processes = 1
    with EB.serving(folder, a) as server:
        print(f"served by {a.served_by}")
        full = EB.url_list(folder, server.base_url, EB.WORK / "run" / "tl-urls.parquet")
        urls = full.with_name("tl-n.parquet")
        pq.write_table(pq.read_table(full).slice(0, a.n), urls)
        for _ in range(a.repeat):
            one_run(urls, EB.WORK / "run" / "tl", a)


if __name__ == "__main__":
    main()
