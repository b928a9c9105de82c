"""`python -m trainer precompute`: encode shards once, so training never runs the VAE encoder or text encoder.

    python -m trainer precompute --shards 'shards/{00000..00063}.tar' --model MODEL --output pre/ \
        [--device cuda|cpu] [--batch-size N] [--resolution 512] [--resize]

Input shard i becomes `OUTPUT/{i:05d}.tar`, its samples under the same keys, in the same order:

* `latent.npy`: the VAE's latent distribution as fp16 [mean, std] (2 x 4 x h x w), unscaled, so the
  trainer draws `mean + std * eps` from its own generator exactly as on-the-fly training draws
  `latent_dist.sample()` (the same random numbers are consumed);
* `text.npy`: the text encoder's last hidden state of the sample's caption (fp16, 77 x d); each
  distinct caption is encoded once (cached);
* `cond.png`: the conditioning map already resized and cropped to the resolution;
* `txt` and `json` as they were (the JPEG is not kept).

`OUTPUT/empty_prompt.npy` holds the empty prompt's embedding (used for caption dropout) and
`OUTPUT/precompute.json` the settings; the trainer finds both beside the shards and then streams these
samples instead of pixels (trainer.data). Each shard is written under a temporary name and renamed
when complete, so a re-run after an interruption skips finished shards and redoes the rest.
Undecodable samples are skipped and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import options
from engine import sample as S
from engine.atomic import fsync_file, tmp_path
from engine.options import check_choices, opt

META_FILE, EMPTY_FILE = "precompute.json", "empty_prompt.npy"
LATENT_KEY, EMBED_KEY = S.LATENT, S.EMBED  # the names this module used before engine/sample.py
TEXT_CACHE = 4096  # distinct captions kept; LAION repeats captions mostly within nearby rows


@dataclass
class PrecomputeConfig:
    """What `python -m trainer precompute` reads, with which model, and where it writes."""

    shards: str
    """Input shard pattern (as for training)."""
    model: str
    """Diffusers folder or hub id whose VAE and text encoder encode the samples (the one you train on)."""
    output: str
    """Folder for the precomputed shards (OUTPUT/NNNNN.tar), empty_prompt.npy and precompute.json."""
    device: str | None = field(default=None, metadata=opt(choices=("cuda", "cpu")))
    """cuda or cpu; default cuda when available."""
    batch_size: int = 16
    """Images per VAE forward pass."""
    resolution: int = 512
    """Training resolution; must equal the trainer's --resolution."""
    resize: bool = False
    """Resize samples whose shards' stats record another image size than --resolution (default: stop)."""
    revision: str | None = None
    """Hub revision of --model."""
    variant: str | None = None
    """Weight variant of --model (e.g. fp16)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.resolution % 8 != 0 or self.resolution <= 0:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")


def npy_bytes(a: np.ndarray) -> bytes:
    """An array as .npy bytes (read back with np.load, allow_pickle=False)."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """Inverse of npy_bytes."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_encoders(cfg: PrecomputeConfig) -> tuple:
    """VAE, text encoder and tokenizer through the trainer's loaders: .safetensors only; a diffusers
    folder, a hub id or one original-layout file (which holds the UNet too)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.models import load_frozen_single_file, load_weights
    from trainer.single_file import is_single_file

    if is_single_file(cfg.model):
        _, vae, text_encoder, tokenizer, _ = load_frozen_single_file(cfg.model)
        return vae, text_encoder, tokenizer
    kw = dict(revision=cfg.revision, variant=cfg.variant)
    return (load_weights(AutoencoderKL, cfg.model, "--model", subfolder="vae", **kw),
            load_weights(CLIPTextModel, cfg.model, "--model", subfolder="text_encoder", **kw),
            CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer", revision=cfg.revision))


class Encoders:
    """The VAE encoder and text encoder in fp32 (fp16 on CUDA), with a cache of caption embeddings."""

    def __init__(self, cfg: PrecomputeConfig, device: torch.device) -> None:
        vae, text_encoder, self.tokenizer = load_encoders(cfg)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.text_encoder = text_encoder.to(device, dtype).eval()
        self.vae = vae.to(device, dtype).eval()
        self.device, self.dtype = device, dtype
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @torch.no_grad()
    def latents(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 images (n, h, w, 3) -> fp16 [mean, std] of the latent distribution, (n, 2, c, h/f, w/f)."""
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).to(self.dtype).div(127.5).sub(1.0)
        dist = self.vae.encode(x).latent_dist
        return torch.stack([dist.mean, dist.std], dim=1).half().cpu().numpy()

    @torch.no_grad()
    def texts(self, captions: list[str]) -> list[np.ndarray]:
        """fp16 last hidden states of the captions; each distinct caption encoded once."""
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if todo:
            ids = self.tokenizer(todo, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = self.text_encoder(ids, return_dict=False)[0].half().cpu().numpy()
            for c, e in zip(todo, out, strict=True):
                self.cache[c] = e
        embeds = [self.cache[c] for c in captions]
        for c in captions:
            self.cache.move_to_end(c)
        while len(self.cache) > TEXT_CACHE:
            self.cache.popitem(last=False)
        return embeds


def caption(sample: dict) -> str:
    """The sample's caption as the trainer reads it (stripped UTF-8, empty when absent)."""
    return S.caption_text(sample)


def encode_batch(enc: Encoders, items: list[tuple[dict, np.ndarray, np.ndarray]]) -> list[dict]:
    """Output samples for decoded (sample, image, map) triples: latents, caption embeddings, map, txt, json."""
    lat = enc.latents(np.stack([img for _, img, _ in items]))
    embeds = enc.texts([caption(s) for s, _, _ in items])
    out = []
    for (s, _, cond), latent, embed in zip(items, lat, embeds, strict=True):
        rec = {"__key__": s["__key__"], LATENT_KEY: npy_bytes(latent), EMBED_KEY: npy_bytes(embed),
               S.COND: S.encode_png(cond)}  # lossless: palette values stay exact
        rec.update({k: s[k] for k in (S.TXT, S.JSON) if k in s})
        out.append(rec)
    return out


def convert_shard(enc: Encoders, url: str, dest: Path, cfg: PrecomputeConfig) -> dict:
    """Encode one input shard into `dest` (written under a temporary name, flushed, renamed); return its counts."""
    import webdataset as wds
    from webdataset.tariterators import tarfile_samples

    from trainer.data import load_pair

    counts = {"samples": 0, "failed": 0, "read_errors": 0}

    def on_error(exn: Exception) -> bool:
        counts["read_errors"] += 1
        return True

    tmp = tmp_path(dest)
    with wds.TarWriter(str(tmp)) as sink:
        pending: list = []
        for sample in tarfile_samples([{"url": url}], handler=on_error):
            try:
                caption(sample)  # a missing or non-UTF-8 txt is refused here as in training (engine.sample)
                img, cond = load_pair(sample, cfg.resolution)
            except Exception:  # noqa: BLE001 - an undecodable sample is skipped and counted
                counts["failed"] += 1
                continue
            pending.append((sample, img, cond))
            if len(pending) == cfg.batch_size:
                _flush(enc, pending, sink, counts)
        _flush(enc, pending, sink, counts)
    fsync_file(tmp)  # whole on disk before the name that vouches for it
    os.replace(tmp, dest)
    return counts


def _flush(enc: Encoders, pending: list, sink, counts: dict) -> None:
    """Encode and write the pending samples, then empty the list."""
    if pending:
        for rec in encode_batch(enc, pending):
            sink.write(rec)
        counts["samples"] += len(pending)
        pending.clear()


def write_meta(enc: Encoders, cfg: PrecomputeConfig, out: Path) -> None:
    """empty_prompt.npy and precompute.json (what the trainer checks before streaming these shards)."""
    np.save(out / EMPTY_FILE, enc.texts([""])[0], allow_pickle=False)
    meta = {"model": cfg.model, "revision": cfg.revision, "resolution": cfg.resolution,
            "latent_channels": enc.vae.config.latent_channels, "scaling_factor": enc.vae.config.scaling_factor,
            "vae_scale_factor": 2 ** (len(enc.vae.config.block_out_channels) - 1),  # latents are resolution / this
            "text_dim": int(enc.text_encoder.config.hidden_size), "source": cfg.shards}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))


def precompute(cfg: PrecomputeConfig) -> dict:
    """Encode every input shard into cfg.output; skip output shards that already exist; return the counts."""
    from trainer.data import check_image_size, expand_shards
    from trainer.train import resolve_device

    urls = expand_shards(cfg.shards)
    check_image_size(cfg.shards, cfg.resolution, cfg.resize)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    enc = Encoders(cfg, resolve_device(cfg.device))
    write_meta(enc, cfg, out)
    total = {"shards": 0, "skipped_shards": 0, "samples": 0, "failed": 0, "read_errors": 0}
    for i, url in enumerate(urls):
        dest = out / f"{S.shard_name(i)}.tar"
        if dest.exists():  # complete: shards only appear under their final name when finished
            total["skipped_shards"] += 1
            continue
        counts = convert_shard(enc, url, dest, cfg)
        total["shards"] += 1
        for k, v in counts.items():
            total[k] += v
        print(f"{dest}: {counts['samples']} samples, {counts['failed']} undecodable", flush=True)
    print(f"done: {json.dumps(total)}; train with --shards '{out}/{{00000..{len(urls) - 1:05d}}}.tar'", flush=True)
    return total


def build_parser() -> argparse.ArgumentParser:
    """The `precompute` subcommand's flags: one per field of PrecomputeConfig."""
    p = argparse.ArgumentParser(prog="python -m trainer precompute", description=__doc__.splitlines()[0],
                                formatter_class=options.HelpFormatter)
    options.add_options(p, PrecomputeConfig)
    return p


def main(argv: list[str]) -> int:
    """Parse the flags and precompute; exit 2 on bad settings."""
    ns = build_parser().parse_args(argv)
    try:
        cfg = PrecomputeConfig(**vars(ns))
        precompute(cfg)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
