"""The engine's one typed configuration: every CLI option is a field documented here.

engine/cli.py derives the command line from these fields (engine/options.py): a field's name, default
and docstring are its flag, default and --help text; `opt(...)` adds other spellings and choices.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .options import check_choices, opt


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


USER_AGENT = "ctrlnet-forge/0.1 (+https://github.com/ctrlnet-forge; image dataset builder; honours X-Robots-Tag noai)"


@dataclass(frozen=True)
class FetchConfig:
    """How rows are downloaded (engine/fetch.py)."""

    concurrency: int = field(default=64, metadata=opt("--concurrency", "--thread-count"))
    """Downloads in flight per worker (img2dataset's --thread_count, per process)."""
    timeout: float = 10.0
    """Seconds for one whole request, body included; a server that drips bytes hits this."""
    connect_timeout: float = 5.0
    """Seconds to open the connection."""
    retries: int = 2
    """Extra attempts after a timeout, connection error, 429 or 5xx (img2dataset's --retries)."""
    backoff: float = 0.5
    """Seconds before the first retry; doubles with every further retry."""
    max_bytes: int = 32 * 1024 * 1024
    """Largest body accepted, on the wire and decoded; bigger ones are cut off early and counted as too_large."""
    max_redirects: int = 5
    """Redirect hops followed (http and https targets only)."""
    user_agent: str = USER_AGENT
    """User-Agent header sent with every request."""
    respect_optout: bool = field(default=True, metadata=opt("--ignore-optout", negate=True))
    """Skip images whose X-Robots-Tag says noai or noimageai."""
    allow_private_network: bool = False
    """Also fetch loopback, private, link-local and other non-public addresses (the sample corpus on
    127.0.0.1, an intranet mirror). Off: such hosts, redirect targets included, end as blocked_address
    with no request sent (engine/netpolicy.py, docs/SECURITY.md)."""

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("--timeout and --connect-timeout must be positive")
        if self.retries < 0:
            raise ValueError("--retries must be 0 or more")
        if self.max_bytes < 1024:
            raise ValueError("--max-bytes must be at least 1024")


@dataclass(frozen=True)
class ImageConfig:
    """What counts as a usable image and how it is cut (decode.py, crop.py, condition.py)."""

    image_size: int = 512
    """Side of the square crop written to the shards; a multiple of 64."""
    min_image_size: int = 512
    """Shorter side below this is rejected (before download when the parquet has sizes, else after)."""
    max_aspect_ratio: float = 2.0
    """Longer side / shorter side above this is rejected."""
    max_pixels: int = 80_000_000
    """Decompression-bomb guard: images declaring more pixels are rejected before decoding."""
    jpeg_quality: int = field(default=95, metadata=opt("--jpeg-quality", "--encode-quality"))
    """Quality of the written KEY.jpg."""
    resize_filter: str = field(default="bilinear", metadata=opt(choices=("lanczos", "bicubic", "bilinear", "box")))
    """Downscaling filter of the crop: bilinear (OpenCV, after a power-of-2 DCT scaling: against a full-resolution
    Lanczos crop, PSNR 44.6 dB mean / 36.1 dB worst 5% vs 47.7 / 31.0 for the old M/8 + Lanczos path,
    at a tenth of its CPU),
    bicubic, box (area average, as img2dataset's OpenCV INTER_AREA) or lanczos (Pillow).
    Quality and costs: bench/RESULTS.md."""
    conditioner: str = "palette"
    """Which conditioning map to compute: palette or grayscale (engine/condition.py's CONDITIONERS)."""
    palette: str = "black,gray50,white"
    """Palette for the palette conditioner: ImageMagick colour names or #RRGGBB, comma separated."""

    def __post_init__(self):
        if self.image_size < 64 or self.image_size % 64:
            raise ValueError(f"--image-size must be a positive multiple of 64, got {self.image_size}")
        if self.min_image_size < 1:
            raise ValueError("--min-image-size must be positive")
        if self.image_size > self.min_image_size:
            raise ValueError(
                f"--image-size {self.image_size} is larger than --min-image-size {self.min_image_size}: "
                "images are never upscaled, so raise --min-image-size to at least --image-size"
            )
        if self.max_aspect_ratio < 1:
            raise ValueError("--max-aspect-ratio must be at least 1")
        check_choices(self)
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("--jpeg-quality must be within 1..100")


    def size_problem(self, width: float, height: float) -> tuple[str, str] | None:
        """("small" | "aspect", reason) when a width x height image fails the size rules, else None.

        One rule for both places it is applied: parquet sizes before download, decoded sizes after.
        """
        if min(width, height) < self.min_image_size:
            return "small", f"{int(width)}x{int(height)} below {self.min_image_size}"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return "aspect", f"{int(width)}x{int(height)} beyond ratio {self.max_aspect_ratio}"
        return None


@dataclass(frozen=True)
class FilterConfig:
    """Optional filters, all off by default: metadata thresholds before download, colour after decode."""

    max_punsafe: float | None = None
    """Drop rows whose punsafe column is above this (NSFW probability)."""
    max_pwatermark: float | None = None
    """Drop rows whose pwatermark column is above this."""
    min_aesthetic: float | None = None
    """Drop rows whose AESTHETIC_SCORE column is below this."""
    min_similarity: float | None = None
    """Drop rows whose CLIP similarity column is below this."""
    min_colorfulness: float | None = None
    """Drop decoded images whose colourfulness (Hasler-Suesstrunk) is below this: gray is 0, dull colour
    photos ~5-15; try 3."""
    drop_empty_captions: bool = False
    """Drop images whose caption is empty after cleaning (counted as empty_caption)."""


@dataclass(frozen=True)
class DedupConfig:
    """Duplicate removal across all shards of a run (engine/dedup.py)."""

    enabled: bool = field(default=True, metadata=opt("--no-dedup", negate=True))
    """Keep each image once: exact (bytes, pixels) and near (perceptual hash) duplicates are dropped."""
    near_distance: int = 8
    """Largest Hamming distance between 64-bit perceptual hashes that still counts as the same image
    (chosen from bench/dedup_bench.py's labelled set: see bench/RESULTS.md)."""
    index_shards: int = 1
    """Index actors that hold the hashes. One actor answers ~6,000 claims/s (bench/RESULTS.md), more
    than 16 workers write; every extra actor adds round trips per batch, so raise it only for
    clusters of hundreds of workers."""

    def __post_init__(self):
        if not 0 <= self.near_distance <= 16:
            raise ValueError(f"--near-distance must be within 0..16 (0 keeps exact duplicates out only), got {self.near_distance}")
        if self.index_shards < 1:
            raise ValueError("--index-shards must be at least 1")


@dataclass(frozen=True)
class EngineConfig:
    """A whole run: inputs, output, the stages' configs and how the work is spread."""

    inputs: tuple[str, ...] = field(metadata=opt(positional=True, metavar="INPUT"))
    """Parquet files or folders of them (URLs); or your own images: a folder (recursive, captions from
    same-stem .txt files), a glob ('photos/**/*.jpg', quoted), or a CSV/JSONL list of path,caption (paths
    relative to the list's folder) (engine/sources.py); read in sorted order."""
    output: str = field(metadata=opt("--output", "--output-folder", required=True))
    """Folder for NNNNN.tar / .parquet / .stats.json and the run's stats.json, or an object store URL
    (s3://bucket/prefix, gs://bucket/prefix) the shards are uploaded to (engine/storage.py)."""
    shard_size: int = field(default=10_000, metadata=opt("--shard-size", "--number-sample-per-shard"))
    """Input rows per shard (img2dataset's --number_sample_per_shard)."""
    workers: int = field(default_factory=usable_cores, metadata=opt("--workers", "--processes-count"))
    """Shard tasks running at once (img2dataset's --processes_count)."""
    ray_address: str | None = None
    """Join this Ray cluster ('auto', host:port, or ray://host:port for Ray Client) and run the shards there
    (runner 'ray')."""
    runner: str | None = field(default=None, metadata=opt(choices=("ray", "local", "processes")))
    """'processes' (worker processes of this machine, no Ray: the default without --ray-address),
    'ray' (Ray tasks: the default with --ray-address; a local Ray without one) or 'local' (threads
    of this process, one GIL). None picks the default."""
    max_retries: int = field(default=2, metadata=opt("--shard-retries"))
    """Times the driver resubmits a shard whose task died (the task itself never raises)."""
    url_col: str | None = None
    """Column holding the URL; default finds URL/url case-insensitively."""
    caption_col: str | None = None
    """Column holding the caption; default finds TEXT/caption case-insensitively."""
    progress: bool = field(default=True, metadata=opt("--no-progress", negate=True))
    """Show a live progress bar on stderr."""
    s3_endpoint: str | None = field(default=None, metadata=opt(metavar="URL"))
    """Endpoint URL of an S3-compatible server for an s3:// --output or INPUT (MinIO, Ceph, R2, ...: e.g.
    http://minio:9000); default: AWS. Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    or ~/.aws, on every node that writes shards. For gs://, the endpoint of a GCS emulator."""
    local_roots: tuple[str, ...] = field(default=(), metadata=opt("--local-root", metavar="DIR"))
    """Folders whose files may be read when a row's URL is a plain path or file:// URL (engine/local.py;
    repeat the flag for several). The folder of an INPUT folder, glob or CSV/JSONL list is always allowed;
    other local rows end as invalid_url and nothing else local is ever read."""
    fetch: FetchConfig = field(default_factory=FetchConfig, metadata=opt(group="download"))
    image: ImageConfig = field(default_factory=ImageConfig, metadata=opt(group="images"))
    filters: FilterConfig = field(default_factory=FilterConfig, metadata=opt(group="filters (all off by default)"))
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("give at least one INPUT parquet file or folder")
        if self.shard_size < 1 or self.shard_size > 10_000_000:
            raise ValueError("--shard-size must be within 1..10,000,000")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.runner is None:  # frozen: the default is settled here, once, so every reader sees it
            object.__setattr__(self, "runner", "ray" if self.ray_address else "processes")
        check_choices(self)
        if self.ray_address and self.runner != "ray":
            raise ValueError(f"--ray-address runs the shards on Ray: drop --runner {self.runner} or give --runner ray")
        if self.s3_endpoint and not any(str(p).startswith(("s3://", "gs://", "gcs://")) for p in (self.output, *self.inputs)):
            raise ValueError("--s3-endpoint is for an object store --output or INPUT (s3://bucket/prefix); drop it or give one")

    def to_dict(self) -> dict:
        """Plain dict for stats.json and logs."""
        return asdict(self)


@dataclass(frozen=True)
class ConditionConfig:
    """`python -m engine condition`: the conditioning map of each image, as the shards' would be."""

    images: tuple[str, ...] = field(metadata=opt(positional=True, metavar="IMAGE"))
    """Images to write the map of (any format the engine decodes)."""
    output: str = field(metadata=opt(required=True))
    """Folder for the maps: DIR/<image name>.png at the image's own size, no crop."""
    image: ImageConfig = field(default_factory=ImageConfig,
                               metadata=opt(group="map", only=("conditioner", "palette", "max_pixels")))


@dataclass(frozen=True)
class PreviewConfig:
    """`python -m engine preview`: a grid of image / conditioning map / caption from shards."""

    shards: tuple[str, ...] = field(metadata=opt(positional=True, metavar="SHARDS"))
    """Shard folders, globs or brace patterns such as 'shards/{00000..00003}.tar'."""
    output: str = "preview.png"
    """PNG to write."""
    samples: int = 16
    """Samples to draw (the first ones of the shards)."""
    columns: int = 4
    """Cells per row."""
