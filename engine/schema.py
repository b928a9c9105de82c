"""Schema of each sample's KEY.json: every field in every sample, each with one JSON type.

Loaders that infer a schema from the first samples (Hugging Face datasets' webdataset builder reads
five) fail when a field is null there and set later, or an int there and a float later. So the
engine's own fields are always written, and each kept input column gets one kind for the whole run,
taken from the Arrow types of all the input files. A missing value is written as its kind's
documented stand-in, never as null: "" for text, NaN for floats (as pandas does), -1 for integers
(as datasets' ClassLabel does), false for booleans.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import numbers

import pyarrow as pa

from . import objinput, storage
from .caption import storable

STRING, INT, FLOAT, BOOL = "string", "int64", "float64", "bool"  # the kinds, named as datasets' dtypes
MISSING = {STRING: "", INT: -1, FLOAT: math.nan, BOOL: False}
# The engine's fields, written last so an input column of the same name never replaces them.
ENGINE_FIELDS = {
    "key": STRING, "url": STRING, "caption": STRING, "caption_clean": STRING, "width": INT, "height": INT,
    "format": STRING, "shard": INT, "row": INT, "content_hash": STRING, "pixel_hash": STRING, "phash": STRING,
}
RESERVED = {"url", "caption"}  # the input's URL and caption columns, renamed by engine/plan.py
UNREADABLE = "__engine_unreadable__"
"""Column of the stand-in rows of a damaged part of a parquet input (engine/plan.py): never written."""


def kind_of(arrow_type: pa.DataType) -> str:
    """The JSON kind an Arrow column is written as; text for everything not a plain number or flag."""
    if pa.types.is_boolean(arrow_type):
        return BOOL
    if pa.types.is_integer(arrow_type) and arrow_type != pa.uint64():  # uint64 may not fit int64
        return INT
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return FLOAT
    return STRING  # strings, binary, dates, times, lists, structs, maps, and all-null columns


def merge(a: str | None, b: str) -> str:
    """One kind for a column typed differently in two input files."""
    if a is None or a == b:
        return b
    return FLOAT if {a, b} == {INT, FLOAT} else STRING


def input_kinds(inputs: tuple[str, ...], url_col: str | None, caption_col: str | None) -> dict[str, str]:
    """Kind of every column of the parquet inputs (the URL and caption columns excepted), merged over
    all files, so every shard of a run writes a column alike. Worked out by the driver (plan.iter_shards,
    card.py: once per run, objinput.per_run), footers and list headers only; shards carry the result to
    the workers."""
    return objinput.per_run(("kinds", inputs, url_col, caption_col),
                            lambda: _input_kinds(inputs, url_col, caption_col))


def _input_kinds(inputs: tuple[str, ...], url_col: str | None, caption_col: str | None) -> dict[str, str]:
    """input_kinds, reading the inputs' schemas."""
    from .plan import CAPTION_NAMES, URL_NAMES, find_column, list_inputs

    kinds: dict[str, str] = {}
    try:
        paths = [p for p in list_inputs(inputs) if str(p).lower().endswith(".parquet")]  # a URL is a str
    except (OSError, ValueError):
        return kinds  # inputs the plan reads otherwise: each shard's Arrow types decide (shard_kinds)
    for path in paths:
        try:
            schema = objinput.parquet_file(path).schema.to_arrow_schema()  # what pq.read_schema gives
        except (OSError, ValueError, pa.ArrowException):
            continue
        names = schema.names
        skip = {find_column(names, url_col, URL_NAMES), find_column(names, caption_col, CAPTION_NAMES)}
        for field in schema:
            if field.name not in skip and field.name.lower() not in RESERVED:
                kinds[field.name] = merge(kinds.get(field.name), kind_of(field.type))
    kinds.update(_list_kinds(inputs, url_col, caption_col, kinds))
    return kinds


def _list_kinds(inputs: tuple[str, ...], url_col: str | None, caption_col: str | None,
                kinds: dict[str, str]) -> dict[str, str]:
    """Kinds of the columns of CSV/JSONL inputs (engine/sources.py), merged with `kinds`, so that
    shards holding only rows of other inputs write those columns too."""
    from .plan import CAPTION_NAMES, URL_NAMES, find_column, list_inputs
    from .sources import PATH_NAMES, TABLE_EXTS, table_schema

    merged: dict[str, str] = {}
    for path in (p for p in list_inputs(inputs)
                 if not storage.is_url(p) and p.suffix.lower() in TABLE_EXTS and p.is_file()):
        schema = table_schema(path, url_col)
        names = schema.names if schema else []
        try:
            skip = {find_column(names, url_col, URL_NAMES + PATH_NAMES), find_column(names, caption_col, CAPTION_NAMES)}
        except KeyError:
            continue  # a column flag this list lacks: the plan names it when it reads the list
        for field in schema or []:
            if field.name not in skip and field.name.lower() not in RESERVED:
                merged[field.name] = merge(merged.get(field.name, kinds.get(field.name)), kind_of(field.type))
    return merged


def shard_kinds(run_kinds: dict[str, str], schema: pa.Schema) -> dict[str, str]:
    """Kinds of a shard's input columns: every column of the run (those of other input files too), then
    any the run's parquet footers did not show (inputs read otherwise) typed by the shard's own schema."""
    kinds = dict(run_kinds)
    kinds.update({f.name: kind_of(f.type) for f in schema if f.name not in kinds and f.name not in RESERVED})
    return {name: kind for name, kind in kinds.items() if name not in ENGINE_FIELDS and name != UNREADABLE}


def as_kind(value, kind: str):
    """`value` as a JSON value of `kind`; a missing or unrepresentable one as MISSING[kind]."""
    exact = type(value)  # the usual values first, without the numbers ABCs' slow isinstance checks
    if exact is str and kind == STRING:
        return storable(value)
    if exact is int and kind == INT:
        return value
    if exact is float and kind == FLOAT:
        return value if math.isfinite(value) else MISSING[kind]
    if value is None:
        return MISSING[kind]
    if kind == STRING:
        return as_text(value)
    if kind == BOOL:
        return value if isinstance(value, bool) else MISSING[kind]
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        return MISSING[kind]  # numbers.Real: numpy scalars too (pyarrow gives float16 values as numpy's)
    if kind == INT and isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    if kind == FLOAT:
        return number if math.isfinite(number) else MISSING[kind]
    return int(number) if math.isfinite(number) and number.is_integer() else MISSING[kind]


def as_text(value) -> str:
    """Any parquet value as text: bytes decoded, dates in ISO form, nested values as compact JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (dt.date, dt.time, dt.datetime)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return storable(json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":")))
    return storable(value)


def sample_json(row: dict, kinds: dict[str, str], engine: dict) -> dict:
    """A sample's KEY.json: the input columns typed by `kinds`, then the engine's fields, all present."""
    meta = {name: as_kind(row.get(name), kind) for name, kind in kinds.items()}
    meta.update({name: as_kind(engine.get(name), kind) for name, kind in ENGINE_FIELDS.items()})
    return meta


def features(meta: dict) -> dict:
    """datasets' feature declaration (the card's YAML form) of a KEY.json written by sample_json."""
    kind = {str: STRING, bool: BOOL, int: INT, float: FLOAT}
    return {name: kind.get(type(value), STRING) for name, value in meta.items()}
