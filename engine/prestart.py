"""The fork server of `--runner processes`, started before the driver's own imports and planning.

A module with nothing heavy to import, so the CLI can call `start()` first thing: the fork server
then imports the shard stages (PRELOAD) on another core while the driver imports, checks the
output folder and plans, and the first worker forks from a ready server instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys

# Imported once by the fork server; every worker forks with them loaded. engine.forkwarm also loads
# Numba's kernels and tells pyarrow there is no pandas (see there): workers inherit both.
PRELOAD = ["engine.procs", "engine.shard", "engine.forkwarm"]


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


def start_early(argv: list[str]) -> None:
    """Launch the fork server before the CLI's own imports (numpy, Pillow, argparse's tables: ~0.25 s
    of a core while the other one idles) when `argv` is surely a `shards` run on the processes
    runner; the CLI's start() then finds it running. Anything else is left to the CLI, which knows."""
    if surely_processes_run(argv):
        start()


def surely_processes_run(argv: list[str]) -> bool:
    """Whether `argv` is `shards ...` keeping the default runner or naming `processes`: no help, no
    --ray-address, no other --runner (abbreviations included, as argparse accepts them)."""
    if argv[:1] != ["shards"]:
        return False
    args = argv[1:]
    for i, arg in enumerate(args):
        if arg in ("-h", "--help") or arg.startswith("--ra"):
            return False
        if arg.startswith("--ru"):
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if value != "processes":
                return False
    return True


def arrow_without_pandas() -> None:
    """Let pyarrow build arrays from Python lists in this process without importing pandas.

    pyarrow asks once per process whether pandas is importable (on its first `pa.array` of a list,
    to rule pandas objects out) and imports all of it, ~0.3-0.4 CPU-s, if it is. Answered "no" here
    while pandas is not imported; `import pandas` works again right after, and pyarrow's pandas
    functions (`to_pandas`) still import it when called. Only for processes of our own (the CLI,
    the fork server): a library caller may hand pyarrow pandas objects later."""
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    with refused("pandas"):
        pa.array([0])


@contextlib.contextmanager
def refused(*names: str):
    """Inside the block, importing `names` or their submodules fails (those not imported already)."""
    hook = _Refuse(names)
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        sys.meta_path.remove(hook)


class _Refuse:
    """An import hook that refuses some modules and leaves every other import to the usual finders."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        """ModuleNotFoundError for a refused module, None (ask the next finder) for the rest."""
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
