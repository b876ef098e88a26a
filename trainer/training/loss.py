"""The DreamBooth loss: one UNet pass over instance and class rows, split after."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def min_snr_weights(noise_scheduler, timesteps, gamma: float):
    """Min-SNR-gamma loss weights (Hang et al. 2023) for eps or v prediction.

    A zero-terminal-SNR schedule has SNR 0 at its last timestep: there the epsilon weight min(snr, gamma) / snr
    is taken at its limit, 1, instead of 0 / 0.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def noisy_latents_and_target(noise_scheduler, latents, noise, timesteps):
    """(the UNet's input in the latents' dtype, the fp32 target). Both are computed in fp32: diffusers' add_noise
    works in its inputs' dtype, and in bf16 sqrt(1 - alphas_cumprod) rounds to 0 at timesteps 0 and 1 (no noise at
    all) and is off by more than 5% at a dozen more (fp16: 2)."""
    noise = noise.float()
    noisy = noise_scheduler.add_noise(latents.float(), noise, timesteps).to(latents.dtype)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, noise_scheduler.get_velocity(latents.float(), noise, timesteps)
    return noisy, noise


def diffusion_loss(
    unet,
    noise_scheduler,
    latents,
    noise,
    timesteps,
    encoder_hidden_states,
    n_instance: int,
    prior_weight: float | torch.Tensor = 1.0,
    snr_gamma: float = 0.0,
    unet_kwargs: dict | None = None,
    instance_weights=None,
):
    """One UNet pass over [instance; class] rows, split after: loss = mse(instance) + w * mse(class), `w` a number
    or one weight per class row.

    instance_weights ([n_instance, 1, h, w], the masked loss): each instance row's error is weighted per latent
    cell and divided by the weights' sum, sum(w * err²) / sum(w), so a row's loss keeps the scale of an
    unmasked one whatever the mask's area (a white mask gives the plain mse) and a cell of weight 0 gets no
    gradient at all. Class rows are never masked.

    Returns (loss, instance_loss, prior_loss or None), all 0-dim tensors.
    """
    noisy, target = noisy_latents_and_target(noise_scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states, **(unet_kwargs or {})).sample
    error = F.mse_loss(pred.float(), target, reduction="none")
    per_sample = error.mean(dim=(1, 2, 3))
    if instance_weights is not None:
        weights = instance_weights.to(error.device, error.dtype).expand_as(error[:n_instance])
        weighted = (error[:n_instance] * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1e-12)
        per_sample = torch.cat([weighted, per_sample[n_instance:]])
    if snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    instance_loss = per_sample[:n_instance].mean()
    if per_sample.shape[0] > n_instance:
        prior_loss = per_sample[n_instance:].mean()
        if isinstance(prior_weight, torch.Tensor):  # one weight per class row (concepts with their own weights)
            return instance_loss + (prior_weight * per_sample[n_instance:]).mean(), instance_loss, prior_loss
        return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss
    return instance_loss, instance_loss, None
