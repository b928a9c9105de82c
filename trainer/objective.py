"""The diffusion objective, apart from the networks and the loop.

`encode_batch` turns pixels and tokens into latents and text embeddings (or passes precomputed ones
through); `Objective` draws noise and timesteps and knows the regression target (epsilon or v, read
from the scheduler's config); `controlnet_loss` is one forward pass of ControlNet + UNet and the MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models import Models


@torch.no_grad()
def encode_batch(models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (VAE sample x scaling factor) and text embeddings; precomputed ones pass through."""
    dtype = models.vae.dtype
    if "latents" in batch:
        latents = batch["latents"].to(dtype)
    else:
        dist = models.vae.encode(batch["pixel_values"].to(dtype)).latent_dist
        latents = dist.sample(generator=generator) * models.vae.config.scaling_factor
    if "encoder_hidden_states" in batch:
        text = batch["encoder_hidden_states"].to(models.text_encoder.dtype)
    else:
        text = models.text_encoder(batch["input_ids"], return_dict=False)[0]
    return latents, text


class Objective:
    """Noise, timesteps, noisy latents and the target of a DDPM-style noise scheduler."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like the latents, and one uniform timestep per sample."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        return noise, t

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0)."""
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict: the noise, or v = alpha_t * noise - sigma_t * x_0."""
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, t)


def controlnet_loss(models: Models, objective: Objective, latents, text, cond, noise, t,
                    only_mid_control: bool = False) -> torch.Tensor:
    """ControlNet forward, UNet forward with its residuals, MSE (in fp32) against the target."""
    noisy = objective.noisy(latents, noise, t)
    down, mid = models.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    if only_mid_control:
        down = [torch.zeros_like(d) for d in down]
    pred = models.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]
    return F.mse_loss(pred.float(), objective.target(latents, noise, t).float())


def step_loss(models: Models, objective: Objective, batch: dict, generator: torch.Generator,
              only_mid_control: bool = False) -> torch.Tensor:
    """The loss of one micro-batch: encode, draw noise and timesteps, predict, compare."""
    latents, text = encode_batch(models, batch, generator)
    noise, t = objective.draw(latents, generator)
    cond = batch["conditioning_pixel_values"].to(latents.dtype)
    return controlnet_loss(models, objective, latents, text, cond, noise, t, only_mid_control)
