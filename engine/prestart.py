"""The fork server of `--runner processes`, started before the driver's own imports and planning.

A module with nothing heavy to import, so the CLI can call `start()` first thing: the fork server
then imports the shard stages (PRELOAD) on another core while the driver imports, checks the
output folder and plans, and the first worker forks from a ready server instead of waiting for it.
"""

from __future__ import annotations

import multiprocessing as mp

# Imported once by the fork server; every worker forks with them loaded. pandas: pyarrow imports it
# the first time a shard's parquet is built from Python lists (pa.array checks for pandas types),
# ~0.45 CPU-s that each worker paid during its first shard.
PRELOAD = ["engine.procs", "engine.shard", "pandas"]


def context():
    """The forkserver context with the shard stages preloaded (never fork: the driver has threads)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Launch the fork server now (idempotent); it preloads while this process goes on."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()
