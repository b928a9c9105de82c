"""Pictures of a run beside its checkpoints, drawn with Pillow (no matplotlib).

loss.png: the logged loss, raw and smoothed, redrawn from train_log.jsonl with every checkpoint, so a
glance at the output folder shows whether the loss is going down. progress.png: the validation images
of every step so far (rows: prompt/map pairs, columns: steps), redrawn after each validation from the
PNGs in validation/, so it spans resumed runs too. The smoothed loss is a debiased exponential moving
average whose weight grows with the number of records (0.6, TensorBoard's default, up to 0.95).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image, ImageDraw

from engine.atomic import write_atomic

SIZE = (800, 400)
MARGIN = (70, 30, 20, 50)  # left, top, right, bottom
CELL_NAME = re.compile(r"step-(\d+)_p(\d+)_s0\.png")  # validate.py's name of a pair's first sample
RAW, SMOOTH, AXIS = (170, 190, 230), (20, 60, 170), (60, 60, 60)


def read_losses(log: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the finite records in a train_log.jsonl; unreadable lines are skipped."""
    steps, losses = [], []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            rec = json.loads(line)
            step, loss = int(rec["step"]), float(rec["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(loss):
            steps.append(step)
            losses.append(loss)
    return steps, losses


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); weight by default from the length."""
    weight = min(0.95, max(0.6, 1 - 10 / max(len(values), 1))) if weight is None else weight
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _scale(lo: float, hi: float, a: float, b: float):
    """Map [lo, hi] linearly onto [a, b] (a flat range maps to the middle)."""
    span = hi - lo
    return (lambda v: (a + b) / 2) if span == 0 else (lambda v: a + (v - lo) / span * (b - a))


def draw_loss(steps: list[int], losses: list[float], path: Path, log_steps: bool = False) -> Path:
    """Draw raw and smoothed loss against the step (log-scaled step axis optional) into a PNG."""
    im = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(im)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    d.rectangle((left, top, right, bottom), outline=AXIS)
    if steps:
        xs = [math.log10(s) if log_steps else s for s in (max(s, 1) for s in steps)]
        fx = _scale(min(xs), max(xs), left, right)
        fy = _scale(min(losses), max(losses), bottom, top)
        for values, colour, width in ((losses, RAW, 1), (smooth(losses), SMOOTH, 2)):
            points = [(fx(x), fy(v)) for x, v in zip(xs, values, strict=True)]
            d.line(points, fill=colour, width=width) if len(points) > 1 else d.point(points, fill=colour)
        d.text((4, top), f"{max(losses):.4g}", fill=AXIS)
        d.text((4, bottom - 10), f"{min(losses):.4g}", fill=AXIS)
        d.text((left, bottom + 8), str(steps[0]), fill=AXIS)
        d.text((right - 50, bottom + 8), str(steps[-1]), fill=AXIS)
    axis = "step (log)" if log_steps else "step"
    d.text((left, 8), f"loss (light: raw, dark: smoothed) vs {axis}; last {losses[-1]:.4g}" if losses
           else "loss: no records yet", fill=AXIS)
    save_png(im, path)
    return path


def save_png(im: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary sibling and a rename: a kill while it is written (SIGKILL, the OOM killer)
    leaves the previous file or none, never a truncated one, which the next progress sheet would have to open."""
    write_atomic(Path(path), lambda tmp: im.save(tmp, format="PNG"))


def write_loss_png(output: Path) -> Path:
    """OUTPUT/loss.png from OUTPUT/train_log.jsonl."""
    output = Path(output)
    steps, losses = read_losses(output / "train_log.jsonl")
    return draw_loss(steps, losses, output / "loss.png", log_steps=len(steps) > 1 and steps[-1] / max(steps[0], 1) > 100)


def progress_cells(validation: Path) -> tuple[list[int], list[int], dict[tuple[int, int], Path]]:
    """(steps, pair indices, {(pair, step): first sample's PNG}) from validation/step-NNNNNN_pI_s0.png files."""
    cells = {}
    for path in validation.glob("step-*_p*_s0.png"):
        match = CELL_NAME.fullmatch(path.name)
        if match:
            cells[(int(match[2]), int(match[1]))] = path
    return sorted({s for _, s in cells}), sorted({p for p, _ in cells}), cells


def write_progress_png(output: Path, cell: int = 128) -> Path | None:
    """OUTPUT/progress.png: a contact sheet of validation images, a row per prompt/map pair, a column per step."""
    output = Path(output)
    steps, pairs, cells = progress_cells(output / "validation")
    if not cells:
        return None
    label = 16
    sheet = Image.new("RGB", (len(steps) * cell, label + len(pairs) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for col, step in enumerate(steps):
        draw.text((col * cell + 3, 2), f"step {step}", fill=AXIS)
        for row, pair in enumerate(pairs):
            if (pair, step) in cells:
                paste_cell(sheet, cells[(pair, step)], cell, (col * cell, label + row * cell))
    save_png(sheet, output / "progress.png")
    return output / "progress.png"


def paste_cell(sheet: Image.Image, path: Path, cell: int, at: tuple[int, int]) -> None:
    """One validation image into the sheet; one that cannot be read (cut short by a kill before these were written
    atomically, or removed meanwhile) leaves its cell blank rather than failing the run at its validation step."""
    try:
        with Image.open(path) as im:
            sheet.paste(im.convert("RGB").resize((cell, cell)), at)
    except (OSError, SyntaxError, ValueError):
        pass
