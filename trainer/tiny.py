"""A tiny Stable-Diffusion-shaped model with random weights, built offline from small configs.

Used by the tests and the demo: the same component classes and folder layout as SD 1.5
(unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json), a few hundred thousand
parameters, so a CPU trains it in seconds. The tokenizer is a byte-level CLIP BPE whose vocabulary
and merges this module writes itself (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.quiet import loading

# Three VAE levels: latents are a quarter of the image size (SD's VAE: an eighth), so 64 px -> 16.
TINY_VAE_CHANNELS = (16, 32, 32)
# The random encoder's posterior means have a std of about 0.145 on photos: scale latents to unit variance.
TINY_VAE_SCALING = 7.0
TINY_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o n", "i n", "e r", "a r", "o f</w>"]


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table (the BPE's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt of a byte-level CLIP BPE with a handful of merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over the tiny vocabulary, saved into `folder` (slow and fast files both)."""
    from transformers import CLIPTokenizer

    vocab, merges = write_tiny_tokenizer_files(folder)
    # transformers 5 names the arguments vocab/merges, 4.x vocab_file/merges_file
    names = CLIPTokenizer.__init__.__code__.co_varnames
    keys = ("vocab_file", "merges_file") if "vocab_file" in names else ("vocab", "merges")
    tok = CLIPTokenizer(**{keys[0]: str(vocab), keys[1]: str(merges)}, model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok


def tiny_unet_config() -> dict:
    """UNet2DConditionModel config: two resolution levels, one cross-attention level, 32-d text."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )


@loading()
def build_tiny_model(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny SD-style diffusers folder with random weights to `folder`; return its path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=TINY_VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=TINY_VAE_SCALING,
    )
    with torch.no_grad():  # act like a trained VAE: a nearly deterministic posterior (std ~ 0.007)
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-10.0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, clip_sample=False)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return folder


def _unet_up_key(parts: list[str], layers_per_block: int, with_attention: bool) -> str:
    """ldm name of an up_blocks.* parameter (output_blocks.N.{0 resnet, 1 attention, 1|2 upsample})."""
    from trainer.export import _resnet

    block, kind = int(parts[1]), parts[2]
    first = block * (layers_per_block + 1)
    if kind == "upsamplers":
        return f"output_blocks.{first + layers_per_block}.{2 if with_attention else 1}.{'.'.join(parts[4:])}"
    index = first + int(parts[3])
    rest = ".".join(parts[4:])
    return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"


def ldm_unet_key(key: str, unet_config) -> str:
    """The original (ldm) name of a diffusers UNet2DConditionModel parameter."""
    from trainer.export import _FIXED, _block_key

    fixed = {**_FIXED, "conv_norm_out": "out.0", "conv_out": "out.2"}
    stem, _, leaf = key.rpartition(".")
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "up_blocks":
        attention = "CrossAttn" in unet_config.up_block_types[int(parts[1])]
        return _unet_up_key(parts, unet_config.layers_per_block, attention)
    return _block_key(parts, unet_config.layers_per_block)


VAE_NAMES = (("down_blocks", "down"), ("up_blocks", "up"), ("resnets", "block"), ("downsamplers.0", "downsample"),
             ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"),
             ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def ldm_vae_key(key: str, levels: int) -> str:
    """The original (ldm) name of a diffusers AutoencoderKL parameter (decoder levels counted from the bottom)."""
    for mid, ldm in (("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                     ("mid_block.attentions.0", "mid.attn_1")):
        key = key.replace(mid, ldm)
    if key.startswith("decoder.up_blocks."):
        parts = key.split(".")
        parts[2] = str(levels - 1 - int(parts[2]))
        key = ".".join(parts)
    for diffusers, ldm in VAE_NAMES:
        key = key.replace(diffusers, ldm)
    return key


def write_tiny_single_file(folder: str | Path, path: str | Path) -> Path:
    """The tiny diffusers model at `folder` as one SD-1.x-layout .safetensors (UNet, VAE, CLIP text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = {"model.diffusion_model." + ldm_unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    state.update({"first_stage_model." + ldm_vae_key(k, levels): v for k, v in vae.state_dict().items()})
    # SD files name CLIP's weights text_model.*; transformers >= 5.6 dropped that wrapper from CLIPTextModel
    state.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
