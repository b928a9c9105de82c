"""Build a corpus: the files and the parquet whose rows point at a base URL."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pyarrow.parquet as pq

from .cases import (
    add_body_cases,
    add_caption_cases,
    add_good,
    add_http_cases,
    add_metadata_cases,
    add_redirect_and_optout_cases,
)
from .laion import build_laion_rows
from .rows import Builder, write_parquet
from .serve import CorpusServer


def build_corpus(
    out_dir: str | Path,
    base_url: str,
    *,
    n_images: int = 40,
    profile: str = "small",
    seed: int = 0,
    bad_cases: bool | None = None,
    bomb_pixels: int = 20000 * 20000,
    invalid_utf8: bool = True,
    workers: int | None = None,
) -> Path:
    """Write out_dir/files/* and out_dir/corpus.parquet (rows pointing at base_url); return the parquet.

    profile "small": n_images good images in every format plus, when bad_cases (default on), one
    row per bad case. profile "laion": n_images JPEGs with the LAION-aesthetics size distribution,
    bad cases off by default. Deterministic for a given seed (same files, same rows, same order).
    invalid_utf8 adds a caption whose bytes are not valid UTF-8 (see docs/CORPUS.md).
    """
    if profile not in ("small", "laion"):
        raise ValueError(f"profile must be 'small' or 'laion', not {profile!r}")
    out = Path(out_dir)
    rng = random.Random(seed)
    b = Builder(out, base_url, rng)
    if profile == "laion":
        build_laion_rows(b, n_images, seed, workers)
    else:
        add_good(b, n_images)
    if bad_cases if bad_cases is not None else profile == "small":
        add_metadata_cases(b)
        add_http_cases(b)
        add_redirect_and_optout_cases(b)
        add_body_cases(b, bomb_pixels)
        add_caption_cases(b, invalid_utf8)
        rng.shuffle(b.rows)  # bad rows spread over shards, as in a real dump
    path = out / "corpus.parquet"
    write_parquet(b.rows, path)
    return path


def serve_and_build(out_dir: str | Path, *, port: int = 0, **kw) -> CorpusServer:
    """Start a CorpusServer on out_dir, build the corpus for its URL; the server has .parquet set.

    Usage: `with serve_and_build(tmp) as srv: run_engine(srv.parquet)`.
    """
    server = CorpusServer(out_dir, port=port).start()
    try:
        server.parquet = build_corpus(out_dir, server.base_url, **kw)
    except BaseException:
        server.stop()
        raise
    return server


def summary(parquet: Path) -> str:
    """Rows per expected outcome, one line."""
    table = pq.read_table(parquet, columns=["expected_outcome"])
    counts = collections.Counter(table.column(0).to_pylist())
    return f"{table.num_rows} rows: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
