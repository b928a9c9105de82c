"""engine.atomic: a file or folder under its final name is always whole; a failed write leaves the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.atomic import write_dir_atomic, write_text_atomic


def test_failed_folder_write_keeps_the_old_folder_and_no_temporary(tmp_path):
    """A writer that fails half-way leaves the previous folder as it was and nothing else."""
    final = tmp_path / "controlnet"
    write_dir_atomic(final, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"old")))

    def half(tmp):
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir_atomic(final, half)
    assert [p.name for p in tmp_path.iterdir()] == ["controlnet"]
    assert (final / "w.bin").read_bytes() == b"old"
    write_dir_atomic(final, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"new")))
    assert [p.name for p in final.iterdir()] == ["w.bin"] and (final / "w.bin").read_bytes() == b"new"


def test_text_write_replaces_whole(tmp_path):
    """The file is replaced by one rename; no temporary sibling stays."""
    path = tmp_path / "log.jsonl"
    write_text_atomic(path, "a\n")
    write_text_atomic(path, "b\n")
    assert path.read_text() == "b\n" and [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


# A folder write over an existing folder, SIGKILLed (an audit hook) once the old folder's deletion has
# removed its first file; FALLBACK makes the system look unable to swap two paths.
KILL_WHILE_REPLACING = """
import os, signal, sys
from pathlib import Path
from engine import atomic
if sys.argv[2] == "fallback":
    atomic.exchange = lambda a, b: False
seen = []
def hook(event, args):
    if event == "shutil.rmtree":
        seen.append(args[0])
    elif event == "os.remove" and seen:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
def write(tmp):
    tmp.mkdir()
    for name in ("config.json", "weights.bin"):
        (tmp / name).write_text("new " + name)
atomic.write_dir_atomic(Path(sys.argv[1]), write)
"""


@pytest.mark.parametrize("how", ["exchange", "fallback"])
def test_a_kill_while_the_old_folder_is_deleted_leaves_the_new_one_whole(tmp_path, how):
    """Found reading engine.atomic after the trainer's stress: publish_dir deleted the old folder in place before
    renaming the new one, so a kill during that deletion (a re-run's export over the last one: 1.4 GB for SD 1.5)
    left a half-deleted final folder and the whole new one under a temporary name, which the next run removed.
    The old folder is now swapped out (or renamed aside) first and deleted under a temporary name."""
    import signal
    import subprocess
    import sys

    from trainer.checkpoint import STALE_WRITE_RE

    final = tmp_path / "controlnet"
    final.mkdir()
    for name in ("config.json", "weights.bin"):
        (final / name).write_text("old " + name)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", KILL_WHILE_REPLACING, str(final), how], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    assert {p.name: p.read_text() for p in final.iterdir()} == {"config.json": "new config.json",
                                                               "weights.bin": "new weights.bin"}
    left = [p.name for p in tmp_path.iterdir() if p != final]
    assert len(left) == 1 and STALE_WRITE_RE.match(left[0]), left  # the old folder, part-deleted: a temporary
