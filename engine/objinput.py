"""Inputs that are objects: parquet files at s3:// or gs:// URLs, read by the driver alone (shards
carry their rows to the workers). Local paths pass through unchanged, so callers need not ask which.

Every failure names the input, and the bucket, flag or credentials to change (engine/storefail.py).
"""

from __future__ import annotations

from pathlib import Path

from .storage import ObjectStore, OutputError, is_url, open_output
from .storefail import one_line

input_endpoint: str | None = None  # --s3-endpoint of the run reading its inputs (pipeline.run sets it)


def _parent(url: str) -> tuple[ObjectStore, str]:
    """The store holding an object URL, and the object's name in it."""
    parent, _, name = str(url).rstrip("/").rpartition("/")
    return open_output(parent, input_endpoint), name


def list_parquet(url: str) -> list[str]:
    """The parquet objects an INPUT URL names: itself, or every *.parquet directly under the prefix.
    A clear FileNotFoundError naming the input, and the bucket, flag or credentials to change."""
    if not url.lower().endswith(".parquet") and not url.endswith("/"):
        url += "/"
    store, name = _parent(url) if not url.endswith("/") else (open_output(url.rstrip("/"), input_endpoint), None)
    try:
        found = [url] if name and store.size(name) is not None else [] if name else \
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


def parquet_file(path):
    """A pq.ParquetFile of an input (a local path or an object URL); a clear error naming the input
    when it is no parquet file or cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(readable(path))
    except pa.ArrowInvalid as exc:
        raise ValueError(f"input {path}: not a parquet file ({one_line(exc)})") from None
    except OSError as exc:
        if not is_url(path) or isinstance(exc, FileNotFoundError):
            raise
        raise FileNotFoundError(str(_parent(path)[0].failure(exc, f"input {path}"))) from None


def readable(path):
    """What pyarrow reads an input from: a local path as it is, an object URL opened for random access."""
    if not is_url(path):
        return path
    store, name = _parent(path)
    return store.open(name)


def input_size(path) -> int:
    """An input's size in bytes (a local file or an object)."""
    if not is_url(path):
        return Path(path).stat().st_size
    store, name = _parent(path)
    size = store.size(name)
    if size is None:
        raise FileNotFoundError(f"input {path}: no such object")
    return size
