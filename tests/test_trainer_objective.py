"""The training step's loss equals a reference written here from diffusers' own modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from trainer.config import ModelConfig
from trainer.models import load_models
from trainer.objective import Objective, encode_batch, step_loss
from trainer.tiny import build_tiny_model

pytestmark = [pytest.mark.quick, pytest.mark.usefixtures("one_torch_thread")]


def reference_loss(folder, controlnet_state, batch, seed, noise, timesteps) -> torch.Tensor:
    """SD ControlNet loss from freshly loaded diffusers modules, following the paper's recipe."""
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96))
    controlnet.load_state_dict(controlnet_state)
    with torch.no_grad():
        posterior = vae.encode(batch["pixel_values"]).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(seed)) * vae.config.scaling_factor
        text = text_encoder(batch["input_ids"])[0]
    # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, written out rather than via add_noise
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=text,
                           controlnet_cond=batch["conditioning_pixel_values"], return_dict=False)
    pred = unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    return F.mse_loss(pred, target)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_loss_matches_reference(tmp_path, prediction_type):
    """Same weights, batch, latent sample, noise and timesteps: the same loss within float tolerance."""
    folder = build_tiny_model(tmp_path / "model", prediction_type=prediction_type)
    models = load_models(ModelConfig(model=str(folder), gradient_checkpointing=False), torch.device("cpu"),
                         torch.float32)
    # give the zero convolutions weights, so the residuals actually change the UNet's output
    with torch.no_grad():
        for p in models.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(7)
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "conditioning_pixel_values": torch.rand(2, 3, 32, 32, generator=g),
        "input_ids": models.tokenizer(["a red cube", ""], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids,
    }
    objective = Objective(models.noise_scheduler)
    assert objective.prediction_type == prediction_type
    # the step draws latent sample, then noise and timesteps, from one generator: replay those draws
    gen = torch.Generator().manual_seed(11)
    latents, _ = encode_batch(models, batch, gen)
    noise, timesteps = objective.draw(latents, gen)
    ours = step_loss(models, objective, batch, torch.Generator().manual_seed(11))
    ref = reference_loss(folder, models.controlnet.state_dict(), batch, 11, noise, timesteps)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # and the check can fail: other timesteps give another loss
    other = reference_loss(folder, models.controlnet.state_dict(), batch, 11, noise, (timesteps + 500) % 1000)
    assert abs(other.item() - ours.item()) > 1e-4


def test_only_mid_control_ignores_down_residuals(tmp_path):
    """With only_mid_control the down residuals do not reach the UNet (the original's switch)."""
    from trainer.objective import controlnet_loss

    folder = build_tiny_model(tmp_path / "model")
    models = load_models(ModelConfig(model=str(folder), gradient_checkpointing=False), torch.device("cpu"),
                         torch.float32)
    with torch.no_grad():
        for p in models.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    objective = Objective(models.noise_scheduler)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    cond, noise = torch.rand(2, 3, 32, 32, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    full = controlnet_loss(models, objective, latents, text, cond, noise, t)
    mid = controlnet_loss(models, objective, latents, text, cond, noise, t, only_mid_control=True)
    with torch.no_grad():  # silence the down zero-convs: now both variants must agree
        for conv in models.controlnet.controlnet_down_blocks:
            conv.weight.zero_()
            conv.bias.zero_()
    full_zeroed = controlnet_loss(models, objective, latents, text, cond, noise, t)
    assert abs(full.item() - mid.item()) > 1e-6
    torch.testing.assert_close(mid, full_zeroed)
