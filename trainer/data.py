"""Stream the engine's WebDataset shards into training batches.

The stream is cut into lanes, fixed when a run starts and kept in its checkpoints (trainer/lanes.py:
Layout, Position), so a run is the same with 0 or 8 workers on those lanes and a resume continues exactly
where it left off. Epoch e shuffles the shards by (seed, e) and gives lane l every L-th of them; the lane
passes its raw (undecoded) samples through its own shuffle buffer. Caption drop for sample i uses a
generator seeded by (seed, i). Batches from workers travel packed in one buffer (trainer/packing.py).

A resume restarts each lane's epoch and skips the samples already used without decoding them.
Samples that fail to decode are replaced by another sample of the same batch and counted; a batch
whose samples all fail is dropped and counted, and --max-failed-batches such batches in a row stop the
run with an error naming the shard and the member (a shard set without cond.png never spins).
Under torchrun a rank that reads only some of a global batch (its own lanes) cannot know whether the
others' shares decoded, so it never drops alone: when its share all fails it yields a stand-in in step
("dropped" set: its last batch again, or before its first one a blank batch that trains with weight 0),
all of it counted as failed; the loop agrees on the ranks' runs of stand-ins once a step and stops every
rank together at --max-failed-batches (trainer.loop.check_dropped). A lane with nothing readable does
the same at once.
Members are decoded under the engine's decoding policy (engine/imagepolicy.py): only JPEG, PNG,
WebP, GIF, BMP and TIFF, pixel count checked from the header; PostScript, PDF and the rest are refused.

Shards whose stats (NNNNN.stats.json beside a local tar, engine/sample.py) record another crop size
than --resolution stop the run before training with an error naming both and the flags; --resize
resizes instead (shorter side to --resolution, then a center crop, as for shards without stats).

Shards written by `python -m trainer precompute` (a `precompute.json` beside them) are detected and
streamed as `latent_mean`, `latent_std` and `encoder_hidden_states` instead of pixels and token ids;
caption dropout then swaps in the empty prompt's stored embedding (trainer.objective.encode_batch).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import signal
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import tarfile_samples

from engine import sample as S
from engine.imagepolicy import Rejected
from trainer.config import DataConfig

# merge_lanes, record_lanes and resume_position (trainer/lanes.py) stay importable from here
from trainer.lanes import Layout, Position, merge_lanes, plan_layout, record_lanes, resume_position  # noqa: F401
from trainer.packing import pack, unpack
from trainer.precompute import EMBED_KEY, EMPTY_FILE, LATENT_KEY, META_FILE, npy_load

IMAGE_KEY, COND_KEY, TEXT_KEY = S.JPG, S.COND, S.TXT  # the names this module used before engine/sample.py
PREFETCH = 4
"""Batches each DataLoader worker may have in flight (DataLoader's prefetch_factor)."""
HELD = PREFETCH + 2
"""Batches a worker keeps referenced after sending them. Whichever process drops a shared-memory batch last
frees its pages (10.5 CPU ms a 512 px batch of 8, measured): held a little longer than the training process
needs them, that cost falls on the worker, not on the training process (the pin thread, the loop)."""
META_KEYS = ("position", "failed", "lanes", "dropped", "blank", "error")
"""Batch entries that describe the stream (stay on the host), not training inputs."""


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (several joined by `::`) into a list of URLs or paths."""
    urls = [u for part in pattern.split("::") for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ShardSetError(f"--shards {pattern!r} names no shard")
    return urls


def check_local_shards(urls: list[str]) -> None:
    """Refuse a shard set with local paths that do not exist or are empty files, before training.

    Read errors are otherwise counted and skipped (a tar damaged in the middle still gives its first samples),
    but a missing local file is a wrong --shards (a typo, a range past the last shard): counted, it would leave
    the run training on part of the data every epoch with nothing but a count to say so. Remote URLs and pipe:
    commands are only known when read."""
    local = [u.removeprefix("file:") for u in urls if not u.startswith("pipe:") and "://" not in u]
    bad = [(p, "missing") if not Path(p).is_file() else (p, "empty") for p in local
           if not Path(p).is_file() or Path(p).stat().st_size == 0]
    if bad:
        shown = ", ".join(f"{p} ({why})" for p, why in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ShardSetError(f"--shards: {len(bad)} of {len(urls)} shard(s) missing or empty: {shown}")


def _mix(*xs: int) -> int:
    """Combine integers into one seed (stable across processes, unlike hash())."""
    return int(np.random.SeedSequence([abs(int(x)) for x in xs]).generate_state(1)[0])


class _Counter:
    """Error handler for the tar reader: count and keep going (never crash a run on one bad shard)."""

    def __init__(self) -> None:
        self.errors = 0
        self.reports = True
        """Whether this reader reports the errors (a lane read by several workers is reported by one)."""

    def __call__(self, exn: Exception) -> bool:
        self.errors += 1
        return True


def raw_epoch(urls: list[str], seed: int, epoch: int, buffer: int, handler: _Counter, lane: int = 0,
              lanes: int = 1) -> Iterator[dict]:
    """Undecoded samples of one lane's epoch: its tars (every lanes-th of the shuffled order), shuffled."""
    rng = random.Random(_mix(seed, epoch, 1))
    order = list(urls)
    rng.shuffle(order)
    if lanes > 1:  # a lane's own tars and buffer; one lane is the whole stream, as before lanes existed
        order, rng = order[lane::lanes], random.Random(_mix(seed, epoch, 1, lane, lanes))
    pool: list[dict] = []
    for sample in tarfile_samples(({"url": u} for u in order), handler=handler):
        pool.append(sample)
        if len(pool) >= buffer:
            j = rng.randrange(len(pool))
            pool[j], pool[-1] = pool[-1], pool[j]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


class SampleError(ValueError):
    """A sample that cannot be used; the message names the member and what is wrong with it."""


class ShardDataError(RuntimeError):
    """No sample decoded in --max-failed-batches batches in a row, or no tar readable at all; names the shard
    and the member (the CLI prints it as one line, exit 2)."""


class ShardSetError(ValueError):
    """The shard set does not fit this run, found before training (the CLI prints it as one line, exit 2)."""


def decode_member(sample: dict, key: str) -> Image.Image:
    """One image member as RGB, through the shared decoding policy (allowed formats, pixel limit)."""
    data = sample.get(key)
    if not isinstance(data, bytes):
        raise SampleError(f"no {key}")
    try:
        return S.decode_rgb(data)
    except Rejected as exc:
        raise SampleError(f"{key} refused ({exc.outcome}: {exc.reason})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise SampleError(f"{key} undecodable ({type(exc).__name__}: {exc})"[:300]) from None


def load_pair(sample: dict, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode image and conditioning map to RGB uint8 arrays of resolution x resolution."""
    image = decode_member(sample, IMAGE_KEY)
    cond = decode_member(sample, COND_KEY)
    if cond.size != image.size:
        check_same_shape(image.size, cond.size)
        cond = cond.resize(image.size, Image.NEAREST)
    return resize_crop(image, resolution, Image.BILINEAR), resize_crop(cond, resolution, Image.NEAREST)


def check_same_shape(image: tuple[int, int], cond: tuple[int, int]) -> None:
    """A map of another size than its image is scaled onto it (a map made at another resolution lines up);
    one of another aspect ratio cannot line up with it (stretched, it would teach a map that does not match the
    picture), so the sample is refused (counted). One pixel of rounding either way is allowed."""
    (w, h), (cw, ch) = image, cond
    if abs(cw * h - ch * w) > max(w, h, cw, ch):
        raise SampleError(f"{COND_KEY} is {cw}x{ch} but {IMAGE_KEY} is {w}x{h} (another aspect ratio)")


def local_stats(pattern: str) -> list[tuple[Path, dict]]:
    """(path, stats) of each local shard with a readable NNNNN.stats.json beside it (the engine's)."""
    found = []
    for url in expand_shards(pattern):
        path = Path(S.stats_path(url.removeprefix("file:")))
        if url.startswith("pipe:") or not path.is_file():
            continue
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # an unreadable stats file says nothing about sizes; the samples still decode
    return found


def check_image_size(pattern: str, resolution: int, resize: bool) -> None:
    """Refuse shards whose stats record another crop size than --resolution, unless --resize."""
    if resize:
        return
    for path, stats in local_stats(pattern):
        size = stats.get(S.IMAGE_SIZE)
        if isinstance(size, int) and size != resolution:
            raise ShardSetError(f"{path.name} says its shard holds {size} px images ({S.IMAGE_SIZE}) but --resolution is "
                             f"{resolution}: pass --resolution {size}, or --resize to resize every sample to {resolution}")


def precomputed_meta(pattern: str, resolution: int) -> dict | None:
    """precompute.json beside the first shard (local paths only), checked against --resolution; else None."""
    first = expand_shards(pattern)[0].removeprefix("file:")
    meta_path = Path(first).parent / META_FILE
    if first.startswith("pipe:") or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        meta["empty_prompt"] = np.load(meta_path.parent / EMPTY_FILE, allow_pickle=False)  # never unpickled
        fields = {k: meta[k] for k in ("resolution", "latent_channels", "text_dim")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardSetError(f"{meta_path.parent}: {META_FILE} or {EMPTY_FILE} unreadable ({type(exc).__name__}: "
                            f"{exc}); run `python -m trainer precompute` again into an empty folder") from None
    if fields["resolution"] != resolution:
        raise ShardSetError(f"the shards were precomputed at {fields['resolution']} px: pass --resolution "
                            f"{fields['resolution']}, or precompute again with --resolution {resolution}")
    return meta


def load_precomputed(sample: dict, resolution: int, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latent [mean, std] (fp16), caption embedding (fp16) and RGB map of a precomputed sample.

    Each array must have exactly the shape and dtype `precompute` writes (the latent's from precompute.json,
    the embedding's those of the stored empty prompt) and be finite: one of another shape would stop the run
    when the batch is stacked, another dtype would change the whole batch's, and a NaN would stop it as a
    "non-finite loss". Such a sample is refused and counted instead. np.load never unpickles (npy_load)."""
    side = resolution // meta.get("vae_scale_factor", 8)  # 8: SD's VAE, for precompute.json files older than it
    latent = npy_member(sample, LATENT_KEY, (2, meta["latent_channels"], side, side), np.float16)
    empty = meta["empty_prompt"]
    embed = npy_member(sample, EMBED_KEY, empty.shape, empty.dtype)
    cond = np.asarray(decode_member(sample, COND_KEY), dtype=np.uint8)
    if cond.shape[:2] != (resolution, resolution):
        raise SampleError(f"{COND_KEY} is {cond.shape[1]}x{cond.shape[0]}, not --resolution {resolution}")
    return latent, embed, cond


def npy_member(sample: dict, key: str, shape: tuple, dtype) -> np.ndarray:
    """A precomputed .npy member of exactly this shape and dtype, finite; else SampleError naming what differs."""
    data = sample.get(key)
    if not isinstance(data, bytes):
        raise SampleError(f"no {key}" + ("" if LATENT_KEY in sample else " (a sample that was not precomputed)"))
    try:
        array = npy_load(data)  # allow_pickle=False: an object array is refused, never unpickled
    except (ValueError, OSError, EOFError) as exc:
        raise SampleError(f"{key} unreadable ({exc})"[:300]) from None
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise SampleError(f"{key} is {array.dtype} {list(array.shape)}, not {np.dtype(dtype)} {list(shape)}")
    if not np.isfinite(array).all():
        raise SampleError(f"{key} holds NaN or infinite values")
    return array


def resize_crop(img: Image.Image, size: int, resample: int) -> np.ndarray:
    """Shorter side to `size`, then a center crop; the map uses NEAREST so palette values stay exact.

    The center square is cut from the source and only it is resized (Pillow's `box`): resizing the whole
    image first made a 20000x1 picture at 512 px a 10-gigapixel intermediate (MemoryError, or a worker
    killed for memory); square images, the engine's, come out the same either way."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if side != size:
        return np.asarray(img.resize((size, size), resample, box=(left, top, left + side, top + side)), dtype=np.uint8)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def caption_of(sample: dict, index: int, seed: int, p_empty: float) -> str:
    """The sample's caption, or the empty prompt with probability p_empty (seeded by the sample index)."""
    text = S.caption_text(sample)
    return "" if random.Random(_mix(seed, index, 2)).random() < p_empty else text


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches (dicts of tensors) from WebDataset shards."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int,
                 start: Position = Position(),  # noqa: B008 - a frozen dataclass, safe to share
                 rank: int = 0, world: int = 1, layout: Layout | None = None):
        super().__init__()
        self.cfg, self.tokenizer, self.seed, self.start = cfg, tokenizer, seed, start
        self.rank, self.world = rank, world
        self.first = start.samples if start.samples is not None else start.batches * cfg.train_batch_size
        self.urls = expand_shards(cfg.shards)
        check_local_shards(self.urls)
        self._last_failure = ""  # the latest undecodable sample: shard URL, member, reason
        self.meta = precomputed_meta(cfg.shards, cfg.resolution)
        check_image_size(cfg.shards, cfg.resolution, cfg.resize)
        gbs = cfg.train_batch_size * world
        if layout is None and start.layout is None and self.first:  # a checkpoint from before lanes: one lane
            layout = Layout(1, 1, gbs)
        self.layout = layout or start.layout or plan_layout(len(self.urls), world, cfg.num_workers, gbs)

    def samples_after(self, batches: int) -> int:
        """Global samples consumed once the stream's position says `batches` (dropped batches included)."""
        return self.first + (batches - self.start.batches) * self.cfg.train_batch_size * self.world

    def _lane_start(self, lane: int) -> tuple[int, int]:
        """(epoch, samples of that epoch already used) of a lane at the start position."""
        if self.start.lanes is not None:
            return tuple(self.start.lanes.get(lane, (0, 0)))
        if self.start.layout is None and self.layout.lanes == 1:  # fresh run, or a checkpoint from before lanes
            return self.start.epoch, self.start.offset
        return 0, 0

    def _lane(self, lane: int, handler: _Counter) -> Iterator[tuple[int, int, dict]]:
        """(epoch, offset-after, raw sample) of one lane from the start position onwards, epoch after epoch."""
        (epoch, skip), empty = self._lane_start(lane), 0
        while True:
            n = 0
            for n, sample in enumerate(raw_epoch(self.urls, self.seed, epoch, self.cfg.shuffle_buffer, handler,
                                                 lane, self.layout.lanes), 1):
                if n > skip:
                    yield epoch, n, sample
            # a lane whose tars hold nothing this epoch gets others the next; all of them empty is an error
            empty = empty + 1 if n == 0 else 0
            if empty >= (1 if self.layout.lanes == 1 else 50):
                raise ShardDataError(f"no readable samples in {self.cfg.shards!r} ({handler.errors} read errors: "
                                     "not tars, or cut before their first member)")
            epoch, skip = epoch + 1, 0

    def _needs(self, rank: int, wid: int, nw: int) -> set[int]:
        """The lanes that reader (rank, worker) takes samples from: one when the layout is its own."""
        gbs, lay = self.cfg.train_batch_size * self.world, self.layout
        period = math.lcm(lay.global_batch * lay.workers, gbs * nw)
        return {lay.lane(i) for i in range(self.first, self.first + period)
                if ((i - self.first) // gbs) % nw == wid and (i - self.first) % gbs % self.world == rank}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        gbs, handlers = self.cfg.train_batch_size * self.world, {}
        readers = {(r, w): self._needs(r, w, nw) for r in range(self.world) for w in range(nw)}
        for lane in readers[self.rank, wid]:  # the first reader of a lane reports its read errors
            handlers[lane] = _Counter()
            handlers[lane].reports = min(q for q, need in readers.items() if lane in need) == (self.rank, wid)
        lanes = {lane: self._lane(lane, h) for lane, h in handlers.items()}
        state: dict[int, tuple[int, int]] = {}
        self._last_good: dict | None = None
        self._dead = ""  # why a lane of this worker can no longer be read (under torchrun: stand-ins from then on)
        group: list[tuple[int, int, dict]] = []
        empty, limit = 0, -(-self.cfg.max_failed_batches // nw)  # each worker sees 1/nw of the batches
        sent: deque = deque(maxlen=HELD)  # the last batches this worker sent, so it frees their memory (HELD)
        for index in itertools.count(self.first):
            k, j = divmod(index - self.first, gbs)  # global batch since the start, row in it
            lane = self.layout.lane(index)
            if lane in lanes and not self._dead:  # a lane this worker reads advances even past other workers' samples
                read = self._read(lanes[lane])
                if read is not None:
                    state[lane] = read[:2]
                    if k % nw == wid:
                        group.append((j, index, read[2]))
            if j < gbs - 1 or k % nw != wid:
                continue
            batch = self._batch(group, handlers, state, self.start.batches + k, index + 1)
            group = []
            empty = 0 if batch is not None else empty + 1
            if batch is not None and info:
                sent.append(pack(batch))  # from a worker: one shared-memory block, not one per tensor
                yield sent[-1]
            elif batch is not None:
                yield batch
            elif empty >= limit:
                raise ShardDataError(
                    f"{self._last_failure}; no sample decoded in {empty * nw} batches in a row "
                    f"({empty * nw * gbs} samples; --max-failed-batches {self.cfg.max_failed_batches}): "
                    "check that the shards hold KEY.jpg and KEY.cond.png images")

    def _read(self, lane: Iterator) -> tuple[int, int, dict] | None:
        """The lane's next (epoch, offset, sample); under torchrun a lane with nothing readable marks this
        worker dead (every rank then stops together, trainer.loop.check_dropped) instead of raising alone."""
        try:
            return next(lane)
        except RuntimeError as exc:
            if self.world == 1:
                raise
            self._dead = str(exc)
            return None

    def _batch(self, group, handlers: dict, state: dict, b: int, end: int) -> dict | None:
        """Collate one global batch's rows of this worker; the lane report says where its lanes stand at `end`."""
        read_errors = sum(h.errors for h in handlers.values() if h.reports)
        for h in handlers.values():
            h.errors = 0
        size, gbs = self.cfg.train_batch_size, self.cfg.train_batch_size * self.world
        if self._dead:
            return self._stand_in(size, read_errors, self.cfg.max_failed_batches, self._dead) | {
                "position": torch.tensor([b + 1, 0, 0]), "lanes": torch.zeros((0, 4), dtype=torch.long)}
        mine = [(index, sample) for j, index, sample in group if j % self.world == self.rank]
        others = [(index, sample) for j, index, sample in group if j % self.world != self.rank]
        epoch, offset = state[self.layout.lane(mine[-1][0])]
        batch = self._collate(mine, others, read_errors, epoch, offset, b)
        if batch is None and len(group) < gbs:
            # the rest of the global batch is read by other ranks, which may have decoded theirs: drop nothing
            # alone (the ranks would fall out of step), stand in and let the loop count
            batch = self._stand_in(size, read_errors, 1, self._last_failure)
        if batch is None:
            return None
        if not int(batch["dropped"]):
            self._last_good = {k: v for k, v in batch.items() if k not in META_KEYS}
        lanes = [[lane, e, o, end] for lane, (e, o) in sorted(state.items())]
        return batch | {"position": torch.tensor([b + 1, epoch, offset]), "lanes": torch.tensor(lanes)}

    def _stand_in(self, size: int, read_errors: int, dropped: int, why: str) -> dict:
        """What a rank trains on when its share of a global batch all failed: its last batch again, or a blank one
        (weight 0) before its first; every row counted as failed, `dropped` towards --max-failed-batches."""
        why = why or f"{read_errors} unreadable tar member(s) in this rank's shards"
        batch = self._last_good or (self._blank(size) | {"blank": torch.tensor(1)})
        return batch | {"failed": torch.tensor(size + read_errors), "dropped": torch.tensor(dropped),
                        "error": torch.tensor(list(why.encode()[:2000]), dtype=torch.uint8)}

    def _blank(self, size: int) -> dict:
        """A batch of the right shapes and no content (black images, empty captions)."""
        res = self.cfg.resolution
        black = np.zeros((res, res, 3), dtype=np.uint8)
        if not self.meta:
            return self._stack([(black, black, "")] * size)
        side = res // self.meta.get("vae_scale_factor", 8)  # 8: SD's VAE, for precompute.json files older than it
        latent = np.zeros((2, self.meta["latent_channels"], side, side), dtype=np.float16)
        return self._stack_precomputed([(latent, black, self.meta["empty_prompt"])] * size)

    def _collate(self, members, others, read_errors: int, epoch: int, offset: int, b: int) -> dict | None:
        """Decode this rank's share of one global batch and stack it; failed samples are replaced and counted.

        A rank whose whole share fails borrows from the rest of the global batch it read (in order), so ranks
        stay in step: a global batch is dropped only when all of it fails, which every rank then finds alike.
        """
        decoded, failed = self._decode_all(members)
        if not decoded and others:
            decoded, _ = self._decode_all(others)
        if not decoded:
            return None
        while len(decoded) < len(members):  # keep batches full so every step sees the same count
            decoded.append(decoded[len(decoded) % max(1, len(members) - failed)])
        decoded = decoded[:len(members)]
        batch = self._stack_precomputed(decoded) if self.meta else self._stack(decoded)
        return batch | {"failed": torch.tensor(failed + read_errors), "position": torch.tensor([b + 1, epoch, offset]),
                        "dropped": torch.tensor(0)}

    def _decode_all(self, members) -> tuple[list[tuple], int]:
        """The samples that decode, and how many did not."""
        decoded, failed = [], 0
        for index, sample in members:
            try:
                item = self._decode(sample, index)
            except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped, by design
                failed += 1
                self._last_failure = f"{sample.get('__url__', '?')}: {exc} (sample {sample.get('__key__', '?')})"
                continue
            decoded.append(item)
        return decoded, failed

    def _decode(self, sample: dict, index: int) -> tuple:
        """One sample's arrays and (possibly dropped) caption; raises when it cannot be decoded."""
        text = caption_of(sample, index, self.seed, self.cfg.proportion_empty_prompts)
        if self.meta:
            latent, embed, cond = load_precomputed(sample, self.cfg.resolution, self.meta)
            return latent, cond, self.meta["empty_prompt"] if text == "" else embed
        if LATENT_KEY in sample and IMAGE_KEY not in sample:
            # counted like any sample without a jpg (a shard set mixing both trains on its pixel samples); a set of
            # precomputed shards only stops at --max-failed-batches with this reason, before its first step
            raise SampleError(f"a precomputed sample ({LATENT_KEY}, no {IMAGE_KEY}) but no {META_FILE} was found "
                              "beside the first shard: pass the local shard paths that `python -m trainer precompute` wrote")
        img, cond = load_pair(sample, self.cfg.resolution)
        return img, cond, text

    def _stack(self, decoded: list[tuple]) -> dict:
        """Pixels in [-1, 1], maps in [0, 1], token ids."""
        imgs = torch.from_numpy(np.stack([d[0] for d in decoded])).permute(0, 3, 1, 2)
        conds = torch.from_numpy(np.stack([d[1] for d in decoded])).permute(0, 3, 1, 2)
        ids = self.tokenizer([d[2] for d in decoded], max_length=self.tokenizer.model_max_length,
                             padding="max_length", truncation=True, return_tensors="pt").input_ids
        # in place: the same values without two more batch-sized temporaries (16.5 -> 11.6 CPU ms at 512 px, batch 8)
        return {"pixel_values": imgs.float().div_(127.5).sub_(1.0), "conditioning_pixel_values": conds.float().div_(255.0),
                "input_ids": ids}

    @staticmethod
    def _stack_precomputed(decoded: list[tuple]) -> dict:
        """Latent mean and std (fp16), maps as uint8 (a quarter of the bytes to pin and copy; scaled to [0, 1]
        on the device by trainer.objective), caption embeddings (fp16)."""
        latents = torch.from_numpy(np.stack([d[0] for d in decoded]))
        conds = torch.from_numpy(np.stack([d[1] for d in decoded])).permute(0, 3, 1, 2)
        return {"latent_mean": latents[:, 0], "latent_std": latents[:, 1], "conditioning_pixel_values": conds,
                "encoder_hidden_states": torch.from_numpy(np.stack([d[2] for d in decoded]))}


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' packed batches come out as the usual dict of tensors."""

    def __iter__(self):
        return map(unpack, super().__iter__())


def _worker_init(_: int) -> None:
    """Workers leave their process's group and ignore Ctrl-C: the main process decides when to stop (after saving a
    checkpoint), and its workers must deliver the batches of the step it finishes first.

    torchrun sends SIGTERM and SIGINT to each rank's whole process group (os.killpg): a worker killed by it failed
    the step ("DataLoader worker is killed by signal: Terminated", no checkpoint). Ignoring SIGTERM instead would
    stall an exit: multiprocessing ends its workers with SIGTERM and then waits for them. In a group of their own
    they still end with their process (DataLoader's shutdown, or its watchdog once the process is gone).
    """
    with contextlib.suppress(OSError):  # not allowed for a session leader (never a DataLoader worker)
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(cfg: DataConfig, tokenizer, seed: int, start: Position, pin_memory: bool, rank: int = 0,
                 world: int = 1):
    """DataLoader over a ShardStream (this rank's share); batches arrive in stream order whatever the worker count."""
    stream = ShardStream(cfg, tokenizer, seed, start, rank, world)
    return _Loader(
        stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin_memory,
        worker_init_fn=_worker_init if cfg.num_workers else None,
        prefetch_factor=PREFETCH if cfg.num_workers else None, persistent_workers=False,
        # DataLoader draws its workers' base seed when an iterator starts, from the global CPU generator unless
        # given one: a resumed run starts its iterator after restoring that generator (trainer.checkpoint), so
        # every resume moved it on by one draw and its checkpoints' rng/cpu differed from an uninterrupted run's
        generator=torch.Generator().manual_seed(seed),
    )
