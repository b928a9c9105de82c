"""Inputs: what each INPUT names (parquet, a folder or glob of images, a CSV/JSONL list) and its rows.

Everything here is ordered (sorted listings, file order of rows), so the same inputs always give
the same rows, shard ids and keys, and a rerun resumes. Rows of images, CSV and JSONL are record
batches with a string `url` (the file's absolute path) and `caption` column, as plan.py reads
parquet; the folders the user named become local roots (engine/local.py reads only inside them).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa

from . import local, objinput, storage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
TABLE_EXTS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PATH_NAMES = ("path", "file", "file_name", "filename", "image", "image_path", "file_path")
"""Column names of a local file list's path column, after plan.URL_NAMES (any case)."""
MAX_CAPTION_BYTES = 1 << 20  # a .txt larger than this is not a caption (a log, a dump): ignored
GLOB_CHARS = set("*?[")
METADATA = ("metadata.jsonl", "metadata.csv")
"""A folder holding one of these is read as that list (file_name, text), as datasets' imagefolder does."""


@dataclass(frozen=True)
class Input:
    """One input as the plan reads it: a parquet file, a CSV/JSONL list, or a group of images."""

    kind: str
    """'parquet', 'csv', 'jsonl' or 'images'."""
    path: Path
    """The file; for 'images' the folder the images lie in (the glob's fixed part)."""
    name: str
    """How run.json and messages name it."""
    files: tuple[Path, ...] = field(default=(), repr=False)
    """'images': the image files, sorted by their path relative to `path`."""

    def root(self) -> Path | None:
        """The folder whose files this input may read (None: only --local-root ones)."""
        if self.kind == "parquet":  # its path may be an object's URL (a str)
            return None
        return {"images": self.path, "csv": self.path.parent, "jsonl": self.path.parent}.get(self.kind)


def expand(inputs, files: bool = True) -> list[Input]:
    """Every INPUT as Inputs, in the order given, each folder and glob in sorted order; without
    `files`, a folder of images is not listed (what kind each input is, cheaply)."""
    found = [i for item in inputs for i in _expand_one(str(item), files)]
    if not found:
        raise FileNotFoundError(f"no parquet, CSV/JSONL or image files in {list(inputs)}")
    return found


def _expand_one(item: str, files: bool = True) -> list[Input]:
    """The Inputs one INPUT names: a folder, a file or a glob; or parquet objects of a store (a URL)."""
    if storage.is_url(item):  # path: the object's URL (a str), read by the driver only (engine/storage.py)
        return [Input("parquet", url, url.rsplit("/", 1)[-1]) for url in objinput.list_parquet(item)]
    p = Path(item)
    if p.is_dir():
        parquet = _walk(p, (".parquet",))
        if parquet:  # a folder of parquet keeps its meaning: URL lists
            return [Input("parquet", f, f.name) for f in parquet]
        listed = [p / n for n in METADATA if (p / n).is_file()]
        if listed:  # Hugging Face imagefolder's layout: the list names the images and their captions
            return [_file_input(listed[0])]
        if not files:
            return [Input("images", p.absolute(), p.absolute().name or item)]
        images = list_images(p)
        if not images:
            raise FileNotFoundError(f"input folder {item!r} holds no parquet files and no images "
                                    f"({', '.join(sorted(e[1:] for e in IMAGE_EXTS))})")
        return [Input("images", p.absolute(), p.absolute().name or item, tuple(images))]
    if p.is_file():
        return [_file_input(p)]
    if GLOB_CHARS & set(item):
        return _glob(item)
    raise FileNotFoundError(f"input {item!r} is neither a file, a folder nor a glob that matches files")


def _file_input(p: Path) -> Input:
    """A file INPUT: a CSV/JSONL list, one image (its folder the root), else parquet."""
    ext = p.suffix.lower()
    if ext in TABLE_EXTS:
        return Input(TABLE_EXTS[ext], p.absolute(), p.name)
    if ext in IMAGE_EXTS:
        return Input("images", p.absolute().parent, p.name, (p.absolute(),))
    return Input("parquet", p, p.name)


def _glob(pattern: str) -> list[Input]:
    """A glob's matches (`**` recursive), sorted: images in one group rooted at the glob's fixed folder."""
    matches = sorted(glob.glob(pattern, recursive=True))
    root = Path(_fixed_part(pattern)).absolute()
    images = [Path(m).absolute() for m in matches if Path(m).suffix.lower() in IMAGE_EXTS and not Path(m).is_dir()]
    others = [i for m in matches if Path(m).suffix.lower() not in IMAGE_EXTS
              and (Path(m).is_dir() or Path(m).suffix.lower() in TABLE_EXTS | {".parquet"})
              for i in _expand_one(m)]
    if not images and not others:
        raise FileNotFoundError(f"input glob {pattern!r} matches no parquet, CSV/JSONL or image files")
    group = [Input("images", root, pattern, tuple(sorted(images, key=lambda f: _rel(f, root))))] if images else []
    return group + others


def _fixed_part(pattern: str) -> str:
    """The folder before a glob's first wildcard ('photos/**/*.jpg' -> 'photos')."""
    parts = Path(pattern).parts
    fixed = [] if not parts else list(parts[:next((i for i, s in enumerate(parts) if GLOB_CHARS & set(s)),
                                                  len(parts))])
    return str(Path(*fixed)) if fixed else "."


def _rel(path: Path, root: Path) -> str:
    """`path` relative to `root` as a sort key (posix separators)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursive, sorted by relative path). Hidden entries are skipped, and
    so are symlinked folders (never followed) and engine output folders (their run.json says so)."""
    root = root.absolute()
    return sorted(_walk(root, tuple(IMAGE_EXTS), hidden=False), key=lambda f: _rel(f, root))


def _walk(root: Path, exts: tuple[str, ...], hidden: bool = True) -> list[Path]:
    """Files under `root` ending in `exts` (any case), sorted, outside engine output folders: shards
    written into a folder inside the input (their .parquet, preview .png) must not become input."""
    found = []
    for folder, dirs, files in os.walk(root):
        if folder != str(root) and "run.json" in files:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if hidden or not d.startswith("."))
        found += [Path(folder, f) for f in files
                  if (hidden or not f.startswith(".")) and f.lower().endswith(exts)]
    return sorted(found)


def caption_file(image: Path) -> Path:
    """The same-stem .txt that holds an image's caption."""
    return image.with_suffix(".txt")


def read_caption(image: Path, root: Path) -> str | None:
    """The image's .txt caption (stripped), or None: missing, not a regular file, too large, or
    resolving outside `root` (a symlink must not smuggle another file's text into the dataset)."""
    try:
        local.resolve(str(caption_file(image)), (str(root),))
        fd = os.open(caption_file(image), os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CAPTION_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_CAPTION_BYTES).decode("utf-8", "replace").lstrip("\ufeff").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def batches(inp: Input, batch_rows: int, url_col: str | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of a non-parquet input as record batches (url, caption, other columns)."""
    if inp.kind == "images":
        for start in range(0, len(inp.files), batch_rows):
            chunk = inp.files[start:start + batch_rows]
            yield pa.RecordBatch.from_arrays(
                [pa.array([url_of(f) for f in chunk], pa.string()),
                 pa.array([read_caption(f, inp.path) for f in chunk], pa.string())], names=["url", "caption"])
        return
    yield from read_table(inp, url_col).to_batches(max_chunksize=batch_rows)


def url_of(path: Path) -> str:
    """A file's row URL: its absolute path, or a file:// URL when the name is not UTF-8 (bytes that
    Arrow's strings cannot hold; engine/local.py decodes them back)."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(text))


def table_schema(path: Path, url_col: str | None) -> pa.Schema | None:
    """The schema a CSV/JSONL list's rows get (engine/schema.py types KEY.json by it), None if unreadable."""
    try:
        return read_table(_file_input(path), url_col).schema
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def records(inp: Input) -> list[dict]:
    """A CSV/JSONL list's rows as dicts, in file order."""
    return _csv_records(inp.path) if inp.kind == "csv" else _jsonl_records(inp.path)


def read_table(inp: Input, url_col: str | None = None) -> pa.Table:
    """A CSV/JSONL list as a table; relative local paths made absolute against the list's folder.
    A path column named as PATH_NAMES says (HF imagefolder's file_name too) becomes `url`. Parsed once
    per run (objinput.per_run): the input check, the run's column types and the shards all ask for it."""
    return objinput.per_run(("list", str(inp.path), url_col), lambda: _read_table(inp, url_col))


def _read_table(inp: Input, url_col: str | None) -> pa.Table:
    """read_table, parsing the list."""
    from .plan import URL_NAMES, find_column  # plan imports this module

    rows = records(inp)
    if not rows:  # a header alone, or an empty file: no rows, no error
        return pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    names = list(dict.fromkeys(k for r in rows for k in r if isinstance(k, str)))
    url = find_column(names, url_col, URL_NAMES + PATH_NAMES)
    if url is None:
        raise KeyError(f"{inp.path}: no path/URL column (looked for {URL_NAMES + PATH_NAMES}, any case) "
                       f"among {names}; use --url-col")
    cols = {n: _column([r.get(n) for r in rows], text=n == url) for n in names}
    cols[url] = pa.array([_absolute(v, inp.path.parent) for v in cols[url].to_pylist()], pa.string())
    if url_col is None and find_column(names, None, URL_NAMES) is None:
        cols = {("url" if n == url else n): c for n, c in cols.items() if n == url or n.lower() != "url"}
    return pa.table(cols)


def _csv_records(path: Path) -> list[dict]:
    """A CSV's rows as dicts of strings (a short row's missing cells None; extra cells dropped)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        text = f.read().lstrip("\ufeff")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))  # long captions exist; 128 KiB by default
    reader = csv.DictReader(io.StringIO(text), dialect="excel-tab" if path.suffix.lower() == ".tsv" else "excel")
    try:
        rows = [{k: v for k, v in r.items() if k is not None} for r in reader]
    except csv.Error as exc:  # a message naming the file, not a traceback
        raise ValueError(f"{path}: not a readable CSV: {exc}") from exc
    return rows


def _jsonl_records(path: Path) -> list[dict]:
    """A JSONL's rows; a line that is not a JSON object is kept as a row without a URL (counted, not lost).
    A byte order mark is skipped, as in a CSV (editors on Windows write one)."""
    records = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
                value = None
            records.append(value if isinstance(value, dict) else {})
    return records


def _column(values: list, text: bool = False) -> pa.Array:
    """One typed column: numbers, flags or text (CSV cells that all read as numbers become numbers)."""
    present = [v for v in values if v is not None and v != ""]
    if not text and present and all(isinstance(v, bool) for v in present):
        return pa.array([v if isinstance(v, bool) else None for v in values], pa.bool_())
    if not text and present:
        numbers = [_number(v) for v in values]
        if all(n is not None for n, v in zip(numbers, values, strict=True) if v is not None and v != ""):
            ints = all(isinstance(n, int) for n in numbers if n is not None)
            return pa.array(numbers, pa.int64() if ints else pa.float64())
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for v in values], pa.string())


def _number(v) -> int | float | None:
    """A JSON number or a CSV cell that reads as one (int64 range), else None."""
    if isinstance(v, bool) or v is None or v == "":
        return None
    if isinstance(v, int):
        return v if -(1 << 63) <= v < (1 << 63) else None
    if isinstance(v, float):
        return v
    if not isinstance(v, str):
        return None
    try:
        n = int(v)
        return n if -(1 << 63) <= n < (1 << 63) else None
    except ValueError:
        pass
    try:
        f = float(v)
        return f if math.isfinite(f) or v.strip().lower() in ("nan", "inf", "-inf") else None
    except ValueError:
        return None


def _absolute(value: str | None, folder: Path) -> str | None:
    """A relative local path resolved against the list's folder; URLs and absolute paths unchanged."""
    if not value or not value.strip() or not local.is_local(value.strip()):
        return value
    v = value.strip()
    if os.path.isabs(v) or local.to_path(v) != v:  # absolute, or a file:// URL
        return value
    return str(folder / v)


def roots(inputs: list[Input]) -> tuple[str, ...]:
    """The folders the inputs name, whose files their rows may read (sorted, no repeats). The file
    system's root is refused: it would let any row of any input (a downloaded URL list too) read any file."""
    found = {r for i in inputs if (r := i.root()) is not None}
    if any(r.parent == r for r in found):
        raise ValueError("an INPUT makes the whole file system readable (a glob or file directly under /): "
                         "name a folder below it")
    return tuple(sorted(str(r) for r in found))


def describe(inp: Input) -> dict:
    """Name, size, rows and a content hash of a non-parquet input, for run.json (engine/fingerprint.py)."""
    if inp.kind == "images":
        h, total = hashlib.sha256(), 0
        for f in inp.files:
            sizes = [_size(f), _size(caption_file(f))]
            total += sum(max(s, 0) for s in sizes)
            h.update(f"{_rel(f, inp.path)}\0{sizes[0]}\0{sizes[1]}\n".encode("utf-8", "surrogateescape"))
        return {"name": inp.name, "bytes": total, "rows": len(inp.files), "footer": h.hexdigest()[:16],
                "path": str(inp.path.resolve())}
    h = hashlib.sha256()
    with open(inp.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"name": inp.name, "bytes": inp.path.stat().st_size, "rows": len(records(inp)),
            "footer": h.hexdigest()[:16], "path": str(inp.path.resolve())}


def _size(path: Path) -> int:
    """A file's size, -1 when it is missing (or a broken symlink)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1
