"""What the runners share (engine/runners.py): the retry policy, a progress count that a retried
shard does not inflate, and a run on worker processes that never loads Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import EngineConfig
from engine.plan import Shard
from engine.runners import Progress, settle

from .conftest import encode, photo, scaled


def shard(shard_id: int) -> Shard:
    """A shard of no rows: settle only reads its id."""
    return Shard(shard_id=shard_id, first_row=0, table=pa.table({"URL": pa.array([], pa.string())}))


@pytest.mark.quick
def test_a_retried_shard_is_counted_once_and_late_counts_of_its_failed_attempt_are_ignored():
    p = Progress(total=100, initial=0, enabled=False)
    p.add(10, 8, shard=0, attempt=1)
    p.add(7, 7, shard=1, attempt=1)
    p.retry(0, 2)  # shard 0's first attempt failed after counting 10 rows
    assert (p.rows, p.written) == (7, 7)
    p.add(3, 3, shard=0, attempt=1)  # arrives after the failure (Ray's counter actor is asynchronous)
    p.add(10, 9, shard=0, attempt=2)
    assert (p.rows, p.written) == (17, 16)
    p.close()


@pytest.mark.quick
def test_settle_retries_a_failed_shard_until_shard_retries_run_out(capsys):
    cfg = EngineConfig(inputs=("x",), output="o", max_retries=2)
    p = Progress(total=10, initial=0, enabled=False)
    done: list[dict] = []
    failed = {"shard": 4, "ok": False, "error": "worker process died (signal 9)"}
    p.add(5, 5, shard=4, attempt=1)
    assert settle(cfg, shard(4), 1, failed, p, done.append) == 2
    assert p.rows == 0 and done == []
    assert settle(cfg, shard(4), 2, failed, p, done.append) == 3
    assert settle(cfg, shard(4), 3, failed, p, done.append) is None and done == [failed]
    assert capsys.readouterr().err.count("shard 00004 attempt") == 2
    ok = {"shard": 5, "ok": True, "stats": {}}
    assert settle(cfg, shard(5), 1, ok, p, done.append) is None and done[-1] is ok
    p.close()


RUN_AND_LIST_MODULES = """
import json, sys
from engine.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")),
                  "numba": "numba" in sys.modules}))
"""


def test_a_run_on_worker_processes_never_imports_ray(tmp_path):
    """The default runner on one machine, a real run: the driver ends without Ray in sys.modules, and
    without Numba (its index stayed under the first band tables: engine/hamming_kernels.py never loaded)."""
    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee"):
        (tmp_path / "photos" / f"{name}.jpg").write_bytes(encode(scaled(photo(name), 320, 300)))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, "shards", str(tmp_path / "photos"),
                          "--output", str(out), "--workers", "2", "--no-progress", "--min-image-size", "256",
                          "--image-size", "256"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "ray": [], "numba": False}
    stats = json.loads((Path(out) / "stats.json").read_text())
    assert stats["config"]["runner"] == "processes" and stats["outcomes"] == {"ok": 2}


WORKER_STATE = """
import json, sys
from engine import prestart

def state():
    from engine import condition, hashes
    import pyarrow as pa
    loaded = {"phash": len(hashes._phash_kernel.signatures), "cells": condition._build_table.cache_info().currsize}
    pa.table({"url": ["a", None]})  # a shard's parquet is built from lists like this
    return {**loaded, "pandas": "pandas" in sys.modules}

if __name__ == "__main__":
    prestart.start()
    with prestart.context().Pool(1) as pool:
        print(json.dumps(pool.apply(state)))
"""


def test_workers_fork_with_numba_kernels_loaded_and_never_import_pandas(tmp_path):
    """The fork server loads the default path's Numba kernels once (engine/forkwarm.py): a worker
    starts with them, and building its parquet from lists does not import pandas."""
    script = tmp_path / "worker_state.py"
    script.write_text(WORKER_STATE)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads(res.stdout.strip().splitlines()[-1])
    assert state["phash"] >= 1 and state["cells"] == 1 and state["pandas"] is False


@pytest.mark.quick
def test_arrow_without_pandas_leaves_pandas_importable():
    code = ("import sys; from engine.prestart import arrow_without_pandas; arrow_without_pandas(); "
            "import pyarrow as pa; t = pa.table({'a': ['x', None], 'b': [1, None]}); "
            "assert 'pandas' not in sys.modules; import pandas; df = t.to_pandas(); "
            "assert df['a'].tolist()[0] == 'x' and df['b'].isna().tolist() == [False, True]; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.quick
@pytest.mark.parametrize(("argv", "early"), [
    (["shards", "in.parquet", "--output", "o"], True),
    (["shards", "in.parquet", "--runner", "processes"], True),
    (["shards", "in.parquet", "--runner=processes", "--workers", "2"], True),
    (["shards", "in.parquet", "--runner", "local"], False),
    (["shards", "in.parquet", "--run=ray"], False),  # argparse's abbreviations count too
    (["shards", "in.parquet", "--runner"], False),  # argparse will refuse it; nothing started
    (["shards", "in.parquet", "--ray-address", "auto"], False),
    (["shards", "in.parquet", "--ray_address=auto"], False),
    (["shards", "--help"], False),
    (["condition", "a.jpg"], False),
    ([], False),
])
def test_the_fork_server_starts_before_the_cli_imports_only_for_a_processes_run(argv, early):
    """engine/__main__.py starts the fork server first thing only when the run surely uses it."""
    from engine.prestart import surely_processes_run

    assert surely_processes_run(argv) is early


def test_ray_runner_defers_a_first_ctrl_c_to_between_ray_calls():
    """The Ray run loop's first SIGINT only sets its flag (raised inside a Ray call it can crash Ray's core worker);
    a second one interrupts at once, and the handlers are back as they were afterwards."""
    import os
    import signal
    import time

    from engine.rayrun import deferred_signals

    # A process started in the background by a non-interactive shell inherits SIGINT ignored, which
    # deferred_signals rightly leaves so: give this test Python's usual handler, as a terminal's command has it.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with deferred_signals() as stopped:
            assert not stopped()
            os.kill(os.getpid(), signal.SIGINT)
            assert stopped()  # no KeyboardInterrupt: the loop raises it at its next check
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # Python runs the handler at once, and the interrupt ends this sleep
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_ignored_ctrl_c_stays_ignored_in_the_ray_run_loop():
    """Started with SIGINT ignored (nohup-like, or a background job of a script), the run loop installs nothing."""
    import signal

    from engine.rayrun import deferred_signals

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_signals() as stopped:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not stopped()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


SIGTERM_WHILE_IMPORTING = """
import os, signal, sys

class SignalOnImport:
    '''Sends this process SIGTERM as `engine.pipeline` starts to import: a scheduler's stop that lands
    after the CLI installed its handler but before the run began (measured: 0.3-0.5 s into a real start).'''

    def find_spec(self, name, path=None, target=None):
        if name == "engine.pipeline":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SignalOnImport())
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_before_the_run_starts_exits_143_with_one_line_and_no_traceback(tmp_path):
    """A SIGTERM (or Ctrl-C) during the CLI's imports and planning took the clean path only once `run`
    had begun: earlier, a KeyboardInterrupt traceback and exit -2 (SIGINT). Now exit 143 (128 + SIGTERM) and the one line."""
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a"]}), parquet)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_IMPORTING, "shards", str(parquet), "--output", str(out),
                          "--runner", "local", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == \
        "interrupted: complete shards are kept; rerun the same command to resume"
    assert not out.exists()  # stopped before the output folder was touched


SIGTERM_AROUND_RAY = """
import os, signal, sys
import ray._private.utils as ray_utils
import engine.rayrun as R

def term():
    os.kill(os.getpid(), signal.SIGTERM)

moment = sys.argv.pop(1)
if moment == "in_ray_init":  # just after ray.init put in its own handler, before it returned
    set_handler = ray_utils.set_sigterm_handler
    def set_then_term(handler):
        set_handler(handler)
        ray_utils.set_sigterm_handler = set_handler
        term()
    ray_utils.set_sigterm_handler = set_then_term
elif moment == "after_ray_init":  # Ray up, the run loop not yet begun
    write_token = R.write_token
    def term_then_write(*args):
        term()
        write_token(*args)
    R.write_token = term_then_write
else:  # "after_ray_shutdown": every shard done, Ray stopped, the summary not yet printed
    leave = R.RayRunner.__exit__
    def leave_then_term(self, *exc):
        leave(self, *exc)
        term()
    R.RayRunner.__exit__ = leave_then_term
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("moment", ["in_ray_init", "after_ray_init", "after_ray_shutdown"])
def test_sigterm_around_the_ray_run_loop_exits_143_with_one_line(tmp_path, moment):
    """ray.init swaps the CLI's SIGTERM handler for its own (sys.exit(15)) and, after ray.shutdown, Ray's core
    worker leaves SIGTERM at its default action: a scheduler's stop outside the run loop ended `--runner ray` with
    exit 15 or -15 and no message (seen killing random runs). Now each window takes the clean path."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "coffee.jpg").write_bytes(encode(scaled(photo("coffee"), 320, 300)))
    res = subprocess.run([sys.executable, "-c", SIGTERM_AROUND_RAY, moment, "shards", str(tmp_path / "photos"),
                          "--output", str(tmp_path / "out"), "--runner", "ray", "--workers", "1", "--no-progress",
                          "--min-image-size", "256", "--image-size", "256"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == \
        "interrupted: complete shards are kept; rerun the same command to resume"


KILL_THE_INDEX_ACTOR = """
import signal, sys
import psutil
import engine.rayrun as R

settle = R.settle

def settle_then_kill(*args):
    '''After the first shard settles, SIGKILL the Ray worker process of the dedup index and progress actor
    (what the OOM killer or a stray kill does) and wait until it is gone.'''
    R.settle = settle
    actor = next(p for p in psutil.Process().children(recursive=True)
                 if (p.cmdline() or [""])[0].startswith("ray::IndexAndCounter"))
    actor.send_signal(signal.SIGKILL)
    actor.wait(30)
    return settle(*args)

R.settle = settle_then_kill
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_ray_index_actor_killed_mid_run_stops_the_run_in_one_line_and_a_rerun_finishes(tmp_path):
    """The actor holding the dedup index and the progress counts, SIGKILLed mid-run, crashed the driver with
    ActorDiedError's traceback (exit 1, seen killing random Ray workers). Now one line that says to rerun,
    exit 1, complete shards kept and stats.json written; the rerun finishes every row."""
    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (tmp_path / "photos" / f"{name}.jpg").write_bytes(encode(scaled(photo(name), 320, 300)))
    out = tmp_path / "out"
    args = ["shards", str(tmp_path / "photos"), "--output", str(out), "--runner", "ray", "--workers", "1",
            "--shard-size", "1", "--no-progress", "--min-image-size", "256", "--image-size", "256"]
    res = subprocess.run([sys.executable, "-c", KILL_THE_INDEX_ACTOR, *args], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray actor holding the dedup index and progress counts died mid-run")
    assert "rerun the same command to resume" in last and "rows pending]" in last
    assert json.loads((out / "stats.json").read_text())["outcomes"].get("pending")
    res = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["outcomes"] == {"ok": 3}
