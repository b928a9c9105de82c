"""`python -m trainer generate` on the tiny model: PNGs Pillow opens, the grid, the map made by the shards'
conditioner (read from the run) or reused as-is; and the single-file exports loaded back by diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import photo, scaled
from trainer.generate import bad_output, fit_to_64, main
from trainer.tiny import build_tiny_model

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base model and a training output folder: controlnet/, train_config.json, shards' stats.json."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from trainer.models import cond_channels_for

    root = tmp_path_factory.mktemp("gen")
    model = build_tiny_model(root / "model")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels_for(vae))
    out = root / "run"
    controlnet.save_pretrained(out / "controlnet")
    (root / "shards").mkdir()
    (root / "shards" / "stats.json").write_text(json.dumps({"config": {"image": {"conditioner": "grayscale",
                                                                                  "palette": "black,white"}}}))
    (out / "train_config.json").write_text(json.dumps({"data": {"shards": str(root / "shards/{00000..00001}.tar"),
                                                                 "resolution": 64},
                                                        "model": {"only_mid_control": False}}))
    Image.fromarray(scaled(photo("astronaut"), 150, 100)).save(root / "photo.jpg")
    return {"root": root, "model": model, "out": out, "controlnet": controlnet}


def gen_args(run, output: Path, *extra: str) -> list[str]:
    """A generate command line on the tiny model (two prompts, two images each, two steps)."""
    return ["--controlnet", str(run["out"]), "--model", str(run["model"]), "--image", str(run["root"] / "photo.jpg"),
            "--prompt", "a photo", "--prompt", "an astronaut", "--output", str(output), "--steps", "2",
            "--num-images", "2", "--device", "cpu", "--seed", "3", *extra]


def test_generate_writes_pngs_grid_and_the_runs_map(run, tmp_path):
    """2 prompts x 2 images as PNGs, a grid of 2 rows x (map + 2), the map from the shards' conditioner."""
    assert main(gen_args(run, tmp_path / "g")) == 0
    names = sorted(p.name for p in (tmp_path / "g").glob("p*_s*.png"))
    assert names == ["p0_s0.png", "p0_s1.png", "p1_s0.png", "p1_s1.png"]
    for name in names:
        with Image.open(tmp_path / "g" / name) as im:
            im.load()
            assert im.size == (128, 64) and im.mode == "RGB"  # 150x100 -> shorter side 64, sides multiples of 64
    with Image.open(tmp_path / "g" / "grid.png") as grid:
        assert grid.size == (3 * 128, 2 * 64)
    cond = np.asarray(Image.open(tmp_path / "g" / "map.png"))
    # the shards were made with the grayscale conditioner (stats.json), not the default palette
    assert (cond[..., 0] == cond[..., 1]).all() and len(np.unique(cond)) > 3


def test_image_is_map_reuses_the_image(run, tmp_path):
    """With --image-is-map the given map is the conditioning image, only resized (nearest: values kept)."""
    rng = np.random.default_rng(0)
    given = rng.choice(np.array([[255, 0, 0], [0, 0, 255]], np.uint8), size=(64, 128))
    Image.fromarray(given).save(tmp_path / "map.png")
    args = gen_args(run, tmp_path / "g", "--image-is-map")
    args[args.index("--image") + 1] = str(tmp_path / "map.png")
    assert main(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g" / "map.png")), given)


def test_flags_override_the_run_and_bad_input_exits_2(run, tmp_path, capsys):
    """--conditioner/--palette beat the run's; a missing image or a wrong --controlnet exit 2 with a message."""
    assert main(gen_args(run, tmp_path / "g", "--conditioner", "palette", "--palette", "black,white",
                         "--num-images", "1")) == 0
    assert set(np.unique(np.asarray(Image.open(tmp_path / "g" / "map.png")))) <= {0, 255}
    bad = gen_args(run, tmp_path / "h")
    bad[bad.index("--image") + 1] = str(tmp_path / "nope.jpg")
    assert main(bad) == 2 and "--image" in capsys.readouterr().err
    bad = gen_args(run, tmp_path / "h")
    bad[bad.index("--controlnet") + 1] = str(tmp_path)
    assert main(bad) == 2 and "--controlnet" in capsys.readouterr().err


def test_nan_and_black_outputs_are_detected():
    """NaN anywhere, or every image black, is a problem; a dark but real image is not."""
    good = np.full((2, 8, 8, 3), 0.2, np.float32)
    assert bad_output(good) is None
    nan = good.copy()
    nan[1, 0, 0, 0] = np.nan
    assert bad_output(nan) == "NaN" and bad_output(np.zeros_like(good)) == "black"
    assert fit_to_64((512, 768), 512) == (512, 768) and fit_to_64((1000, 600), 512) == (832, 512)


@pytest.mark.parametrize("fmt", ["diffusers", "original"])
def test_single_file_export_loads_with_diffusers(run, tmp_path, fmt):
    """The one-file export, in either layout, loads through ControlNetModel.from_single_file offline (diffusers'
    own converter for lllyasviel's control_model.* keys) and matches the diffusers folder weight for weight."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    from trainer.export import load_single_file_controlnet, save_single_file

    path = save_single_file(run["controlnet"], tmp_path / "cn.safetensors", fmt)
    keys = load_file(str(path)).keys()
    assert all(k.startswith("control_model.") for k in keys) == (fmt == "original")
    if fmt == "original":  # the names of lllyasviel's control_v11p_sd15_*.pth
        assert {"control_model.time_embed.0.weight", "control_model.input_hint_block.14.weight",
                "control_model.middle_block_out.0.weight", "control_model.zero_convs.0.0.weight"} <= set(keys)
    back = load_single_file_controlnet(path)
    folder = ControlNetModel.from_pretrained(run["out"] / "controlnet").state_dict()
    loaded = back.state_dict()
    assert loaded.keys() == folder.keys()
    for k, v in folder.items():
        assert torch.equal(loaded[k], v.half().float()), k
    # plain diffusers, no helper: the config= argument with the folder written beside the file
    again = ControlNetModel.from_single_file(str(path), config=str(run["out"] / "controlnet"), local_files_only=True)
    assert all(torch.equal(again.state_dict()[k], loaded[k]) for k in loaded)


def test_generate_from_the_single_file(run, tmp_path):
    """--controlnet FILE.safetensors (original layout) generates like the folder does."""
    from trainer.export import save_single_file

    path = save_single_file(run["controlnet"], run["out"] / "controlnet-fp16.safetensors", "original")
    args = gen_args(run, tmp_path / "g", "--num-images", "1")
    args[args.index("--controlnet") + 1] = str(path)
    assert main(args) == 0
    assert (tmp_path / "g" / "p1_s0.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_in_fp16(run, tmp_path):
    """On CUDA the default is fp16; the images come out finite (or the run says why and exits 1)."""
    args = gen_args(run, tmp_path / "g")
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == 0
    with Image.open(tmp_path / "g" / "p0_s0.png") as im:
        assert im.size == (128, 64)


def test_generate_is_a_subcommand_of_the_trainer():
    """`python -m trainer generate --help` reaches generate's parser, with the interface's flags and defaults."""
    out = subprocess.run([sys.executable, "-m", "trainer", "generate", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for flag in ("--controlnet", "--model", "--image", "--image-is-map", "--prompt", "--output", "--steps",
                 "--guidance-scale", "--controlnet-scale", "--seed", "--num-images", "--device", "--guess-mode"):
        assert flag in text
    assert "(default: 20)" in text and "(default: 7.5)" in text
