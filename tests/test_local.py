"""engine/local.py: rows naming files on disk, read only inside an explicit --local-root."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import local
from engine import outcomes as O
from engine.config import EngineConfig
from engine.pipeline import run

from .conftest import encode, run_rows, scaled

MAX = 1 << 20


@pytest.fixture
def tree(tmp_path, astronaut, coffee) -> Path:
    """root/ with a photo and a subfolder; a secret beside root; symlinks pointing in and out."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(encode(scaled(astronaut, 640, 560)))
    (root / "sub" / "b.jpg").write_bytes(encode(scaled(coffee, 600, 700)))
    (tmp_path / "secret.txt").write_text("root:x:0:0")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.txt")
    (root / "inside.jpg").symlink_to(root / "a.jpg")
    os.mkfifo(root / "fifo.jpg")
    return root


@pytest.mark.parametrize("url", ["a.jpg", "sub/b.jpg", "{root}/a.jpg", "file://{root}/sub/b.jpg", "inside.jpg",
                                 "file://localhost{root}/a.jpg", "sub/../a.jpg"])
def test_files_inside_the_root_are_read(tree, url):
    got = local.read(url.format(root=tree), (str(tree),), MAX)
    assert got.outcome is None and got.body[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "../secret.txt", "sub/../../secret.txt",
                                 "escape.jpg", "{root}/../secret.txt", "file://otherhost{root}/a.jpg", ""])
def test_paths_outside_the_root_are_refused(tree, url):
    got = local.read(url.format(root=tree), (str(tree),), MAX)
    assert got.outcome == O.INVALID_URL and got.body is None and "refused" in got.reason


def test_missing_fifo_and_folders_are_counted_not_read(tree):
    for name, outcome in (("nope.jpg", O.HTTP_ERROR), ("fifo.jpg", O.HTTP_ERROR), ("sub", O.HTTP_ERROR)):
        got = local.read(name, (str(tree),), MAX)
        assert got.outcome == outcome and got.body is None, name
    assert local.read("a.jpg", (str(tree),), 1024).outcome == O.TOO_LARGE


@pytest.mark.slow
def test_a_run_reads_local_rows_only_with_a_root(tree, tmp_path):
    urls = ["a.jpg", f"file://{tree}/sub/b.jpg", "/etc/passwd", "escape.jpg", "missing.jpg", f"{tree}/fifo.jpg"]
    parquet = tmp_path / "local.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"t{i}" for i in range(len(urls))]}), parquet)
    want = [O.OK, O.OK, O.INVALID_URL, O.INVALID_URL, O.HTTP_ERROR, O.HTTP_ERROR]
    cfg = EngineConfig(inputs=(str(parquet),), output=str(tmp_path / "with"), runner="local", progress=False,
                       local_roots=(str(tree),))
    assert run(cfg)["outcomes"] == {O.OK: 2, O.INVALID_URL: 2, O.HTTP_ERROR: 2}
    assert run_rows(tmp_path / "with").column("outcome").to_pylist() == want
    without = run(EngineConfig(inputs=(str(parquet),), output=str(tmp_path / "without"), runner="local",
                               progress=False))
    assert without["outcomes"] == {O.INVALID_URL: len(urls)}
