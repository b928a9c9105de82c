"""The finished ControlNet, in the forms its users load.

    DIR/controlnet/{config.json, diffusion_pytorch_model.safetensors}   diffusers (fp32)
    DIR/controlnet-fp16.safetensors     one file, diffusers keys, fp16: ComfyUI and the A1111
                                        ControlNet extension detect and convert this layout
    DIR/unet/                           the whole UNet, only when its decoder was trained
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.models import Models


def export_final(models: Models, output: Path, unlock_decoder: bool = False) -> Path:
    """Write the final ControlNet (and UNet, when unlocked) under `output`; return the diffusers folder."""
    output = Path(output)
    folder = output / "controlnet"
    models.controlnet.save_pretrained(folder, safe_serialization=True)
    half = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in models.controlnet.state_dict().items()}
    save_file(half, str(output / "controlnet-fp16.safetensors"), metadata={"format": "pt"})
    if unlock_decoder:
        models.unet.save_pretrained(output / "unet", safe_serialization=True)
    return folder
