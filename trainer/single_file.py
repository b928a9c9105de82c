"""`--model path/to/checkpoint.safetensors`: an SD 1.x/2.x base model in the original single-file layout.

Loaded offline by diffusers' own single-file loader (`from_single_file(..., config=FOLDER,
local_files_only=True)`), with FOLDER assembled from configs shipped in trainer/configs/: the
architecture is read from the file's cross-attention width (768: SD 1.x, 1024: SD 2.x at 768 px with
v-prediction, 32: trainer/tiny.py's tiny model). The CLIP tokenizer files (vocab.json, merges.txt) are
derived from OpenAI CLIP's BPE table (MIT licence) exactly as CLIP's own tokenizer builds them.
Pickle checkpoints (.ckpt, .pt, .pth, .bin) are refused: loading one runs code from the file.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).with_name("configs")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
# cross-attention width -> shipped config folder (and the tokenizer's pad token)
ARCHITECTURES = {768: ("sd15", "<|endoftext|>"), 1024: ("sd2", "!"), 32: ("tiny", None)}


def convert_advice(path: str) -> str:
    """How to turn a pickle checkpoint into a .safetensors one."""
    out = str(Path(path).with_suffix(".safetensors"))
    return (f"{path} is a pickle checkpoint, which can run code when loaded: convert it once with\n"
            "  python -c \"import torch, safetensors.torch as st; sd = torch.load('" + path + "', "
            "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
            "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, '"
            + out + "')\"\nthen pass --model " + out)


def is_single_file(model: str) -> bool:
    """True for a .safetensors file; a clear error for pickle files and missing files."""
    suffix = Path(model).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(convert_advice(model))
    if suffix != ".safetensors":
        return False
    if not Path(model).is_file():
        raise ValueError(f"--model {model}: no such file")
    return True


def architecture(path: str) -> tuple[str, str | None]:
    """(shipped config name, tokenizer pad token) for a single-file SD checkpoint, from its keys."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
        if not keys:
            raise ValueError(f"--model {path}: not an SD 1.x/2.x checkpoint in the original layout "
                             f"(no {UNET_PREFIX}*attn2.to_k.weight); use a diffusers folder")
        width = f.get_slice(keys[0]).get_shape()[1]
    if width not in ARCHITECTURES:
        raise ValueError(f"--model {path}: cross-attention width {width} is neither SD 1.x (768) nor SD 2.x "
                         "(1024); convert it to a diffusers folder and pass that")
    return ARCHITECTURES[width]


def assemble_config(name: str, pad_token: str | None, dest: Path) -> Path:
    """A diffusers config folder (no weights needed) for the architecture `name`, written to `dest`."""
    if name == "tiny":
        from trainer.tiny import build_tiny_model

        return build_tiny_model(dest)
    from transformers import CLIPTokenizer

    shutil.copytree(CONFIGS / name, dest, dirs_exist_ok=True)
    bpe = CONFIGS / "clip-bpe"
    names = CLIPTokenizer.__init__.__code__.co_varnames  # transformers 5: vocab/merges, 4.x: *_file
    keys = ("vocab_file", "merges_file") if "vocab_file" in names else ("vocab", "merges")
    tok = CLIPTokenizer(**{keys[0]: str(bpe / "vocab.json"), keys[1]: str(bpe / "merges.txt")},
                        pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(str(dest / "tokenizer"))
    return dest


@contextlib.contextmanager
def config_for(path: str):
    """A temporary diffusers config folder that matches the checkpoint at `path`."""
    name, pad = architecture(path)
    with tempfile.TemporaryDirectory(prefix="sd-config-") as tmp:
        yield assemble_config(name, pad, Path(tmp) / name)


def load_pipeline(pipeline_class, path: str, **kwargs):
    """`pipeline_class.from_single_file` on the checkpoint, offline, with the shipped config."""
    if architecture(path)[0] == "sd2":
        print(f"{path}: SD 2.x, loaded as the 768 px v-prediction model (2.0/2.1); for SD 2.x-base (512 px, "
              "epsilon) pass a diffusers folder", flush=True)
    with config_for(path) as config:
        return pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True, **kwargs)
