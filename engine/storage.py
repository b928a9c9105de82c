"""Storage: where a run's files live, a local folder or an object store, behind one small interface.

`open_output(output, endpoint)` gives a Store: a LocalStore for a folder, an ObjectStore for
`s3://bucket/prefix` (and `gs://bucket/prefix`) through pyarrow.fs, already a dependency: its S3
and GCS file systems read and write parquet natively, take an endpoint (S3-compatible servers) and
find credentials as the AWS/Google SDKs do (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an
instance role; gcloud credentials). fsspec would add s3fs/gcsfs and their aiohttp/botocore stack.

The pipeline asks a Store for: the done markers, small files (run.json, stats.json, README.md, the
lease) read and written whole, a shard's parquet, and a staging folder for each shard. On disk a
shard is built and renamed into place in the output folder itself (engine/write.py). On an object
store it is built the same way in a local temporary folder, then uploaded: tar and parquet first,
the NNNNN.stats.json marker last; an object store has no rename, but a single object appears whole
or not at all, so a marker still vouches only for files already there, and resume checks their
sizes against it as on disk (pipeline.trusted). A staging folder that a killed process left
(named after its host and pid) is removed by the next process that stages a shard on that host.
The single-writer rule is a lease object (LEASE): see engine/lease.py.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

from . import storefail
from .lease import LEASE, LEASE_TTL_S, RENEW_S, SETTLE_S, Leased, pid_alive  # noqa: F401 - importable here
from .sample import STATS_SUFFIX

SCHEMES = ("s3://", "gs://", "gcs://")
MARKER = f"[0-9][0-9][0-9][0-9][0-9]*{STATS_SUFFIX}"
STAGING_PREFIX = "ctrlnet-shard-"  # an object store's local shard folders: STAGING_PREFIX + "HOST-PID-" + mkdtemp's suffix
_STAGING_RE = re.compile(re.escape(STAGING_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[^-]+")
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")
GCS_RETRY_S = 20.0  # how long a GCS request is retried (pyarrow's default, 15 min, looks like a hang)
# How long one gs:// call may take before it is abandoned. pyarrow sets no request timeout on its GCS
# client: google-cloud-cpp's own stall timeout (120 s without a byte, not reachable from pyarrow) holds
# each request to a server that takes it and never answers for 2 min (several per failed shard), and
# one trickling a byte a second forever. So each call runs on a thread the store stops waiting for
# (ObjectStore._ask). Above GCS_RETRY_S: the SDK's own error, when it has one, comes first.
GCS_STALL_S = 30.0


class OutputError(ValueError):
    """--output cannot hold the shards: a file, a path under a file, a folder not writable, or an
    object store that cannot be reached."""


class StoreLost(RuntimeError):
    """The object store of --output stopped answering mid-run: the run stops, its complete shards
    are kept (each vouched for by its marker), and a rerun resumes once the store answers again.
    Not an OSError: the runners take those for a dead worker and carry on."""


class RunnerLost(RuntimeError):
    """A part of the runner that the whole run needs died mid-run (under Ray: the actor holding the dedup index
    and the progress counts, its worker process killed or out of memory): the run stops, its complete shards are
    kept (each vouched for by its marker), and a rerun resumes. Said in one line, exit 1, not as a traceback.
    Here, beside StoreLost, so the CLI catches it without importing the runners."""


class Stalled(OSError):
    """A gs:// request the store took and never answered within GCS_STALL_S (an OSError, as any failed
    request: the paths that handle those, the store lost mid-run included, handle it alike)."""


def bounded(call, seconds: float, what: str):
    """call()'s value, or its exception, when it ends within `seconds`; else Stalled naming `what`. The
    stuck call is left on its daemon thread (nothing can stop a request inside the C++ SDK), which
    keeps whatever it uses alive: no stream of it is closed, so no object is completed half-written."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller below, whatever it is
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="gcs-call")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise Stalled(f"{what} got no answer in {seconds:g} s (pyarrow's GCS client has no request timeout of its "
                      "own: the request was abandoned)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store rather than a local path."""
    return str(path).startswith(SCHEMES)


def absolute(path: str) -> str:
    """A local path made absolute (a Ray worker's working folder is not the driver's); URLs as given."""
    return path if is_url(path) else os.path.abspath(path)


def _dump(obj: dict) -> bytes:
    """JSON as every file of the output is written."""
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode("utf-8")


class LocalStore:
    """A local (or shared-filesystem) folder: files are staged and renamed into place, then flushed."""

    remote = False
    held = None  # no lease object: the flock of lock() keeps the folder to one run
    lost = None  # a folder is never lost mid-run: its failures are the disk's

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.url = str(self.folder)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names of the files directly in the folder matching the glob `pattern`."""
        return sorted(p.name for p in self.folder.glob(pattern) if p.is_file())

    def read(self, name: str) -> bytes | None:
        """A file's bytes, None when it does not exist."""
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        """A file's size, None when it is not a file."""
        path = self.folder / name
        return path.stat().st_size if path.is_file() else None

    def open(self, name: str):
        """A file opened for reading (parquet reads seek in it)."""
        return open(self.folder / name, "rb")

    def local(self, name: str) -> Path | None:
        """The file's path on this machine (None on an object store)."""
        return self.folder / name

    def write(self, name: str, data: bytes) -> None:
        """Atomically (re)write a small file and flush the folder."""
        from .atomic import fsync_dir, write_atomic

        write_atomic(self.folder / name, lambda tmp: tmp.write_bytes(data))
        fsync_dir(self.folder)

    def write_json(self, name: str, obj: dict) -> None:
        """Atomically write a JSON file."""
        self.write(name, _dump(obj))

    def delete(self, name: str) -> None:
        """Remove a file (gone already: nothing to do)."""
        (self.folder / name).unlink(missing_ok=True)

    def tidy(self) -> int:
        """Delete temporaries left by killed runs; how many."""
        from .write import remove_stale_tmp

        return remove_stale_tmp(self.folder)

    def stage_shard(self, lease: str | None = None) -> Staging:
        """Where a shard is built: the folder itself (engine/write.py renames the files into place;
        no lease: the flock on .lock keeps the folder to one run)."""
        return Staging(self, self.folder, None)

    def lock(self):
        """The folder created if needed and locked for this run alone (flock on .lock)."""
        usable_output(self.folder)
        return lock_output(self.folder)

    def reachable(self) -> None:
        """Nothing to ask: a folder's failures are the disk's (the CLI names them)."""

    def lease_taken(self) -> None:
        """None: no other run can take a folder over while this one holds its flock."""


class Staging:
    """One shard's local build folder and, on an object store, its upload: files first, marker last."""

    def __init__(self, store, folder: Path, lease: str | None):
        self.store, self.folder, self.lease = store, folder, lease

    def commit(self, name: str) -> None:
        """Upload the shard `name` built in the folder (on disk it is in place already)."""
        if self.store.remote:
            self.store.upload_shard(self.folder, name, self.lease)

    def close(self) -> None:
        """Remove a temporary build folder and whatever is left in it."""
        if self.store.remote:
            shutil.rmtree(self.folder, ignore_errors=True)


def _host() -> str:
    """This host's name as a staging folder carries it (no path separator)."""
    return socket.gethostname().replace(os.sep, "_") or "host"


def staging_prefix() -> str:
    """The name a shard's staging folder starts with: its host and process, so a later run can tell a
    killed process's folder (removed, remove_stale_staging) from a live one's."""
    return f"{STAGING_PREFIX}{_host()}-{os.getpid()}-"


def remove_stale_staging(folder: str | None = None) -> int:
    """Delete the shard staging folders that killed processes of this host left in the temporary folder
    (`folder`, default tempfile's); how many. Found by a kill sweep: a SIGKILL mid-shard (OOM, a preempted
    node) left the whole partial shard there for good, as nothing but its own `finally` removed it. Folders
    of live processes, of other hosts sharing the folder, and of other names are left alone."""
    root = Path(folder or tempfile.gettempdir())
    removed = 0
    for path in root.glob(f"{STAGING_PREFIX}*"):
        match = _STAGING_RE.fullmatch(path.name)
        if match and match["host"] == _host() and not pid_alive(int(match["pid"])) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


@functools.cache
def remove_stale_staging_once() -> int:
    """remove_stale_staging, once per process (at its first staged shard)."""
    return remove_stale_staging()


class ObjectStore(Leased):
    """`s3://bucket/prefix` or `gs://bucket/prefix` through pyarrow.fs; every object is put whole."""

    remote = True

    def __init__(self, url: str, endpoint: str | None = None):
        import pyarrow.fs as pafs

        self.url = url.rstrip("/")
        scheme, _, rest = self.url.partition("://")
        self.bucket, self.scheme, self.endpoint = rest.split("/", 1)[0], scheme, endpoint
        # an emulator (fake-gcs-server, the storage testbench) takes no token; a key file says otherwise
        self.anonymous = scheme != "s3" and bool(endpoint) and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        self.lost: str | None = None  # why the store stopped answering mid-run (then nothing more is asked)
        self._quick_fs = None  # the checks' S3 file system, made when first asked (see _quick)
        if storefail.check_endpoint(endpoint):
            raise OutputError(storefail.check_endpoint(endpoint))
        try:
            if scheme == "s3":
                self.fs = pafs.S3FileSystem(
                    endpoint_override=endpoint, connect_timeout=5, request_timeout=30,
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
            else:  # gs:// (endpoint: a GCS emulator's host:port)
                self.fs = pafs.GcsFileSystem(endpoint_override=endpoint and endpoint.split("://")[-1],
                                             scheme="http" if endpoint else "https", anonymous=self.anonymous,
                                             retry_time_limit=timedelta(seconds=GCS_RETRY_S))
        except (OSError, ValueError) as exc:
            raise OutputError(f"--output {url}: {storefail.one_line(exc)}") from None
        self.root = rest.rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _ask(self, what: str, call, *args):
        """call(*args), a request to the store: as is for s3:// (the SDK's timeouts bound it), under a
        deadline of GCS_STALL_S for gs:// (Stalled past it; `what` names the request in its message)."""
        if self.scheme == "s3":
            return call(*args)
        return bounded(lambda: call(*args), GCS_STALL_S,
                       f"{what} {self.url} at {storefail.where(self.scheme, self.endpoint)}")

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names of the objects directly under the prefix matching the glob `pattern`."""
        import pyarrow.fs as pafs

        self._alive()
        infos = self._ask("listing", self.fs.get_file_info, pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(n for i in infos if i.type == pafs.FileType.File
                      and fnmatch.fnmatchcase(n := i.base_name, pattern))

    def read(self, name: str) -> bytes | None:
        """An object's bytes, None when it does not exist."""
        self._alive()
        try:
            return self._ask(f"reading {name} of", self._read, self._key(name))
        except FileNotFoundError:
            return None

    def _read(self, key: str) -> bytes:
        """An object's bytes (FileNotFoundError when there is none)."""
        with self.fs.open_input_stream(key) as f:
            return f.read()

    def size(self, name: str) -> int | None:
        """An object's size, None when there is none."""
        import pyarrow.fs as pafs

        self._alive()
        info = self._ask(f"asking for {name} in", self.fs.get_file_info, self._key(name))
        return info.size if info.type == pafs.FileType.File else None

    def open(self, name: str):
        """An object opened for random-access reads (parquet footers, column chunks): pyarrow's file
        for s3://; for gs:// a BoundedFile, never pyarrow's (see there). FileNotFoundError when none."""
        self._alive()
        if self.scheme == "s3":
            return self.fs.open_input_file(self._key(name))
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(f"{self.url}/{name}: no such object")
        return BoundedFile(self, name, size)

    def local(self, name: str) -> Path | None:
        """None: objects have no path on this machine."""
        return None

    def write(self, name: str, data: bytes) -> None:
        """Put one object whole (it is visible only once complete)."""
        self._alive()
        self._ask(f"writing {name} to", self._put, self._key(name), data)

    def _put(self, key: str, data: bytes) -> None:
        """Put one object whole."""
        with self.fs.open_output_stream(key) as f:
            f.write(data)

    def write_json(self, name: str, obj: dict) -> None:
        """Put a JSON object."""
        self.write(name, _dump(obj))

    def delete(self, name: str) -> None:
        """Remove an object (gone already: nothing to do). Asked first, as pyarrow puts an empty
        "prefix/" folder marker after every delete."""
        if self.size(name) is not None:
            with contextlib.suppress(FileNotFoundError):
                self._ask(f"deleting {name} of", self.fs.delete_file, self._key(name))

    def tidy(self) -> int:
        """Nothing to tidy: an interrupted upload leaves no object (the staging folders are local)."""
        return 0

    def stage_shard(self, lease: str | None = None) -> Staging:
        """A fresh local folder to build one shard in, to be uploaded under the run id `lease` (the one
        its run's lock() took, carried to this worker; not whoever holds the lease by then)."""
        remove_stale_staging_once()
        return Staging(self, Path(tempfile.mkdtemp(prefix=staging_prefix())), lease)

    def upload_shard(self, folder: Path, name: str, lease: str | None) -> None:
        """Upload NNNNN.tar and .parquet, then the .stats.json marker, while the run `lease` holds the
        lease: asked before any object changes and again before the marker."""
        marker = f"{name}{STATS_SUFFIX}"
        try:
            self._still_held(lease, name)  # a run that lost the lease changes none of the new holder's objects
            self.delete(marker)  # a marker left by an untrusted earlier attempt goes before its files change
            for ext in (".tar", ".parquet"):
                self._upload(folder / f"{name}{ext}", f"{name}{ext}")
            self._still_held(lease, name)
            self._upload(folder / marker, marker)
        except OSError as exc:
            from .write import ShardWriteError

            raise ShardWriteError(str(self.failure(exc, f"uploading shard {name} to {self.url}"))) from exc

    def _still_held(self, lease: str | None, name: str) -> None:
        """ShardWriteError, with nothing more uploaded, when the lease names another run than `lease`."""
        from .write import ShardWriteError

        holder = self.lease_run()
        if holder != lease:
            raise ShardWriteError(f"shard {name}: not marked done: another run ({holder}) holds the lease of "
                                  f"{self.url} (this run's is {lease}); the shard is left to that run")

    def _upload(self, path: Path, name: str) -> None:
        """Stream a local file into one object (multipart for big tars; the object appears at the end)."""
        if self.scheme != "s3":
            return self._upload_bounded(path, name)
        with open(path, "rb") as src, self.fs.open_output_stream(self._key(name)) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    def _upload_bounded(self, path: Path, name: str) -> None:
        """_upload for gs://, each request under the deadline (a tar's chunks one by one, not the whole
        upload at once). A stalled one is left open: closing it would complete a truncated object."""
        what = f"uploading {name} to"
        dst = self._ask(what, self.fs.open_output_stream, self._key(name))
        with open(path, "rb") as src:
            try:
                while chunk := src.read(8 << 20):
                    self._ask(what, dst.write, chunk)
            except Stalled:
                raise
            except BaseException:
                with contextlib.suppress(OSError):
                    self._ask(what, dst.close)  # as the with-block of s3:// does
                raise
        self._ask(what, dst.close)  # the object appears now, whole

    def check(self, what: str | None = None) -> None:
        """A clear OutputError, naming the flag or credentials to change, when the bucket cannot be
        reached or read (asked before any download starts; the lease then tries the first write)."""
        import pyarrow.fs as pafs

        what = what or f"--output {self.url}"
        try:
            if self._ask("asking for the bucket of", self._quick().get_file_info, self.bucket).type \
                    != pafs.FileType.Directory:
                self._no_bucket(what)
            self._ask("listing", self._quick().get_file_info, pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as exc:
            raise self.failure(exc, what) from None

    def _quick(self):
        """The file system the checks ask through: for S3 one that gives up sooner than the uploads'
        (a server that accepts but never answers: 94 s to the error with theirs, ~25 s with this)."""
        import pyarrow.fs as pafs

        if self.scheme != "s3":
            return self.fs  # GCS: retried for GCS_RETRY_S, each call bounded by GCS_STALL_S (_ask)
        if self._quick_fs is None:
            self._quick_fs = pafs.S3FileSystem(endpoint_override=self.endpoint, connect_timeout=5, request_timeout=10,
                                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
        return self._quick_fs

    def _no_bucket(self, what: str) -> None:
        """The bucket looked missing: an OutputError saying so when the store says NoSuchBucket, naming
        --s3-endpoint when the server is no object store (any web server answers a HEAD with 404)."""
        import pyarrow.fs as pafs

        if self.scheme != "s3":  # GCS's bucket metadata request answers with the store's own error
            raise OutputError(f"{what}: bucket {self.bucket} does not exist at "
                              f"{storefail.where(self.scheme, self.endpoint)}; create it first")
        try:  # a listing's error carries the store's own answer, a HEAD's has no body
            self._quick().get_file_info(pafs.FileSelector(self.root, allow_not_found=False))
            return
        except FileNotFoundError:
            return  # the bucket is there, the prefix is not yet
        except OSError as exc:
            if "NO_SUCH_BUCKET" not in str(exc):
                raise self.failure(exc, what) from None
        raise OutputError(f"{what}: bucket {self.bucket} does not exist at "
                          f"{storefail.where(self.scheme, self.endpoint)}; create it first")

    def failure(self, exc: BaseException, what: str | None = None) -> OutputError:
        """An OutputError for a failed request: its cause and what to change (engine/storefail.py)."""
        return OutputError(storefail.explain(exc, what or f"--output {self.url}", self.scheme, self.endpoint,
                                             self.anonymous))

    def reachable(self) -> None:
        """StoreLost when the bucket does not answer (asked by the driver after a failed shard, so a
        store gone mid-run stops the run instead of failing every shard in turn); from then on every
        read and write of this store fails at once. StoreLost too once another run took over the
        lease this process holds (Leased.lease_taken): the run stops instead of failing every shard."""
        if self.lost:
            raise StoreLost(self.lost)
        try:
            self._ask("asking for the bucket of", self._quick().get_file_info, self.bucket)
            taken = self.lease_taken()
        except OSError as exc:
            self.lost = ("the object store stopped answering mid-run (complete shards are kept: rerun the same "
                         f"command once it answers again): {self.failure(exc)}")
            raise StoreLost(self.lost) from None
        if taken:
            raise StoreLost(taken)

    def _alive(self) -> None:
        """Fail at once, without a request, once the store was found gone mid-run (an OSError, as a
        failed request's: the run's closing writes give up on it as on any)."""
        if self.lost:
            raise OSError(self.lost)


class BoundedFile:
    """A gs:// object opened for reading, as a seekable binary file (what pq.read_table, tarfile and
    engine/objinput.py ask of one) whose every request is under the store's deadline. Its bytes come
    from one sequential download (open_input_stream, then reads of CHUNK bytes, each its own call),
    kept in an anonymous local temporary file as they arrive: a read downloads up to its end only, once.
    Not pyarrow's GCS random-access file: its first read makes its request inside a closed() check that
    holds the GIL, so a server stalling there froze the whole process, deadline thread included, for
    google-cloud-cpp's 120 s. Costs local disk (TMPDIR, freed at close) up to the object's size, never
    memory; a parquet's footer is at its end, so a parquet is downloaded whole, every column."""

    CHUNK = 8 << 20  # bytes per bounded read: GCS_STALL_S for 8 MiB holds on a link of 2.5 Mbit/s or more

    def __init__(self, store: ObjectStore, name: str, size: int):
        self._store, self._name, self._size, self._pos = store, name, size, 0
        self._spool = tempfile.TemporaryFile(prefix="ctrlnet-gs-")  # unlinked: nothing is left after a kill
        self._have, self._stream, self._failed = 0, None, None
        self._lock = threading.Lock()  # one download extends the spool at a time
        self.closed = False

    def _call(self, method, *args):
        """One call of the download under the store's deadline."""
        return self._store._ask(f"reading {self._name} of", method, *args)

    def _fill(self, end: int) -> None:
        """Download until the spool holds the object's first `end` bytes (or all of it)."""
        if self.closed:
            raise ValueError(f"{self._name}: I/O operation on a closed file")
        with self._lock:
            while self._have < min(end, self._size):
                if self._failed:  # the stream is dead, or still held by a stalled call: not asked again
                    raise OSError(self._failed)
                try:
                    self._spool.write(self._next())
                except OSError as exc:
                    self._failed, self._stream = str(exc), None  # a stuck call keeps the stream it uses
                    raise
            self._spool.flush()  # what read_at's pread sees
            if self._have >= self._size:
                self._drop()

    def _next(self) -> bytes:
        """The download's next chunk (opened at the first); an OSError when it ends before the object's size."""
        if self._stream is None:
            self._stream = self._call(self._store.fs.open_input_stream, self._store._key(self._name), None)
        chunk = self._call(self._stream.read, min(self.CHUNK, self._size - self._have))
        if not chunk:
            raise OSError(f"{self._store.url}/{self._name} ended after {self._have} of its {self._size} bytes "
                          "(replaced while read?)")
        self._have += len(chunk)
        return chunk

    def _drop(self) -> None:
        """Close the download under the deadline (one left unread asks the store to stop)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                self._call(stream.close)

    def size(self) -> int:
        """The object's size in bytes (asked when opened)."""
        return self._size

    def read_at(self, nbytes: int, offset: int) -> bytes:
        """`nbytes` bytes from `offset` (fewer at the end)."""
        nbytes = max(0, min(nbytes, self._size - offset))
        self._fill(offset + nbytes)
        return os.pread(self._spool.fileno(), nbytes, offset) if nbytes else b""

    def read(self, nbytes: int | None = -1) -> bytes:
        """The next `nbytes` bytes (all that is left when -1 or None)."""
        left = max(0, self.size() - self._pos)
        nbytes = left if nbytes is None or nbytes < 0 else min(nbytes, left)
        data = self.read_at(nbytes, self._pos) if nbytes else b""
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move the position (0: from the start, 1: from here, 2: from the end); no request."""
        self._pos = offset + (0, self._pos, self.size() if whence == 2 else 0)[whence]
        return self._pos

    def tell(self) -> int:
        """The position."""
        return self._pos

    def readable(self) -> bool:
        """Yes: it is read."""
        return True

    def seekable(self) -> bool:
        """Yes: reads are by position."""
        return True

    def writable(self) -> bool:
        """No: objects are put whole (ObjectStore.write)."""
        return False

    def close(self) -> None:
        """Stop the download (under the deadline) and free the local copy."""
        if not self.closed:
            self.closed = True
            with self._lock:
                self._drop()
                self._spool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_STORES: dict[tuple, object] = {}
_STORES_LOCK = threading.Lock()


def open_output(output: str | os.PathLike, endpoint: str | None = None):
    """The Store of an --output: an ObjectStore for a URL, else a LocalStore (one per process each)."""
    if not is_url(output):
        return LocalStore(output)
    with _STORES_LOCK:  # one S3 client per process: the shards of a worker share it
        key = (str(output), endpoint)
        if key not in _STORES or _STORES[key].lost:  # a store lost by an earlier run is asked afresh
            _STORES[key] = ObjectStore(str(output), endpoint)
        return _STORES[key]


def credentials_env(cfg) -> dict:
    """Ray runtime_env entries carrying the driver's AWS_* variables to every worker, when the run
    has an s3:// output (each node uploads its own shards); empty otherwise or when none is set."""
    if not str(cfg.output).startswith("s3://"):
        return {}
    found = {k: os.environ[k] for k in AWS_VARS if os.environ.get(k)}
    return {"env_vars": found} if found else {}


def store_of(cfg) -> LocalStore | ObjectStore:
    """The Store of an EngineConfig's --output."""
    return open_output(cfg.output, getattr(cfg, "s3_endpoint", None))


def as_store(out) -> LocalStore | ObjectStore:
    """A Store as given, or the LocalStore of a folder path."""
    return out if isinstance(out, (LocalStore, ObjectStore)) else open_output(out)


def usable_output(out: Path) -> None:
    """Create the output folder if needed; a clear OutputError naming --output when it cannot be used."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file, not a folder: choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--output {out} cannot be created: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--output {out} is not writable by this user: choose another folder")


def lock_output(out: Path):
    """Hold an exclusive lock on the output folder (released by the OS even on SIGKILL)."""
    import fcntl

    try:  # opened without truncating: an existing .lock is left exactly as it is
        handle = os.fdopen(os.open(out / ".lock", os.O_WRONLY | os.O_CREAT, 0o644), "w")
    except OSError as exc:
        raise OutputError(f"--output {out} is not writable: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(f"another run is writing to {out}; wait for it or choose another --output") from None
    return handle
