"""Command line: `python -m engine shards INPUT... --output DIR` and `python -m engine condition`.

Option names follow img2dataset's where one exists (its snake_case spelling is accepted too), so
its users feel at home.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import outcomes as O
from .config import DedupConfig, EngineConfig, FetchConfig, FilterConfig, ImageConfig


def _opt(parser, *names: str, **kw) -> None:
    """Add an option under its kebab-case names plus their snake_case spellings."""
    spelled = list(names) + ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
    parser.add_argument(*dict.fromkeys(spelled), **kw)


def shards_parser(sub) -> None:
    """Options of `shards`; every default comes from engine/config.py."""
    f, i, d, r = FetchConfig(), ImageConfig(), DedupConfig(), EngineConfig(inputs=("x",), output="x")
    p = sub.add_parser("shards", help="parquet of URLs + captions, or a folder of images -> WebDataset shards",
                       description="Download (or read from disk), validate, dedup, crop and condition the images of LAION-style "
                                   "parquet files, or your own folder of images, into WebDataset tar shards. Rerun the same command to resume.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="parquet files or folders of them (URLs); or your own images: a folder (recursive, "
                        "captions from same-stem .txt files), a glob ('photos/**/*.jpg'), or a CSV/JSONL "
                        "list of path,caption (paths relative to the list's folder)")
    _opt(p, "--output", "--output-folder", required=True, help="folder for the shards and stats")
    g = p.add_argument_group("work")
    _opt(g, "--workers", "--processes-count", type=int, default=r.workers, help="shard tasks at once (cores)")
    _opt(g, "--shard-size", "--number-sample-per-shard", type=int, default=r.shard_size, help="input rows per shard")
    _opt(g, "--ray-address", default=None, help="join this Ray cluster ('auto' or host:port) and run the shards there")
    _opt(g, "--runner", choices=["ray", "local", "processes"], default=None,
         help="'processes' (default on one machine): worker processes, no Ray start; 'ray' (default with "
              "--ray-address): Ray tasks, a local Ray without an address; 'local': threads of this process")
    _opt(g, "--shard-retries", type=int, default=r.max_retries, help="resubmissions of a shard whose task died")
    _opt(g, "--url-col", default=None, help="URL column (default: URL/url, any case)")
    _opt(g, "--caption-col", default=None, help="caption column (default: TEXT/caption, any case)")
    _opt(g, "--no-progress", action="store_true", help="no live progress bar")
    _opt(g, "--local-root", action="append", default=[], metavar="DIR",
         help="read rows whose URL is a path or file:// URL inside DIR from disk (repeatable; default: only "
              "inside a folder or glob given as INPUT and a CSV/JSONL list's folder)")
    g = p.add_argument_group("download")
    _opt(g, "--concurrency", "--thread-count", type=int, default=f.concurrency, help="downloads in flight per worker")
    _opt(g, "--timeout", type=float, default=f.timeout, help="seconds per request, body included")
    _opt(g, "--connect-timeout", type=float, default=f.connect_timeout, help="seconds to connect")
    _opt(g, "--retries", type=int, default=f.retries, help="retries after timeouts, connection errors, 429, 5xx")
    _opt(g, "--max-bytes", type=int, default=f.max_bytes, help="largest body accepted")
    _opt(g, "--max-redirects", type=int, default=f.max_redirects, help="redirect hops followed")
    _opt(g, "--user-agent", default=f.user_agent, help="User-Agent header")
    _opt(g, "--ignore-optout", action="store_true", help="download images whose X-Robots-Tag says noai/noimageai")
    _opt(g, "--allow-private-network", action="store_true",
         help="also fetch loopback/private/link-local addresses (default: public addresses only)")
    g = p.add_argument_group("images")
    _opt(g, "--image-size", type=int, default=i.image_size, help="side of the square crop (multiple of 64)")
    _opt(g, "--min-image-size", type=int, default=i.min_image_size, help="smallest shorter side accepted")
    _opt(g, "--max-aspect-ratio", type=float, default=i.max_aspect_ratio, help="largest long/short side ratio")
    _opt(g, "--max-pixels", type=int, default=i.max_pixels, help="decompression-bomb guard")
    _opt(g, "--jpeg-quality", "--encode-quality", type=int, default=i.jpeg_quality, help="quality of KEY.jpg")
    _opt(g, "--resize-filter", choices=["lanczos", "bicubic", "bilinear", "box"], default=i.resize_filter,
         help="downscaling filter: bilinear (OpenCV SIMD, cheapest), bicubic, box (area average, "
              "as img2dataset's INTER_AREA), lanczos (Pillow, about 10x bilinear's CPU)")
    _opt(g, "--conditioner", default=i.conditioner, help="conditioning map: palette or grayscale")
    _opt(g, "--palette", default=i.palette, help="palette colours (ImageMagick names or #RRGGBB)")
    g = p.add_argument_group("filters (all off by default)")
    _opt(g, "--max-punsafe", type=float, help="drop rows with punsafe above this")
    _opt(g, "--max-pwatermark", type=float, help="drop rows with pwatermark above this")
    _opt(g, "--min-aesthetic", type=float, help="drop rows with AESTHETIC_SCORE below this")
    _opt(g, "--min-similarity", type=float, help="drop rows with CLIP similarity below this")
    _opt(g, "--min-colorfulness", type=float, help="drop near-grayscale images (try 3; gray is 0, dull colour photos ~5-15)")
    _opt(g, "--drop-empty-captions", action="store_true", help="drop images whose cleaned caption is empty")
    g = p.add_argument_group("dedup")
    _opt(g, "--no-dedup", action="store_true", help="keep duplicates")
    _opt(g, "--near-distance", type=int, default=d.near_distance, help="perceptual-hash distance of near duplicates")
    _opt(g, "--index-shards", type=int, default=d.index_shards, help="dedup index actors")


def config_from_args(a: argparse.Namespace) -> EngineConfig:
    """Namespace -> EngineConfig (the dataclasses check the values and name the flag to change)."""
    return EngineConfig(
        inputs=tuple(a.inputs), output=a.output, shard_size=a.shard_size, workers=a.workers,
        ray_address=a.ray_address, runner=a.runner, max_retries=a.shard_retries, url_col=a.url_col,
        caption_col=a.caption_col, progress=not a.no_progress, local_roots=tuple(a.local_root),
        fetch=FetchConfig(concurrency=a.concurrency, timeout=a.timeout, connect_timeout=a.connect_timeout,
                          retries=a.retries, max_bytes=a.max_bytes, max_redirects=a.max_redirects,
                          user_agent=a.user_agent, respect_optout=not a.ignore_optout,
                          allow_private_network=a.allow_private_network),
        image=ImageConfig(image_size=a.image_size, min_image_size=a.min_image_size,
                          max_aspect_ratio=a.max_aspect_ratio, max_pixels=a.max_pixels,
                          jpeg_quality=a.jpeg_quality, resize_filter=a.resize_filter,
                          conditioner=a.conditioner, palette=a.palette),
        filters=FilterConfig(max_punsafe=a.max_punsafe, max_pwatermark=a.max_pwatermark,
                             min_aesthetic=a.min_aesthetic, min_similarity=a.min_similarity,
                             min_colorfulness=a.min_colorfulness, drop_empty_captions=a.drop_empty_captions),
        dedup=DedupConfig(enabled=not a.no_dedup, near_distance=a.near_distance, index_shards=a.index_shards),
    )


def summary(stats: dict) -> str:
    """The end-of-run table: every outcome with its count and share."""
    rows = max(stats["rows"], 1)
    lines = [f"{'outcome':<22}{'rows':>10}{'share':>9}"]
    for name, n in sorted(stats["outcomes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<22}{n:>10}{100 * n / rows:>8.1f}%")
    lines.append(f"{'total':<22}{stats['rows']:>10}")
    lines.append(f"{stats['shards_complete']} shards complete, {stats['written']} samples, "
                 f"{stats['images_per_s']} images/s this run ({stats['seconds']} s)")
    for c in stats.get("duplicate_clusters", [])[:5]:
        lines.append(f"  duplicate cluster of {c['owner']}: {c['count']} dropped, e.g. {c['example_url']}")
    for f in stats["shards_failed"]:
        lines.append(f"  shard {f['shard']} failed: {f['error']}")
    return "\n".join(lines)


def run_shards(a: argparse.Namespace) -> int:
    """`shards`: run the pipeline, print the summary; exit 1 while rows are pending."""
    cfg = config_from_args(a)
    if cfg.runner == "processes":  # first thing: the fork server's imports overlap with the driver's
        from .prestart import start

        start()
    from .pipeline import PENDING, run

    print(f"engine: {len(cfg.inputs)} input(s) -> {cfg.output} ({cfg.workers} workers, runner {cfg.runner})",
          file=sys.stderr)
    try:
        stats = run(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: complete shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary(stats))
    print(f"shards in {Path(cfg.output).resolve()}")
    if stats["outcomes"].get(O.BLOCKED_ADDRESS):
        print(f"{stats['outcomes'][O.BLOCKED_ADDRESS]} rows point at non-public addresses (blocked_address); "
              "--allow-private-network fetches them", file=sys.stderr)
    if stats.get("unsaved"):
        print(f"error: {stats['unsaved']}; rerun the same command once the disk is fixed", file=sys.stderr)
        return 1
    if stats["outcomes"].get(PENDING):
        print(f"{stats['outcomes'][PENDING]} rows pending: rerun the same command to finish", file=sys.stderr)
        return 1
    return 0


def condition_parser(sub) -> None:
    """Options of `condition`."""
    i = ImageConfig()
    p = sub.add_parser("condition", help="write the conditioning map of each image (for inference)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Writes DIR/<name>.png for each IMAGE at the image's own size, no crop, "
                                   "through the same function the shards use.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _opt(p, "--output", required=True, help="folder for the maps")
    _opt(p, "--conditioner", default=i.conditioner, help="palette or grayscale")
    _opt(p, "--palette", default=i.palette, help="palette colours")
    _opt(p, "--max-pixels", type=int, default=i.max_pixels, help="decompression-bomb guard")


def run_condition(a: argparse.Namespace) -> int:
    """`condition`: one PNG per input image; unreadable inputs are reported, not fatal."""
    from .condition import make_conditioner
    from .decode import Rejected, decode_full
    from .write import encode_png

    conditioner = make_conditioner(a.conditioner, a.palette)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in map(Path, a.images):
        try:
            rgb = decode_full(path.read_bytes(), a.max_pixels)  # the engine's formats and pixel limit
            (out / f"{path.stem}.png").write_bytes(encode_png(conditioner(rgb)))
            print(out / f"{path.stem}.png")
        except (OSError, ValueError, SyntaxError, Rejected) as exc:
            failed += 1
            print(f"{path}: {getattr(exc, 'outcome', 'error')}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def preview_parser(sub) -> None:
    """Options of `preview`."""
    p = sub.add_parser("preview", help="draw a grid of image / conditioning map / caption from shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Reads the first samples of SHARDS (folder, glob or brace pattern such as "
                                   "'shards/{00000..00003}.tar') with webdataset and draws them into one PNG.")
    p.add_argument("shards", nargs="+", metavar="SHARDS")
    _opt(p, "--output", default="preview.png", help="PNG to write")
    _opt(p, "--samples", type=int, default=16, help="samples to draw")
    _opt(p, "--columns", type=int, default=4, help="cells per row")


def run_preview(a: argparse.Namespace) -> int:
    """`preview`: one PNG grid of the first samples."""
    from .preview import preview

    result = preview(a.shards, a.output, a.samples, a.columns)
    print(f"{result['output']}: {result['samples']} samples, {result['skipped']} skipped as undecodable")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m engine` and `ctrlnet-shards`."""
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shards_parser(sub)
    condition_parser(sub)
    preview_parser(sub)
    a = parser.parse_args(argv)
    # SIGTERM (a scheduler's stop) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return {"shards": run_shards, "condition": run_condition, "preview": run_preview}[a.command](a)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:  # bad flags or inputs: say which
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk failed mid-run (full, I/O error): complete shards are kept
        print(f"error: {exc}; complete shards are kept: rerun the same command once the disk is fixed",
              file=sys.stderr)
        return 1

