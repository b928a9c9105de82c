"""What every runner shares: the progress display, the one retry policy, the driver-held dedup
index, and `LocalRunner` (threads of the driver's process).

A runner takes shards and hands each one's final status to `on_done`; between attempts it calls
`settle`, so a failed shard is retried alike on threads, worker processes (procs.py) and Ray
(rayrun.py), and the rows a failed attempt had counted are taken back from the display.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from . import dedup as D
from .config import EngineConfig
from .plan import Shard
from .sample import shard_name
from .storage import OutputError, RunnerLost  # noqa: F401 -- the Ray runner raises them from here


class Progress:
    """Rows finished and samples written, as the live bar and the final summary see them.

    Counts arrive per (shard, attempt); when a shard is retried, what its failed attempts counted
    is taken back and their late counts ignored, so a retried shard's rows are counted once."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.start, self.rows, self.written = time.monotonic(), 0, 0
        self.lock = threading.Lock()  # the local runner's threads report at once
        self.by_shard: dict[int, list[int]] = {}  # rows, written of each shard's current attempt
        self.attempt: dict[int, int] = {}  # only shards past their first attempt
        self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, disable=not enabled,
                        smoothing=0.1, file=sys.stderr)

    def add(self, rows: int, written: int, shard: int = -1, attempt: int = 1) -> None:
        """Count finished rows and written samples of `shard`'s attempt `attempt`."""
        with self.lock:
            if attempt < self.attempt.get(shard, 1):
                return  # a failed attempt's late count: its rows are being redone
            counted = self.by_shard.setdefault(shard, [0, 0])
            counted[0] += rows
            counted[1] += written
            self._move(rows, written)

    def retry(self, shard: int, attempt: int) -> None:
        """`shard` starts attempt `attempt`: take back what the failed attempts counted."""
        with self.lock:
            self.attempt[shard] = attempt
            rows, written = self.by_shard.pop(shard, (0, 0))
            self._move(-rows, -written)

    def _move(self, rows: int, written: int) -> None:
        """Change the totals and redraw (the lock is held)."""
        self.rows += rows
        self.written += written
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.update(rows)
        self.bar.set_postfix_str(
            f"{self.written / elapsed:.1f} img/s, ok {100 * self.written / max(self.rows, 1):.0f}%", refresh=False)

    def close(self) -> None:
        """Stop drawing."""
        self.bar.close()


def settle(cfg: EngineConfig, shard: Shard, attempt: int, status: dict, progress: Progress,
           on_done: Callable[[dict], None]) -> int | None:
    """The retry policy of every runner: after attempt `attempt` of `shard`, the next attempt's
    number when it failed and `--shard-retries` allow another (its counts taken back from
    `progress`), else None with the status handed to `on_done`. A failed shard's object store is
    asked whether it still answers: one gone mid-run stops the run (StoreLost), not each shard in turn."""
    if not status["ok"]:
        from .storage import store_of

        store_of(cfg).reachable()
    if status["ok"] or attempt > cfg.max_retries:
        on_done(status)
        return None
    print(f"shard {shard_name(shard.shard_id)} attempt {attempt} failed "
          f"({status.get('error', '')[:200]}); retrying", file=sys.stderr)
    progress.retry(shard.shard_id, attempt + 1)
    return attempt + 1


def driver_index(cfg: EngineConfig) -> list[D.DedupShard]:
    """The dedup index as plain objects of the driver's process (none when dedup is off)."""
    return [D.DedupShard(cfg.dedup.near_distance) for _ in range(cfg.dedup.index_shards)] \
        if cfg.dedup.enabled else []


def driver_client(index: list[D.DedupShard]) -> D.DedupClient | None:
    """A client calling the driver's index objects directly (the resume rebuild loads it this way)."""
    return D.DedupClient(index, D.direct_call) if index else None


class LocalRunner:
    """Runs shards on threads of this process (no Ray start, no worker processes); same
    interface as the other runners."""

    def __init__(self, cfg: EngineConfig, lease: str | None = None):
        self.cfg, self.lease = cfg, lease  # lease: the run id its shards are marked done under (object stores)
        self.index = driver_index(cfg)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def client(self) -> D.DedupClient | None:
        """The dedup index as plain objects."""
        return driver_client(self.index)

    def run(self, shards: Iterator[Shard], progress: Progress, on_done: Callable[[dict], None]) -> None:
        """Process `workers` shards at once on threads of this process (the CPU stages release the
        GIL); `settle` decides retries, on this thread."""
        from .shard import process_shard  # here, not at the top: only a local run needs it in the driver

        client = self.client()
        claim = client.claim if client else None
        origin = {"host": socket.gethostname()}
        running: dict = {}
        with ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="shard") as pool:

            def submit(shard: Shard, attempt: int) -> None:
                report = lambda rows, written: progress.add(rows, written, shard.shard_id, attempt)  # noqa: E731
                running[pool.submit(process_shard, shard, self.cfg, claim, report, origin, self.lease)] = (shard, attempt)

            def settle_some() -> None:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    shard, attempt = running.pop(future)
                    again = settle(self.cfg, shard, attempt, future.result(), progress, on_done)
                    if again:
                        submit(shard, again)

            for shard in shards:
                while len(running) >= self.cfg.workers:
                    settle_some()
                submit(shard, 1)
            while running:
                settle_some()
