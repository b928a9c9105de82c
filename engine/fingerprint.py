"""Run fingerprint: what an output folder was made with, so a rerun can only finish that run.

OUTPUT/run.json records, at the first run, every output-affecting setting (every config field,
by default, except the OPERATIONAL ones below) and the input files (name, size, rows and a hash
of the parquet footer; a folder or glob of images: its sorted file list's names and sizes hashed). A rerun compares itself with it before it touches any file and is refused
with a line per differing flag or input: shards cut, cropped, conditioned or filtered otherwise,
or made from other rows, must never be mixed into one dataset.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from . import objinput, options, sources, storage
from .config import EngineConfig
from .hashes import PHASH_VERSION

RUN_FILE = "run.json"

# Settings that may change between the runs of one folder, with the reason each may: they decide
# how fast or how patiently rows are worked on, never what a sample or a row's record looks like.
# Every other field (including ones added later) is output-affecting unless listed here.
OPERATIONAL = {
    "inputs": "compared by content (name, size, rows), not by the path typed",
    "output": "the folder itself; moving it keeps its shards valid",
    "s3_endpoint": "where the object store is reached, not what is stored",
    "workers": "how many shards run at once; each shard is written by one task alone",
    "ray_address": "where the tasks run; the same shard function either way",
    "runner": "in-process or Ray; the same shard function either way",
    "max_retries": "resubmissions of a failed shard (--shard-retries); a shard is whole or redone",
    "progress": "the live bar on stderr",
    "fetch.concurrency": "downloads in flight; each row's outcome is decided alone",
    "fetch.timeout": "patience with slow servers: rows left pending may get more on a rerun",
    "fetch.connect_timeout": "as --timeout",
    "fetch.retries": "as --timeout: how often a failing server is asked again",
    "fetch.backoff": "as --retries: the pause between attempts",
    "fetch.user_agent": "how the crawler introduces itself (servers may answer it, as any flaky server)",
    "dedup.index_shards": "how the dedup index is spread over actors; the same verdicts",
}

# Each setting's flag, and whether the flag is the negation of the field (a boolean given as
# --no-... or --ignore-...): from the config's field metadata, as engine/cli.py's parser is.
FLAGS = options.flags(EngineConfig)


class RunMismatch(ValueError):
    """A rerun whose settings or inputs differ from those the output folder was made with."""


def flag(name: str) -> str:
    """The command-line flag of a dotted setting name."""
    return FLAGS.get(name, ("--" + name.rsplit(".", 1)[-1].replace("_", "-"), False))[0]


def _flatten(obj: dict, prefix: str = "") -> dict:
    """Nested config dicts -> {"image.palette": ..., ...}."""
    flat = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def settings(cfg: EngineConfig) -> dict:
    """Every output-affecting setting of `cfg` by dotted name, as JSON values."""
    flat = _flatten(json.loads(json.dumps(cfg.to_dict(), default=str)))
    return {k: v for k, v in sorted(flat.items()) if k not in OPERATIONAL}


def footer_hash(path: Path) -> str:
    """A short hash of a parquet file's (or object's) footer (schema, row groups, column statistics):
    a cheap stand-in for its contents, read without the data (an object's: read once per run)."""
    return hashlib.sha256(objinput.footer(path)).hexdigest()[:16]


def describe_inputs(inputs) -> list[dict]:
    """Name, size, rows and footer hash of each input parquet, in reading order (footers only); a
    folder or glob of images and a CSV/JSONL list as one entry each (engine/sources.py)."""
    described = []
    for inp in sources.expand(inputs):
        if inp.kind != "parquet":
            described.append(sources.describe(inp))
            continue
        path = inp.path  # a Path, or an object's URL (engine/storage.py)
        rows = objinput.parquet_file(path).metadata.num_rows  # a clear error for a non-parquet file
        described.append({"name": inp.name, "bytes": objinput.input_size(path), "rows": rows, "footer": footer_hash(path),
                          "path": path if storage.is_url(path) else str(path.resolve())})
    return described


def fingerprint(cfg: EngineConfig) -> dict:
    """What run.json records for `cfg`."""
    return {"settings": settings(cfg), "inputs": describe_inputs(cfg.inputs),
            "phash_version": PHASH_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load(output) -> dict | None:
    """The folder's (or object store's, engine/storage.py) recorded fingerprint, or None when it has
    none (a first run, or a folder made before fingerprints existed)."""
    store = storage.as_store(output)
    path = f"{store.url}/{RUN_FILE}"
    data = store.read(RUN_FILE)
    if data is None:
        return None
    try:
        recorded = json.loads(data)
        if isinstance(recorded.get("settings"), dict) and isinstance(recorded.get("inputs"), list):
            return recorded
    except (OSError, ValueError, AttributeError):
        pass
    raise RunMismatch(f"{path} is unreadable, so a rerun cannot be checked against it: restore it, "
                      "delete it to fall back to the checks of the shards' stats, or choose another --output")


def _show(name: str, value) -> str:
    """A setting's value as the user typed it."""
    if isinstance(value, bool):
        return "given" if value != FLAGS.get(name, ("", False))[1] else "not given"
    return "not given" if value is None else str(value)


def setting_differences(recorded: dict, now: dict) -> list[str]:
    """A line per output-affecting setting that differs from the recorded one."""
    defaults = settings(EngineConfig(inputs=("-",), output="-"))
    lines = []
    for name, value in now.items():
        if name not in recorded:  # a setting added since the folder was made: its default is what ran
            if value != defaults.get(name, value):
                lines.append(f"{flag(name)}: not recorded (added since), default {_show(name, defaults[name])} "
                             f"assumed, now {_show(name, value)}")
        elif recorded[name] != value and isinstance(value, bool):
            lines.append(f"{flag(name)}: was {_show(name, recorded[name])}, now {_show(name, value)}")
        elif recorded[name] != value:
            lines.append(f"{flag(name)}: {_show(name, recorded[name])} was used, now {_show(name, value)}")
    return lines  # settings recorded but gone from the config cannot be compared and are ignored


def _size(d: dict) -> str:
    """An input's size as a message shows it."""
    return f"{d['rows']:,} rows, {d['bytes']:,} bytes"


def input_differences(recorded: list[dict], now: list[dict]) -> list[str]:
    """A line per input file added, missing or changed (shards are cut from all rows in order)."""
    names_was, names_now = [d["name"] for d in recorded], [d["name"] for d in now]
    if names_was != names_now:
        gone = [d for d in recorded if d["name"] not in names_now]
        new = [d for d in now if d["name"] not in names_was]
        lines = [f"input {d['name']} ({_size(d)}) was used, now it is not given" for d in gone[:5]]
        lines += [f"input {d['name']} ({_size(d)}) is new" for d in new[:5]]
        if len(gone) + len(new) > 10:
            lines.append(f"... {len(gone) + len(new) - 10} more inputs differ")
        return lines or ["inputs: the same files were given in another order"]
    return [f"input {d['name']}: {_size(was)} were used, now {_size(d)}"
            + ("" if (was["rows"], was["bytes"]) != (d["rows"], d["bytes"]) else " with other contents")
            for was, d in zip(recorded, now, strict=True)
            if (was["rows"], was["bytes"], was.get("footer")) != (d["rows"], d["bytes"], d["footer"])]


def differences(recorded: dict, now: dict) -> list[str]:
    """Every way `now` differs from the recorded fingerprint (empty: the same run)."""
    return setting_differences(recorded["settings"], now["settings"]) + \
        input_differences(recorded["inputs"], now["inputs"]) + hash_differences(recorded, now)


def hash_differences(recorded: dict, now: dict) -> list[str]:
    """A line when the perceptual hash changed since the folder was made (engine/hashes.py
    PHASH_VERSION; folders from before it was recorded used version 1): the stored hashes the
    resumed index reloads could no longer be compared with new ones."""
    was, is_ = recorded.get("phash_version", 1), now.get("phash_version", PHASH_VERSION)
    if was == is_ or not now["settings"].get("dedup.enabled", True):
        return []
    return [f"perceptual hash: version {was} was used, this engine computes version {is_} "
            "(finish the run with the engine that began it)"]


def check(output: Path, recorded: dict, now: dict) -> None:
    """Refuse a rerun that differs from the recorded run (RunMismatch names each difference)."""
    lines = differences(recorded, now)
    if lines:
        raise RunMismatch(
            f"{output} was made with other settings or inputs; rerun with the ones used, or choose another "
            "--output:\n  " + "\n  ".join(lines))

