"""--model FILE.safetensors: an original-layout SD checkpoint loaded offline by diffusers' single-file loaders with
the configs shipped in trainer/configs; pickle checkpoints refused with how to convert."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.cli import main as train_main
from trainer.config import ModelConfig
from trainer.models import load_frozen
from trainer.single_file import CONFIGS, architecture, assemble_config
from trainer.tiny import build_tiny_model, write_tiny_single_file

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny diffusers folder and the same weights written as one SD-1.x-layout .safetensors."""
    root = tmp_path_factory.mktemp("sf")
    folder = build_tiny_model(root / "model")
    return folder, write_tiny_single_file(folder, root / "tiny-sd.safetensors")


def test_single_file_loads_every_weight(tiny, monkeypatch):
    """load_frozen on the file (offline) gives the folder's UNet, VAE and text encoder weight for weight."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, path = tiny
    from_file = load_frozen(ModelConfig(model=str(path)))
    from_folder = load_frozen(ModelConfig(model=str(folder)))
    for a, b in zip(from_file[:3], from_folder[:3], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert from_file[3]("a photo").input_ids == from_folder[3]("a photo").input_ids
    assert from_file[4].config.num_train_timesteps == from_folder[4].config.num_train_timesteps


def test_generate_with_a_single_file_base(tiny, tmp_path):
    """`generate --model FILE.safetensors` runs the pipeline from the file."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from PIL import Image

    from trainer.generate import main as generate_main

    folder, path = tiny
    ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(folder / "unet"),
                              conditioning_embedding_out_channels=(16, 32, 96)).save_pretrained(tmp_path / "cn")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "in.png")
    assert generate_main(["--controlnet", str(tmp_path / "cn"), "--model", str(path), "--image",
                          str(tmp_path / "in.png"), "--prompt", "red", "--output", str(tmp_path / "g"),
                          "--steps", "1", "--device", "cpu", "--resolution", "64"]) == 0
    assert (tmp_path / "g" / "p0_s0.png").is_file()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_checkpoints_are_refused_with_how_to_convert(tmp_path, suffix, capsys):
    """Training and generation both refuse pickle files, naming safetensors and the command to convert."""
    model = tmp_path / f"v1-5-pruned{suffix}"
    model.write_bytes(b"not read")
    assert train_main(["--shards", "s/{0..1}.tar", "--model", str(model), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "pickle" in err and "safetensors" in err and "weights_only=True" in err
    from trainer.generate import main as generate_main

    (tmp_path / "in.png").write_bytes(b"x")
    assert generate_main(["--controlnet", str(tmp_path), "--model", str(model), "--image", str(tmp_path / "in.png"),
                          "--prompt", "a", "--output", str(tmp_path / "g")]) == 2


def test_shipped_configs_for_real_checkpoints(tmp_path):
    """SD 1.x and 2.x configs assemble into folders diffusers reads; the CLIP tokenizer is CLIP's (ids of
    'a photo of' are 320 1125 539), padded as each model expects."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    for name, width, pad in (("sd15", 768, "<|endoftext|>"), ("sd2", 1024, "!")):
        folder = assemble_config(name, pad, tmp_path / name)
        assert StableDiffusionPipeline.load_config(folder)["unet"] == ["diffusers", "UNet2DConditionModel"]
        assert UNet2DConditionModel.load_config(folder, subfolder="unet")["cross_attention_dim"] == width
        assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.18215
        assert CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder").hidden_size == width
        tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        assert tok("a photo of").input_ids == [49406, 320, 1125, 539, 49407] and tok.pad_token == pad
    assert json.loads((CONFIGS / "sd2/scheduler/scheduler_config.json").read_text())["prediction_type"] \
        == "v_prediction"


def test_architecture_is_read_from_the_keys(tiny, tmp_path):
    """The tiny file is recognised by its cross-attention width; a file that is no SD checkpoint is refused."""
    from safetensors.torch import save_file

    assert architecture(str(tiny[1]))[0] == "tiny"
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="original layout"):
        architecture(str(tmp_path / "other.safetensors"))


def test_train_from_a_single_file(tiny, tmp_path):
    """`python -m trainer --model FILE.safetensors` trains and exports a ControlNet."""
    from trainer.synthetic import write_shards

    write_shards(tmp_path / "shards", n_shards=1, per_shard=4, size=48, cond_mode="RGB")
    code = train_main(["--shards", str(tmp_path / "shards" / "{00000..00000}.tar"), "--model", str(tiny[1]),
                       "--output", str(tmp_path / "out"), "--device", "cpu", "--mixed-precision", "no",
                       "--resolution", "32", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
                       "--optimizer", "adamw", "--max-train-steps", "2", "--dataloader-num-workers", "0",
                       "--export-format", "original", "--no-progress"])
    assert code == 0
    # the run's one-file export in lllyasviel's layout loads back through diffusers' converter, weight for weight
    from diffusers import ControlNetModel

    from trainer.export import load_single_file_controlnet

    single = load_single_file_controlnet(tmp_path / "out" / "controlnet-fp16.safetensors").state_dict()
    folder = ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet").state_dict()
    assert single.keys() == folder.keys() and all(torch.equal(single[k], folder[k].half().float()) for k in folder)
    assert (tmp_path / "out" / "controlnet" / "config.json").is_file()
    from PIL import Image

    with Image.open(tmp_path / "out" / "loss.png") as im:  # drawn with the checkpoint
        assert im.size == (800, 400)
