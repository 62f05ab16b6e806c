"""EDM (Karras et al. 2022) around a diffusers `UNet2DModel`: preconditioning, noise-level sampling, loss.

The preconditioning is diffusers' own (`EDMEulerScheduler.precondition_inputs/_noise/_outputs`), so a model
trained here is called exactly the way diffusers' EDM schedulers call it:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2)   c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in = 1 / sqrt(sigma^2 + sd^2)    c_noise = ln(sigma) / 4          (sd = sigma_data = 0.5)

(diffusers calls the F-prediction of this parameterisation ``prediction_type="epsilon"``.) The scheduler
config saved next to the UNet is how `load_dm` knows the UNet expects EDM preconditioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import EDMEulerScheduler, UNet2DModel

from vaegen.seeding import derive

SIGMA_DATA = 0.5


def edm_scheduler(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> EDMEulerScheduler:
    """The scheduler saved with every DM we train: it records EDM preconditioning and the sampling range."""
    return EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=SIGMA_DATA,
                             sigma_schedule="karras", prediction_type="epsilon", rho=rho)


def write_random_dm(root: str | Path, preset: str = "tiny", channels: int = 1, seed: int = 0,
                    **unet_changes) -> Path:
    """A DM directory of `preset`'s UNet (changed by `unet_changes`, diffusers UNet2DModel arguments) with
    random weights and EDM preconditioning, laid out as `vaegen dm train` writes it but without dm.json, so it
    reads as a foreign DM. For benches and tests, where speed or code paths matter and the weights do not."""
    from generator.presets import get_preset

    torch.manual_seed(derive(seed, "dm-init"))
    unet = UNet2DModel(**{**get_preset(preset).unet_kwargs(channels), **unet_changes})
    unet.save_pretrained(root)
    edm_scheduler().save_pretrained(root)
    return Path(root)


def edm_denoise(unet: UNet2DModel, scheduler: EDMEulerScheduler, x: torch.Tensor,
                sigma: torch.Tensor | float) -> torch.Tensor:
    """D(x; sigma), the denoised estimate of x (float32), for one sigma or one per sample.

    `sigma` is a python float / 0-d tensor (sampling) or a (B,) tensor (training). The network runs in the
    UNet's dtype (bf16/fp16 under autocast or a cast model); the skip connection stays in float32.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    c_noise = scheduler.precondition_noise(sigma.reshape(-1))
    sigma = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
    dtype = getattr(unet, "module", unet).dtype  # under several processes `unet` is DDP's wrapper
    x_in = scheduler.precondition_inputs(x, sigma).to(dtype)
    F = unet(x_in, c_noise.to(dtype)).sample.float()
    return scheduler.precondition_outputs(x, F, sigma)


@dataclass(frozen=True)
class EDMLoss:
    """EDM's training objective: log-normal sigma, weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, unet: UNet2DModel, scheduler: EDMEulerScheduler, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean weighted denoising loss of a batch of clean images in [-1, 1] (float32, (B, C, H, W))."""
        b = images.shape[0]
        sd = scheduler.config.sigma_data
        # Noise is drawn on CPU from an explicit generator so training is reproducible (and resumable) on
        # any device; the transfer is negligible next to a UNet forward pass.
        normal = torch.randn(b, generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        sigma = (normal * self.p_std + self.p_mean).exp().to(images.device)
        noise = noise.to(images.device)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        denoised = edm_denoise(unet, scheduler, images + sigma.reshape(-1, 1, 1, 1) * noise, sigma)
        per_sample = ((denoised - images) ** 2).mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()
