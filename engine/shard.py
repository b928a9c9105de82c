"""One shard, start to finish: prefilter -> fetch -> decode -> dedup -> crop -> condition -> write.

The event loop keeps downloads flowing while the CPU stages run on worker threads (turbojpeg,
Pillow and the Numba kernels release the GIL). A semaphore held from download until the sample
is written bounds the connections, the bodies and the encoded samples held in memory. `process_shard` never
raises: whatever happens, the driver gets a status record and decides on retries.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import local
from . import outcomes as O
from .caption import clean_caption, storable
from .claims import Claim as IndexClaim
from .condition import make_conditioner
from .config import EngineConfig
from .crop import center_crop
from .decode import Rejected, decode
from .fetch import fetch, make_session
from .hashes import ImageHashes, image_hashes, to_int64
from .plan import UNREADABLE, Shard, prefilter
from .quality import colorfulness
from .sample import IMAGE_SIZE, encode_jpeg, encode_map_png, encode_png, sample_key, shard_name
from .schema import sample_json, shard_kinds
from .storage import store_of
from .write import ShardWriteError, TarShard, publish_shard

Report = Callable[[int, int], None]  # (rows finished, samples written) since the last call
Claim = Callable[[list], list]       # dedup claims -> verdicts, blocking (engine/dedup.py)


class IndexUnavailable(RuntimeError):
    """The dedup index did not answer: the whole shard fails (and is retried or left pending),
    since writing without dedup, or dropping rows as errors, would both be wrong."""


@dataclass
class Prepared:
    """A decoded, checked, cropped and conditioned image, encoded and ready for the tar."""

    jpg: bytes
    cond_png: bytes
    width: int
    height: int
    format: str
    hashes: ImageHashes | None


def jsonable(value):
    """Parquet values made safe for JSON: NaN -> null, bytes -> text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return storable(value)
    return value


STAGES = ("decode", "hashes", "resize", "remap", "png", "jpeg")
"""The CPU stages of prepare(), in order; their thread CPU time goes to the shard's stats."""


def prepare(body: bytes, cfg: EngineConfig, conditioner, cpu: dict | None = None) -> Prepared:
    """The CPU stages for one body; raises Rejected for an unusable image.

    `cpu` (stage -> seconds) gets each stage's thread CPU time added: cheap (a clock read per
    stage), so always on; bench/engine_bench.py prints it per image.
    """
    clock = StageClock(cpu)
    image = clock.lap("decode", decode(body, cfg.image))
    hashes = clock.lap("hashes", image_hashes(body, image.rgb)) if cfg.dedup.enabled else None
    crop = clock.lap("resize", center_crop(image.rgb, cfg.image.image_size, cfg.image.resize_filter))
    threshold = cfg.filters.min_colorfulness
    if threshold is not None and (score := colorfulness(crop)) < threshold:
        raise Rejected(O.LOW_COLOR, f"colourfulness {score:.1f} below {threshold}")
    packed = getattr(conditioner, "packed", None)  # palette maps come out as palette-PNG scanlines
    cond = clock.lap("remap", packed(crop) if packed else conditioner(crop))
    png = clock.lap("png", encode_map_png(cond) if packed else encode_png(cond))
    jpg = clock.lap("jpeg", encode_jpeg(crop, cfg.image.jpeg_quality))
    return Prepared(jpg, png, image.width, image.height, image.format, hashes)


class StageClock:
    """Adds the thread CPU time since the previous lap to a stage's total."""

    def __init__(self, totals: dict | None):
        self.totals, self.last = totals, time.thread_time()

    def lap(self, stage: str, value):
        """Charge the time since the last lap to `stage`; returns `value` (so calls nest inline)."""
        now = time.thread_time()
        if self.totals is not None:
            self.totals[stage] = self.totals.get(stage, 0.0) + now - self.last
        self.last = now
        return value


class ClaimBatcher:
    """Collects dedup claims for a moment and sends them in one call (one round trip per batch)."""

    def __init__(self, claim: Claim, executor: ThreadPoolExecutor, max_batch: int = 64, max_wait: float = 0.1):
        self.claim, self.executor = claim, executor
        self.max_batch, self.max_wait = max_batch, max_wait
        self.pending: list[tuple[IndexClaim, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.cpu = 0.0  # thread CPU seconds of the claim calls (the shard's "claims" stage)

    async def submit(self, item: IndexClaim, open_rows: int | None = None):
        """The verdict for one claim, once its batch has been answered. `open_rows`: the shard's rows
        without an outcome; when all of them wait here, none can join. A count, not a callback into
        the shard: a callback would tie the shard and its batcher in a reference cycle, which kept
        every finished shard's rows alive until Python's rare full collection (issue 10)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if len(self.pending) >= self.max_batch or (open_rows is not None and len(self.pending) >= open_rows):
            self.flush()  # full, or the shard's last rows: waiting max_wait would only delay its end
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.max_wait, self.flush)
        return await future

    def flush(self) -> None:
        """Send the pending claims now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if batch:
            asyncio.ensure_future(self._send(batch))

    def _timed_claim(self, items: list) -> list:
        """The claim call, its CPU time counted."""
        start = time.thread_time()
        try:
            return self.claim(items)
        finally:
            self.cpu += time.thread_time() - start

    async def _send(self, batch) -> None:
        """One blocking call on a thread; its verdicts (or its error) go to each waiting claim."""
        try:
            verdicts = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._timed_claim, [item for item, _ in batch])
            for (_, future), verdict in zip(batch, verdicts, strict=True):
                future.set_result(verdict)
        except Exception as exc:  # noqa: BLE001 -- the index failing fails these rows, not the loop
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)


class ShardRun:
    """State of one shard being processed: its rows, records, tar and counters."""

    def __init__(self, shard: Shard, cfg: EngineConfig, claim: Claim | None, report: Report | None,
                 origin: dict | None = None, lease: str | None = None):
        self.shard, self.cfg, self.report = shard, cfg, report
        self.lease = lease  # the run id of its run's object-store lease: the shard is marked done only under it
        self.origin = origin or {}  # where the shard was made (host, Ray node id), kept in its stats
        self.rows = shard.table.to_pylist()
        self.records: list[dict | None] = [None] * len(self.rows)
        self.store = store_of(cfg)  # the output folder, or an object store it is uploaded to (engine/storage.py)
        self.captions: list[str | None] = [None] * len(self.rows)  # cleaned once, by caption()
        self.conditioner = make_conditioner(cfg.image.conditioner, cfg.image.palette)
        self.roots = tuple(cfg.local_roots) + tuple(shard.roots)  # --local-root and the folders named as input
        self.kinds = shard_kinds(shard.kinds, shard.table.schema)
        self.cpu = ThreadPoolExecutor(2, thread_name_prefix="cpu")
        self.io = ThreadPoolExecutor(1, thread_name_prefix="io")  # one thread: tar writes stay ordered
        self.claims = ClaimBatcher(claim, self.io) if claim and cfg.dedup.enabled else None
        self.clusters: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.done = self.written = self.reported_done = self.reported_written = 0
        self.bytes = 0
        self.cpu_s: dict[str, float] = {}  # CPU seconds by stage (prepare's STAGES and cpu_ms())
        # thread CPU clocks, not the process's: shards of the local runner share one process
        self.cpu_start, self.wall_start = time.thread_time(), time.time()

    def key(self, index: int) -> str:
        """This shard's key for row `index`."""
        return sample_key(self.shard.shard_id, index, self.cfg.shard_size)

    def finish(self, index: int, outcome: str, reason: str = "", **extra) -> None:
        """Record the one outcome of row `index`."""
        row = self.rows[index]
        self.records[index] = {
            "key": self.key(index), "row": self.shard.first_row + index, "url": jsonable(row.get("url")),
            "caption": storable(row.get("caption")), "outcome": outcome, "reason": reason[:300], **extra,
        }
        self.done += 1

    def caption(self, index: int) -> str:
        """Row `index`'s cleaned caption (cleaned on first use: the screen and the writer share it)."""
        if self.captions[index] is None:
            self.captions[index] = clean_caption(self.rows[index].get("caption"))
        return self.captions[index]

    def meta(self, index: int, prep: Prepared, caption: str) -> dict:
        """The sample's KEY.json: url, sizes, source row, hashes and every kept parquet column."""
        row = self.rows[index]
        meta = {"key": self.key(index), "url": row.get("url"), "caption": row.get("caption"),
                "caption_clean": caption, "width": prep.width, "height": prep.height,
                "format": prep.format, "shard": self.shard.shard_id, "row": self.shard.first_row + index}
        if prep.hashes:
            meta.update(content_hash=f"{prep.hashes.content:016x}", pixel_hash=f"{prep.hashes.pixels:016x}",
                        phash=f"{prep.hashes.phash:016x}")
        return sample_json(row, self.kinds, meta)  # every field in every sample, one type each

    async def dedup(self, index: int, prep: Prepared) -> tuple[str, str] | None:
        """(outcome, owner key) when the index already holds this image, else None."""
        if not self.claims or prep.hashes is None:
            return None
        try:
            verdict = await self.claims.submit(IndexClaim(self.key(index), *prep.hashes), len(self.rows) - self.done)
        except Exception as exc:
            raise IndexUnavailable(f"dedup index failed: {type(exc).__name__}: {exc}") from exc
        if verdict.status == O.NEW:
            return None
        outcome = verdict.status  # the verdict names are the outcomes' (engine/outcomes.py)
        owner = verdict.owner_key or ""
        self.clusters[owner] += 1
        self.examples.setdefault(owner, self.rows[index].get("url") or "")
        return outcome, owner

    def screen(self, index: int) -> tuple[str, str] | None:
        """Outcome and reason for a row dropped before download (metadata, empty caption)."""
        row = self.rows[index]
        if row.get(UNREADABLE):  # a stand-in for a row of a damaged parquet input (plan._parquet_batches)
            return O.ERROR, row[UNREADABLE]
        url = row.get("url")
        if self.roots and isinstance(url, str) and url.strip() and local.is_local(url.strip()):
            row = {**row, "url": local.PLACEHOLDER_URL}  # the path itself is checked by local.read
        dropped = prefilter(row, self.cfg.image, self.cfg.filters, self.cfg.fetch.allow_private_network)
        if dropped is None and self.cfg.filters.drop_empty_captions and not self.caption(index):
            dropped = O.EMPTY_CAPTION, "caption empty after cleaning"
        return dropped

    async def download(self, index: int, session) -> None:
        """Fetch, then run the CPU stages on a worker thread, then keep or drop the image."""
        url = self.rows[index]["url"].strip()
        if self.roots and local.is_local(url):
            got = await asyncio.get_running_loop().run_in_executor(
                None, local.read, url, self.roots, self.cfg.fetch.max_bytes)
        else:
            got = await fetch(session, url, self.cfg.fetch)
        fetched = {"http_status": got.status, "seconds": got.seconds}
        if got.outcome:
            return self.finish(index, got.outcome, got.reason, **fetched)
        self.bytes += len(got.body)
        fetched["bytes"] = len(got.body)
        stages: dict[str, float] = {}
        try:
            prep = await asyncio.get_running_loop().run_in_executor(
                self.cpu, prepare, got.body, self.cfg, self.conditioner, stages)
        except Rejected as rej:
            # bytes a server compressed unasked (br, zstd) fail as an unknown format: say why they looked so
            note = f" (sent with Content-Encoding {got.encoding}, never asked for, so not undone)" if got.encoding else ""
            return self.finish(index, rej.outcome, rej.reason + note, **fetched)
        finally:
            got.body = None
            for stage, seconds in stages.items():  # merged on the loop thread: no lock needed
                self.cpu_s[stage] = self.cpu_s.get(stage, 0.0) + seconds
        await self.keep(index, prep, fetched)

    async def keep(self, index: int, prep: Prepared, fetched: dict) -> None:
        """Write the sample unless the dedup index already holds the image."""
        found = {"width": prep.width, "height": prep.height, "format": prep.format, **fetched}
        if prep.hashes:
            # int64 with the hashes' bits: the columns claims.iter_rebuild_items reads on resume
            found.update(content_hash=to_int64(prep.hashes.content), pixel_hash=to_int64(prep.hashes.pixels),
                         phash=to_int64(prep.hashes.phash))
        duplicate = await self.dedup(index, prep)
        if duplicate:
            return self.finish(index, duplicate[0], f"duplicate of {duplicate[1]}",
                               duplicate_of=duplicate[1], **found)
        caption = self.caption(index)
        await asyncio.get_running_loop().run_in_executor(
            self.io, self.tar.write, self.key(index), prep.jpg, prep.cond_png, caption,
            self.meta(index, prep, caption))
        self.written += 1
        self.finish(index, O.OK, **found)

    async def row(self, index: int, session, gate: asyncio.Semaphore) -> None:
        """Carry row `index` to its outcome; exceptions become the `error` outcome."""
        try:
            dropped = self.screen(index)
            if dropped:
                return self.finish(index, *dropped)
            # Held until the sample is written: bounds the bodies and encoded samples held at once.
            async with gate:
                await self.download(index, session)
        except (IndexUnavailable, ShardWriteError):
            raise  # the whole shard fails: no row may end `ok` without its sample
        except Exception as exc:  # noqa: BLE001 -- one policy: an unforeseen failure is this row's outcome
            if self.records[index] is None:
                self.finish(index, O.ERROR, f"{type(exc).__name__}: {exc}")

    def tick(self) -> None:
        """Tell the progress display what finished since the last tick."""
        if self.report:
            self.report(self.done - self.reported_done, self.written - self.reported_written)
        self.reported_done, self.reported_written = self.done, self.written

    async def ticker(self) -> None:
        """Report progress once a second while the shard runs."""
        while True:
            await asyncio.sleep(1.0)
            self.tick()

    async def run(self) -> None:
        """All rows at once; the semaphore decides how many are really in flight."""
        gate = asyncio.Semaphore(self.cfg.fetch.concurrency)
        ticker = asyncio.ensure_future(self.ticker())
        loop_start = time.thread_time()
        try:
            async with make_session(self.cfg.fetch) as session:
                await asyncio.gather(*(self.row(i, session, gate) for i in range(len(self.rows))))
        finally:
            ticker.cancel()
            self.tick()
            self.cpu_s["fetch"] = time.thread_time() - loop_start

    def stats(self, seconds: float) -> dict:
        """The shard's NNNNN.stats.json."""
        counts = Counter(r["outcome"] for r in self.records)
        return {
            "shard": self.shard.shard_id, "first_row": self.shard.first_row, "rows": len(self.rows),
            "shard_size": self.cfg.shard_size, IMAGE_SIZE: self.cfg.image.image_size,
            "outcomes": dict(sorted(counts.items())), "written": self.written, "bytes_downloaded": self.bytes,
            "seconds": round(seconds, 3), "images_per_s": round(self.written / seconds, 2) if seconds else 0.0,
            "duplicate_clusters": [{"owner": k, "count": n, "example_url": self.examples[k]}
                                   for k, n in self.clusters.most_common(20)],
            "cpu_ms": self.cpu_ms(),
            # when the shard ran (epoch s) and its process's peak RSS: throughput and memory over a run
            "window": [round(self.wall_start, 3), round(time.time(), 3)],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **self.origin,
        }

    def cpu_ms(self) -> dict:
        """CPU milliseconds of this shard by stage: prepare's STAGES, fetch (the event loop: HTTP,
        parsing, records), claims (dedup calls), tar (the writer thread), other (the shard's own
        thread outside the loop: set-up, parquet, stats), and their total. What the process does
        besides (imports, Ray's threads) is the run's fixed cost, measured by bench/engine_bench.py."""
        cpu = dict(self.cpu_s)
        cpu["claims"] = self.claims.cpu if self.claims else 0.0
        cpu["tar"] = max(0.0, cpu.pop("io", 0.0) - cpu["claims"])
        cpu["other"] = max(0.0, time.thread_time() - self.cpu_start - cpu.get("fetch", 0.0))
        cpu["total"] = sum(cpu.values())
        return {k: round(1000 * v, 1) for k, v in cpu.items()}

    def execute(self) -> dict:
        """Process every row, then check and publish tar, parquet and (last) stats; an I/O error
        anywhere fails the whole shard and leaves no temporary behind."""
        start, name = time.monotonic(), shard_name(self.shard.shard_id)
        staging = self.store.stage_shard(self.lease)  # built where publish_shard renames into place; uploaded from there
        self.out = staging.folder
        self.tar = TarShard(self.out / f"{name}.tar")
        try:
            try:
                asyncio.run(self.run())
                self.cpu_s["io"] = self.io.submit(time.thread_time).result()  # the writer thread's CPU
            finally:  # queued tar writes end before the tar is closed or removed
                self.cpu.shutdown(wait=True, cancel_futures=True)
                self.io.shutdown(wait=True, cancel_futures=True)
            missing = [i for i, r in enumerate(self.records) if r is None]
            for i in missing:  # cannot happen by construction; guards the "counts add up" promise
                self.finish(i, O.ERROR, "row lost")
            ok_keys = [r["key"] for r in self.records if r["outcome"] == O.OK]
            stats = publish_shard(self.tar, self.records, self.stats(time.monotonic() - start), ok_keys)
            staging.commit(name)  # object store: tar, parquet, then the marker; a folder: in place already
            return stats
        except BaseException:
            self.tar.abort()
            raise
        finally:
            staging.close()


def process_shard(shard: Shard, cfg: EngineConfig, claim: Claim | None = None,
                  report: Report | None = None, origin: dict | None = None, lease: str | None = None) -> dict:
    """Process one shard; returns {"shard", "ok", "stats" | "error"} and never raises.

    `origin` ({"host", "node_id"}) is recorded in the shard's stats: which machine wrote it. `lease`:
    the run id its run's lock() took on an object store (none on a folder), carried by the runner."""
    try:
        stats = ShardRun(shard, cfg, claim, report, origin, lease).execute()
        return {"shard": shard.shard_id, "ok": True, "stats": stats}
    except Exception as exc:  # noqa: BLE001 -- the driver decides what a failed shard means
        return {"shard": shard.shard_id, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8)}

