"""Shard integrity and the run fingerprint (engine/write.py publish_shard, engine/pipeline.py,
engine/fingerprint.py), against real files: tars written by TarShard and read back with
webdataset's own reader, write errors raised by the OS (RLIMIT_FSIZE, so EFBIG at a random byte),
and the engine's command line on the loopback corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from engine import fingerprint as F
from engine.config import EngineConfig, FetchConfig
from engine.pipeline import completed
from engine.write import SAMPLE_MEMBERS, ShardWriteError, TarShard, publish_shard, tar_problem

from .conftest import run_rows

# Loopback is opted into where the engine has the switch (engine/fetch.py's network policy).
NETWORK = ["--allow-private-network"] if "allow_private_network" in \
    {f.name for f in dataclasses.fields(FetchConfig)} else []


# ---------------------------------------------------------------------------------------------
# Shards written in-process (no network): the read-back and the resume checks
# ---------------------------------------------------------------------------------------------

def make_shard(out: Path, shard_id: int = 0, ok: int = 3, failed: int = 1, *, legacy: bool = False) -> dict:
    """A real shard (tar, parquet, stats) of `ok` samples and `failed` rows, published as the engine
    does; `legacy` strips the file sizes, as shards written before they were recorded."""
    name = f"{shard_id:05d}"
    records = [{"key": f"{name}{i:05d}", "row": i, "url": f"http://h/{i}.jpg", "caption": "c",
                "outcome": "ok" if i < ok else "http_error", "reason": ""} for i in range(ok + failed)]
    tar = TarShard(out / f"{name}.tar")
    for r in records[:ok]:
        tar.write(r["key"], os.urandom(3000), os.urandom(500), "a caption", {"url": r["url"]})
    stats = {"shard": shard_id, "first_row": 0, "rows": ok + failed, "shard_size": 16, "image_size": 512,
             "outcomes": {"ok": ok, "http_error": failed} if failed else {"ok": ok}, "written": ok}
    stats = publish_shard(tar, records, stats, [r["key"] for r in records[:ok]])
    if legacy:
        stats = {k: v for k, v in stats.items() if not k.endswith("_bytes")}
        (out / f"{name}.stats.json").write_text(json.dumps(stats))
    return stats


def members(path: Path) -> dict[str, set[str]]:
    """Member extensions by key, through webdataset's own reader."""
    return {s["__key__"]: {k for k in s if not k.startswith("__")}
            for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)}


@pytest.mark.quick
def test_a_published_shard_reads_back_and_is_trusted(tmp_path):
    stats = make_shard(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.stats.json", "00000.tar"]
    assert members(tmp_path / "00000.tar") == {f"0000000{i:03d}": set(SAMPLE_MEMBERS) for i in range(3)}
    assert stats["tar_bytes"] == (tmp_path / "00000.tar").stat().st_size
    assert completed(tmp_path) == {0: stats}


@pytest.mark.quick
def test_a_tar_that_reads_back_wrong_is_never_published(tmp_path):
    """The records claim an `ok` row whose sample is not in the tar: the shard fails whole, no
    file of it is left (neither final nor temporary), and an earlier marker is not revived."""
    records = [{"key": f"00000{i:05d}", "row": i, "url": "u", "caption": "", "outcome": "ok", "reason": ""}
               for i in range(2)]
    tar = TarShard(tmp_path / "00000.tar")
    tar.write(records[0]["key"], b"j" * 100, b"p" * 100, "", {})
    with pytest.raises(ShardWriteError, match="1 ok rows missing.*0000000001"):
        publish_shard(tar, records, {"shard": 0, "rows": 2}, [r["key"] for r in records])
    tar.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.quick
def test_tar_problem_names_what_is_wrong(tmp_path):
    make_shard(tmp_path, ok=4, failed=0)
    tar = tmp_path / "00000.tar"
    keys = [f"00000{i:05d}" for i in range(4)]
    assert tar_problem(tar, keys) is None
    assert "keys without an ok row" in tar_problem(tar, keys[:3])
    assert "ok rows missing" in tar_problem(tar, [*keys, "0000000009"])
    # one member gone: a tar rewritten without KEY.txt of the second sample
    short = tmp_path / "short.tar"
    with tarfile.open(tar) as src, tarfile.open(short, "w") as dst:
        for m in src:
            if m.name != f"{keys[1]}.txt":
                dst.addfile(m, src.extractfile(m))
    assert f"without exactly {', '.join(SAMPLE_MEMBERS)} (e.g. {keys[1]})" in tar_problem(short, keys)
    # cut in the middle of a member's data, as a disk that filled up would leave it
    os.truncate(tar, tar.stat().st_size // 2)
    assert tar_problem(tar, keys) is not None


@pytest.mark.quick
@pytest.mark.parametrize("damage", ["tar_truncated", "tar_grown", "parquet_ok_flipped", "stats_written",
                                    "parquet_missing", "marker_of_another_shard", "legacy_tar_short"])
def test_resume_distrusts_a_shard_whose_files_disagree(tmp_path, damage):
    make_shard(tmp_path, 0, legacy=damage.startswith("legacy"))
    make_shard(tmp_path, 1, legacy=damage.startswith("legacy"))
    assert sorted(completed(tmp_path)) == [0, 1]
    tar, parquet, marker = (tmp_path / f"00000.{ext}" for ext in ("tar", "parquet", "stats.json"))
    if damage == "tar_truncated":
        os.truncate(tar, tar.stat().st_size - 2048)
    elif damage == "tar_grown":  # another tar in its place, longer than the one the stats vouch for
        (tmp_path / "big").write_bytes(os.urandom(20000))
        with tarfile.open(tar, "a") as t:
            t.add(tmp_path / "big", arcname="0000000009.jpg")
    elif damage == "parquet_ok_flipped":
        table = pq.read_table(parquet)
        flipped = pc.if_else(pc.equal(table.column("key"), "0000000000"), "http_error", table.column("outcome"))
        pq.write_table(table.set_column(table.schema.get_field_index("outcome"), "outcome", flipped), parquet)
    elif damage == "stats_written":
        stats = json.loads(marker.read_text())
        marker.write_text(json.dumps({**stats, "written": 2, "outcomes": {"ok": 2, "http_error": 2}}))
    elif damage == "parquet_missing":
        parquet.unlink()
    elif damage == "marker_of_another_shard":
        shutil.copy(tmp_path / "00001.stats.json", marker)
    elif damage == "legacy_tar_short":  # made before sizes were recorded: the member list decides
        with tarfile.open(tar) as src, tarfile.open(tmp_path / "cut.tar", "w") as dst:
            for m in list(src)[:-4]:  # the last sample gone: 2 samples for 3 ok rows
                dst.addfile(m, src.extractfile(m))
        os.replace(tmp_path / "cut.tar", tar)
    assert sorted(completed(tmp_path)) == [1], damage


# ---------------------------------------------------------------------------------------------
# The fingerprint's settings and their flags
# ---------------------------------------------------------------------------------------------

def cli_flags() -> set[str]:
    """Every option string of `python -m engine shards`."""
    import argparse

    from engine.cli import shards_parser

    sub = argparse.ArgumentParser().add_subparsers()
    shards_parser(sub)
    parser = sub.choices["shards"]
    return {s for a in parser._actions for s in a.option_strings}


def all_fields(obj, prefix: str = "") -> set[str]:
    """Dotted names of every config field."""
    names = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        names |= all_fields(value, f"{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return names


@pytest.mark.quick
def test_every_field_is_fingerprinted_unless_listed_operational_and_has_a_flag():
    cfg = EngineConfig(inputs=("x",), output="o")
    recorded = F.settings(cfg)
    fields = all_fields(cfg)
    assert set(F.OPERATIONAL) <= fields, "OPERATIONAL names a field that does not exist"
    assert set(recorded) == fields - set(F.OPERATIONAL)
    assert {"image.palette", "image.conditioner", "fetch.max_bytes", "shard_size", "filters.min_aesthetic"} \
        <= set(recorded)
    missing = {name: F.flag(name) for name in recorded if F.flag(name) not in cli_flags()}
    assert not missing, f"settings whose flag the CLI lacks (see opt() in engine/config.py): {missing}"


@pytest.mark.quick
def test_differences_name_each_flag_and_input():
    cfg = EngineConfig(inputs=("x",), output="o")
    was = {"settings": F.settings(cfg), "inputs": [{"name": "a.parquet", "bytes": 100, "rows": 3, "footer": "f"}]}
    other = dataclasses.replace(cfg, shard_size=8, image=dataclasses.replace(cfg.image, palette="black,white"),
                                dedup=dataclasses.replace(cfg.dedup, enabled=False))
    now = {"settings": F.settings(other), "inputs": [{"name": "a.parquet", "bytes": 100, "rows": 3, "footer": "g"}]}
    assert F.differences(was, now) == [
        "--no-dedup: was not given, now given", "--palette: black,gray50,white was used, now black,white",
        "--shard-size: 10000 was used, now 8",
        "input a.parquet: 3 rows, 100 bytes were used, now 3 rows, 100 bytes with other contents"]
    now["inputs"] = [{"name": "b.parquet", "bytes": 7, "rows": 1, "footer": "h"}]
    assert F.input_differences(was["inputs"], now["inputs"]) == [
        "input a.parquet (3 rows, 100 bytes) was used, now it is not given", "input b.parquet (1 rows, 7 bytes) is new"]
    # a setting added after the folder was made: its default is taken as what ran
    del was["settings"]["image.palette"]
    assert F.setting_differences(was["settings"], F.settings(cfg)) == []
    assert "--palette: not recorded" in F.setting_differences(was["settings"], now["settings"])[1]


@pytest.mark.quick
def test_a_changed_perceptual_hash_is_refused_unless_dedup_is_off():
    """A resumed index reloads the finished shards' pHashes: another hash version must not mix in."""
    cfg = EngineConfig(inputs=("x",), output="o")
    was = {"settings": F.settings(cfg), "inputs": []}  # a folder from before the version was recorded
    now = {**was, "phash_version": 2}
    assert F.differences(was, {**was, "phash_version": 1}) == []
    assert F.differences(was, now) == ["perceptual hash: version 1 was used, this engine computes version 2 "
                                       "(finish the run with the engine that began it)"]
    off = F.settings(dataclasses.replace(cfg, dedup=dataclasses.replace(cfg.dedup, enabled=False)))
    assert F.hash_differences({**was, "settings": off}, {**now, "settings": off}) == []


# ---------------------------------------------------------------------------------------------
# The command line on the loopback corpus
# ---------------------------------------------------------------------------------------------

def engine_cmd(parquet: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine", "shards", str(parquet), "--output", str(out), "--runner", "local",
            "--shard-size", "16", "--timeout", "1.5", "--retries", "1", "--max-bytes", str(8 << 20),
            "--no-progress", *NETWORK, *extra]


def cli(*args) -> tuple[int, str]:
    """`python -m engine` in this process (the same main(), without a second interpreter's start):
    exit status and stderr."""
    import contextlib
    import io

    from engine.cli import main

    err, handler = io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in args[3:]])  # engine_cmd's [python, -m, engine, ...]
    finally:
        signal.signal(signal.SIGTERM, handler)
    return rc, err.getvalue()


def snapshot(out: Path) -> dict[str, tuple]:
    """Name, size, mtime and content hash of every file in the folder."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.rglob("*")) if p.is_file()}


def check_consistent(out: Path) -> None:
    """Every shard with a done marker: its tar holds exactly its `ok` rows, each with all members."""
    for marker in out.glob("[0-9]*.stats.json"):
        name = marker.name.split(".")[0]
        stats = json.loads(marker.read_text())
        rows = pq.read_table(out / f"{name}.parquet")
        ok = set(rows.filter(pc.equal(rows.column("outcome"), "ok")).column("key").to_pylist())
        assert members(out / f"{name}.tar") == {k: set(SAMPLE_MEMBERS) for k in ok}, name
        assert len(ok) == stats["written"] and sum(stats["outcomes"].values()) == stats["rows"] == rows.num_rows
    assert not list(out.glob("*.tmp"))


@pytest.fixture(scope="module")
def quick_corpus(corpus, tmp_path_factory) -> Path:
    """40 rows of the sample corpus (3 shards of 16) without its deliberately slow ones (timeouts)."""
    table = pq.read_table(corpus.parquet)
    path = tmp_path_factory.mktemp("inputs") / "quick.parquet"
    pq.write_table(table.filter(pc.not_equal(table.column("expected_outcome"), "timeout")).slice(0, 40), path)
    return path


@pytest.fixture(scope="module")
def reference(quick_corpus, tmp_path_factory) -> Path:
    """One uninterrupted run, the yardstick of the others."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    res = subprocess.run(engine_cmd(quick_corpus, out), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    check_consistent(out)
    return out


def ok_keys(out: Path) -> list[str]:
    rows = run_rows(out)
    return sorted(rows.filter(pc.equal(rows.column("outcome"), "ok")).column("key").to_pylist())


@pytest.mark.slow
def test_a_write_error_at_a_random_byte_fails_the_shard_and_the_rerun_redoes_it(quick_corpus, reference, tmp_path):
    """Files beyond N bytes fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored), N drawn between 4 KB and
    the largest tar: no shard is kept with a sample missing, no row becomes an `error`, and the
    rerun without the limit ends exactly as the uninterrupted run."""
    seed = int(os.environ.get("INTEGRITY_SEED", random.SystemRandom().randrange(1 << 30)))
    largest = max(p.stat().st_size for p in reference.glob("*.tar"))
    # at least twice the run's stats.json, which is written last and must land for the checks below
    floor = max(4096, 2 * (reference / "stats.json").stat().st_size)
    limit = random.Random(seed).randrange(floor, largest)
    print(f"INTEGRITY_SEED={seed}: files limited to {limit} bytes (largest tar {largest})")

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "shards"
    first = subprocess.run(engine_cmd(quick_corpus, out, "--shard-retries", "1"), preexec_fn=limited,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, f"seed {seed}: {first.stderr[-3000:]}"
    assert "Traceback" not in first.stderr and "rerun the same command" in first.stderr
    assert "File too large" in first.stdout + first.stderr
    check_consistent(out)
    assert len(completed(out)) < len(list(reference.glob("*.tar")))
    summary = json.loads((out / "stats.json").read_text())
    assert summary["outcomes"]["pending"] == summary["rows"] - sum(s["rows"] for s in completed(out).values()) > 0
    if list(out.glob("[0-9]*.parquet")):
        assert "File too large" not in " ".join(filter(None, run_rows(out).column("reason").to_pylist()))
    again = subprocess.run(engine_cmd(quick_corpus, out), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, f"seed {seed}: {again.stderr[-3000:]}"
    check_consistent(out)
    assert ok_keys(out) == ok_keys(reference)
    assert sorted(set(members_all(out))) == ok_keys(reference)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["outcomes"] == json.loads((reference / "stats.json").read_text())["outcomes"]
    assert sum(stats["outcomes"].values()) == stats["rows"] == pq.ParquetFile(quick_corpus).metadata.num_rows


def members_all(out: Path) -> list[str]:
    """Every key of every tar, through webdataset's reader."""
    return [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("[0-9]*.tar")), shardshuffle=False,
                                          empty_check=False)]


@pytest.mark.slow
def test_a_rerun_with_other_settings_or_inputs_is_refused_and_changes_no_file(quick_corpus, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    os.remove(next(out.glob("[0-9]*.stats.json")))  # a shard left to do: a refused run must not do it
    (out / "00003.tar.0badc0de.tmp").write_bytes(b"stale")  # nor remove a stale temporary
    one_row = tmp_path / "one.parquet"
    pq.write_table(pq.read_table(quick_corpus).slice(0, 1), one_row)
    before = snapshot(out)
    cases = [(engine_cmd(quick_corpus, out, "--palette", "black,white"),
              ["--palette: black,gray50,white was used, now black,white"]),
             (engine_cmd(quick_corpus, out, "--shard-size", "8"), ["--shard-size: 16 was used, now 8"]),
             (engine_cmd(quick_corpus, out, "--no-dedup", "--min-aesthetic", "5"),
              ["--no-dedup: was not given, now given", "--min-aesthetic: not given was used, now 5.0"]),
             (engine_cmd(one_row, out), ["input one.parquet (1 rows", "input quick.parquet ("])]
    res = subprocess.run(cases[0][0], capture_output=True, text=True, timeout=300)  # the real exit status
    assert res.returncode == 2 and cases[0][1][0] in res.stderr and "Traceback" not in res.stderr, res.stderr
    for cmd, messages in cases:
        rc, err = cli(*cmd)
        assert rc == 2 and all(m in err for m in messages), (messages, err)
        assert snapshot(out) == before, cmd[-4:]
    # a folder made before run.json: the shards' own stats still refuse another input (was: "ok 300%")
    os.remove(out / "run.json")
    before = snapshot(out)
    rc, err = cli(*engine_cmd(one_row, out))
    assert rc == 2 and "other inputs" in err, err
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_rerun_with_other_operational_flags_goes_ahead(quick_corpus, reference, tmp_path):
    """Workers, concurrency, timeouts and retries may change: the rerun redoes a distrusted shard.
    The folder has no run.json (as one made before it existed): the rerun goes ahead and writes it."""
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    os.remove(out / "run.json")
    tar = out / "00001.tar"
    os.truncate(tar, tar.stat().st_size // 2)  # damaged after the run: resume must not trust it
    res = subprocess.run(engine_cmd(quick_corpus, out, "--workers", "1", "--concurrency", "3", "--timeout", "2",
                                    "--retries", "0", "--shard-retries", "0", "--user-agent", "other/1.0"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    check_consistent(out)
    assert ok_keys(out) == ok_keys(reference) == sorted(members_all(out))
    recorded, first = (json.loads((d / "run.json").read_text()) for d in (out, reference))
    assert recorded["settings"] == first["settings"] and recorded["inputs"] == first["inputs"]


@pytest.mark.slow
def test_an_unusable_output_is_one_clear_error(quick_corpus, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    cases = [(a_file, "is a file"), (a_file / "under", "cannot be created")]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        cases.append((readonly, "not writable"))
    res = subprocess.run(engine_cmd(quick_corpus, a_file), capture_output=True, text=True, timeout=300)
    results = [(res.returncode, res.stderr, "is a file")]  # the real exit status, then the rest in-process
    results += [(*cli(*engine_cmd(quick_corpus, out)), message) for out, message in cases]
    for rc, err, message in results:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and "Traceback" not in err, err
        assert len(errors) == 1 and "--output" in errors[0] and message in errors[0], err
    assert a_file.read_text() == "x"

