"""bench.scaling's all-busy rate: rows/s only while every worker process had a shard running."""

from __future__ import annotations

import pytest

from bench.scaling import busy_rate


def shard(pid: int, start: float, end: float, rows: int) -> dict:
    return {"host": "h", "pid": pid, "window": [start, end], "rows": rows}


def test_the_last_waves_tail_is_left_out():
    """Worker 1 ends at t=10, worker 2 runs on alone until t=15: only 0-10 counts, with each shard's share."""
    stats = [shard(1, 0, 5, 100), shard(1, 5, 10, 100), shard(2, 0, 5, 100), shard(2, 5, 15, 200)]
    # inside 0-10: 100 + 100 + 100 + half of the last shard's 200 rows
    assert busy_rate(stats) == pytest.approx(400 / 10)
    steady = sum(s["rows"] for s in stats) / 15
    assert busy_rate(stats) > steady  # the tail weighs on the first-to-last figure only


def test_a_worker_that_starts_late_moves_the_window_start():
    stats = [shard(1, 0, 10, 100), shard(2, 4, 10, 60)]
    assert busy_rate(stats) == pytest.approx((60 + 60) / 6)


def test_no_common_window_gives_none():
    assert busy_rate([shard(1, 0, 5, 10), shard(2, 6, 9, 10)]) is None


def test_the_recorded_shard_size_is_the_one_the_run_used():
    from bench.scaling import last_value

    assert last_value(["--shard-size", "25", "--workers", "2", "--shard-size", "500"], "--shard-size") == 500
    assert last_value(["--shard-size", "25", "--shard-size=40"], "--shard-size") == 40
