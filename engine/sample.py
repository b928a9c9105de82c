"""The sample format, written once: what the engine writes and the trainer, the fixtures and the
benchmarks read.

A shard is `NNNNN.tar` (five-digit shard id) beside `NNNNN.stats.json`; each sample is one key,
shard id then row index (`sample_key`), with the members

* `KEY.jpg`: the RGB crop, JPEG (libjpeg-turbo);
* `KEY.cond.png`: the conditioning map, PNG: palette (mode P, 1/2/4/8-bit) for palette maps,
  L for gray maps, RGB otherwise; every form decodes to the same RGB pixels;
* `KEY.txt`: the cleaned caption, UTF-8;
* `KEY.json`: url, sizes, source row, hashes and the kept parquet columns.

`python -m trainer precompute` keeps `txt`, `json` and `cond.png` and replaces `jpg` by
`latent.npy` and `text.npy`. The stats record the crop size (`image_size`), which the trainer
checks against its --resolution. Light imports only (numpy, Pillow): the trainer imports this.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPG, COND, TXT, JSON = "jpg", "cond.png", "txt", "json"
SAMPLE_MEMBERS = (COND, JPG, JSON, TXT)  # every key of an engine shard has exactly these, in tar order
LATENT, EMBED = "latent.npy", "text.npy"  # precomputed shards: VAE latent [mean, std], caption embedding
PRECOMPUTED_MEMBERS = (COND, EMBED, LATENT, JSON, TXT)
STATS_SUFFIX = ".stats.json"  # NNNNN.stats.json beside NNNNN.tar: the shard's counts, written last
IMAGE_SIZE = "image_size"  # the stats field holding the side of every square crop in the shard
MAP_PNG_LEVEL = 1  # zlib level of the map: level 0 is 6x the bytes, 2-6 cost up to 2.7x the CPU (bench/RESULTS.md)
MAP_PNG_STRATEGY = zlib.Z_RLE  # maps of a few colours are runs: matching runs only is ~20% less CPU
# and ~18% fewer bytes than the default strategy at level 1 (300 corpus maps: 0.47 -> 0.38 ms, 9.7 -> 7.9 KB)


def shard_name(shard_id: int) -> str:
    """Five digits, as webdataset brace patterns expect ({00000..00063})."""
    return f"{shard_id:05d}"


def sample_key(shard_id: int, index: int, shard_size: int) -> str:
    """Stable key: shard id then row index, zero padded, so a rerun writes the same keys."""
    return f"{shard_name(shard_id)}{index:0{max(5, len(str(shard_size - 1)))}d}"


def stats_path(tar_path: str) -> str:
    """The stats file beside a shard: 00003.tar -> 00003.stats.json."""
    return tar_path.removesuffix(".tar") + STATS_SUFFIX


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """RGB uint8 -> JPEG bytes through libjpeg-turbo, 4:2:2 as written since the first shards.

    simplejpeg's bundled libjpeg-turbo 3 writes the same bytes as PyTurboJPEG on the system's 2.1
    for ~20% less CPU (bench/RESULTS.md "Sample encodings")."""
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), int(quality), "RGB", "422")


def encode_png(cond: np.ndarray) -> bytes:
    """Conditioning map -> PNG; one channel when the map is gray, which is 3x smaller."""
    gray = bool((cond[..., 0] == cond[..., 1]).all() and (cond[..., 1] == cond[..., 2]).all())
    im = Image.fromarray(np.ascontiguousarray(cond[..., 0]) if gray else cond, "L" if gray else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # maps of few colours compress well even at level 1
    return buf.getvalue()


@dataclass(frozen=True)
class PackedMap:
    """A palette map as PNG stores it: scanlines of packed indices and the colours they index."""

    rows: np.ndarray
    """(H, 1 + ceil(W * bits / 8)) uint8: per row filter byte 0, then the indices from the top bit."""
    colors: np.ndarray
    """(K, 3) uint8 palette."""
    bits: int
    """Bits per index: 1, 2, 4 or 8 (index_bits)."""
    width: int
    """Pixels per row."""


def index_bits(n_colors: int) -> int:
    """The PNG bit depth that holds indices into n_colors colours (the smallest allowed)."""
    return next(b for b in (1, 2, 4, 8) if n_colors <= 1 << b)


def _chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, tag, data, CRC."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_map_png(packed: PackedMap, strategy: int = MAP_PNG_STRATEGY) -> bytes:
    """A PackedMap as a palette PNG (IHDR colour type 3, PLTE, one IDAT): the scanlines are already
    in PNG's layout, so only zlib runs here (Pillow would unpack and repack them). `strategy`: zlib's
    (bench/stage_choices.py compares the default)."""
    h = packed.rows.shape[0]
    header = struct.pack(">IIBBBBB", packed.width, h, packed.bits, 3, 0, 0, 0)
    deflate = zlib.compressobj(MAP_PNG_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 8, strategy)
    idat = deflate.compress(np.ascontiguousarray(packed.rows).data) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"PLTE", np.ascontiguousarray(packed.colors, np.uint8).tobytes())
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def decode_rgb(data: bytes) -> Image.Image:
    """An image member as RGB under the engine's decoding policy (allowed formats, pixel limit);
    raises engine.imagepolicy.Rejected, or OSError/ValueError for undecodable bytes."""
    from .imagepolicy import open_image

    with open_image(data) as im:
        return im.convert("RGB")


def caption_text(sample: dict) -> str:
    """The sample's KEY.txt as stripped text; raises ValueError when the member is missing or not UTF-8.

    Every sample has a txt (an empty one for no caption), so a missing one is damage (a tar cut after the
    sample's jpg: members are written cond.png, jpg, json, txt) and bytes that are not UTF-8 are not the
    engine's: training on them would teach the empty prompt, or U+FFFD, for that picture's caption."""
    text = sample.get(TXT)
    if text is None:
        raise ValueError(f"no {TXT}")
    if not isinstance(text, bytes):
        return str(text).strip()
    try:
        return text.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{TXT} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
