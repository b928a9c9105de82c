"""`python -m engine preview SHARDS --output preview.png`: what the shards hold, at a glance.

Reads samples with webdataset's own tar reader from any shards (a folder, a glob, a brace pattern
such as 'shards/{00000..00003}.tar', or tar paths) and draws a grid: each cell is the image, its
conditioning map beside it, and the caption under both. Samples whose image does not decode are
skipped and counted in the footer.
"""

from __future__ import annotations

import glob
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from . import sample as S
from .decode import decode_full
from .imagepolicy import DEFAULT_MAX_PIXELS, Rejected

CELL = 160  # pixels per image side
TEXT_LINES = 3
LINE = 12


def shard_paths(patterns: list[str]) -> list[str]:
    """Tar paths of folders (their *.tar), globs and brace patterns, in order, without repeats."""
    from braceexpand import braceexpand

    found: list[str] = []
    for pattern in patterns:
        if Path(pattern).is_dir():
            found += sorted(str(p) for p in Path(pattern).glob("*.tar"))
            continue
        for part in braceexpand(pattern):
            found += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    paths = list(dict.fromkeys(found))
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"no shard at {', '.join(missing or patterns)}")
    return paths


def read_samples(paths: list[str], limit: int) -> tuple[list[dict], int]:
    """Up to `limit` decoded (image, map, caption) samples, and how many were skipped as undecodable."""
    from webdataset.tariterators import tarfile_samples

    samples, skipped = [], 0
    for sample in tarfile_samples([{"url": p} for p in paths]):
        image_key = next((k for k in (S.JPG, "jpeg", "png", "webp") if k in sample), None)  # shards from elsewhere too
        try:  # shards may come from anywhere: the engine's decoding policy (formats, pixel limit)
            image = Image.fromarray(decode_full(sample[image_key], DEFAULT_MAX_PIXELS))
            cond = sample.get(S.COND)
            cond = Image.fromarray(decode_full(cond, DEFAULT_MAX_PIXELS)) if cond else None
        except (KeyError, Rejected, OSError, ValueError, SyntaxError):
            skipped += 1
            continue
        caption = sample.get(S.TXT, b"").decode("utf-8", "replace")
        samples.append({"image": image, "cond": cond, "caption": caption, "key": sample.get("__key__", "")})
        if len(samples) >= limit:
            break
    return samples, skipped


def _fit(im: Image.Image, method=Image.Resampling.BICUBIC) -> Image.Image:
    """The image scaled (up or down) to fit a CELL x CELL square, on gray."""
    im = ImageOps.contain(im, (CELL, CELL), method=method)
    square = Image.new("RGB", (CELL, CELL), (128, 128, 128))
    square.paste(im, ((CELL - im.width) // 2, (CELL - im.height) // 2))
    return square


def draw_cell(sample: dict) -> Image.Image:
    """Image | map, and the caption (wrapped, cut to TEXT_LINES lines) below."""
    cell = Image.new("RGB", (2 * CELL, CELL + TEXT_LINES * LINE + 6), "white")
    cell.paste(_fit(sample["image"]), (0, 0))
    if sample["cond"] is not None:
        cell.paste(_fit(sample["cond"], Image.Resampling.NEAREST), (CELL, 0))  # map values kept exact
    lines = textwrap.wrap(sample["caption"] or "(no caption)", width=2 * CELL // 6)[:TEXT_LINES]
    draw = ImageDraw.Draw(cell)
    for i, line in enumerate(lines):
        draw.text((3, CELL + 3 + i * LINE), line, fill=(0, 0, 0))
    return cell


def preview(patterns: list[str], output: str, samples: int = 16, columns: int = 4) -> dict:
    """Draw the grid of the first `samples` samples into `output`; return what was drawn."""
    found, skipped = read_samples(shard_paths(patterns), samples)
    if not found:
        raise ValueError(f"no decodable sample in {', '.join(patterns)}")
    cells = [draw_cell(s) for s in found]
    w, h = cells[0].size
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * w, rows * h + LINE + 6), "white")
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * w, (i // columns) * h))
    ImageDraw.Draw(grid).text((3, rows * h + 3), f"{len(cells)} samples (image | map, caption); "
                              f"{skipped} skipped as undecodable", fill=(0, 0, 0))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    return {"output": output, "samples": len(cells), "skipped": skipped}
