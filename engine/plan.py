"""Plan: inputs (parquet, folders or globs of images, CSV/JSONL lists) -> deterministic shards of rows,
and the metadata prefilter.

Rows are streamed batch by batch (never the whole input in memory) and cut into shards of
`shard_size` rows in input order, so the same inputs always give the same shard ids and keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from . import objinput, schema, sources, storage
from . import outcomes as O
from .config import FilterConfig, ImageConfig
from .netpolicy import CREDENTIALS, refused_url
from .storefail import one_line

URL_NAMES = ("url", "image_url", "link")
CAPTION_NAMES = ("text", "caption", "alt", "title")
# Metadata columns that LAION variants spell differently; the first present one is used.
METRIC_NAMES = {
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "aesthetic": ("aesthetic_score", "aesthetic"),
    "similarity": ("similarity", "clip_similarity"),
}


@dataclass
class Shard:
    """One unit of work: `table` holds its rows, `first_row` the input index of row 0."""

    shard_id: int
    first_row: int
    table: pa.Table
    roots: tuple[str, ...] = ()
    """Folders the run's inputs name (a folder or glob of images, a CSV/JSONL's folder): their files
    may be read like those of --local-root (engine/sources.py)."""
    kinds: dict[str, str] = field(default_factory=dict)
    """One JSON kind per input column of the whole run (engine/schema.py), worked out once by the
    driver: workers on other nodes need not see the inputs, and every shard writes a column alike."""


def list_inputs(inputs: tuple[str, ...] | list[str]) -> list[Path]:
    """Each input's file (a group of images: its folder); order is sorted and therefore reproducible."""
    return [i.path for i in sources.expand(inputs, files=False)]


def find_column(names: list[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    """The column named `wanted`, else the first candidate present, matched case-insensitively.

    A KeyError when the match is ambiguous (`URL` and `url` both present): picking one silently
    would read the other's values as the URLs, or the captions, of every row."""
    if wanted and wanted in names:
        return wanted
    flag = "--caption-col" if candidates == CAPTION_NAMES else "--url-col"
    for name in ([wanted] if wanted else candidates):
        matches = [n for n in names if n.lower() == name.lower()]
        if len(matches) > 1:
            raise KeyError(f"columns {' and '.join(map(repr, matches))} differ only by case: "
                           f"name the one to use exactly with {flag}")
        if matches:
            return matches[0]
    if wanted:
        raise KeyError(f"column {wanted!r} not found; columns are {names}")
    return None


def _normalize(batch: pa.RecordBatch, url_col: str | None, caption_col: str | None) -> pa.Table:
    """Rename the URL and caption columns to `url` and `caption`; keep every other column."""
    names = batch.schema.names
    url = find_column(names, url_col, URL_NAMES)
    if url is None:
        raise KeyError(f"no URL column (looked for {URL_NAMES}, any case) among {names}; use --url-col")
    cap = find_column(names, caption_col, CAPTION_NAMES)
    table = pa.Table.from_batches([batch])
    cols, out_names = [], []
    for name in names:
        col = _valid_text(table.column(name))
        if name == url:
            cols.append(_without_credentials(_as_string(col)))
            out_names.append("url")
        elif name == cap:
            cols.append(col)
            out_names.append("caption")
        elif name.lower() in ("url", "caption"):
            continue  # a second column of the same name would shadow the chosen one
        else:
            cols.append(col)
            out_names.append(name)
    if cap is None:
        cols.append(pa.nulls(len(table), pa.string()))
        out_names.append("caption")
    return pa.Table.from_arrays(cols, names=out_names)


def _valid_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column with invalid UTF-8 (seen in scraped dumps) rebuilt with U+FFFD in its place."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    try:
        col.validate(full=True)
        return col
    except pa.ArrowInvalid:
        raw = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())
        return pa.chunked_array([pa.array([None if v is None else v.decode("utf-8", "replace")
                                           for v in raw.to_pylist()], pa.string())])


def _as_string(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """URLs stored as binary or other types become strings (invalid UTF-8 replaced)."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    values = [None if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
              for v in col.to_pylist()]
    return pa.chunked_array([pa.array(values, pa.string())])


def _without_credentials(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """URLs without `user:password@` (netpolicy.strip_credentials, vectorised): from here on no
    stage can store or send them."""
    return pc.replace_substring_regex(col, pattern=CREDENTIALS, replacement=r"\1", max_replacements=1)


def check_inputs(inputs, url_col: str | None = None, caption_col: str | None = None) -> None:
    """Refuse, before the output is touched, inputs the plan could not read at all: a file that is no
    parquet, one without a URL (path) column, a --url-col or --caption-col it lacks, or columns that
    differ only by case, a folder without images. Footers, lists and folder listings only; each error
    names the input."""
    for inp in sources.expand(inputs):  # FileNotFoundError: a folder or glob without images
        if inp.kind == "images":
            continue  # its rows are built with `url` and `caption`
        if inp.kind != "parquet":
            sources.read_table(inp, url_col)  # KeyError naming the list when it has no path column
            continue
        names = objinput.parquet_file(inp.path).schema_arrow.names  # ValueError: not a parquet file
        try:
            if find_column(names, url_col, URL_NAMES) is None:
                raise KeyError(f"no URL column (looked for {URL_NAMES}, any case) among {names}; use --url-col")
            find_column(names, caption_col, CAPTION_NAMES)
        except KeyError as exc:
            raise KeyError(f"input {inp.path}: {exc.args[0]}") from None


def iter_shards(inputs, shard_size: int, url_col: str | None = None, caption_col: str | None = None,
                batch_rows: int = 65_536) -> Iterator[Shard]:
    """Stream all input rows in order and yield them cut into shards of `shard_size` rows."""
    pending: list[pa.Table] = []
    pending_rows = 0
    shard_id = 0
    found = sources.expand(inputs)
    roots = sources.roots(found)
    kinds = schema.input_kinds(tuple(str(i) for i in inputs), url_col, caption_col)
    for inp in found:
        for batch in _batches(inp, min(batch_rows, max(shard_size, 1024)), url_col):
            table = _normalize(batch, *((url_col, caption_col) if inp.kind != "images" else ("url", "caption")))
            pending.append(_conform(table, kinds))
            pending_rows += batch.num_rows
            while pending_rows >= shard_size:
                table = pa.concat_tables(pending, promote_options="permissive")
                yield Shard(shard_id, shard_id * shard_size, table.slice(0, shard_size), roots, kinds)
                rest = table.slice(shard_size)
                pending, pending_rows, shard_id = [rest], rest.num_rows, shard_id + 1
    if pending_rows:
        yield Shard(shard_id, shard_id * shard_size, pa.concat_tables(pending, promote_options="permissive"), roots, kinds)


def _conform(table: pa.Table, kinds: dict[str, str]) -> pa.Table:
    """Each column as the one Arrow type of its run-wide kind (engine/schema.py), the caption as text:
    input files that type a column differently (`tag` text in one, ints in another) otherwise
    cannot be joined into one shard. The values written to KEY.json are the same either way."""
    for i, name in enumerate(table.column_names):
        kind = schema.STRING if name == "caption" else kinds.get(name)
        target = ARROW_TYPES.get(kind)
        if target is not None and table.column(i).type != target:
            table = table.set_column(i, name, _as_type(table.column(i), kind, target))
    return table


ARROW_TYPES = {schema.STRING: pa.string(), schema.INT: pa.int64(), schema.FLOAT: pa.float64(), schema.BOOL: pa.bool_()}


def _as_type(col: pa.ChunkedArray, kind: str, target: pa.DataType) -> pa.ChunkedArray:
    """`col` as `target`: cast by Arrow where it can (int32 -> int64, decimal -> float64, large or
    dictionary strings), else value by value as KEY.json writes them (schema.as_text; bytes of a
    caption decoded as clean_caption does)."""
    if kind != schema.STRING or pa.types.is_large_string(col.type) or pa.types.is_null(col.type) or (
            pa.types.is_dictionary(col.type) and pa.types.is_string(col.type.value_type)):
        try:
            return col.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    if kind == schema.STRING:
        values = [None if v is None else v.decode("utf-8", "replace") if isinstance(v, bytes) else schema.as_text(v)
                  for v in col.to_pylist()]
    else:
        values = [None if v is None else schema.as_kind(v, kind) for v in col.to_pylist()]
    return pa.chunked_array([pa.array(values, target)])


UNREADABLE = schema.UNREADABLE  # the stand-in rows' reason column (_parquet_batches)


def _batches(inp: sources.Input, batch_rows: int, url_col: str | None) -> Iterator[pa.RecordBatch]:
    """An input's rows, batch by batch: parquet streamed, the others by engine/sources.py."""
    if inp.kind == "parquet":
        return _parquet_batches(inp.path, batch_rows)
    return sources.batches(inp, batch_rows, url_col)


def _parquet_batches(path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A parquet input's rows, streamed. A local file's row group that cannot be decoded (a damaged
    page) gives stand-in rows carrying the reason (UNREADABLE): each ends `error`, counted, and the rest
    of the file is still read. An object's read errors are the store's (the run stops; a rerun)."""
    pf = objinput.parquet_file(path)
    done = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            done += batch.num_rows
            yield batch
        return
    except (OSError, pa.ArrowException):
        if storage.is_url(path):
            raise
    yield from _groups_from(pf, done, batch_rows, Path(path).name)  # damaged after row `done`


def _groups_from(pf, skip: int, batch_rows: int, name: str) -> Iterator[pa.RecordBatch]:
    """The rows of `pf` from row `skip` on, one row group at a time (so that one damaged group costs
    only its own rows), a group that cannot be read replaced by stand-ins."""
    first = 0
    for group in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        drop, first = max(0, skip - first), first + rows  # drop: this group's rows already given
        if drop >= rows:
            continue
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group]):
                part = batch.slice(max(0, drop - done))
                done += batch.num_rows
                if part.num_rows:
                    yield part
        except (OSError, pa.ArrowException) as exc:
            reason = f"input {name} row group {group} unreadable: {one_line(exc)}"
            yield _stand_ins(pf.schema_arrow, rows - max(done, drop), reason)


def _stand_ins(file_schema: pa.Schema, rows: int, reason: str) -> pa.RecordBatch:
    """`rows` rows of nulls in the file's columns, with `reason` in UNREADABLE."""
    return pa.RecordBatch.from_arrays([pa.nulls(rows, f.type) for f in file_schema] + [pa.array([reason] * rows, pa.string())],
                                      names=[*file_schema.names, UNREADABLE])


def check_url(url: object) -> str | None:
    """Why a URL cannot be fetched, or None when it looks like an http(s) address."""
    if url is None or not isinstance(url, str) or not url.strip():
        return "missing url"
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 host
        return f"unparsable url: {exc}"
    if parts.scheme.lower() == "file" or url.strip().startswith("/"):
        return "a local file: read only inside --local-root DIR (or give its folder as INPUT)"
    if parts.scheme.lower() not in ("http", "https"):
        return f"unsupported scheme {parts.scheme!r}" if parts.scheme else \
            "not an absolute url (a local path? --local-root DIR reads it, or give its folder as INPUT)"
    if not host:
        return "no host in url"
    return None


def _number(row: dict, names: tuple[str, ...]) -> float | None:
    """First present, finite numeric value among `names` (case-insensitive keys), else None."""
    lower = {k.lower(): v for k, v in row.items()}
    for name in names:
        value = lower.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def prefilter(row: dict, image: ImageConfig, filters: FilterConfig,
              allow_private_network: bool = False) -> tuple[str, str] | None:
    """Outcome and reason for a row dropped on its metadata alone, or None to download it.

    A URL whose host is a non-public IP literal is refused here; names are judged after DNS, by fetch.
    """
    bad = check_url(row.get("url"))
    if bad:
        return O.INVALID_URL, bad
    blocked = None if allow_private_network else refused_url(row["url"])
    if blocked:
        return O.BLOCKED_ADDRESS, blocked
    w, h = _number(row, ("width",)), _number(row, ("height",))
    if w and h and w > 0 and h > 0:
        problem = image.size_problem(w, h)
        if problem:
            return (O.FILTERED_SIZE if problem[0] == "small" else O.FILTERED_ASPECT), problem[1]
    checks = (
        ("punsafe", filters.max_punsafe, O.FILTERED_PUNSAFE, lambda v, t: v > t),
        ("pwatermark", filters.max_pwatermark, O.FILTERED_WATERMARK, lambda v, t: v > t),
        ("aesthetic", filters.min_aesthetic, O.FILTERED_AESTHETIC, lambda v, t: v < t),
        ("similarity", filters.min_similarity, O.FILTERED_SIMILARITY, lambda v, t: v < t),
    )
    for metric, threshold, outcome, fails in checks:
        if threshold is None:
            continue
        value = _number(row, METRIC_NAMES[metric])
        if value is None:
            continue  # a row without the metric is not judged on it
        if fails(value, threshold):
            return outcome, f"{metric} {value:.3g} vs {threshold}"
    return None
