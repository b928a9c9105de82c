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
def encode_inputs(models: Models, batch: dict) -> tuple[tuple | torch.Tensor, torch.Tensor]:
    """What is known before any random draw: the latent distribution (mean, std) or ready latents, and the text."""
    dtype = models.vae.dtype
    if "latent_mean" in batch:
        dist = (batch["latent_mean"].to(dtype), batch["latent_std"].to(dtype))
    elif "latents" in batch:
        dist = batch["latents"].to(dtype)
    else:
        posterior = models.vae.encode(batch["pixel_values"].to(dtype)).latent_dist
        dist = (posterior.mean, posterior.std)
    if "encoder_hidden_states" in batch:
        text = batch["encoder_hidden_states"].to(dtype)  # the frozen parts' dtype (the text encoder may sit on the CPU)
    else:
        text = models.text_encoder(batch["input_ids"], return_dict=False)[0]
    return dist, text


@torch.no_grad()
def sample_latents(models: Models, dist: tuple | torch.Tensor, rows: slice, generator: torch.Generator,
                   share: tuple[int, int] = (0, 1)):
    """Latents of some rows: mean + std * eps, drawn exactly as diffusers' `latent_dist.sample(generator)`."""
    if isinstance(dist, torch.Tensor):
        return dist[rows]
    mean, std = dist[0][rows], dist[1][rows]
    eps = randn_share(mean.shape, generator, mean.device, mean.dtype, share)
    return (mean + std * eps) * models.vae.config.scaling_factor


def encode_batch(models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (VAE sample x scaling factor) and text embeddings of a whole batch.

    Precomputed shards carry the latent distribution (`latent_mean`, `latent_std`) and the caption
    embeddings; they are sampled with the same random numbers as on-the-fly encoding, so training on
    them follows the on-the-fly run.
    """
    dist, text = encode_inputs(models, batch)
    return sample_latents(models, dist, slice(None), generator), text


def randn_share(shape, generator: torch.Generator, device, dtype, share: tuple[int, int]) -> torch.Tensor:
    """Rank r of W's rows (r, r + W, ...) of normal draws for the global batch (W x rows): each process of a
    torchrun run draws what one process with the whole global batch would, and keeps its own samples."""
    rank, world = share
    return torch.randn((shape[0] * world, *shape[1:]), generator=generator, device=device, dtype=dtype)[rank::world]


class Objective:
    """Noise, timesteps, noisy latents and the target of a DDPM-style noise scheduler."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")

    def draw(self, latents: torch.Tensor, generator: torch.Generator,
             share: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like the latents, and one uniform timestep per sample (this rank's rows of the global draw)."""
        rank, world = share
        noise = randn_share(latents.shape, generator, latents.device, latents.dtype, share)
        t = torch.randint(0, self.num_timesteps, (latents.shape[0] * world,), generator=generator,
                          device=latents.device)[rank::world]
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
    if models.memory_format == torch.channels_last:  # otherwise each input keeps its layout (a map's is NHWC-like)
        noisy, cond = (x.contiguous(memory_format=torch.channels_last) for x in (noisy, cond))
    if models.denoiser is not None:
        pred = models.denoiser(noisy, t, text, cond)
    else:
        pred = predict(models.controlnet, models.unet, noisy, t, text, cond, only_mid_control)
    return F.mse_loss(pred.float(), objective.target(latents, noise, t).float())


def predict(controlnet, unet, noisy, t, text, cond, only_mid_control: bool = False) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added."""
    down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    if only_mid_control:
        down = [torch.zeros_like(d) for d in down]
    return unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


class Denoiser(torch.nn.Module):
    """ControlNet and UNet as one module, so torch.compile makes them one graph (--cuda-graphs): compiled apart,
    under CUDA graphs the ControlNet's outputs would live in memory the UNet's replay overwrites."""

    def __init__(self, controlnet, unet, only_mid_control: bool = False):
        super().__init__()
        self.controlnet, self.unet, self.only_mid_control = controlnet, unet, only_mid_control

    def forward(self, noisy, t, text, cond) -> torch.Tensor:
        """The UNet's prediction (trainer.objective.predict)."""
        return predict(self.controlnet, self.unet, noisy, t, text, cond, self.only_mid_control)


def step_loss(models: Models, objective: Objective, batch: dict, generator: torch.Generator,
              only_mid_control: bool = False, chunks: int = 1, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The loss of one pass: encode, draw noise and timesteps, predict, compare.

    A pass may hold `chunks` micro-batches of an accumulation (trainer.loop merges them when asked):
    the random draws are then made chunk by chunk, in the order separate micro-batches make them
    (latent sample, noise, timesteps), so the pass sees exactly the numbers those would have seen and,
    chunks being equal in size, the mean loss is the mean of theirs. `share` = (rank, world) under torchrun:
    the draws cover the global batch and this rank keeps its rows (trainer.objective.randn_share).
    """
    dist, text = encode_inputs(models, batch)
    n = batch["conditioning_pixel_values"].shape[0]
    size = n // chunks
    drawn = []
    for k in range(chunks):
        latents = sample_latents(models, dist, slice(k * size, (k + 1) * size), generator, share)
        drawn.append((latents, *objective.draw(latents, generator, share)))
    latents, noise, t = (torch.cat(x) if chunks > 1 else x[0] for x in zip(*drawn, strict=True))
    cond = batch["conditioning_pixel_values"]
    cond = cond.to(latents.dtype) / 255 if cond.dtype == torch.uint8 else cond.to(latents.dtype)  # uint8: precomputed
    return controlnet_loss(models, objective, latents, text, cond, noise, t, only_mid_control)
