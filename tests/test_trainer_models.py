"""trainer.models: base weights load as safetensors only; a folder holding only pickled .bin is refused."""

from __future__ import annotations

import shutil

import pytest

from trainer.config import ModelConfig
from trainer.models import UnsafeWeightsError, load_frozen
from trainer.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bin_only_model_folder_is_refused_with_the_flag(tmp_path):
    """The tiny model loads; the same model whose UNet is saved as a .bin only is refused, naming --model."""
    from diffusers import UNet2DConditionModel

    good = build_tiny_model(tmp_path / "good")
    assert list(load_frozen(ModelConfig(model=str(good)))[0].config.block_out_channels) == [32, 64]
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    shutil.rmtree(pickled / "unet")
    UNet2DConditionModel.from_pretrained(good / "unet").save_pretrained(pickled / "unet", safe_serialization=False)
    assert [p.name for p in (pickled / "unet").glob("*.bin")] and not list((pickled / "unet").glob("*.safetensors"))
    with pytest.raises(UnsafeWeightsError) as e:
        load_frozen(ModelConfig(model=str(pickled)))
    assert f"--model {pickled}" in str(e.value) and "unet" in str(e.value) and ".safetensors" in str(e.value)
