"""Latent smoothness (Xiao et al. 2024, §5.3, Fig. 3): does the encoder recognise what the decoder makes of
the latents between two codes?

For a seeded pair of test images (x0, x1) with posterior means z0, z1 and alpha on a grid in [0, 1]:

    z_alpha  = alpha * z0 + (1 - alpha) * z1        the paper's convention: alpha = 1 is z0, alpha = 0 is z1
    x~_alpha = likelihood mean of decode(z_alpha)   in [0, 1], fed to the encoder as is -- also for Bernoulli
                                                    models, whose encoder saw only binary images in training
    curve(alpha) = log q(z_alpha | x~_alpha)        the encoder's diagonal-Gaussian density, nats

A high curve means the decoded interpolant is encoded back close to where it came from, and confidently; a dip
means the line crosses latents whose decodings the encoder does not map back. The paper only plots curves;
these summaries are ours (per pair p, grid alpha_k = k / (A - 1), k = 0..A-1, then a mean over pairs):

    mean_log_q   mean_k curve_p(alpha_k)
    deepest_dip  min_k curve_p(alpha_k) - (curve_p(0) + curve_p(1)) / 2       <= 0; 0 = no dip. A monotone
                 curve scores -|curve_p(1) - curve_p(0)| / 2: the reference is the endpoints' mean, not the lower
    roughness    mean over k = 1..A-2 of (curve_p(alpha_{k+1}) - 2 curve_p(alpha_k) + curve_p(alpha_{k-1}))^2
                 >= 0; 0 = linear. A smooth curve's second difference shrinks like (1 / (A - 1))^2, so
                 roughness is comparable only at the same number of alphas.

log q is a density over d_z dimensions: its level is comparable only between models with the same d_z.

Pairs: a permutation of the given images' rows from `numpy_rng(seed, "eval-subsample", SUBSAMPLE["smoothness"])`,
consecutive entries paired -- (perm[0], perm[1]), (perm[2], perm[3]), ... -- so the two images of a pair differ,
no image is in two pairs (the confidence intervals over pairs treat them as independent), and asking for more
pairs than n // 2 gives n // 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evaluator.gaps import batches
from evaluator.likelihood import diag_gaussian_log_prob
from evaluator.stats import mean_ci
from vaegen.seeding import SUBSAMPLE, numpy_rng

DEFINITION = ("log q(z_a | x~_a) along z_a = a z0 + (1 - a) z1 (a = 1: z0) between the posterior means of seeded "
              "disjoint pairs of test images, x~_a = decoder likelihood mean fed back to the encoder; "
              "mean_log_q = mean over pairs and the a-grid; deepest_dip = mean over pairs of "
              "min_a curve - (curve(0) + curve(1)) / 2; roughness = mean over pairs of the mean squared second "
              "difference of the curve along the a-grid")


@dataclass(frozen=True)
class SmoothnessConfig:
    """pairs: image pairs to interpolate (0 skips the measurement); alphas: grid points in [0, 1] including
    both ends (at least 3, so that a second difference exists)."""

    pairs: int = 50
    alphas: int = 21

    def __post_init__(self):
        if self.pairs < 0:
            raise ValueError(f"smoothness pairs must be >= 0, got {self.pairs}")
        if self.alphas < 3:
            raise ValueError(f"smoothness needs at least 3 alphas (both ends and one inside), got {self.alphas}")


@dataclass
class SmoothnessResult:
    log_q: Tensor  # (P, A) curve per pair: log q(z_alpha | x~_alpha)
    alphas: Tensor  # (A,) float64, ascending from 0 (z1) to 1 (z0)
    pairs: np.ndarray  # (P, 2) rows (x0, x1) of the images given; alpha = 1 is x0's posterior mean

    def curves(self) -> np.ndarray:
        return self.log_q.detach().cpu().double().numpy()


def draw_pairs(n: int, pairs: int, seed: int) -> np.ndarray:
    """(min(pairs, n // 2), 2) disjoint pairs of distinct rows of range(n), seeded (see the module docstring)."""
    if n < 2:
        raise ValueError(f"latent smoothness needs at least 2 images, got {n}")
    order = numpy_rng(seed, "eval-subsample", SUBSAMPLE["smoothness"]).permutation(n)
    count = min(pairs, n // 2)
    return order[: 2 * count].reshape(count, 2)


def alpha_grid(points: int) -> Tensor:
    """k / (points - 1) for k = 0..points-1 in float64: exactly 0 and 1 at the ends (also in float32), so the
    ends of the interpolation are z1 and z0 bit for bit."""
    return torch.arange(points, dtype=torch.float64) / (points - 1)


def interpolate(z0: Tensor, z1: Tensor, alphas: Tensor) -> Tensor:
    """alpha * z0 + (1 - alpha) * z1 for every pair and alpha: (P, d), (P, d), (A,) -> (P, A, d)."""
    a = alphas.to(z0.dtype).to(z0.device).view(1, -1, 1)
    return a * z0.unsqueeze(1) + (1 - a) * z1.unsqueeze(1)


def round_trip_log_q(vae, z: Tensor) -> Tensor:
    """log q(z | x~(z)) per row (B, d_z) -> (B,): decode z to the likelihood mean, score z under the encoder's
    posterior of that image."""
    mean, logvar = vae.encode(vae.likelihood.mean(vae.decode(z)))
    return diag_gaussian_log_prob(z, mean, logvar)


@torch.no_grad()
def latent_smoothness(vae, x: Tensor, config: SmoothnessConfig, seed: int = 0, max_decode: int = 8192,
                      progress: bool = False) -> SmoothnessResult:
    """The curves of `config.pairs` seeded pairs of the images x (B, C, H, W), all pairs x alphas batched in
    chunks of at most `max_decode` latents (results do not depend on it).

    The VAE must be in eval mode: in train mode BatchNorm would normalize each chunk with its own statistics
    (results would depend on the chunking) and overwrite its running statistics.
    """
    if vae.training:
        raise ValueError("latent_smoothness needs the VAE in eval mode (vae.eval()): BatchNorm in train mode "
                         "makes a curve depend on its chunk")
    if config.pairs < 1:
        raise ValueError("latent_smoothness needs at least one pair")
    pairs = draw_pairs(len(x), config.pairs, seed)
    rows = torch.as_tensor(pairs.T.reshape(-1), device=x.device)  # every x0, then every x1
    means = torch.cat([vae.encode(x[rows[sl]])[0] for sl in batches(len(rows), max_decode)])
    z0, z1 = means.view(2, len(pairs), -1)
    alphas = alpha_grid(config.alphas)
    z = interpolate(z0, z1, alphas).reshape(len(pairs) * config.alphas, -1)
    desc = "smoothness" if progress else None
    log_q = torch.cat([round_trip_log_q(vae, z[sl]) for sl in batches(len(z), max_decode, desc)])
    return SmoothnessResult(log_q.view(len(pairs), config.alphas), alphas, pairs)


def deepest_dip(curves) -> np.ndarray:
    """min over alpha minus the mean of the two endpoint values, per curve: (P, A) -> (P,), <= 0."""
    c = np.asarray(curves, dtype=np.float64)
    return c.min(1) - (c[:, 0] + c[:, -1]) / 2


def roughness(curves) -> np.ndarray:
    """Mean squared second difference along alpha, per curve: (P, A) -> (P,), >= 0."""
    c = np.asarray(curves, dtype=np.float64)
    return np.square(np.diff(c, n=2, axis=1)).mean(1)


def smoothness_summary(result: SmoothnessResult) -> dict:
    """What gaps.json records: the three summaries as means over pairs with 95% CIs, and the mean curve."""
    curves = result.curves()
    return {
        "mean_log_q": mean_ci(curves.mean(1)),
        "deepest_dip": mean_ci(deepest_dip(curves)),
        "roughness": mean_ci(roughness(curves)),
        "alphas": result.alphas.tolist(),
        "mean_curve": curves.mean(0).tolist(),
        "n_pairs": len(result.pairs),
        "pairing": "eval-subsample smoothness: seeded permutation of the evaluated test images, consecutive "
                   "entries paired",
        "definition": DEFINITION,
    }


def smoothness_arrays(result: SmoothnessResult, index: np.ndarray | None = None) -> dict:
    """Per-pair arrays for per_example.zarr; `index` maps rows of the images given to dataset rows (the
    evaluation's test_idx), as every other */index array holds rows of the run's D_test."""
    pairs = result.pairs if index is None else np.asarray(index)[result.pairs]
    return {"smoothness/pairs": pairs, "smoothness/log_q": result.log_q}
