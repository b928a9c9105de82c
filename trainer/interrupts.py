"""The trainer's Ctrl-C / SIGTERM outside the training loop (loading, the final save and export), kept apart
from trainer.cli so that trainer.train can ask for a signal whose exception Python dropped without importing the
CLI, and so that the CLI installs its handler before torch is imported. trainer.loop.StopSignal handles the
signals inside the loop.
"""

from __future__ import annotations

from engine.stopping import raise_interrupted

_raised: list[int] = []
"""Signals `interrupt` raised for in this run (see unraised_signal)."""


def interrupt(signum, frame) -> None:
    """Signal handler outside the loop (trainer.loop.StopSignal replaces it inside): stop at once."""
    _raised.append(signum)
    raise_interrupted(signum)


def unraised_signal() -> int | None:
    """A signal `interrupt` raised for whose exception never reached trainer.cli.main(), and forgets it.

    A handler runs wherever Python is: inside a weakref callback or a __del__ (importlib's module locks while
    diffusers imports, say) the Interrupted it raises is printed as `Exception ignored in ...` and dropped, and the
    run went on to train to its end. main() ends the run on the ones that reach it; the loop asks for the others
    when it starts (trainer.train), and stops at its first step, saved."""
    signum = _raised[-1] if _raised else None
    _raised.clear()
    return signum


def forget() -> None:
    """A new run (trainer.cli.main): no signal raised for yet."""
    _raised.clear()


def unraisable_hook(previous):
    """sys.unraisablehook without the `Exception ignored in ...` traceback of our own signal handlers' exceptions
    (Interrupted, the loop's second Ctrl-C): the handlers note them, and the run stops on them all the same
    (unraised_signal, trainer.loop.StopSignal.__exit__); anything else is reported as before."""
    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)
    return hook
