"""engine.atomic: a file or folder under its final name is always whole; a failed write leaves the old one."""

from __future__ import annotations

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
