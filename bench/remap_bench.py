"""Palette remap throughput: Numba (one thread, all cores) vs plain numpy vs ImageMagick 6 `-remap`.

Run with `make bench-remap` (python -m bench.remap_bench). Real photos from scikit-image's data folder,
center-cropped and resized to each size; every figure is the best of a few repeats, in Mpixel/s.
ImageMagick is timed twice: as users run it (one process per image, PNG in and out), and remap
only (the same process reading a PPM into null:, minus one that reads it without -remap), which
leaves out process start-up, decoding and encoding. The Numba output is checked equal to IM's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from PIL import Image

from bench.results import machine_line, update_section
from engine.condition import remap_palette
from engine.palette import DEFAULT_PALETTE, parse_palette

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
TAB10 = "#1F77B4,#FF7F0E,#2CA02C,#D62728,#9467BD,#8C564B,#E377C2,#7F7F7F,#BCBD22,#17BECF"


def imagemagick() -> str:
    """Debian's IM6 binary, else magick, else /usr/bin/convert (never the /usr/local/bin stand-in)."""
    for name in ("convert-im6.q16", "magick"):
        if path := shutil.which(name):
            return path
    if Path("/usr/bin/convert").exists():
        return "/usr/bin/convert"
    raise SystemExit("ImageMagick not found: run `make system-deps`")


def photo_at(name: str, size: int) -> np.ndarray:
    """A scikit-image photo, center-cropped to a square and resized to size x size."""
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im)


def numpy_remap(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The obvious vectorized version: squared distance to every colour, argmin, gather."""
    dist = ((rgb[:, :, None, :].astype(np.int32) - palette.astype(np.int32)) ** 2).sum(-1)
    return palette[dist.argmin(-1)]


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs (the others lost time to the rest of the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(*args: str) -> None:
    """One ImageMagick process, failing loudly."""
    subprocess.run([imagemagick(), *args], check=True, capture_output=True)


def im_per_image(paths: list[Path], palette_png: Path, work: Path) -> Callable[[], None]:
    """What users run: `convert IN.png -dither None -remap palette.png OUT.png`, one process per image."""

    def go() -> None:
        for src in paths:
            run(str(src), "-dither", "None", "-remap", str(palette_png), str(work / f"im-{src.stem}.png"))

    return go


def im_remap_only(ppms: list[Path], palette_png: Path, repeats: int) -> float:
    """Seconds IM spends in -remap alone: (read + remap into null:) minus (read into null:)."""
    total = 0.0
    for ppm in ppms:
        with_remap = best_seconds(
            lambda p=ppm: run(str(p), "-dither", "None", "-remap", str(palette_png), "null:"), repeats
        )
        read_only = best_seconds(lambda p=ppm: run(str(p), "null:"), repeats)
        total += max(with_remap - read_only, 1e-9)
    return total


def write_inputs(images: list[np.ndarray], work: Path) -> tuple[list[Path], list[Path]]:
    """Each image as PNG (for the per-image runs) and as PPM (cheap to decode, for remap only)."""
    pngs, ppms = [], []
    for i, rgb in enumerate(images):
        pngs.append(work / f"in{i}.png")
        ppms.append(work / f"in{i}.ppm")
        Image.fromarray(rgb).save(pngs[-1])
        Image.fromarray(rgb).save(ppms[-1])
    return pngs, ppms


def measure(spec: str, size: int, repeats: int, work: Path) -> dict[str, float | bool | int]:
    """All five figures (Mpixel/s) for one palette and one image size, plus the equality check."""
    palette = parse_palette(spec)
    images = [photo_at(name, size) for name in PHOTOS]
    mpix = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    palette_png = work / "palette.png"
    run(*(f"xc:{c}" for c in spec.split(",")), "+append", str(palette_png))
    pngs, ppms = write_inputs(images, work)
    remap_palette(images[0][:8, :8], palette, parallel=False)  # compile / load the Numba cache
    remap_palette(images[0][:8, :8], palette, parallel=True)
    per_image = im_per_image(pngs, palette_png, work)
    row = {
        "numba_1": mpix
        / best_seconds(lambda: [remap_palette(im, palette, parallel=False) for im in images], repeats),
        "numba_n": mpix
        / best_seconds(lambda: [remap_palette(im, palette, parallel=True) for im in images], repeats),
        "numpy": mpix
        / best_seconds(lambda: [numpy_remap(im, palette) for im in images], max(1, repeats // 2)),
        "im_process": mpix / best_seconds(per_image, max(1, repeats // 2)),
        "im_remap": mpix / im_remap_only(ppms, palette_png, max(1, repeats // 2)),
    }
    theirs = [np.asarray(Image.open(work / f"im-{p.stem}.png").convert("RGB")) for p in pngs]
    row["equal"] = all(
        np.array_equal(remap_palette(im, palette), t) for im, t in zip(images, theirs, strict=True)
    )
    row["images"] = len(images)
    return row


def table(results: dict[tuple[str, int], dict]) -> str:
    """The markdown table of every (palette, size) row."""
    n = numba.get_num_threads()
    lines = [
        f"| palette | size | Numba 1 thread | Numba {n} threads | numpy argmin | IM6 per image (process) "
        "| IM6 -remap only | Numba 1 thread / IM6 process | Numba 1 thread / IM6 -remap only | equal to IM6 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (spec, size), r in results.items():
        name = (
            "default (black,gray50,white)" if spec == DEFAULT_PALETTE else f"{len(spec.split(','))} colours"
        )
        lines.append(
            f"| {name} | {size}x{size} | {r['numba_1']:.0f} | {r['numba_n']:.0f} | {r['numpy']:.1f} "
            f"| {r['im_process']:.1f} | {r['im_remap']:.1f} | {r['numba_1'] / r['im_process']:.0f}x "
            f"| {r['numba_1'] / r['im_remap']:.0f}x "
            f"| {'yes' if r['equal'] else 'NO'} ({r['images']} photos) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and write it to bench/RESULTS.md's "remap" section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="square image sides")
    parser.add_argument(
        "--palettes", nargs="+", default=[DEFAULT_PALETTE, TAB10], help="comma-separated colours"
    )
    parser.add_argument("--repeats", type=int, default=4, help="runs per figure; the fastest counts")
    parser.add_argument("--no-write", action="store_true", help="print only, leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="remap-bench-") as tmp:
        for spec in args.palettes:
            for size in args.sizes:
                results[(spec, size)] = measure(spec, size, args.repeats, Path(tmp))
                print(f"{spec} {size}: {results[(spec, size)]}", flush=True)
    version = subprocess.run([imagemagick(), "-version"], capture_output=True, text=True).stdout.splitlines()[
        0
    ]
    body = "\n".join(
        [
            "## Palette remap (Mpixel/s, higher is better)",
            "",
            f"Machine: {machine_line()}. {version}. Load average before/after: "
            f"{load_before:.1f}/{os.getloadavg()[0]:.1f} (other work on the box slows every column).",
            f"Photos: {', '.join(PHOTOS)} from scikit-image, center-cropped and resized; best of "
            f"{args.repeats} runs (IM and numpy: {max(1, args.repeats // 2)}).",
            "IM6 per image = `convert IN.png -dither None -remap palette.png OUT.png`, one process per image "
            "as users run it; IM6 -remap only = the same on a PPM into `null:` minus reading it, so no "
            "start-up, decoding or encoding; IM uses all its OpenMP threads, so the ratios (one Numba "
            "thread against them) are conservative. numpy = whole-palette argmin (not IM-exact for every "
            "palette). Threads pay only while cores are idle (on a busy box waking them can cost a 4 ms "
            "scheduler tick), so remap_palette goes parallel from 4 Mpixel and shard workers stay serial.",
            "",
            table(results),
        ]
    )
    print(body)
    if not args.no_write:
        update_section("remap", body)


if __name__ == "__main__":
    main()
