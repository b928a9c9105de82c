"""The finished ControlNet, in the forms its users load.

    DIR/controlnet/{config.json, diffusion_pytorch_model.safetensors}   diffusers (fp32)
    DIR/controlnet-fp16.safetensors     one file, fp16; keys in diffusers' layout, or with
                                        --export-format original in lllyasviel's `control_model.*`
                                        layout (the layout of control_v11p_sd15_*.pth). ComfyUI and the
                                        A1111 ControlNet extension read both. The diffusers config rides
                                        along in the file's metadata ("config").
    DIR/unet/                           the whole UNet, only when its decoder was trained

`load_single_file_controlnet(path)` loads the single file with diffusers' own
`ControlNetModel.from_single_file`, offline: it hands diffusers the config from the file's metadata
(diffusers would otherwise fetch lllyasviel/control_v11p_sd15_canny's config from the Hub, which fails
offline and is wrong for SD 2.x or any other shape; its `original_config=` route is broken in
diffusers 0.42: create_controlnet_diffusers_config_from_ldm omits an argument).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.atomic import write_atomic, write_dir_atomic
from trainer.models import Models

EXPORT_FORMATS = ("diffusers", "original")
ORIGINAL_PREFIX = "control_model."
# diffusers ResnetBlock2D names -> ldm ResBlock names
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "conv_in": "input_blocks.0.0", "controlnet_mid_block": "middle_block_out.0",
          "controlnet_cond_embedding.conv_in": "input_hint_block.0",
          "controlnet_cond_embedding.conv_out": "input_hint_block.14"}


def _resnet(rest: str) -> str:
    """A resnet's parameter name in the ldm layout (`norm1.weight` -> `in_layers.0.weight`)."""
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _block_key(parts: list[str], layers_per_block: int) -> str | None:
    """ldm name of a down_blocks.* or mid_block.* parameter (None when it is neither)."""
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # the block's last input_block: a lone Downsample
            return f"input_blocks.{(block + 1) * (layers_per_block + 1)}.0.op.{'.'.join(parts[5:])}"
        index = 1 + block * (layers_per_block + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    return None


def original_key(key: str, layers_per_block: int) -> str:
    """The lllyasviel/ldm name (without `control_model.`) of a diffusers ControlNetModel parameter."""
    stem, _, leaf = key.rpartition(".")
    if stem in _FIXED:
        return f"{_FIXED[stem]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{leaf}"
    if parts[:2] == ["controlnet_cond_embedding", "blocks"]:
        index = 2 * (int(parts[2]) + 1)
        if index >= 14:
            raise ValueError("a conditioning embedding of more than 6 blocks has no original (ldm) layout")
        return f"input_hint_block.{index}.{leaf}"
    mapped = _block_key(parts, layers_per_block)
    if mapped is None:
        raise ValueError(f"{key}: no original (ldm) name; use --export-format diffusers")
    return mapped


def to_original(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict in lllyasviel's `control_model.*` layout."""
    if not isinstance(layers_per_block, int):
        raise ValueError("per-block layers_per_block has no original (ldm) layout; use --export-format diffusers")
    return {ORIGINAL_PREFIX + original_key(k, layers_per_block): v for k, v in state.items()}


def save_single_file(controlnet, path: Path, export_format: str = "diffusers") -> Path:
    """One fp16 .safetensors of the ControlNet in the chosen layout, its diffusers config in the metadata."""
    half = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in controlnet.state_dict().items()}
    if export_format == "original":
        half = to_original(half, controlnet.config.layers_per_block)
    elif export_format != "diffusers":
        raise ValueError(f"--export-format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    config = json.dumps(dict(controlnet.config), default=list)
    save_file(half, str(path), metadata={"format": "pt", "layout": export_format, "config": config})
    return path


def export_final(models: Models, output: Path, unlock_decoder: bool = False, export_format: str = "diffusers") -> Path:
    """Write the final ControlNet (and UNet, when unlocked) under `output`; return the diffusers folder."""
    output = Path(output)
    folder = output / "controlnet"
    write_dir_atomic(folder, lambda tmp: models.controlnet.save_pretrained(tmp, safe_serialization=True))
    write_atomic(output / "controlnet-fp16.safetensors",
                 lambda tmp: save_single_file(models.controlnet, tmp, export_format))
    if unlock_decoder:
        write_dir_atomic(output / "unet", lambda tmp: models.unet.save_pretrained(tmp, safe_serialization=True))
    return folder


def embedded_config(path: Path) -> dict | None:
    """The diffusers config stored in a single file's metadata by save_single_file, if any."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("config")
    return json.loads(text) if text else None


def load_single_file_controlnet(path: str | Path, **kwargs):
    """ControlNetModel.from_single_file, offline, with the config from the file (or a controlnet/ beside it)."""
    from diffusers import ControlNetModel

    path = Path(path)
    config = embedded_config(path)
    if config is None:
        beside = path.parent / "controlnet"
        if not (beside / "config.json").is_file():
            raise ValueError(f"{path} carries no config and no controlnet/config.json lies beside it: pass the "
                             "diffusers folder instead")
        return ControlNetModel.from_single_file(str(path), config=str(beside), local_files_only=True, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        return ControlNetModel.from_single_file(str(path), config=tmp, local_files_only=True, **kwargs)
