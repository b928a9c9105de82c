"""Validation images written to disk: the current ControlNet in diffusers' own pipeline.

For each (prompt, conditioning image) pair: `num_validation_images` samples with the prompt, and one
in guess mode (empty prompt), saved as PNGs named by step, plus one grid per step:

    validation/step-000500_p0_s0.png, ..._p0_guess.png, step-000500_grid.png

Each row of the grid is one pair: conditioning map, samples, guess-mode sample.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler
from PIL import Image

from engine.imagepolicy import open_image
from trainer.config import ValidationConfig
from trainer.models import Models, autocast
from trainer.plots import save_png


def build_pipeline(models: Models) -> StableDiffusionControlNetPipeline:
    """A ControlNet pipeline around the training models (no safety checker, no progress bar)."""
    pipe = StableDiffusionControlNetPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        controlnet=models.controlnet, scheduler=UniPCMultistepScheduler.from_config(models.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def mid_only(controlnet):
    """Zero the down-block residuals at inference, as training with --only-mid-control does."""
    original = controlnet.forward

    def forward(*args, **kwargs):
        down, mid = original(*args, **{**kwargs, "return_dict": False})
        return [torch.zeros_like(d) for d in down], mid

    controlnet.forward = forward
    try:
        yield
    finally:
        del controlnet.forward


def load_condition(path: str, size: int) -> Image.Image:
    """A conditioning image as RGB, resized (nearest: palette values stay exact) to size x size."""
    with open_image(Path(path).read_bytes()) as im:  # the decoding policy: allowed formats, pixel limit
        return im.convert("RGB").resize((size, size), Image.NEAREST)


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste equally sized images into a grid, one list per row."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * h))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img.resize((w, h)), (j * w, i * h))
    return grid


@torch.no_grad()
def embed_prompt(models: Models, prompt: str, device: torch.device) -> torch.Tensor:
    """A prompt's text embedding, computed wherever the text encoder lives (the CPU for precomputed runs)."""
    enc = models.text_encoder
    ids = models.tokenizer([prompt], max_length=models.tokenizer.model_max_length, padding="max_length",
                           truncation=True, return_tensors="pt").input_ids.to(enc.device)
    return enc(ids, return_dict=False)[0].to(device)


@torch.no_grad()
def run_validation(models: Models, cfg: ValidationConfig, step: int, out_dir: Path, resolution: int,
                   device: torch.device, weight_dtype: torch.dtype, seed: int,
                   only_mid_control: bool = False) -> dict:
    """Generate and save the validation images of one step; return paths and a black-image check."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(models)
    was_training = models.controlnet.training
    models.controlnet.eval()
    rows, paths, means = [], [], []
    masked = mid_only(models.controlnet) if only_mid_control else contextlib.nullcontext()
    try:
        with autocast(device, weight_dtype), masked:
            for i, (prompt, image_path) in enumerate(cfg.pairs()):
                cond = load_condition(image_path, resolution)
                row = [cond]
                gen = torch.Generator(device=device).manual_seed(seed)
                text, empty = embed_prompt(models, prompt, device), embed_prompt(models, "", device)
                images = pipe(prompt_embeds=text, negative_prompt_embeds=empty, image=cond,
                              num_inference_steps=cfg.num_inference_steps, generator=gen,
                              height=resolution, width=resolution,
                              num_images_per_prompt=cfg.num_validation_images).images
                named = [(f"p{i}_s{k}", im) for k, im in enumerate(images)]
                if cfg.guess_mode:
                    gen = torch.Generator(device=device).manual_seed(seed)
                    guess = pipe(prompt_embeds=empty, negative_prompt_embeds=empty, image=cond,
                                 num_inference_steps=cfg.num_inference_steps, generator=gen,
                                 height=resolution, width=resolution, guess_mode=True, guidance_scale=3.0).images
                    named.append((f"p{i}_guess", guess[0]))
                for name, im in named:
                    path = out_dir / f"step-{step:06d}_{name}.png"
                    save_png(im, path)
                    paths.append(path)
                    means.append(float(np.asarray(im).mean()))
                    row.append(im)
                rows.append(row)
    finally:
        models.controlnet.train(was_training)
    grid = out_dir / f"step-{step:06d}_grid.png"
    save_png(make_grid(rows), grid)
    return {"images": paths, "grid": grid, "all_black": bool(means) and max(means) < 1.0}
