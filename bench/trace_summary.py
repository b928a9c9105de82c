"""Where a traced stretch of training spent its time: GPU busy against wall time, per thread CPU, syncs.

bench/train_bench.py (`--trace N`) profiles N steps with the loader and N steps on GPU-resident batches
(torch.profiler, CPU and CUDA) and keeps this summary of each beside the gzipped Chrome trace. Read
side by side, the two tell whether the loader's steps are slower because the GPU idles (busy fraction
down, wall up: the host or the data is late) or because its kernels take longer (busy time up).

    python -m bench.trace_summary TRACE.json.gz   # prints the summary of a saved trace
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
WATCHED = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaHostAlloc",
           "cudaMalloc", "cudaFree", "cudaMemcpyAsync", "cudaStreamWaitEvent", "cudaLaunchKernel",
           "cuLaunchKernel", "cudaHostRegister")
"""CUDA runtime calls whose count and time say the most about host stalls."""


def union_ms(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total length (ms) of the union of (start, end) intervals in µs, and the gaps between them (ms)."""
    total, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append((s - end) / 1000)
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1000, gaps


def summarize(trace: dict, steps: int) -> dict:
    """Busy fraction of the GPU, idle gaps, per-thread top operators, watched runtime calls; per step in ms."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    cpu = [e for e in events if e.get("cat") == "cpu_op"]
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    if not cpu or not gpu:
        return {"error": "no CPU or GPU events in the trace"}
    t0 = min(e["ts"] for e in cpu)
    t1 = max(e["ts"] + e["dur"] for e in cpu + gpu)
    wall = (t1 - t0) / 1000
    busy, gaps = union_ms([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    streams = defaultdict(float)
    for e in gpu:
        streams[f"{e.get('cat')}@{e.get('tid')}"] += e["dur"] / 1000
    threads: dict = defaultdict(Counter)
    for e in cpu:
        threads[e.get("tid")][e["name"]] += e["dur"] / 1000
    runtime = Counter(), Counter()
    for e in events:
        if e.get("cat") == "cuda_runtime" and e["name"] in WATCHED:
            runtime[0][e["name"]] += 1
            runtime[1][e["name"]] += e["dur"] / 1000
    big = [g for g in gaps if g > 1.0]
    per = max(1, steps)
    return {
        "steps": steps, "wall_ms_per_step": round(wall / per, 2), "gpu_busy_ms_per_step": round(busy / per, 2),
        "gpu_busy_frac": round(busy / wall, 3), "gaps_over_1ms_per_step": round(len(big) / per, 2),
        "gap_ms_over_1ms_per_step": round(sum(big) / per, 2), "longest_gaps_ms": sorted(big)[-5:],
        "gpu_ms_per_step": {k: round(v / per, 2) for k, v in sorted(streams.items(), key=lambda kv: -kv[1])[:6]},
        "threads": {str(tid): {name: round(ms / per, 2) for name, ms in ops.most_common(12)}
                    for tid, ops in sorted(threads.items(), key=lambda kv: -sum(kv[1].values()))[:4]},
        "runtime_calls_per_step": {k: [round(n / per, 1), round(runtime[1][k] / per, 2)]
                                   for k, n in runtime[0].most_common()},
    }


def load(path: Path) -> dict:
    """A Chrome trace, gzipped or not."""
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, json.dumps(summarize(load(Path(arg)), steps=1), indent=1))
