"""Local files as input: rows whose URL is a plain path or a file:// URL, read from disk.

Only with an explicit --local-root: without one such rows stay invalid_url (plan.check_url), so
a URL list can never make the engine read the machine's own files. With roots, the path is
resolved (symlinks and `..` included) and refused unless it lies inside one of them; only
regular files are read (never a FIFO or a device that would block or never end).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from . import outcomes as O

if TYPE_CHECKING:  # imported in read(): the driver plans through this module and needs no aiohttp
    from .fetch import FetchResult

PLACEHOLDER_URL = "http://local.file/"
"""What plan.prefilter sees instead of a local path (its URL check knows only http(s))."""


def is_local(url: str) -> bool:
    """Whether `url` names a local file: file://... or a path without a scheme."""
    scheme = urlsplit(url).scheme.lower()
    return scheme == "file" or scheme == "" or (len(scheme) == 1 and url[1:2] == ":")  # C:\ on Windows


def to_path(url: str) -> str:
    """The filesystem path of a file:// URL (percent-decoded) or of a plain path."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL names another host: {parts.netloc!r}")
        return unquote(parts.path, errors="surrogateescape")  # a name of non-UTF-8 bytes stays those bytes
    return url


def resolve(url: str, roots: tuple[str, ...]) -> Path:
    """The real path of `url` inside one of `roots`; ValueError when it is outside all of them."""
    raw = to_path(url)
    if not raw or "\x00" in raw:
        raise ValueError("empty path or NUL byte in path")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    candidates = [Path(raw)] if os.path.isabs(raw) else [Path(r) / raw for r in roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if any(real == root or real.is_relative_to(root) for root in real_roots):
            return real
    raise ValueError(f"{raw} is outside the input folders and every --local-root")


def read(url: str, roots: tuple[str, ...], max_bytes: int) -> FetchResult:
    """A file's bytes as a FetchResult (the shape fetch() returns), or the outcome that explains why not."""
    from .fetch import FetchResult

    start = time.monotonic()
    result = FetchResult(url=url, attempts=1)
    try:
        path = resolve(url, roots)
    except ValueError as exc:
        result.outcome, result.reason = O.INVALID_URL, f"local file refused: {exc}"[:300]
    else:
        result.body, result.outcome, result.reason = _read_regular(path, max_bytes)
    result.seconds = time.monotonic() - start
    return result


def _read_regular(path: Path, max_bytes: int) -> tuple[bytes | None, str | None, str]:
    """(body, None, "") or (None, outcome, reason) for one resolved path."""
    try:
        # O_NOFOLLOW: the last component cannot be swapped for a symlink after resolve();
        # O_NONBLOCK: opening a FIFO never waits for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, O.HTTP_ERROR, f"local file not found: {path}"
    except OSError as exc:
        return None, O.HTTP_ERROR, f"local file unreadable: {exc.strerror}: {path}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, O.HTTP_ERROR, f"not a regular file: {path}"
        if info.st_size > max_bytes:
            return None, O.TOO_LARGE, f"{info.st_size} bytes > --max-bytes {max_bytes}"
        with os.fdopen(os.dup(fd), "rb") as f:
            body = f.read(max_bytes + 1)
    except OSError as exc:
        return None, O.HTTP_ERROR, f"local file unreadable: {exc.strerror}: {path}"
    finally:
        os.close(fd)
    if len(body) > max_bytes:  # grew while we read it
        return None, O.TOO_LARGE, f"more than --max-bytes {max_bytes}"
    return body, None, ""
