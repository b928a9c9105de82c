"""Write: samples -> a WebDataset tar, plus the per-row parquet and the shard's stats.

Every file is written under a temporary name and renamed into place, so a file with a final
name is always whole. The stats file is renamed last: its presence marks the shard done. Before
it is, the tar is read back against the shard's `ok` rows, and the folder is flushed after the
renames. Any failure on the way fails the whole shard (ShardWriteError), leaving no temporary.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import sample as S
from .atomic import TMP_SUFFIX, fsync_dir, stage, tmp_path, write_atomic
from .sample import SAMPLE_MEMBERS

# Per-row parquet schema: fixed columns first, so shards concatenate cleanly.
ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("outcome", pa.string()), ("reason", pa.string()), ("http_status", pa.int32()),
    ("bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()),
    ("content_hash", pa.int64()), ("pixel_hash", pa.int64()), ("phash", pa.int64()),
    ("duplicate_of", pa.string()), ("seconds", pa.float32()),
])


def _dump(obj: dict) -> str:
    """JSON as every file of the output folder is written."""
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)


def write_json(obj: dict, final: Path) -> None:
    """Atomically write a JSON file."""
    write_atomic(final, lambda tmp: tmp.write_text(_dump(obj)))


def _rows_table(rows: list[dict]) -> pa.Table:
    """The per-row records as the parquet schema."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def write_rows(rows: list[dict], final: Path) -> None:
    """Atomically write the per-row parquet (one row per input row)."""
    table = _rows_table(rows)
    write_atomic(final, lambda tmp: pq.write_table(table, tmp))


class ShardWriteError(RuntimeError):
    """Writing a shard failed (disk full, file too large, I/O error) or its tar read back wrong.

    Like the dedup index failing, it fails the whole shard (retried by the driver, then left
    pending), since turning it into per-row errors would keep a tar missing `ok` samples."""


def _member_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    """A sample member as webdataset.TarWriter describes it: a regular file, mode 0444, owner bigdata."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444
    info.uname = info.gname = "bigdata"
    return info


def _ustar(info: tarfile.TarInfo) -> bytes:
    """tarfile's own header block for `info` (USTAR, as the engine has always written)."""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


_TEMPLATE = _ustar(_member_info("", 0, 0))  # tarfile's header with name, size and mtime left empty
_OCTAL11 = 8 ** 11  # what USTAR's 11 octal digits of size and mtime hold


def member_header(name: str, size: int, mtime: float) -> bytes:
    """The header tarfile writes for this member (_ustar(_member_info(...))), filled into its template:
    name, size, mtime and checksum at their USTAR offsets, a tenth of TarInfo.tobuf's 48 CPU-us."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) > 100 or not (0 <= size < _OCTAL11 and 0 <= mtime < _OCTAL11):
        return _ustar(_member_info(name, size, mtime))  # long names and huge sizes: tarfile's way or its error
    block = bytearray(_TEMPLATE)
    block[0:len(raw)] = raw
    block[124:156] = b"%011o\0%011o\0        " % (size, int(mtime))  # size, mtime, checksum as 8 spaces
    block[148:155] = b"%06o\0" % sum(block)  # summed over those spaces, as tarfile does
    return bytes(block)


class SampleTarWriter:
    """The tar members webdataset.TarWriter writes (KEY.EXT, sorted by EXT, mode 0444), written
    with the standard library: webdataset imports torch, about 2.3 CPU-s per worker process.

    A sample's headers (member_header), payloads and padding go out in one write, the bytes
    tarfile's own writer would produce: its stream mode copies every payload through a 10 KB
    buffer (bench/stage_choices.py: 0.44 -> 0.16 CPU-ms a sample, written to memory)."""

    def __init__(self, stream):
        self.stream, self.offset, self.closed = stream, 0, False

    def write(self, sample: dict) -> None:
        """Append one sample: {"__key__": KEY, EXT: bytes, ...}."""
        key, now, parts = sample["__key__"], time.time(), []
        for ext in sorted(k for k in sample if k != "__key__"):
            data = sample[ext]
            parts += (member_header(f"{key}.{ext}", len(data), now), data,
                      tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
        block = b"".join(parts)
        self.stream.write(block)
        self.offset += len(block)

    def close(self) -> None:
        """Write the end-of-archive blocks, padded to a whole record as tarfile does (the stream stays open)."""
        if self.closed:
            return
        self.closed = True
        self.offset += 2 * tarfile.BLOCKSIZE
        self.stream.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -self.offset % tarfile.RECORDSIZE))


class TarShard:
    """A tar being written under a temporary name; `commit` (or `publish_shard`) renames it into place.

    The first failed write marks the tar broken: later writes fail at once with the same error,
    so no row is counted `ok` after the tar stopped growing."""

    def __init__(self, final: Path):
        self.final, self.tmp = final, tmp_path(final)
        self.stream = open(self.tmp, "wb")
        self.writer = SampleTarWriter(self.stream)
        self.count = 0
        self.broken: str | None = None

    def write(self, key: str, jpg: bytes, cond_png: bytes, caption: str, meta: dict) -> None:
        """Append one sample: KEY.jpg, KEY.cond.png, KEY.txt, KEY.json."""
        if self.broken:
            raise ShardWriteError(self.broken)
        try:
            self.writer.write({
                "__key__": key, S.JPG: jpg, S.COND: cond_png, S.TXT: caption.encode("utf-8"),
                S.JSON: json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace"),
            })
        except Exception as exc:  # a half-written member leaves the tar unusable, whatever the cause
            self.broken = f"writing {self.final.name}: {type(exc).__name__}: {exc}"
            raise ShardWriteError(self.broken) from exc
        self.count += 1

    def close(self) -> None:
        """End the archive under its temporary name and flush it to disk."""
        if self.broken:
            raise ShardWriteError(self.broken)
        try:
            try:
                self.writer.close()
                self.stream.flush()
                os.fsync(self.stream.fileno())
            finally:
                self.stream.close()
        except OSError as exc:
            self.broken = f"closing {self.final.name}: {type(exc).__name__}: {exc}"
            raise ShardWriteError(self.broken) from exc

    def commit(self) -> None:
        """Close the tar and rename it to its final name."""
        self.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        """Close and delete the temporary file (errors on the way out change nothing: it goes)."""
        try:
            self.writer.close()
            self.stream.close()
        except Exception:  # noqa: BLE001, S110 -- a full disk fails the close too; the file is removed anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def tar_problem(path: Path, keys: list[str]) -> str | None:
    """What is wrong with the tar at `path` as the samples `keys` (None: nothing).

    Reads member headers only (tarfile seeks past the data): every key must have exactly the
    SAMPLE_MEMBERS as whole regular files and no other key may be present, so a short, truncated
    or mixed tar is caught without decoding an image."""
    size = path.stat().st_size
    found: dict[str, Counter] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile() or m.offset_data + m.size > size:
                    return f"member {m.name} is cut short"
                key, _, ext = m.name.partition(".")
                found.setdefault(key, Counter())[ext] += 1
    except tarfile.TarError as exc:
        return f"unreadable ({exc})"
    wanted = Counter(SAMPLE_MEMBERS)
    missing = [k for k in keys if k not in found]
    extra = sorted(set(found) - set(keys))
    partial = [k for k in keys if k in found and found[k] != wanted]
    problems = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in (
        ("ok rows missing", missing), ("keys without an ok row", extra),
        (f"keys without exactly {', '.join(SAMPLE_MEMBERS)}", partial)) if v]
    return "; ".join(problems) or None


def publish_shard(tar: TarShard, records: list[dict], stats: dict, ok_keys: list[str]) -> dict:
    """Read the tar back against `ok_keys`, then move tar, parquet and (last) the stats marker
    into place, flushing the folder before and after the marker.

    Any I/O error or mismatch removes every temporary and raises ShardWriteError. Returns the
    stats as written: with the files' sizes, which a resumed run checks before trusting them."""
    out, name = tar.final.parent, tar.final.name.removesuffix(".tar")
    parquet, marker = out / f"{name}.parquet", out / f"{name}{S.STATS_SUFFIX}"
    staged = [tar.tmp]
    try:
        tar.close()
        problem = tar_problem(tar.tmp, ok_keys)
        if problem:
            raise ShardWriteError(f"{tar.final.name} read back wrong: {problem}")
        table = _rows_table(records)
        staged.append(stage(parquet, lambda tmp: pq.write_table(table, tmp)))
        stats = {**stats, "tar_bytes": staged[0].stat().st_size, "parquet_bytes": staged[1].stat().st_size}
        staged.append(stage(marker, lambda tmp: tmp.write_text(_dump(stats))))
        marker.unlink(missing_ok=True)  # a marker left by an untrusted earlier attempt goes first
        os.replace(staged[0], tar.final)
        os.replace(staged[1], parquet)
        fsync_dir(out)  # tar and parquet are on disk before the marker that vouches for them
        os.replace(staged[2], marker)
        fsync_dir(out)
    except OSError as exc:
        raise ShardWriteError(f"writing shard {name}: {type(exc).__name__}: {exc}") from exc
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)  # no-op for the ones renamed into place
    return stats


def remove_stale_tmp(output: Path) -> int:
    """Delete temporary files left by killed runs; returns how many."""
    stale = list(output.glob(f"*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
