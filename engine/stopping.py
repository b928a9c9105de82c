"""How a command of this project stops: the interrupt that carries its signal, and the process's last step.

Shared by the engine's CLI (and its Ray runner) and the trainer's; only the standard library is imported, so a
CLI can use it before its heavy imports.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or a scheduler's stop (SIGTERM) taking a command's clean path; its exit status is
    128 + `signum` (130, 143), as a shell reports a process the signal ended."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.signum = signum


def raise_interrupted(signum: int, frame=None) -> None:
    """A signal handler: stop with Interrupted(signum) wherever the program is (Ctrl-C's clean path)."""
    raise Interrupted(signum)


def exit_status(exc: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by `exc` (a plain KeyboardInterrupt is Ctrl-C's)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def exit_now(code: int) -> None:
    """End this process with `code` once Python's exit handlers (Ray's, multiprocessing's, torch's) have run,
    skipping the module teardown and the C++ libraries' static destructors; a signal meanwhile ends it at once with
    the same status.

    The command's work is done and its last line printed by then. Under load about one engine command in 70
    aborted in those destructors ("terminate called without an active exception", exit 134: pyarrow's idle thread
    pools), and a second Ctrl-C during the trainer's ~1.5 s of torch and diffusers teardown printed a
    KeyboardInterrupt traceback or ended the process by the signal (-2, -15) instead of its status."""
    if main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: os._exit(code))  # the last line is printed: nothing is left to write
    # Exempting what is alive from the interpreter's last garbage collections saves 0.1-0.2 s of every command
    # (~600 modules of numpy, pyarrow and Numba objects to traverse).
    gc.freeze()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def main_thread() -> bool:
    """Signal handlers can be set only in the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()
