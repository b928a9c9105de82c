"""`python -m trainer generate`: pictures from a trained ControlNet, its base model and your own image.

    python -m trainer generate --controlnet controlnet-out --model runwayml/stable-diffusion-v1-5 \\
        --image photo.jpg --prompt "a house at dusk" --output generated

The conditioning map is made from --image by the same conditioner the training shards were made with
(engine/condition.py; its name and palette are read from the run's train_config.json -> the shards'
stats.json, else from --conditioner/--palette), or --image is used as the map itself (--image-is-map).
Both are resized so that the shorter side is --resolution and each side a multiple of 64. Writes
map.png, one PNG per prompt and sample (p0_s0.png, ...) and grid.png (a row per prompt: the map,
then its samples). Images that come out NaN or black (fp16 overflow, usually in the VAE) are reported
with what to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from engine import options
from engine.options import check_choices, opt

DTYPE_NAMES = ("fp32", "fp16", "bf16")


@dataclass
class GenerateConfig:
    """One `generate` run."""

    controlnet: str
    """A trained ControlNet: the training output folder, its controlnet/ folder, a checkpoint, or one .safetensors."""
    model: str
    """Base model: diffusers folder, hub id, or one SD 1.x/2.x .safetensors file."""
    image: str
    """Your photo (made into a conditioning map) or, with --image-is-map, the map itself."""
    prompts: list[str] = field(metadata=opt("--prompt", metavar="TEXT"))
    """Prompts (repeat the flag for several); each gets --num-images samples."""
    output: str
    """Folder for map.png, the samples and grid.png."""
    image_is_map: bool = False
    """Use --image as the conditioning map as it is (no conditioner)."""
    steps: int = field(default=20, metadata=opt(metavar="N"))
    """Denoising steps (UniPC)."""
    guidance_scale: float = field(default=7.5, metadata=opt(metavar="G"))
    """Classifier-free guidance scale."""
    controlnet_scale: float = field(default=1.0, metadata=opt(metavar="S"))
    """Weight of the ControlNet's residuals (diffusers' controlnet_conditioning_scale)."""
    seed: int = 0
    """Seed of the first sample; the rest follow from the same generator."""
    num_images: int = 1
    """Samples per prompt."""
    guess_mode: bool = False
    """ControlNet guess mode: the map alone steers (use with an empty prompt and a guidance scale of 3-5)."""
    device: str | None = field(default=None, metadata=opt(choices=("cpu", "cuda")))
    """cuda or cpu; default: cuda when available."""
    dtype: str | None = field(default=None, metadata=opt(choices=DTYPE_NAMES))
    """fp32, fp16 or bf16; default: fp16 on CUDA, fp32 on the CPU."""
    resolution: int | None = field(default=None, metadata=opt(metavar="PX"))
    """Shorter side of the map in pixels (rounded to a multiple of 64); default: the run's --resolution, else 512."""
    conditioner: str | None = None
    """Conditioner name; default: the one the run's shards were made with, else palette."""
    palette: str | None = None
    """Palette of the palette conditioner; default: the shards', else the engine's default."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("give at least one --prompt (an empty one, --prompt '', with --guess-mode)")
        if self.steps < 1 or self.num_images < 1:
            raise ValueError("--steps and --num-images must be at least 1")
        if not Path(self.image).is_file():
            raise ValueError(f"--image {self.image}: no such file")
        check_choices(self)
        if self.dtype == "fp16" and self.device == "cpu":
            raise ValueError("--dtype fp16 needs CUDA: use --dtype fp32 (or bf16) with --device cpu")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m trainer generate`: a flag per field of GenerateConfig."""
    p = argparse.ArgumentParser(prog="python -m trainer generate", description=__doc__.splitlines()[0],
                                formatter_class=options.HelpFormatter)
    options.add_options(p, GenerateConfig)
    return p


# --- what the run says: conditioner, palette, resolution, only-mid-control ---------------------------------


def run_config(controlnet: Path) -> dict:
    """The train_config.json of the run that made `controlnet` (found beside or above it), or {}."""
    start = controlnet if controlnet.is_dir() else controlnet.parent
    for folder in (start, *list(start.parents)[:2]):
        path = folder / "train_config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return {}
    return {}


def shard_settings(run: dict) -> dict:
    """The engine's image settings (conditioner, palette) from the stats.json beside the run's shards."""
    from trainer.data import expand_shards

    pattern = run.get("data", {}).get("shards", "")
    try:
        first = Path(expand_shards(pattern)[0]) if pattern else None
    except ValueError:
        return {}
    stats = first.parent / "stats.json" if first is not None else None
    if stats is None or not stats.is_file():
        return {}
    try:
        return json.loads(stats.read_text()).get("config", {}).get("image", {})
    except (OSError, ValueError):
        return {}


def resolve_map_settings(cfg: GenerateConfig, run: dict) -> tuple[str, str, int]:
    """Conditioner, palette and resolution: flags first, then the run's shards and config, then defaults."""
    from engine.palette import DEFAULT_PALETTE

    image = shard_settings(run)
    conditioner = cfg.conditioner or image.get("conditioner") or "palette"
    palette = cfg.palette or image.get("palette") or DEFAULT_PALETTE
    resolution = cfg.resolution or run.get("data", {}).get("resolution") or 512
    return conditioner, palette, int(resolution)


# --- the conditioning map -----------------------------------------------------------------------------------


def fit_to_64(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(w, h) scaled so the shorter side is `resolution`, each side rounded to a multiple of 64 (>= 64)."""
    w, h = size
    scale = resolution / min(w, h)
    return tuple(max(64, int(round(side * scale / 64)) * 64) for side in (w, h))


def make_map(path: str, image_is_map: bool, conditioner: str, palette: str, resolution: int) -> Image.Image:
    """The conditioning map: --image resized (nearest for a map: palette values stay exact) or conditioned."""
    from engine.condition import make_conditioner
    from engine.decode import to_rgb

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im) or im
        rgb = Image.fromarray(to_rgb(im))
    size = fit_to_64(rgb.size, resolution)
    if image_is_map:
        return rgb.resize(size, Image.NEAREST)
    photo = np.ascontiguousarray(np.asarray(rgb.resize(size, Image.LANCZOS)))
    return Image.fromarray(make_conditioner(conditioner, palette)(photo))


# --- the models ---------------------------------------------------------------------------------------------


def controlnet_location(path: str) -> Path:
    """The diffusers ControlNet folder or single file that `path` names (a run folder holds controlnet/)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p, p / "controlnet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"--controlnet {path}: not a ControlNet folder (config.json), a training output folder "
                     "(controlnet/) or a .safetensors file")


def load_controlnet(path: Path, dtype):
    """ControlNetModel from a diffusers folder or one .safetensors file (trainer.export's layout)."""
    from diffusers import ControlNetModel

    if path.is_file():
        from trainer.export import load_single_file_controlnet

        return load_single_file_controlnet(path, dtype=dtype)
    return ControlNetModel.from_pretrained(path, dtype=dtype, use_safetensors=True)  # never unpickle .bin


def load_pipeline(model: str, controlnet, dtype):
    """StableDiffusionControlNetPipeline of the base model (folder, hub id or one file) with UniPC."""
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    from trainer.models import load_base_pipeline

    pipe = load_base_pipeline(StableDiffusionControlNetPipeline, model, controlnet=controlnet, dtype=dtype)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_device_dtype(cfg: GenerateConfig):
    """torch device, dtype and the dtype's name: CUDA in fp16 when available, else the CPU in fp32."""
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible: pass --device cpu")
    name = cfg.dtype or ("fp16" if device == "cuda" else "fp32")
    return torch.device(device), {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name], name


# --- generation and the checks on its output ----------------------------------------------------------------


def bad_output(images: np.ndarray) -> str | None:
    """'NaN' when any value is not finite, 'black' when every image is (nearly) black, else None."""
    if not np.isfinite(images).all():
        return "NaN"
    if float(images.reshape(len(images), -1).mean(axis=1).max()) < 1.0 / 255:
        return "black"
    return None


def advice(problem: str, dtype_name: str) -> str:
    """What to change when the output came out NaN or black."""
    if dtype_name == "fp16":
        return (f"the images came out {problem} in fp16 (an overflow, usually in the VAE): use --dtype fp32 "
                "(or bf16), or a base model whose VAE is fixed for fp16 (e.g. madebyollin/sdxl-vae-fp16-fix "
                "for SDXL; SD 1.5's VAE is normally fine)")
    return (f"the images came out {problem} in {dtype_name}: check that --controlnet was trained on this --model, "
            "try --controlnet-scale 0.5 and more --steps")


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """float images in [0, 1] (NaN as 0) -> 8-bit PIL images."""
    arr = np.clip(np.nan_to_num(images, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def sample(pipe, cfg: GenerateConfig, cond: Image.Image, prompt: str, device, mid_only: bool) -> np.ndarray:
    """`num_images` samples for one prompt, as floats in [0, 1] (so NaN is still visible)."""
    import contextlib

    import torch

    from trainer.validate import mid_only as mid_only_ctx

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad(), (mid_only_ctx(pipe.controlnet) if mid_only else contextlib.nullcontext()):
        return pipe(prompt, cond, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                    controlnet_conditioning_scale=cfg.controlnet_scale, guess_mode=cfg.guess_mode,
                    num_images_per_prompt=cfg.num_images, generator=gen, height=cond.height, width=cond.width,
                    output_type="np").images


def generate(cfg: GenerateConfig) -> dict:
    """Make the map, load the models, sample every prompt; write PNGs and the grid; return paths and checks."""
    from trainer.validate import make_grid

    location = controlnet_location(cfg.controlnet)
    run = run_config(location)
    conditioner, palette, resolution = resolve_map_settings(cfg, run)
    cond = make_map(cfg.image, cfg.image_is_map, conditioner, palette, resolution)
    device, dtype, dtype_name = resolve_device_dtype(cfg)
    pipe = load_pipeline(cfg.model, load_controlnet(location, dtype), dtype).to(device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    cond.save(out / "map.png")
    rows, paths, problems = [], [], []
    for i, prompt in enumerate(cfg.prompts):
        images = sample(pipe, cfg, cond, prompt, device, run.get("model", {}).get("only_mid_control", False))
        problems.append(bad_output(images))
        pils = to_pil(images)
        for k, im in enumerate(pils):
            paths.append(out / f"p{i}_s{k}.png")
            im.save(paths[-1])
        rows.append([cond, *pils])
    make_grid(rows).save(out / "grid.png")
    problem = next((p for p in problems if p), None)
    return {"images": paths, "grid": out / "grid.png", "map": out / "map.png", "conditioner": conditioner,
            "palette": palette, "size": cond.size, "problem": problem,
            "advice": advice(problem, dtype_name) if problem else None}


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the PNGs written, 1 when they came out NaN/black (advice printed), 2 on bad input."""
    a = build_parser().parse_args(argv)
    try:
        cfg = GenerateConfig(**vars(a))
        result = generate(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in result["images"]:
        print(path)
    print(f"grid: {result['grid']} (map: {result['map']}, {result['size'][0]}x{result['size'][1]}, "
          f"{'given map' if cfg.image_is_map else result['conditioner']})")
    if result["problem"]:
        print(f"warning: {result['advice']}", file=sys.stderr)
        return 1
    return 0
