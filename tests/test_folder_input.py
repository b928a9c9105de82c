"""`python -m engine shards FOLDER|GLOB|LIST.csv|LIST.jsonl`: own images to shards (engine/sources.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from engine import outcomes as O
from engine import sources
from engine.cli import main

from .conftest import encode, photo, run_rows, scaled


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """photos/: real photos at LAION sizes, some captioned by .txt, in nested folders, plus a note,
    a broken image, a hidden file and a symlink to a photo outside the folder."""
    base = tmp_path_factory.mktemp("own")
    root = base / "photos"
    (root / "trip" / "day2").mkdir(parents=True)
    (root / "a_astronaut.jpg").write_bytes(encode(scaled(photo("astronaut"), 640, 560)))
    (root / "a_astronaut.txt").write_text("an astronaut in a white suit\n")
    (root / "trip" / "coffee.png").write_bytes(encode(scaled(photo("coffee"), 600, 520), "PNG"))
    (root / "trip" / "coffee.txt").write_text("\ufeffa cup of coffee")
    (root / "trip" / "day2" / "chelsea.JPG").write_bytes(encode(scaled(photo("chelsea"), 700, 540)))
    (root / "trip" / "day2" / "broken.jpg").write_bytes(encode(scaled(photo("rocket"), 600, 600))[:700])
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"x")
    (base / "secret.jpg").write_bytes(encode(scaled(photo("immunohistochemistry"), 600, 600)))
    (base / "secret.txt").write_text("secret caption")
    (root / "zz_escape.jpg").symlink_to(base / "secret.jpg")
    (root / "trip" / "day2" / "chelsea.txt").symlink_to(base / "secret.txt")  # caption from outside: ignored
    return root


def shards(*args: str) -> int:
    """`python -m engine shards ...` in-process, local runner."""
    return main(["shards", *args, "--runner", "local", "--no-progress", "--min-image-size", "256", "--image-size", "256"])


def samples(out: Path) -> dict[str, dict]:
    """Every sample of the run's tars read by webdataset: key -> {caption, json}."""
    tars = sorted(str(p) for p in out.glob("*.tar"))
    found = {}
    for s in wds.WebDataset(tars, shardshuffle=False):
        found[s["__key__"]] = {"txt": s["txt"].decode(), "json": json.loads(s["json"]), "jpg": s["jpg"]}
    return found


def test_a_folder_becomes_shards_with_every_row_counted(photos, tmp_path):
    out = tmp_path / "out"
    assert shards(str(photos), "--output", str(out), "--shard-size", "3") == 0
    rows = run_rows(out)
    names = [Path(u).relative_to(photos).as_posix() for u in rows.column("url").to_pylist()]
    assert names == ["a_astronaut.jpg", "trip/coffee.png", "trip/day2/broken.jpg", "trip/day2/chelsea.JPG",
                     "zz_escape.jpg"]  # sorted, recursive; the note and the hidden file are not rows
    outcomes = dict(zip(names, rows.column("outcome").to_pylist(), strict=True))
    assert outcomes["zz_escape.jpg"] == O.INVALID_URL and outcomes["trip/day2/broken.jpg"] not in (O.OK, None)
    assert [outcomes[n] for n in names if n not in ("zz_escape.jpg", "trip/day2/broken.jpg")] == [O.OK] * 3
    got = samples(out)
    assert sorted(got) == sorted(k for k, o in zip(rows.column("key").to_pylist(), outcomes.values(),
                                                   strict=True) if o == O.OK)
    by_name = {Path(s["json"]["url"]).name: s for s in got.values()}
    assert by_name["a_astronaut.jpg"]["txt"] == "an astronaut in a white suit"
    assert by_name["coffee.png"]["txt"] == "a cup of coffee"
    assert by_name["chelsea.JPG"]["txt"] == ""  # its .txt is a symlink out of the folder: not read
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 5 and sum(stats["outcomes"].values()) == 5 and stats["written"] == 3

    # the same command again: nothing to do; after a photo is added, refused by the fingerprint
    assert shards(str(photos), "--output", str(out), "--shard-size", "3") == 0
    assert json.loads((out / "stats.json").read_text())["written"] == 3
    (photos / "trip" / "new.jpg").write_bytes(encode(scaled(photo("astronaut"), 520, 520)))
    try:
        assert shards(str(photos), "--output", str(out), "--shard-size", "3") == 2
    finally:
        (photos / "trip" / "new.jpg").unlink()
    assert len(run_rows(out)) == 5


def test_a_glob_reads_only_its_matches(photos, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    with open(os.fsencode(odd) + b"/\xff caf\xc3\xa9.jpg", "wb") as f:  # a name that is not UTF-8
        f.write(encode(scaled(photo("rocket"), 600, 560)))
    out = tmp_path / "out"
    assert shards(str(photos / "**" / "*.png"), str(photos / "a_*.jpg"), str(odd / "*.jpg"), "--output", str(out)) == 0
    rows = run_rows(out)
    urls = rows.column("url").to_pylist()
    assert [Path(u).name for u in urls] == ["coffee.png", "a_astronaut.jpg", "%FF%20caf%C3%A9.jpg"]
    assert urls[2].startswith("file://") and rows.column("outcome").to_pylist() == [O.OK, O.OK, O.OK]
    assert sorted(s["txt"] for s in samples(out).values()) == ["", "a cup of coffee", "an astronaut in a white suit"]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_list_of_relative_paths_and_captions(photos, tmp_path, kind):
    rows = [("a_astronaut.jpg", "first"), ("trip/coffee.png", "second, with a comma"),
            ("../secret.jpg", "escapes the list's folder"), (str(photos / "trip" / "day2" / "chelsea.JPG"), "abs"),
            ("missing.jpg", "gone")]
    listing = photos / f"list.{kind}"
    if kind == "csv":
        import csv
        with open(listing, "w", newline="") as f:
            csv.writer(f).writerows([("file_name", "Caption", "score")] + [(p, c, i) for i, (p, c) in enumerate(rows)])
    else:
        listing.write_text("".join(json.dumps({"path": p, "text": c, "score": i}) + "\n" for i, (p, c) in
                                   enumerate(rows)) + "not json\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "rocket.jpg").write_bytes(encode(scaled(photo("rocket"), 600, 560)))
    (tmp_path / "more" / "rocket.txt").write_text("a rocket")
    out = tmp_path / "out"
    args = (str(tmp_path / "more" / "*.jpg"), str(listing), "--output", str(out), "--shard-size", "1")
    try:
        assert shards(*args) == 0
        again = shards(*args)  # resumes: nothing left to do
    finally:
        listing.unlink()
    assert again == 0
    got = run_rows(out)
    want = [O.OK, O.OK, O.OK, O.INVALID_URL, O.OK, O.HTTP_ERROR] + ([O.INVALID_URL] if kind == "jsonl" else [])
    assert got.column("outcome").to_pylist() == want
    assert "outside" in got.column("reason").to_pylist()[3]
    # the list's score column is in every KEY.json, with one type, also in the glob's shard that has none
    metas = sorted((s["json"]["score"], s["txt"]) for s in samples(out).values())
    assert metas == [(-1, "a rocket"), (0, "first"), (1, "second, with a comma"), (3, "abs")]


def test_parquet_of_paths_needs_a_root_and_fingerprints_folders(photos, tmp_path):
    table = pa.table({"url": [f"file://{photos}/a_astronaut.jpg", "trip/coffee.png"], "caption": ["a", "b"]})
    pq.write_table(table, tmp_path / "paths.parquet")
    out = tmp_path / "out"
    assert shards(str(tmp_path / "paths.parquet"), "--output", str(out), "--local-root", str(photos)) == 0
    assert run_rows(out).column("outcome").to_pylist() == [O.OK, O.OK]
    without = tmp_path / "without"
    assert shards(str(tmp_path / "paths.parquet"), "--output", str(without)) == 0
    assert all("--local-root" in r for r in run_rows(without).column("reason").to_pylist())
    described = sources.describe(sources.expand([str(photos)])[0])
    assert described["rows"] == 5 and described["name"] == "photos"
    os.utime(photos / "a_astronaut.jpg")  # touching a file is not a change; its size is what counts
    assert sources.describe(sources.expand([str(photos)])[0]) == described


def test_an_imagefolder_with_metadata_jsonl(photos, tmp_path):
    folder = tmp_path / "hf"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "x.jpg").write_bytes((photos / "a_astronaut.jpg").read_bytes())
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "train/x.jpg", "text": "from metadata"}) + "\n")
    out = tmp_path / "out"
    assert shards(str(folder), "--output", str(out)) == 0
    assert [s["txt"] for s in samples(out).values()] == ["from metadata"]


def test_inputs_that_name_nothing_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert shards(str(tmp_path / "empty"), "--output", str(tmp_path / "o1")) == 2
    assert shards(str(tmp_path / "nothing*.jpg"), "--output", str(tmp_path / "o2")) == 2
    assert "no parquet files and no images" in capsys.readouterr().err
    (tmp_path / "header.csv").write_text("path,caption\n")  # a list of nothing: zero rows, not an error
    assert shards(str(tmp_path / "header.csv"), "--output", str(tmp_path / "o3")) == 0
    assert json.loads((tmp_path / "o3" / "stats.json").read_text())["rows"] == 0


@pytest.mark.slow
def test_a_folder_through_ray(photos, tmp_path):
    out = tmp_path / "out"
    assert main(["shards", str(photos), "--output", str(out), "--no-progress", "--min-image-size", "256",
                 "--image-size", "256", "--workers", "1", "--shard-size", "2"]) == 0
    outcomes = run_rows(out).column("outcome").to_pylist()
    assert len(outcomes) == 5 and outcomes.count(O.OK) == 3 and outcomes[4] == O.INVALID_URL
    assert outcomes[2] not in (O.OK, None)  # the broken photo: a decode outcome
    assert sorted(s["txt"] for s in samples(out).values()) == ["", "a cup of coffee", "an astronaut in a white suit"]


def test_an_input_rooted_at_the_file_system_root_is_refused(tmp_path):
    """A glob directly under / would make every file readable by any row: refused, a folder below is fine."""
    from pathlib import Path

    from engine import sources

    with pytest.raises(ValueError, match="whole file system"):
        sources.roots([sources.Input("images", Path("/"), "/*.jpg")])
    assert sources.roots([sources.Input("csv", tmp_path / "list.csv", "list.csv")]) == (str(tmp_path),)


def test_a_list_is_parsed_once_per_run(tmp_path, monkeypatch):
    """The input check, the column types and the shards all read a CSV/JSONL list: one parse per run."""
    from engine import objinput, plan

    lst = tmp_path / "list.csv"
    lst.write_text("path,caption,tag\n" + "".join(f"p{i}.jpg,cap {i},{i}\n" for i in range(30)))
    parses = []
    real = sources.records
    monkeypatch.setattr(sources, "records", lambda inp: parses.append(inp.path) or real(inp))
    with objinput.run_scope():
        plan.check_inputs([str(lst)])
        rows = sum(s.table.num_rows for s in plan.iter_shards([str(lst)], 10))
        assert sources.table_schema(lst, None) is not None
    assert rows == 30 and parses == [lst]
