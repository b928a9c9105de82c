"""Inputs that are objects: parquet files at s3:// or gs:// URLs, read by the driver alone (shards
carry their rows to the workers). Local paths pass through unchanged, so callers need not ask which.

A run asks about each input several times (run.json's fingerprint: rows, size, footer; the schema of
KEY.json; the plan's rows): opened each time, that was 5 HEADs and 6 GETs a small input on moto, and
its prefix listed 4 times. Inside `run_scope` (pipeline.run) each prefix is listed once and each object
opened once (one HEAD) with its footer read in the first GET (a small object: all of it), kept for that
run only: a rerun asks the store afresh (tests/test_s3.py counts the requests).

Every failure names the input, and the bucket, flag or credentials to change (engine/storefail.py).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

from .storage import ObjectStore, OutputError, is_url, open_output
from .storefail import one_line

input_endpoint: str | None = None  # --s3-endpoint of the run reading its inputs (pipeline.run sets it)
TAIL = 1 << 16  # bytes read from an object input's end when it is opened: its footer, as pyarrow's first read
_RUN: dict | None = None  # what this run has asked about its inputs (run_scope), None outside a run
_RUN_LOCK = threading.RLock()  # per_run's calls nest (an input's metadata needs its opened object)


@contextlib.contextmanager
def run_scope():
    """Within: per_run keeps each answer (listings, opened objects, schemas) for this run; after,
    the objects are closed and the next run asks again (an input may have changed in between)."""
    global _RUN
    outer, _RUN = _RUN, {}
    try:
        yield
    finally:
        done, _RUN = _RUN, outer
        for value in done.values():
            if isinstance(value, Opened):
                value.file.close()


def per_run(key: tuple, make):
    """make()'s value, made once per run inside run_scope (errors are not kept); every call outside one."""
    if _RUN is None:
        return make()
    with _RUN_LOCK:
        if key not in _RUN:
            _RUN[key] = make()
        return _RUN[key]


@dataclass
class Opened:
    """An object input opened for random access, with its last bytes (the parquet footer) read."""

    file: object
    """The store's file of the object (ObjectStore.open); a BufferReader of `tail` when that holds all of it."""
    size: int
    """The object's size in bytes (from the open's HEAD)."""
    tail: bytes
    """Its last min(size, TAIL) bytes, or more: the whole footer and the 8 bytes after it."""

    def footer(self) -> bytes:
        """The parquet footer's bytes (FileMetaData), as they are stored; b"" when there is none."""
        if len(self.tail) < 12 or self.tail[-4:] != b"PAR1":
            return b""
        length = int.from_bytes(self.tail[-8:-4], "little")
        return self.tail[-8 - length:-8] if length + 8 <= len(self.tail) else b""


def _parent(url: str) -> tuple[ObjectStore, str]:
    """The store holding an object URL, and the object's name in it."""
    parent, _, name = str(url).rstrip("/").rpartition("/")
    return open_output(parent, input_endpoint), name


def list_parquet(url: str) -> list[str]:
    """The parquet objects an INPUT URL names: itself, or every *.parquet directly under the prefix
    (listed once per run). A clear FileNotFoundError naming the input, and the bucket, flag or
    credentials to change."""
    return per_run(("list", url), lambda: _list_parquet(url))


def _list_parquet(url: str) -> list[str]:
    """list_parquet, asking the store: a named object is opened (kept for the run), a prefix listed."""
    if not url.lower().endswith(".parquet") and not url.endswith("/"):
        url += "/"
    store, name = _parent(url) if not url.endswith("/") else (open_output(url.rstrip("/"), input_endpoint), None)
    try:
        found = [url] if name and _exists(url) else [] if name else \
            [f"{store.url}/{n}" for n in store.names("*.parquet")]
        if not found:
            store.check(f"input {url}")  # a missing bucket, a wrong endpoint: said as such
    except OSError as exc:
        raise FileNotFoundError(str(store.failure(exc, f"input {url}"))) from None
    except OutputError as exc:
        raise FileNotFoundError(str(exc)) from None
    if not found:
        raise FileNotFoundError(f"input {url}: no such object" if name else
                                f"input {url}: no .parquet objects under it (only parquet inputs may be URLs)")
    return found


def _exists(url: str) -> bool:
    """Whether the object is there: opened (and kept for the run), as it will be read anyway."""
    try:
        opened(url)
    except FileNotFoundError:
        return False
    return True


def opened(url: str) -> Opened:
    """The object at `url` opened and its tail read: once per run (one HEAD, one GET; a second GET
    only for a footer longer than TAIL; gs://: the whole object, storage.BoundedFile). FileNotFoundError
    when there is none; other OSErrors as raised."""
    return per_run(("open", url), lambda: _open(url))


def _open(url: str) -> Opened:
    """Open the object and read its tail; an object no bigger than TAIL is then read from memory."""
    import pyarrow as pa

    store, name = _parent(url)
    f = store.open(name)
    size = f.size()
    tail = f.read_at(min(size, TAIL), size - min(size, TAIL))
    if len(tail) >= 12 and tail[-4:] == b"PAR1":
        whole = int.from_bytes(tail[-8:-4], "little") + 8
        if len(tail) < whole <= size:  # a footer longer than TAIL (thousands of row groups)
            tail = f.read_at(whole, size - whole)
    if len(tail) == size:
        f.close()
        f = pa.BufferReader(tail)
    return Opened(f, size, tail)


def parquet_file(path):
    """A pq.ParquetFile of an input (a local path or an object URL; an object's footer parsed once per
    run, its data read through the object opened once); a clear error naming the input when it is no
    parquet file or cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if not is_url(path):
            return pq.ParquetFile(path)
        return pq.ParquetFile(opened(path).file, metadata=per_run(("metadata", path), lambda: _metadata(path)))
    except pa.ArrowInvalid as exc:
        raise ValueError(f"input {path}: not a parquet file ({one_line(exc)})") from None
    except OSError as exc:
        if not is_url(path) or isinstance(exc, FileNotFoundError):
            raise
        raise FileNotFoundError(str(_parent(path)[0].failure(exc, f"input {path}"))) from None


def _metadata(url: str):
    """The parquet metadata of an object input, parsed from the tail read when it was opened."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.ParquetFile(pa.BufferReader(opened(url).tail)).metadata


def footer(path) -> bytes:
    """An input's parquet footer as stored (a local file's read from disk, an object's from its tail)."""
    if is_url(path):
        return opened(path).footer()
    with open(path, "rb") as f:
        f.seek(-8, 2)
        length = int.from_bytes(f.read(4), "little")
        f.seek(-8 - length, 2)
        return f.read(length)


def input_size(path) -> int:
    """An input's size in bytes (a local file or an object)."""
    if not is_url(path):
        return Path(path).stat().st_size
    try:
        return opened(path).size
    except FileNotFoundError:
        raise FileNotFoundError(f"input {path}: no such object") from None
