"""Load the frozen Stable Diffusion parts, create the trainable ControlNet, and set precisions.

Frozen parts live in the low-precision dtype (they only run forward); everything that trains keeps
fp32 master weights and is run under autocast. Attention goes through PyTorch's
scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.config import ModelConfig
from trainer.quiet import loading

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_COND_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet default, for a VAE that downsamples 8x


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on the device (training step and validation alike); none for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Models:
    """Everything a training step or a validation pipeline needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    controlnet: ControlNetModel
    memory_format: torch.memory_format = torch.contiguous_format
    """The ControlNet's and UNet's (and so their inputs') memory format: channels_last with --channels-last."""
    denoiser: torch.nn.Module | None = None
    """ControlNet and UNet as one compiled module (trainer.objective.Denoiser, --cuda-graphs); None: called apart."""


class UnsafeWeightsError(OSError):
    """A model folder without .safetensors weights: pickled .bin/.ckpt files are never loaded (they can run code)."""


def load_weights(cls, source: str, flag: str, **kw):
    """`cls.from_pretrained(source, use_safetensors=True, ...)`, with an error that names the flag."""
    try:
        return cls.from_pretrained(source, use_safetensors=True, **kw)
    except OSError as exc:
        where = f"{source}/{kw['subfolder']}" if kw.get("subfolder") else source
        raise UnsafeWeightsError(
            f"{flag} {source}: no .safetensors weights could be loaded from {where} (pickled .bin weights are "
            f"never loaded: unpickling can run code). Use a folder or hub revision with .safetensors files, "
            f"or convert it once with save_pretrained(..., safe_serialization=True). Cause: {exc}"[:900]) from None


@loading()
def load_frozen(cfg: ModelConfig) -> tuple:
    """UNet, VAE, text encoder, tokenizer and noise scheduler from a diffusers folder, hub id or one file."""
    from trainer.single_file import is_single_file

    if is_single_file(cfg.model):
        return load_frozen_single_file(cfg.model)
    kw = dict(revision=cfg.revision)
    wkw = dict(kw, variant=cfg.variant)
    tokenizer = CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer", **kw)
    text_encoder = load_weights(CLIPTextModel, cfg.model, "--model", subfolder="text_encoder", **wkw)
    vae = load_weights(AutoencoderKL, cfg.model, "--model", subfolder="vae", **wkw)
    unet = load_weights(UNet2DConditionModel, cfg.model, "--model", subfolder="unet", **wkw)
    scheduler = DDPMScheduler.from_pretrained(cfg.model, subfolder="scheduler", **kw)
    return unet, vae, text_encoder, tokenizer, scheduler


def cond_channels_for(vae: AutoencoderKL) -> tuple[int, ...]:
    """Conditioning-embedding widths whose downsampling (2^(n-1)) matches the VAE's."""
    levels = int(math.log2(2 ** (len(vae.config.block_out_channels) - 1)))
    return DEFAULT_COND_CHANNELS[: levels + 1] if levels < 3 else DEFAULT_COND_CHANNELS


def build_controlnet(cfg: ModelConfig, unet: UNet2DConditionModel, vae: AutoencoderKL) -> ControlNetModel:
    """Load an existing ControlNet, or copy the UNet's encoder into a new one (zero convolutions)."""
    if cfg.controlnet:
        return load_weights(ControlNetModel, cfg.controlnet, "--controlnet", revision=cfg.revision)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels_for(vae))


def decoder_modules(unet: UNet2DConditionModel) -> list[torch.nn.Module]:
    """The UNet's decoder half: what the original ControlNet trains when sd_locked=False."""
    return [unet.up_blocks, unet.conv_norm_out, unet.conv_out]


def drop_encoders(models: Models) -> None:
    """For precomputed shards: free the VAE encoder; the text encoder stays on the CPU in fp32.

    Validation still needs the VAE decoder on the device and encodes its few prompts on the CPU.
    """
    models.vae.encoder = None
    models.vae.quant_conv = None
    models.text_encoder.to("cpu", dtype=torch.float32)


def prepare(models: Models, cfg: ModelConfig, device: torch.device, weight_dtype: torch.dtype,
            precomputed: bool = False) -> None:
    """Freeze, cast and place the models; switch on SDPA attention and gradient checkpointing."""
    if precomputed:
        drop_encoders(models)
    for m in (models.unet, models.vae, models.text_encoder):
        m.requires_grad_(False)
        if not (precomputed and m is models.text_encoder):
            place(m, device, weight_dtype)
        m.eval()
    place(models.controlnet, device, weight_dtype if cfg.low_memory else torch.float32)  # low: bf16, no fp32 copy
    models.controlnet.train()
    models.controlnet.requires_grad_(True)
    if cfg.unlock_decoder:
        for m in decoder_modules(models.unet):
            m.to(dtype=torch.float32)
            m.requires_grad_(True)
            m.train()
    for m in (models.unet, models.vae, models.controlnet):
        m.set_attn_processor(AttnProcessor2_0())
    if cfg.channels_last:  # NHWC: the layout Tensor Core convolutions run in, no transposes around each conv
        models.memory_format = torch.channels_last
        for m in (models.unet, models.controlnet):
            m.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        models.controlnet.enable_gradient_checkpointing()
        if cfg.gradient_checkpointing_unet:
            # the frozen UNet keeps activations too: gradients flow through it back to the residuals
            models.unet.enable_gradient_checkpointing()
        if cfg.checkpoint_levels is not None:
            keep_low_levels(models, cfg.checkpoint_levels)


def resolution_levels(models: Models) -> list[tuple[int, torch.nn.Module]]:
    """(level, block) pairs of the ControlNet and UNet; level 0 is the full latent resolution."""
    n = len(models.unet.down_blocks)
    pairs = [(i, b) for i, b in enumerate(models.controlnet.down_blocks)]
    pairs += [(n - 1 - j, b) for j, b in enumerate(models.unet.up_blocks)]
    pairs += [(n - 1, models.controlnet.mid_block), (n - 1, models.unet.mid_block)]
    return pairs


def keep_low_levels(models: Models, levels: int) -> None:
    """Keep checkpointing only in blocks at the `levels` highest resolutions (where activations are largest)."""
    for level, block in resolution_levels(models):
        if level >= levels:
            for m in block.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = False


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a model to `device` in `dtype`. diffusers' `.to(dtype)` warns on every cast ("should be kept in
    float32: []"), even of a model with no module to keep in float32; such a model is cast by torch's own
    Module.to, which is what diffusers' then calls. The UNet is loaded in fp32 and cast after (not loaded
    in `dtype`) so that the ControlNet copied from it starts from its fp32 weights, as in diffusers' script."""
    if model.dtype == dtype:
        model.to(device)
    elif getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "is_quantized", False):
        model.to(device, dtype=dtype)  # diffusers' own checks and notice apply
    else:
        torch.nn.Module.to(model, device, dtype=dtype)


def load_models(cfg: ModelConfig, device: torch.device, weight_dtype: torch.dtype,
                precomputed: bool = False) -> Models:
    """Load, build and prepare every model of a run (without the encoders on the device when precomputed)."""
    unet, vae, text_encoder, tokenizer, scheduler = load_frozen(cfg)
    controlnet = build_controlnet(cfg, unet, vae)
    models = Models(unet, vae, text_encoder, tokenizer, scheduler, controlnet)
    prepare(models, cfg, device, weight_dtype, precomputed)
    return models


def param_groups(models: Models, cfg: ModelConfig, lr: float, decoder_lr: float) -> list[dict]:
    """Optimizer parameter groups: the ControlNet, and the UNet decoder when unlocked."""
    groups = [{"params": [p for p in models.controlnet.parameters() if p.requires_grad], "lr": lr}]
    if cfg.unlock_decoder:
        params = [p for m in decoder_modules(models.unet) for p in m.parameters()]
        groups.append({"params": params, "lr": decoder_lr})
    return groups


def decoder_state(models: Models) -> dict[str, torch.Tensor]:
    """State dict of the unlocked UNet decoder (keys as in the full UNet)."""
    names = ("up_blocks.", "conv_norm_out.", "conv_out.")
    return {k: v for k, v in models.unet.state_dict().items() if k.startswith(names)}


@loading()
def load_base_pipeline(pipeline_class, model: str, **kwargs):
    """A diffusers pipeline of the base model (diffusers folder, hub id or one .safetensors), no safety checker."""
    from trainer import single_file

    kwargs.update(safety_checker=None, requires_safety_checker=False)
    if single_file.is_single_file(model):
        return single_file.load_pipeline(pipeline_class, model, **kwargs)
    return pipeline_class.from_pretrained(model, use_safetensors=True, **kwargs)  # never unpickle .bin


def load_frozen_single_file(path: str) -> tuple:
    """load_frozen's parts from an original-layout SD checkpoint (trainer/single_file.py)."""
    from diffusers import StableDiffusionPipeline

    pipe = load_base_pipeline(StableDiffusionPipeline, path)
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config)
