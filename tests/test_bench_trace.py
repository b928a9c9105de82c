"""bench/trace_summary.py on a hand-made Chrome trace: GPU busy time is the union of kernel intervals."""

from bench.trace_summary import summarize, union_ms


def test_union_merges_overlaps_and_reports_gaps():
    total, gaps = union_ms([(0, 1000), (500, 2000), (4000, 5000)])
    assert total == 2.0 + 1.0
    assert gaps == [2.0]


def test_summary_of_two_steps():
    def ev(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    trace = {"traceEvents": [
        ev("cpu_op", "aten::mm", 0, 10_000), ev("cpu_op", "aten::mm", 10_000, 10_000),
        ev("cuda_runtime", "cudaStreamSynchronize", 15_000, 3_000),
        ev("kernel", "gemm", 1_000, 4_000, tid=7), ev("kernel", "gemm", 3_000, 4_000, tid=8),
        ev("kernel", "gemm", 12_000, 2_000, tid=7), ev("gpu_memcpy", "HtoD", 16_000, 1_000, tid=9),
    ]}
    s = summarize(trace, steps=2)
    assert s["wall_ms_per_step"] == 10.0
    assert s["gpu_busy_ms_per_step"] == (6 + 2 + 1) / 2
    assert s["gaps_over_1ms_per_step"] == 1.0  # 7->12 ms and 14->16 ms are over 1 ms: two gaps over two steps
    assert s["runtime_calls_per_step"]["cudaStreamSynchronize"] == [0.5, 1.5]
    assert s["threads"]["1"]["aten::mm"] == 10.0
    assert summarize({"traceEvents": []}, steps=1) == {"error": "no CPU or GPU events in the trace"}
