"""Atomic writes: a file (or folder) is written under a temporary name, flushed, then renamed into place.

So a file with its final name is always whole, whoever reads it after whatever crash. The data
engine writes its shards, parquet and stats this way (engine.write); the trainer its checkpoints,
precomputed shards and logs (trainer.checkpoint, trainer.precompute, trainer.metrics).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path(final: Path) -> Path:
    """A unique temporary sibling of `final` (two attempts at one file never share one)."""
    return final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (its renames) to disk, so a done marker never outlives its data."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network and FUSE file systems cannot flush a folder; their renames are as durable as
        # they make them, and failing every write there would help no one.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (before the rename that vouches for it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def stage(final: Path, write: Callable[[Path], object]) -> Path:
    """Write a flushed temporary sibling of `final` with `write`; nothing is left if that fails."""
    tmp = tmp_path(final)
    try:
        write(tmp)
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(final: Path, write: Callable[[Path], object]) -> None:
    """Write `final` through a flushed temporary sibling and one rename (`write` fills the path it is given)."""
    os.replace(stage(final, write), final)


def write_text_atomic(final: Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    write_atomic(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below `folder`, and `folder` itself."""
    for path in sorted(folder.rglob("*")):
        (fsync_dir if path.is_dir() else fsync_file)(path)
    fsync_dir(folder)


RENAME_EXCHANGE = 2  # renameat2(2): swap two paths in one step (Linux 3.15+, most local file systems)


@functools.cache
def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, glibc before 2.28)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_cwd = -100  # AT_FDCWD: both paths as given
    return fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0


def publish_dir(tmp: Path, final: Path) -> None:
    """Flush a finished temporary folder and rename it to `final`, then flush the parent.

    An older `final` is swapped with `tmp` in one step and deleted from there: deleting it in place
    first (as before) left a half-deleted export or checkpoint when a kill landed in between, and the
    whole new folder under a temporary name that the next run removes. Where the file system cannot
    swap, the old folder is renamed aside first, which narrows that window to two renames. Either
    way what a kill leaves besides `final` has a temporary name (the trainer's next start removes it).
    """
    fsync_tree(tmp)
    old = None
    if final.exists():
        if exchange(tmp, final):
            old = tmp
        else:
            old = tmp_path(final)
            os.replace(final, old)
    if old is not tmp:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def write_dir_atomic(final: Path, write: Callable[[Path], object]) -> None:
    """Write folder `final` through a temporary sibling folder (`write` fills the path it is given)."""
    tmp = tmp_path(final)
    try:
        write(tmp)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
