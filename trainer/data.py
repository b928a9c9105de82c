"""Stream the engine's WebDataset shards into training batches.

The stream is defined independently of the number of DataLoader workers, so a run is the same with
0 or 8 workers and a resume continues exactly where a checkpoint left off:

* epoch e visits the shards in an order shuffled by (seed, e), passes the raw (undecoded) samples
  through a shuffle buffer seeded by (seed, e), and numbers them 0, 1, 2, ... across epochs;
* sample i belongs to batch i // batch_size; every worker reads the same raw stream (reading tar
  bytes is cheap) but decodes only the batches it owns, round-robin in the order the DataLoader
  asks for them;
* caption drop for sample i uses a generator seeded by (seed, i);
* under torchrun (trainer.distributed) a global batch is world x batch_size consecutive samples, and
  rank r of W decodes only sample j of it with j % W == r; the position is counted in global samples,
  so a resume on another number of processes continues at the same sample.

A resume restarts the epoch it stopped in and skips the samples already used without decoding them.
Samples that fail to decode are replaced by another sample of the same batch and counted; a batch
whose samples all fail is dropped and counted, and --max-failed-batches such batches in a row stop the
run with an error naming the shard and the member (a shard set without cond.png never spins).
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

import json
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import tarfile_samples

from engine import sample as S
from engine.imagepolicy import Rejected
from trainer.config import DataConfig
from trainer.precompute import EMBED_KEY, EMPTY_FILE, LATENT_KEY, META_FILE, npy_load

IMAGE_KEY, COND_KEY, TEXT_KEY = S.JPG, S.COND, S.TXT  # the names this module used before engine/sample.py


@dataclass(frozen=True)
class Position:
    """Where the stream stands: batches consumed, and the epoch / sample offset that follows them."""

    batches: int = 0
    epoch: int = 0
    offset: int = 0
    samples: int | None = None
    """Global samples consumed (all ranks); None in checkpoints older than it: batches x batch size."""


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (several joined by `::`) into a list of URLs or paths."""
    urls = [u for part in pattern.split("::") for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ValueError(f"--shards {pattern!r} names no shard")
    return urls


def _mix(*xs: int) -> int:
    """Combine integers into one seed (stable across processes, unlike hash())."""
    return int(np.random.SeedSequence([abs(int(x)) for x in xs]).generate_state(1)[0])


class _Counter:
    """Error handler for the tar reader: count and keep going (never crash a run on one bad shard)."""

    def __init__(self) -> None:
        self.errors = 0

    def __call__(self, exn: Exception) -> bool:
        self.errors += 1
        return True


def raw_epoch(urls: list[str], seed: int, epoch: int, buffer: int, handler: _Counter) -> Iterator[dict]:
    """Undecoded samples of one epoch in their shuffled order (identical in every worker)."""
    rng = random.Random(_mix(seed, epoch, 1))
    order = list(urls)
    rng.shuffle(order)
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
    """No sample decoded in --max-failed-batches batches in a row; names the shard and the member."""


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
        cond = cond.resize(image.size, Image.NEAREST)
    return resize_crop(image, resolution, Image.BILINEAR), resize_crop(cond, resolution, Image.NEAREST)


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
            raise ValueError(f"{path.name} says its shard holds {size} px images ({S.IMAGE_SIZE}) but --resolution is "
                             f"{resolution}: pass --resolution {size}, or --resize to resize every sample to {resolution}")


def precomputed_meta(pattern: str, resolution: int) -> dict | None:
    """precompute.json beside the first shard (local paths only), checked against --resolution; else None."""
    first = expand_shards(pattern)[0].removeprefix("file:")
    meta_path = Path(first).parent / META_FILE
    if first.startswith("pipe:") or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["resolution"] != resolution:
        raise ValueError(f"the shards were precomputed at {meta['resolution']} px: pass --resolution "
                         f"{meta['resolution']}, or precompute again with --resolution {resolution}")
    meta["empty_prompt"] = np.load(meta_path.parent / EMPTY_FILE, allow_pickle=False)
    return meta


def load_precomputed(sample: dict, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latent [mean, std] (fp16), caption embedding (fp16) and RGB map of a precomputed sample."""
    latent, embed = npy_load(sample[LATENT_KEY]), npy_load(sample[EMBED_KEY])
    cond = np.asarray(decode_member(sample, COND_KEY), dtype=np.uint8)
    if latent.ndim != 4 or latent.shape[0] != 2 or cond.shape[:2] != (resolution, resolution):
        raise ValueError(f"precomputed sample {sample.get('__key__')} does not match --resolution {resolution}")
    return latent, embed, cond


def resize_crop(img: Image.Image, size: int, resample: int) -> np.ndarray:
    """Shorter side to `size`, then a center crop; the map uses NEAREST so palette values stay exact."""
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def caption_of(sample: dict, index: int, seed: int, p_empty: float) -> str:
    """The sample's caption, or the empty prompt with probability p_empty (seeded by the sample index)."""
    text = S.caption_text(sample)
    return "" if random.Random(_mix(seed, index, 2)).random() < p_empty else text


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches (dicts of tensors) from WebDataset shards."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int, start: Position = Position(), rank: int = 0,
                 world: int = 1):
        super().__init__()
        self.cfg, self.tokenizer, self.seed, self.start = cfg, tokenizer, seed, start
        self.rank, self.world = rank, world
        self.first = start.samples if start.samples is not None else start.batches * cfg.train_batch_size
        self.urls = expand_shards(cfg.shards)
        self._last_failure = ""  # the latest undecodable sample: shard URL, member, reason
        self.meta = precomputed_meta(cfg.shards, cfg.resolution)
        check_image_size(cfg.shards, cfg.resolution, cfg.resize)

    def samples_after(self, batches: int) -> int:
        """Global samples consumed once the stream's position says `batches` (dropped batches included)."""
        return self.first + (batches - self.start.batches) * self.cfg.train_batch_size * self.world

    def _raw(self, handler: _Counter) -> Iterator[tuple[int, int, int, dict]]:
        """(global index, epoch, offset-after, raw sample) from the start position onwards."""
        index = self.first
        epoch, skip = self.start.epoch, self.start.offset
        while True:
            n = 0
            for n, sample in enumerate(raw_epoch(self.urls, self.seed, epoch, self.cfg.shuffle_buffer, handler), 1):
                if n <= skip:
                    continue
                yield index, epoch, n, sample
                index += 1
            if n == 0:
                raise RuntimeError(f"no readable samples in {self.cfg.shards!r} ({handler.errors} read errors)")
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        handler, gbs = _Counter(), self.cfg.train_batch_size * self.world
        members: list[tuple[int, dict]] = []
        empty, limit = 0, -(-self.cfg.max_failed_batches // nw)  # each worker sees 1/nw of the batches
        for index, epoch, offset, sample in self._raw(handler):
            k = (index - self.first) // gbs  # global batches since the start
            if k % nw != wid:
                continue
            members.append((index, sample))
            if len(members) == gbs:
                # every worker and rank reads the same tar stream, so only one of them reports read errors
                read_errors = handler.errors if wid == 0 and self.rank == 0 else 0
                handler.errors = 0
                batch = self._collate(members, read_errors, epoch, offset, self.start.batches + k)
                members = []
                empty = 0 if batch is not None else empty + 1
                if batch is not None:
                    yield batch
                elif empty >= limit:
                    raise ShardDataError(
                        f"{self._last_failure}; no sample decoded in {empty * nw} batches in a row "
                        f"({empty * nw * gbs} samples; --max-failed-batches {self.cfg.max_failed_batches}): "
                        "check that the shards hold KEY.jpg and KEY.cond.png images")

    def _collate(self, group, read_errors: int, epoch: int, offset: int, b: int) -> dict | None:
        """Decode this rank's share of one global batch and stack it; failed samples are replaced and counted.

        A rank whose whole share fails borrows from the rest of the global batch (in order), so ranks stay in
        step: a global batch is dropped only when all of it fails, which every rank then finds alike.
        """
        if not self.meta and any(LATENT_KEY in sample for _, sample in group):
            raise RuntimeError(f"{self.cfg.shards!r} holds precomputed samples but no {META_FILE} was found beside "
                               "the first shard: pass the local shard paths that `python -m trainer precompute` wrote")
        members = group[self.rank::self.world]
        decoded, failed = self._decode_all(members)
        if not decoded and self.world > 1:
            decoded, _ = self._decode_all([m for j, m in enumerate(group) if j % self.world != self.rank])
        if not decoded:
            return None
        while len(decoded) < len(members):  # keep batches full so every step sees the same count
            decoded.append(decoded[len(decoded) % max(1, len(members) - failed)])
        decoded = decoded[:len(members)]
        batch = self._stack_precomputed(decoded) if self.meta else self._stack(decoded)
        return batch | {"failed": torch.tensor(failed + read_errors), "position": torch.tensor([b + 1, epoch, offset])}

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
            latent, embed, cond = load_precomputed(sample, self.cfg.resolution)
            return latent, cond, self.meta["empty_prompt"] if text == "" else embed
        img, cond = load_pair(sample, self.cfg.resolution)
        return img, cond, text

    def _stack(self, decoded: list[tuple]) -> dict:
        """Pixels in [-1, 1], maps in [0, 1], token ids."""
        imgs = torch.from_numpy(np.stack([d[0] for d in decoded])).permute(0, 3, 1, 2)
        conds = torch.from_numpy(np.stack([d[1] for d in decoded])).permute(0, 3, 1, 2)
        ids = self.tokenizer([d[2] for d in decoded], max_length=self.tokenizer.model_max_length,
                             padding="max_length", truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": imgs.float().div(127.5).sub(1.0), "conditioning_pixel_values": conds.float().div(255.0),
                "input_ids": ids}

    @staticmethod
    def _stack_precomputed(decoded: list[tuple]) -> dict:
        """Latent mean and std (fp16), maps as uint8 (a quarter of the bytes to pin and copy; scaled to [0, 1]
        on the device by trainer.objective), caption embeddings (fp16)."""
        latents = torch.from_numpy(np.stack([d[0] for d in decoded]))
        conds = torch.from_numpy(np.stack([d[1] for d in decoded])).permute(0, 3, 1, 2)
        return {"latent_mean": latents[:, 0], "latent_std": latents[:, 1], "conditioning_pixel_values": conds,
                "encoder_hidden_states": torch.from_numpy(np.stack([d[2] for d in decoded]))}


def _worker_init(_: int) -> None:
    """Workers ignore Ctrl-C: the main process decides when to stop (after saving a checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(cfg: DataConfig, tokenizer, seed: int, start: Position, pin_memory: bool, rank: int = 0,
                 world: int = 1):
    """DataLoader over a ShardStream (this rank's share); batches arrive in stream order whatever the worker count."""
    stream = ShardStream(cfg, tokenizer, seed, start, rank, world)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin_memory,
        worker_init_fn=_worker_init if cfg.num_workers else None,
        prefetch_factor=4 if cfg.num_workers else None, persistent_workers=False,
    )
