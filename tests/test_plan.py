import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import outcomes as O
from engine.config import FilterConfig, ImageConfig
from engine.plan import check_url, iter_shards, prefilter

pytestmark = pytest.mark.quick


def write(path, n, start=0, **extra):
    cols = {"URL": [f"http://h/{i}.jpg" for i in range(start, start + n)],
            "TEXT": [f"caption {i}" for i in range(start, start + n)], **extra}
    pq.write_table(pa.table(cols), path, row_group_size=7)
    return path


def test_shards_are_deterministic_and_cover_every_row_in_order(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write(d / "b.parquet", 23, start=30)
    write(d / "a.parquet", 30)
    shards = list(iter_shards([str(d)], shard_size=10, batch_rows=4))
    assert [s.shard_id for s in shards] == list(range(6))
    assert [s.first_row for s in shards] == [0, 10, 20, 30, 40, 50]
    urls = [u for s in shards for u in s.table.column("url").to_pylist()]
    assert urls == [f"http://h/{i}.jpg" for i in range(53)]  # a.parquet first: sorted names
    again = [u for s in iter_shards([str(d)], shard_size=10) for u in s.table.column("url").to_pylist()]
    assert again == urls


def test_columns_found_case_insensitively_and_extras_kept(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"url": ["http://h/1"], "caption": ["c"], "AESTHETIC_SCORE": [6.7],
                             "punsafe": [0.1]}), path)
    (shard,) = iter_shards([str(path)], shard_size=5)
    assert shard.table.column_names == ["url", "caption", "AESTHETIC_SCORE", "punsafe"]


def test_missing_url_column_is_a_clear_error(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"link_to_image": ["http://h/1"]}), path)
    with pytest.raises(KeyError, match="--url-col"):
        list(iter_shards([str(path)], shard_size=5))
    (shard,) = iter_shards([str(path)], shard_size=5, url_col="LINK_TO_IMAGE")
    assert shard.table.column("url").to_pylist() == ["http://h/1"]


@pytest.mark.parametrize("url,bad", [
    (None, True), ("", True), ("not a url", True), ("htp:/x", True), ("javascript:alert(1)", True),
    ("ftp://h/x.jpg", True), ("http://", True), ("https://example.com/a.jpg", False), (" http://h/x ", False),
])
def test_check_url(url, bad):
    assert (check_url(url) is not None) == bad


def test_prefilter_on_metadata():
    image, none = ImageConfig(), FilterConfig()
    assert prefilter({"url": "http://h/x", "WIDTH": 400, "HEIGHT": 900}, image, none)[0] == O.FILTERED_SIZE
    assert prefilter({"url": "http://h/x", "WIDTH": 2000, "HEIGHT": 600}, image, none)[0] == O.FILTERED_ASPECT
    assert prefilter({"url": "http://h/x", "WIDTH": None, "HEIGHT": None}, image, none) is None
    assert prefilter({"url": "http://h/x", "WIDTH": 1024, "HEIGHT": 768}, image, none) is None
    strict = FilterConfig(max_punsafe=0.5, min_aesthetic=6.0, max_pwatermark=0.8, min_similarity=0.3)
    row = {"url": "http://h/x", "punsafe": 0.2, "AESTHETIC_SCORE": 6.5, "pwatermark": 0.1, "similarity": 0.35}
    assert prefilter(row, image, strict) is None
    assert prefilter({**row, "punsafe": 0.9}, image, strict)[0] == O.FILTERED_PUNSAFE
    assert prefilter({**row, "AESTHETIC_SCORE": 5.0}, image, strict)[0] == O.FILTERED_AESTHETIC
    assert prefilter({**row, "pwatermark": 0.95}, image, strict)[0] == O.FILTERED_WATERMARK
    assert prefilter({**row, "similarity": 0.1}, image, strict)[0] == O.FILTERED_SIMILARITY
    assert prefilter({**row, "punsafe": float("nan")}, image, strict) is None
