"""Shards every loader reads: Hugging Face datasets (webdataset builder and the card), webdataset, the trainer.

The inputs are built so that a schema guessed from the first samples breaks: the first shard's input
columns (an int, a float, text, a list, a flag) and caption are all missing, later ones are set, and
the second input file types WIDTH as a float and adds a column of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from engine import schema
from engine.config import EngineConfig, FetchConfig
from engine.pipeline import run

FAST = FetchConfig(timeout=1.5, connect_timeout=1.0, retries=1, backoff=0.05, max_bytes=8 * 1024 * 1024,
                   allow_private_network=True)  # the corpus is served on loopback


def good_urls(corpus, n: int) -> list[str]:
    """URLs of corpus rows the engine writes as samples."""
    table = pq.read_table(corpus.parquet, columns=["URL", "expected_outcome"]).to_pylist()
    urls = [r["URL"] for r in table if r["expected_outcome"] == "ok"][:n]
    assert len(urls) == n
    return urls


def write_inputs(corpus, folder: Path) -> Path:
    """a.parquet: 6 rows, the first 4 (shard 0) with every extra value missing; b.parquet: 4 rows, WIDTH a
    float there, plus a column only it has."""
    folder.mkdir()
    urls = good_urls(corpus, 10)
    missing, given = [None] * 4, [1]
    pq.write_table(pa.table({
        "URL": urls[:6], "TEXT": missing + ["a cat", "a dog"],
        "WIDTH": pa.array(missing + [800, 640], pa.int64()), "punsafe": pa.array(missing + [0.1, 0.2]),
        "LICENSE": pa.array(missing + ["?", "cc-by"], pa.string()),
        "tags": pa.array(missing + [["x"], []], pa.list_(pa.string())), "nsfw": pa.array(missing + [True, False]),
    }), folder / "a.parquet")
    pq.write_table(pa.table({
        "URL": urls[6:], "TEXT": ["one", "two", None, "four"], "WIDTH": pa.array([800.0, None, 1024.5, 512.0]),
        "punsafe": [0.3, 0.4, None, 0.5], "LICENSE": ["x", None, "y", "z"], "only_b": given * 4,
    }), folder / "b.parquet")
    return folder


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> Path:
    """One local run over the two inputs, shards of 4 rows."""
    root = tmp_path_factory.mktemp("card")
    out = root / "shards"
    stats = run(EngineConfig(inputs=(str(write_inputs(corpus, root / "in")),), output=str(out), shard_size=4,
                             workers=1, fetch=FAST, progress=False, runner="local"))
    assert stats["outcomes"] == {"ok": 10}
    return out


def tars(out: Path) -> list[str]:
    return sorted(str(p) for p in out.glob("[0-9]*.tar"))


@pytest.mark.slow
def test_every_key_json_has_every_field_with_one_type(shards):
    metas = [s["json"] for s in wds.WebDataset(tars(shards), shardshuffle=False).decode()]
    assert len(metas) == 10
    types = {k: {type(m[k]) for m in metas} for k in metas[0]}
    assert all(set(m) == set(metas[0]) for m in metas)
    assert all(len(t) == 1 for t in types.values()), types
    first = metas[0]
    assert first["caption"] == "" and first["LICENSE"] == "" and first["tags"] == "" and first["only_b"] == -1
    assert math.isnan(first["WIDTH"]) and math.isnan(first["punsafe"]) and first["nsfw"] is False
    assert types["WIDTH"] == {float} and 1024.5 in {m["WIDTH"] for m in metas}  # int in a, float in b
    assert {m["tags"] for m in metas} == {"", '["x"]', "[]"} and {m["only_b"] for m in metas} == {-1, 1}


def load(*args, tmp: Path, **kw):
    import datasets

    return datasets.load_dataset(*args, split="train", cache_dir=str(tmp), **kw)


def check_dataset(ds) -> None:
    """Ten rows, images decoded, the json struct typed as written."""
    assert ds.num_rows == 10
    features = ds.features["json"]
    assert features["WIDTH"].dtype == "float64" and features["only_b"].dtype == "int64"
    assert features["caption"].dtype == "string" and features["nsfw"].dtype == "bool"
    row = ds[0]
    assert row["jpg"].size == (512, 512) and row["cond.png"].size == (512, 512)
    assert row["txt"] == row["json"]["caption_clean"]
    assert sorted(r["only_b"] for r in ds["json"]) == [-1] * 6 + [1] * 4


@pytest.mark.slow
def test_datasets_webdataset_builder_reads_the_shards(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_dataset(load("webdataset", data_files=tars(shards), tmp=tmp_path))


@pytest.mark.slow
def test_datasets_reads_the_output_folder_through_its_card(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = (shards / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"][0]["data_files"][0]["path"] == "[0-9]*.tar"
    assert "10 samples written" in " ".join(text.split()) and "| ok | 10 |" in text
    check_dataset(load(str(shards), tmp=tmp_path))


@pytest.mark.slow
def test_the_trainer_reads_the_shards(shards):
    from trainer.data import _Counter, load_pair, raw_epoch

    errors = _Counter()
    samples = list(raw_epoch(tars(shards), seed=0, epoch=0, buffer=4, handler=errors))
    assert len(samples) == 10 and errors.errors == 0
    image, cond = load_pair(samples[0], 64)
    assert image.shape[:2] == cond.shape[:2] == (64, 64)


@pytest.mark.slow
def test_a_rerun_rewrites_the_card_and_leaves_the_shards(corpus, shards):
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("[0-9]*")}
    (shards / "README.md").write_text("stale")
    stats = run(EngineConfig(inputs=(str(shards.parent / "in"),), output=str(shards), shard_size=4, workers=1,
                             fetch=FAST, progress=False, runner="local"))
    assert stats["outcomes"] == {"ok": 10}
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("[0-9]*")} == before
    assert (shards / "README.md").read_text().startswith("---\n")
    assert json.loads((shards / "stats.json").read_text())["written"] == 10


@pytest.mark.quick
def test_every_parquet_type_has_one_json_kind_and_a_typed_stand_in():
    import datetime as dt
    import decimal

    import numpy as np

    kinds = {"i": pa.int32(), "u": pa.uint64(), "f": pa.float16(), "d": pa.decimal128(5, 2), "b": pa.bool_(),
             "t": pa.timestamp("s"), "l": pa.list_(pa.int64()), "n": pa.null(), "s": pa.string()}
    assert {k: schema.kind_of(t) for k, t in kinds.items()} == {
        "i": "int64", "u": "string", "f": "float64", "d": "float64", "b": "bool", "t": "string", "l": "string",
        "n": "string", "s": "string"}
    assert schema.merge("int64", "float64") == "float64" and schema.merge("int64", "string") == "string"
    assert schema.as_kind(np.float16(0.5), "float64") == 0.5 and math.isnan(schema.as_kind(None, "float64"))
    assert math.isnan(schema.as_kind(float("inf"), "float64")) and schema.as_kind(decimal.Decimal("1.5"), "float64") == 1.5
    assert schema.as_kind(3.0, "int64") == 3 and schema.as_kind(3.5, "int64") == -1 and schema.as_kind("x", "int64") == -1
    assert schema.as_kind(None, "bool") is False and schema.as_kind(b"caf\xc3\xa9", "string") == "café"
    assert schema.as_kind(dt.datetime(2024, 1, 2, 3, 4), "string") == "2024-01-02T03:04:00"
    assert schema.as_kind({"a": [1, None]}, "string") == '{"a":[1,null]}'
    meta = schema.sample_json({"WIDTH": None, "url": "shadowed"}, {"WIDTH": "int64"}, {"key": "k", "url": "u"})
    assert set(meta) == {"WIDTH", *schema.ENGINE_FIELDS} and meta["WIDTH"] == -1 and meta["caption"] == ""
    assert meta["url"] == "u" and schema.features(meta)["WIDTH"] == "int64"
