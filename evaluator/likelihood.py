"""How well a VAE explains an image: the ELBO of any diagonal Gaussian q(z|x), and IWAE log p(x).

Everything here works for any model with the trainer's VAE contract (`encode`, `decode`, `log_likelihood`,
`kl_to_prior`, `latent_dim`): the prior is N(0, I) and posteriors are diagonal Gaussians given as (mean,
log-variance).
Units are nats per image, summed over pixels. Latent samples are decoded in chunks of at most `max_decode`
images, so memory stays bounded whatever the number of samples per image.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

LOG_2PI = math.log(2 * math.pi)


def diag_gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over the last axis."""
    return -0.5 * (LOG_2PI + logvar + (z - mean) ** 2 * torch.exp(-logvar)).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z**2).sum(-1)


def decoded_log_likelihood(vae, x: torch.Tensor, z: torch.Tensor, max_decode: int) -> torch.Tensor:
    """log p(x|z) for latents z of shape (S, B, d_z) and images x (B, ...) -> (S, B).

    Chunks over the sample axis so that at most about `max_decode` images are decoded at once.
    """
    n_samples, batch = z.shape[:2]
    per_chunk = max(1, max_decode // batch)
    out = []
    for start in range(0, n_samples, per_chunk):
        zc = z[start:start + per_chunk]
        s = zc.shape[0]
        xs = x.unsqueeze(0).expand(s, *x.shape).reshape(s * batch, *x.shape[1:])
        params = vae.decode(zc.reshape(s * batch, -1))
        out.append(vae.log_likelihood(xs, params).view(s, batch))
    return torch.cat(out)


def gaussian_elbo(vae, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor,
                  max_decode: int = 8192) -> torch.Tensor:
    """Reparameterised ELBO of q(z|x) = N(mean, diag(exp(logvar))) with given noise (S, B, d_z) -> (B,).

    E_q[log p(x|z)] is averaged over the S noise draws; KL(q || N(0, I)) is exact. Passing the same noise to
    two posteriors (common random numbers) makes the estimate of their ELBO difference far less noisy.
    """
    z = mean + torch.exp(0.5 * logvar) * noise
    return decoded_log_likelihood(vae, x, z, max_decode).mean(0) - vae.kl_to_prior(mean, logvar)


@torch.no_grad()
def iwae_log_px(vae, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                max_decode: int = 8192, progress: bool = False) -> torch.Tensor:
    """Importance-weighted bound log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), per image -> (B,).

    A lower bound on log p(x) in expectation that tightens as k grows (Burda et al. 2016). The k weights
    are processed in chunks and combined with logsumexp, so k = 5000 needs no more memory than k = 50.
    """
    mean, logvar = vae.encode(x)
    batch, d_z = mean.shape
    per_chunk = max(1, max_decode // batch)
    running = torch.full((batch,), -math.inf, dtype=torch.float64, device=x.device)
    starts = tqdm(range(0, k, per_chunk), desc=f"IWAE k={k}", unit="chunk", leave=False, disable=not progress)
    for start in starts:
        s = min(per_chunk, k - start)
        noise = torch.randn(s, batch, d_z, generator=generator, device=x.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        log_w = (decoded_log_likelihood(vae, x, z, max_decode) + standard_normal_log_prob(z)
                 - diag_gaussian_log_prob(z, mean, logvar))
        running = torch.logaddexp(running, torch.logsumexp(log_w.double(), dim=0))
    return (running - math.log(k)).to(mean.dtype)
