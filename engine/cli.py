"""Command line: `python -m engine shards INPUT... --output DIR` and `python -m engine condition`.

Option names follow img2dataset's where one exists (its snake_case spelling is accepted too), so
its users feel at home.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import options
from . import outcomes as O
from .config import ConditionConfig, EngineConfig, PreviewConfig
from .stopping import exit_now, exit_status, raise_interrupted
from .storage import RunnerLost, StoreLost


def subcommand(sub, name: str, cls: type, **kw) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of `cls` (engine/options.py), with img2dataset's
    snake_case spellings accepted too."""
    p = sub.add_parser(name, formatter_class=options.HelpFormatter, **kw)
    options.add_options(p, cls, title="work" if cls is EngineConfig else None, snake=True)
    return p


def shards_parser(sub) -> None:
    """Options of `shards`: the fields of EngineConfig and its parts (engine/config.py)."""
    subcommand(sub, "shards", EngineConfig,
               help="parquet of URLs + captions, or a folder of images -> WebDataset shards",
               description="Download (or read from disk), validate, dedup, crop and condition the images of LAION-style "
                           "parquet files, or your own folder of images, into WebDataset tar shards. Rerun the same command to resume.")


def config_from_args(a: argparse.Namespace) -> EngineConfig:
    """Namespace -> EngineConfig (the dataclasses check the values and name the flag to change)."""
    return options.from_args(EngineConfig, a)


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
    from .prestart import arrow_without_pandas

    arrow_without_pandas()  # this process is ours: folder and CSV inputs' lists never import pandas
    from .pipeline import PENDING, run

    print(f"engine: {len(cfg.inputs)} input(s) -> {cfg.output} ({cfg.workers} workers, runner {cfg.runner})",
          file=sys.stderr)
    stats = run(cfg)  # Ctrl-C and SIGTERM: main() says what is kept
    print(summary(stats))
    print(f"shards in {cfg.output if '://' in cfg.output else Path(cfg.output).resolve()}")
    if stats["outcomes"].get(O.BLOCKED_ADDRESS):
        print(f"{stats['outcomes'][O.BLOCKED_ADDRESS]} rows point at non-public addresses (blocked_address); "
              "--allow-private-network fetches them", file=sys.stderr)
    if stats.get("unsaved"):
        print(f"error: {stats['unsaved']}; rerun the same command once the disk or object store is fixed", file=sys.stderr)
        return 1
    if stats["outcomes"].get(PENDING):
        print(f"{stats['outcomes'][PENDING]} rows pending: rerun the same command to finish", file=sys.stderr)
        return 1
    return 0


def condition_parser(sub) -> None:
    """Options of `condition`: the fields of ConditionConfig."""
    subcommand(sub, "condition", ConditionConfig, help="write the conditioning map of each image (for inference)",
               description="Writes DIR/<name>.png for each IMAGE at the image's own size, no crop, "
                           "through the same function the shards use.")


def run_condition(a: argparse.Namespace) -> int:
    """`condition`: one PNG per input image; unreadable inputs are reported, not fatal."""
    from .condition import make_conditioner
    from .decode import Rejected, decode_full
    from .sample import encode_png

    cfg = options.from_args(ConditionConfig, a)
    conditioner = make_conditioner(cfg.image.conditioner, cfg.image.palette)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in map(Path, cfg.images):
        try:
            rgb = decode_full(path.read_bytes(), cfg.image.max_pixels)  # the engine's formats and pixel limit
            (out / f"{path.stem}.png").write_bytes(encode_png(conditioner(rgb)))
            print(out / f"{path.stem}.png")
        except (OSError, ValueError, SyntaxError, Rejected) as exc:
            failed += 1
            print(f"{path}: {getattr(exc, 'outcome', 'error')}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def preview_parser(sub) -> None:
    """Options of `preview`: the fields of PreviewConfig."""
    subcommand(sub, "preview", PreviewConfig, help="draw a grid of image / conditioning map / caption from shards",
               description="Reads the first samples of SHARDS (folder, glob or brace pattern such as "
                           "'shards/{00000..00003}.tar') with webdataset and draws them into one PNG.")


def run_preview(a: argparse.Namespace) -> int:
    """`preview`: one PNG grid of the first samples."""
    from .preview import preview

    cfg = options.from_args(PreviewConfig, a)
    result = preview(list(cfg.shards), cfg.output, cfg.samples, cfg.columns)
    print(f"{result['output']}: {result['samples']} samples, {result['skipped']} skipped as undecodable")
    return 0


INTERRUPTED = {"shards": ": complete shards are kept; rerun the same command to resume"}
"""What an interrupted command leaves, by command (the rest: nothing worth saying)."""


def entry() -> None:
    """`python -m engine` and `ctrlnet-shards`: main(), then the process ends with its exit status."""
    exit_now(main())


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command; its exit status (tests call this in their own process: no exit here)."""
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shards_parser(sub)
    condition_parser(sub)
    preview_parser(sub)
    a = parser.parse_args(argv)
    # SIGTERM (a scheduler's stop) takes the same clean path as Ctrl-C, and ends with 143 where Ctrl-C ends with 130.
    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        return {"shards": run_shards, "condition": run_condition, "preview": run_preview}[a.command](a)
    except KeyboardInterrupt as exc:  # here, not around run(): a signal during the imports or the planning too
        print(f"\ninterrupted{INTERRUPTED.get(a.command, '')}", file=sys.stderr)
        return exit_status(exc)
    except (StoreLost, RunnerLost) as exc:  # the object store or a Ray actor went away mid-run; its message says to rerun
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:  # bad flags or inputs: say which
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) adds quotes
        print(f"error: {text}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk failed mid-run (full, I/O error): complete shards are kept
        print(f"error: {exc}; complete shards are kept: rerun the same command once the disk or object store is fixed",
              file=sys.stderr)
        return 1

