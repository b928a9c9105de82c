"""Hostile or broken input lists: each ends as a one-line error before any output exists, or as
counted rows whose KEY.json fields keep one JSON type (engine/plan.py, engine/sources.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from engine import outcomes as O
from engine import sources
from engine.cli import main
from engine.plan import UNREADABLE, check_inputs, iter_shards

from .conftest import encode, photo, scaled

pytestmark = pytest.mark.quick


def damage_row_group(path: Path, group: int) -> None:
    """Scramble bytes inside the data pages of one row group's caption column (its footer stays intact)."""
    data = bytearray(path.read_bytes())
    offset = pq.read_metadata(path).row_group(group).column(1).data_page_offset
    for i in range(offset + 30, offset + 400):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def long_captions(n: int) -> list[str]:
    """Captions long enough that a row group's caption pages span the damaged bytes."""
    return [f"caption number {i} " * 5 for i in range(n)]


def test_a_damaged_row_group_costs_its_rows_alone_and_each_is_counted(tmp_path):
    path = tmp_path / "damaged.parquet"
    urls = [f"http://h/{i}.jpg" for i in range(3000)]
    pq.write_table(pa.table({"url": urls, "caption": long_captions(3000)}), path,
                   row_group_size=1000, compression="snappy")
    damage_row_group(path, 1)
    shards = list(iter_shards([str(path)], shard_size=700, batch_rows=300))
    table = pa.concat_tables([s.table for s in shards], promote_options="permissive")
    assert table.num_rows == 3000  # the footer's count: no row lost, none doubled
    bad = table.column(UNREADABLE).to_pylist()
    assert [i for i, r in enumerate(bad) if r] == list(range(1000, 2000))
    assert "row group 1 unreadable" in bad[1000]
    kept = table.column("url").to_pylist()
    assert kept[:1000] == urls[:1000] and kept[2000:] == urls[2000:]


def test_inputs_typing_a_column_differently_are_joined_in_one_shard(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"URL": ["http://h/1", "http://h/2"], "TEXT": ["one", "two"],
                             "tag": ["x", "y"], "score": pa.array([1, 2], pa.int32())}), a)
    pq.write_table(pa.table({"url": ["http://h/3"], "caption": pa.array([b"three \xff"], pa.binary()),
                             "tag": [7], "score": [2.5], "when": pa.array([0], pa.timestamp("s"))}), b)
    (shard,) = iter_shards([str(a), str(b)], shard_size=10)
    t = shard.table
    assert t.column("tag").to_pylist() == ["x", "y", "7"]
    assert t.column("score").to_pylist() == [1.0, 2.0, 2.5]
    assert t.column("caption").to_pylist() == ["one", "two", "three \ufffd"]
    assert t.column("when").to_pylist() == [None, None, "1970-01-01T00:00:00"]


def test_a_jsonl_with_a_byte_order_mark_or_a_line_nested_too_deep_keeps_every_row(tmp_path):
    path = tmp_path / "list.jsonl"
    deep = "[" * 5000 + "]" * 5000
    path.write_text('\ufeff{"path": "a.jpg", "caption": "first"}\r\n'
                    f'{{"path": "b.jpg", "v": {deep}}}\n{{"path": "c.jpg"}}\n', encoding="utf-8")
    table = sources.read_table(sources.Input("jsonl", path, path.name))
    assert table.column("url").to_pylist() == [str(tmp_path / "a.jpg"), None, str(tmp_path / "c.jpg")]
    assert table.column("caption").to_pylist() == ["first", None, None]


def write_parquet(path: Path, table: pa.Table) -> str:
    """`table` as a parquet file; its path."""
    pq.write_table(table, path)
    return str(path)


UNUSABLE = {
    "no URL column": (lambda d: [write_parquet(d / "x.parquet", pa.table({"link_to_image": ["http://h/1"]}))],
                      [], "no URL column"),
    "URL and url": (lambda d: [write_parquet(d / "x.parquet", pa.table({"URL": ["http://h/1"], "url": ["x"]}))],
                    [], "'URL' and 'url' differ only by case"),
    "TEXT and text": (lambda d: [write_parquet(d / "x.parquet", pa.table({"url": ["http://h/1"], "TEXT": ["a"],
                                                                          "text": ["b"]}))],
                      [], "--caption-col"),
    "missing --caption-col": (lambda d: [write_parquet(d / "x.parquet", pa.table({"url": ["http://h/1"]}))],
                              ["--caption-col", "alt_text"], "column 'alt_text' not found"),
    "second file without URL": (lambda d: [write_parquet(d / "a.parquet", pa.table({"url": ["http://h/1"]})),
                                           write_parquet(d / "b.parquet", pa.table({"img": ["http://h/2"]}))],
                                [], "b.parquet: no URL column"),
    "zero bytes": (lambda d: [(d / "x.parquet").write_bytes(b"") or str(d / "x.parquet")], [], "not a parquet file"),
    "CSV without a path column": (lambda d: [(d / "l.csv").write_text("caption,n\na,1\n") and str(d / "l.csv")],
                                  [], "no path/URL column"),
    "empty folder": (lambda d: [(d / "empty").mkdir() or str(d / "empty")], [], "holds no parquet files and no images"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_an_unusable_input_is_one_error_line_before_the_output_exists(tmp_path, capsys, case):
    make, flags, said = UNUSABLE[case]
    inputs = make(tmp_path)
    out = tmp_path / "out"
    assert main(["shards", *inputs, "--output", str(out), "--runner", "local", "--no-progress", *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and said in err[0] and not err[0].startswith('error: "'), err
    assert not out.exists()  # not even the folder and its .lock
    with pytest.raises((KeyError, ValueError, FileNotFoundError)):  # the plan's own check, as the run's
        check_inputs(inputs, caption_col=flags[1] if flags else None)


def test_mixed_damaged_inputs_end_counted_with_one_json_type_per_field(tmp_path):
    """The whole engine: two parquets typing `tag` and `score` differently, one with a damaged row
    group, rows naming photos on disk; every row counted, every KEY.json field of one type."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        (photos / f"{i}.jpg").write_bytes(encode(scaled(photo(name), 96, 80)))
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"url": [str(photos / "0.jpg"), None], "TEXT": ["a", "b"], "tag": ["x", "y"],
                             "score": pa.array([1, None], pa.int32())}), a)
    pq.write_table(pa.table({"url": [str(photos / f"{i % 3}.jpg") for i in range(1, 31)], "caption": long_captions(30),
                             "tag": list(range(30)), "score": [0.5] * 30}), b, row_group_size=10, compression="snappy")
    damage_row_group(b, 2)
    out = tmp_path / "out"
    assert main(["shards", str(a), str(b), "--output", str(out), "--runner", "local", "--no-progress",
                 "--local-root", str(photos), "--min-image-size", "64", "--image-size", "64", "--shard-size", "8",
                 "--no-dedup"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 32 and sum(stats["outcomes"].values()) == 32
    assert stats["outcomes"] == {O.OK: 21, O.INVALID_URL: 1, O.ERROR: 10}
    types: dict[str, set] = {}
    for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False):
        for k, v in json.loads(s["json"]).items():
            types.setdefault(k, set()).add(type(v).__name__)
    assert types["tag"] == {"str"} and types["score"] == {"float"} and UNREADABLE not in types
    assert all(len(t) == 1 and "NoneType" not in t for t in types.values()), types
