"""Dataset card: OUTPUT/README.md, rewritten at the end of every run (and of every resume).

Its YAML front matter is what Hugging Face datasets reads for `load_dataset(OUTPUT)`: the shard
tars as the one split, and every member's feature (KEY.json's fields typed as engine/schema.py
writes them), so no schema is guessed from the first samples. The prose gives the run's counts.
It is a summary, not a shard file: resume (pipeline.completed) and the run fingerprint ignore it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import yaml

from . import sample as S
from . import schema, storage
from .config import EngineConfig
from .sample import shard_name

CARD = "README.md"
SHARDS = "[0-9]*.tar"  # the shard tars; every other file of the folder is not part of the dataset


def first_sample_json(out) -> dict | None:
    """KEY.json of the first sample of the first tar holding one (every sample has the same fields);
    `out` a folder or a Store (engine/storage.py), whose tars are streamed from their start only."""
    store = storage.as_store(out)
    for tar in store.names(SHARDS):
        try:
            with store.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as t:
                for member in t:
                    if member.name.endswith(".json"):
                        return json.loads(t.extractfile(member).read())
        except (OSError, tarfile.TarError, ValueError):
            continue
    return None


def json_features(cfg: EngineConfig, out) -> dict[str, str]:
    """KEY.json's fields and dtypes: from a written sample, else (no sample yet) from the inputs."""
    sample = first_sample_json(out)
    if sample is not None:
        return schema.features(sample)
    kinds = schema.input_kinds(tuple(cfg.inputs), cfg.url_col, cfg.caption_col)
    kinds = {k: v for k, v in kinds.items() if k not in schema.ENGINE_FIELDS}
    return {**kinds, **schema.ENGINE_FIELDS}


def front_matter(fields: dict[str, str]) -> dict:
    """The card's YAML: one config whose train split is the tars, and every member's feature."""
    members = [
        {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"},
        {"name": S.COND, "dtype": "image"}, {"name": S.JPG, "dtype": "image"},
        {"name": S.JSON, "struct": [{"name": k, "dtype": v} for k, v in fields.items()]},
        {"name": S.TXT, "dtype": "string"},
    ]
    return {
        "tags": ["webdataset", "controlnet", "ctrlnet-forge"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": SHARDS}]}],
        "dataset_info": {"config_name": "default", "features": members},
    }


def prose(cfg: EngineConfig, stats: dict, tars: list[Path]) -> str:
    """The run's counts and how to read the shards, in Markdown."""
    outcomes = "\n".join(f"| {name} | {n} |" for name, n in stats.get("outcomes", {}).items())
    pending = stats.get("outcomes", {}).get("pending", 0)
    first, last = (tars[0].stem, tars[-1].stem) if tars else (shard_name(0), shard_name(0))
    return f"""# ControlNet training shards

Made by ctrlnet-forge (`python -m engine shards`) from {len(cfg.inputs)} input(s): {stats.get("rows", 0)} rows,
{stats.get("written", 0)} samples written in {stats.get("shards_complete", 0)} complete shards of up to
{cfg.shard_size} rows. Each sample is a {cfg.image.image_size}px centre crop (`KEY.jpg`), its
`{cfg.image.conditioner}` conditioning map (`KEY.cond.png`, palette `{cfg.image.palette}`), the cleaned caption
(`KEY.txt`) and its metadata (`KEY.json`).{" " + str(pending) + " rows are pending: rerun the same command to finish them." if pending else ""}

| outcome | rows |
|---|---|
{outcomes}

Per-row outcomes are in `NNNNN.parquet`, per-shard counts in `NNNNN.stats.json`, the run's in `stats.json`.

## Reading the shards

```python
import datasets
ds = datasets.load_dataset("path/to/this/folder", split="train")     # features from this card
ds = datasets.load_dataset("webdataset", data_files="path/to/this/folder/*.tar", split="train")
import webdataset as wds
ds = wds.WebDataset("path/to/this/folder/{{{first}..{last}}}.tar").decode("pil")
```

Every `KEY.json` has every field, each with one JSON type. The input's own columns are kept; a
missing value is written as `""` (text), `NaN` (floats), `-1` (integers) or `false` (booleans), never
as null. `content_hash`, `pixel_hash` and `phash` are `""` when dedup was off (`--no-dedup`).
"""


def write_card(out, cfg: EngineConfig, stats: dict) -> None:
    """Atomically (re)write OUTPUT/README.md (`out` a folder or a Store); a failure is reported in
    `stats`, the shards stay valid."""
    store = storage.as_store(out)
    try:
        meta = yaml.safe_dump(front_matter(json_features(cfg, store)), sort_keys=False, allow_unicode=True)
        text = f"---\n{meta}---\n\n{prose(cfg, stats, [Path(n) for n in store.names(SHARDS)])}"
        store.write(CARD, text.encode("utf-8"))
    except OSError as exc:
        stats.setdefault("unsaved", f"could not write {store.url}/{CARD}: {exc}")
