"""The GPU benchmark's arithmetic, on hand-made inputs: bench/trace_summary.py (GPU busy time is the union of kernel
intervals) and bench/train_bench.py's rates over alternating loader and resident phases."""

from bench.trace_summary import summarize, union_ms
from bench.train_bench import PHASE_SKIP, phase_rate


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


def test_phase_rate_skips_each_phase_start_and_sums_the_phases_of_one_kind():
    # records every 5 steps; phases: resident 100-150, loader 150-200, resident 200-250 (10 steps/s resident,
    # 5 steps/s loader), with a slow first record in each phase that the skip leaves out
    records, t = [{"step": 100, "time": 0.0}], 0.0
    for first, last, rate in ((100, 150, 10.0), (150, 200, 5.0), (200, 250, 10.0)):
        for step in range(first + 5, last + 1, 5):
            t += 5 / rate if step > first + PHASE_SKIP else 5.0
            records.append({"step": step, "time": t})
    phases = [("resident", 100, 150), ("loader", 150, 200), ("resident", 200, 250)]
    assert phase_rate(records, phases, "resident", samples_per_step=8) == 80.0
    assert phase_rate(records, phases, "loader", samples_per_step=8) == 40.0
    assert phase_rate(records, [], "loader", samples_per_step=8) != phase_rate(records, [], "loader", 8)  # nan


def test_a_saved_result_renders_under_its_own_title_with_ratios_against_the_peer():
    from bench.train_bench import TITLE, markdown

    ours = {"batch": 8, "accum": 1, "levels": 1, "cuda_graphs": True, "samples_per_s": 84.0, "mfu": 0.28,
            "flops_per_sample": 2.5e12, "peak_allocated_gib": 8.3, "peak_reserved_gib": 10.3}
    res = {"gpu": "card", "torch": "t", "diffusers": "d", "bnb": "b", "workers": 8, "peak_tflops": 700.0,
           "peak_flops": 7e14, "runs": {"peer-b8": {"batch": 8, "accum": 1, "samples_per_s": 28.0,
                                                    "peak_allocated_gib": 9.4, "peak_reserved_gib": 10.6},
                                        "ours-b8-l1-graphs": ours}}
    text = markdown(res, "### later call")
    assert text.startswith("### later call\n") and TITLE not in text
    assert "--checkpoint-levels 1 --cuda-graphs` | 84.0 | **3.00x** | 8.3 GiB" in text
    assert "| b8 | diffusers, batch 8 x accumulation 1 | 28.0 | 1.00x | 9.4 GiB | 10.6 GiB | 10.0% |" in text
    assert markdown(res).startswith(TITLE)
