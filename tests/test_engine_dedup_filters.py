"""Engine runs with duplicates across shards (Ray workers racing, a SIGKILL and a resume) and with
every optional filter on; each outcome is counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import outcomes as O
from engine.caption import clean_caption
from engine.config import DedupConfig, EngineConfig, FetchConfig, FilterConfig
from engine.pipeline import run

from .conftest import run_rows

pytestmark = pytest.mark.slow
FAST = FetchConfig(timeout=1.5, connect_timeout=1.0, retries=1, backoff=0.05, max_bytes=8 * 1024 * 1024,
                   allow_private_network=True)  # the corpus is served on loopback
GROUP_KINDS = ("original", "same_bytes_other_url", "reencoded_q70", "resized_85", "webp")


def outcomes_by_row(out: Path) -> dict[int, tuple[str, str]]:
    return {r["row"]: (r["outcome"], r["key"]) for r in run_rows(out).select(["row", "outcome", "key"]).to_pylist()}


@pytest.fixture(scope="module")
def dup_corpus(corpus, tmp_path_factory) -> tuple[Path, list[tuple[int, str]]]:
    """A parquet of groups (an original and four copies of it) laid out so that every copy of a group
    lands in another shard (shard size = number of groups), plus distinct photos that must all stay."""
    rows = pq.read_table(corpus.parquet, columns=["URL", "case", "expected_outcome", "WIDTH", "HEIGHT"]).to_pylist()
    good = [r["URL"] for r in rows if r["expected_outcome"] == O.OK and "/files/" in r["URL"]
            and r["case"] in ("jpeg", "jpeg_progressive", "png", "webp_lossless", "jpeg444", "png_palette")]
    files = Path(corpus.root) / "files"
    groups, distinct = good[:4], good[4:8]
    columns = {kind: [] for kind in GROUP_KINDS}
    for g, url in enumerate(groups):
        name = url.rsplit("/", 1)[1].split("?")[0]
        im = Image.open(files / name).convert("RGB")
        w, h = im.size
        im.save(files / f"dup{g}_q70.jpg", quality=70)
        im.resize((max(512, int(w * 0.85)), max(512, int(h * 0.85))), Image.Resampling.LANCZOS) \
            .save(files / f"dup{g}_small.jpg", quality=90)
        im.save(files / f"dup{g}.webp", quality=90)
        base = url.rsplit("/", 1)[0]
        columns["original"].append(url)
        columns["same_bytes_other_url"].append(url + ("&" if "?" in url else "?") + "mirror=1")
        columns["reencoded_q70"].append(f"{base}/dup{g}_q70.jpg")
        columns["resized_85"].append(f"{base}/dup{g}_small.jpg")
        columns["webp"].append(f"{base}/dup{g}.webp")
    urls, group_of = [], []
    for kind in GROUP_KINDS:  # kind-major: each shard holds one kind, so copies race across shards
        urls += columns[kind]
        group_of += [(g, kind) for g in range(len(groups))]
    urls += distinct
    group_of += [(-1, "distinct")] * len(distinct)
    path = tmp_path_factory.mktemp("dups") / "dups.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"photo {i}" for i in range(len(urls))]}), path)
    return path, group_of


def check_one_per_group(out: Path, group_of: list[tuple[int, str]]) -> dict[int, tuple[str, str]]:
    got = outcomes_by_row(out)
    assert sorted(got) == list(range(len(group_of)))
    per_group = defaultdict(list)
    for row, (group, kind) in enumerate(group_of):
        if group >= 0:
            per_group[group].append((kind, got[row][0]))
        else:
            assert got[row][0] == O.OK, f"distinct photo {row} dropped as {got[row][0]}"
    for group, kinds in per_group.items():
        outcomes = Counter(o for _, o in kinds)
        assert outcomes[O.OK] == 1, f"group {group}: {kinds}"
        assert outcomes[O.OK] + outcomes[O.DUPLICATE_EXACT] + outcomes[O.DUPLICATE_NEAR] == len(kinds), kinds
        by_kind = dict(kinds)
        if by_kind["original"] == O.OK:  # the same bytes at another URL is an exact duplicate
            assert by_kind["same_bytes_other_url"] == O.DUPLICATE_EXACT
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["outcomes"].values()) == stats["rows"] == len(group_of)
    assert stats["duplicate_clusters"] and all(c["example_url"].startswith("http") for c in stats["duplicate_clusters"])
    return got


@pytest.mark.parametrize("runner", ["ray", "processes"])
def test_duplicates_across_shards_and_ray_workers_are_written_once(dup_corpus, tmp_path, runner):
    parquet, group_of = dup_corpus
    n_groups = max(g for g, _ in group_of) + 1
    out = tmp_path / "out"
    # two index shards: claims of one group race across shards too (the three-phase path)
    run(EngineConfig(inputs=(str(parquet),), output=str(out), shard_size=n_groups, workers=2, fetch=FAST,
                     progress=False, runner=runner, dedup=DedupConfig(index_shards=2)))
    check_one_per_group(out, group_of)


def test_dedup_off_keeps_every_copy(dup_corpus, tmp_path):
    parquet, group_of = dup_corpus
    out = tmp_path / "out"
    cfg = EngineConfig(inputs=(str(parquet),), output=str(out), shard_size=8, workers=1, fetch=FAST,
                       progress=False, runner="local")
    run(EngineConfig(**{**cfg.__dict__, "dedup": DedupConfig(enabled=False)}))
    assert {o for o, _ in outcomes_by_row(out).values()} == {O.OK}


def test_sigkill_and_resume_never_duplicate_a_completed_shards_image(dup_corpus, tmp_path):
    parquet, group_of = dup_corpus
    n_groups = max(g for g, _ in group_of) + 1
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine", "shards", str(parquet), "--output", str(out), "--workers", "1",
           "--shard-size", str(n_groups), "--timeout", "1.5", "--retries", "1", "--no-progress", "--allow-private-network"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("*.stats.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("[0-9]*.tar")}
    done_before = {p.name.split(".")[0] for p in out.glob("[0-9]*.stats.json")}
    assert done_before and len(done_before) < 6, "the kill must land midway"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = check_one_per_group(out, group_of)
    for name in done_before:  # completed shards were kept as they were, their images still own the group
        assert (out / f"{name}.tar").stat().st_mtime_ns == before[f"{name}.tar"]
    assert not list(out.glob("*.tmp"))
    assert len({key for _, key in got.values()}) == len(group_of)


def expected_with_filters(row: dict, f: FilterConfig, gray_cases: set[str]) -> str:
    """What the engine must say about a corpus row with these filters on (same order as plan.prefilter)."""
    expected = row["expected_outcome"]
    if expected in (O.INVALID_URL, O.FILTERED_SIZE, O.FILTERED_ASPECT):
        return expected
    for column, limit, outcome, fails in (("punsafe", f.max_punsafe, O.FILTERED_PUNSAFE, float.__gt__),
                                          ("pwatermark", f.max_pwatermark, O.FILTERED_WATERMARK, float.__gt__),
                                          ("AESTHETIC_SCORE", f.min_aesthetic, O.FILTERED_AESTHETIC, float.__lt__),
                                          ("similarity", f.min_similarity, O.FILTERED_SIMILARITY, float.__lt__)):
        value = row[column]
        if value is not None and not np.isnan(value) and fails(float(value), limit):
            return outcome
    if not clean_caption(row["TEXT"]):
        return O.EMPTY_CAPTION
    if expected == O.OK and row["case"] in gray_cases:
        return O.LOW_COLOR
    return expected


def test_every_filter_outcome_is_counted(corpus, tmp_path):
    table = pq.read_table(corpus.parquet)
    q = {c: float(np.nanquantile(np.array(table.column(c).to_pylist(), float), 0.9 if c.startswith("p") else 0.1))
         for c in ("punsafe", "pwatermark", "AESTHETIC_SCORE", "similarity")}  # each catches ~10%
    filters = FilterConfig(max_punsafe=q["punsafe"], max_pwatermark=q["pwatermark"],
                           min_aesthetic=q["AESTHETIC_SCORE"], min_similarity=q["similarity"],
                           min_colorfulness=2.0, drop_empty_captions=True)
    out = tmp_path / "out"
    stats = run(EngineConfig(inputs=(str(corpus.parquet),), output=str(out), shard_size=16, workers=1,
                             fetch=FAST, filters=filters, progress=False, runner="local"))
    texts = table.column("TEXT").cast(pa.binary()).to_pylist()
    rows = table.drop(["TEXT"]).to_pylist()
    for row, text in zip(rows, texts, strict=False):
        row["TEXT"] = text
    gray = {"jpeg_gray", "png_gray", "png16_gray"}
    expected = Counter(expected_with_filters(r, filters, gray) for r in rows)
    assert stats["outcomes"] == dict(expected)
    for outcome in (O.FILTERED_PUNSAFE, O.FILTERED_WATERMARK, O.FILTERED_AESTHETIC, O.FILTERED_SIMILARITY,
                    O.EMPTY_CAPTION, O.LOW_COLOR):
        assert stats["outcomes"].get(outcome, 0) > 0, f"the corpus must exercise {outcome}"


def test_a_failing_dedup_index_fails_the_shard_instead_of_writing_it(corpus, tmp_path):
    """No tar, no stats, so the driver retries it or the rerun redoes it; rows are never lost."""
    from engine.plan import iter_shards
    from engine.shard import process_shard

    def broken_index(claims):
        raise ConnectionError("index actor died")

    cfg = EngineConfig(inputs=(str(corpus.parquet),), output=str(tmp_path), shard_size=16, workers=1,
                       fetch=FAST, progress=False, runner="local")
    shard = next(s for s in iter_shards(cfg.inputs, 16)
                 if "files/" in "".join(u or "" for u in s.table.column("url").to_pylist()))
    status = process_shard(shard, cfg, claim=broken_index)
    assert not status["ok"] and "index actor died" in status["error"]
    assert list(tmp_path.iterdir()) == []
