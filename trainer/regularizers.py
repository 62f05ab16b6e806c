"""What the paper compares DMaaPx with, besides augmentation (trainer/regimes.py hooks them into the loop):

Aug.Mollify (Tran et al. 2023, "One-line-of-code data mollification"): during the first part of training the
    inputs are replaced by x~ = sqrt(1 - v) x + sqrt(v) eps, eps ~ N(0, I), in the data's [-1, 1] range
    (variance preserving), with v annealed from 1 to ~0 by the authors' sigmoid schedule (their reference code,
    image/experiment.py: start 0, end 3, tau 0.7, v clipped below at 1e-9), per optimizer step; after it the
    data are clean. The paper runs it over the first half of training (500 of 1000 epochs).
RHA, Reverse Half Asleep (Zhang et al. 2022): from `rha_start` on, the decoder is frozen and the encoder alone
    is trained to maximize the ELBO of samples of the VAE's own generative model, z ~ p(z), x ~ p(x|z).
Early stopping: a seeded part of D_train is held out as a validation set (never trained on); training stops
    when the validation ELBO has not improved for `patience` evaluations, and the best model is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vaegen.seeding import numpy_rng


@dataclass(frozen=True)
class MollifySchedule:
    """Tran et al.'s sigmoid schedule of the noise variance v over the mollification steps."""

    steps: int                 # optimizer steps with noise (the first half of training by default)
    start: float = 0.0
    end: float = 3.0
    tau: float = 0.7
    v_min: float = 1e-9

    def variance(self, step: int) -> float:
        """v at optimizer step `step` (0-based): 1 at the start, ~0 at `steps`, exactly 0 after."""
        if step >= self.steps:
            return 0.0
        t = step / self.steps
        v_start, v_end = _sigmoid(self.start / self.tau), _sigmoid(self.end / self.tau)
        v = (v_end - _sigmoid((t * (self.end - self.start) + self.start) / self.tau)) / (v_end - v_start)
        return float(min(max(v, self.v_min), 1.0))

    def describe(self) -> dict:
        return {"kind": "sigmoid (Tran et al. 2023)", "steps": self.steps, "start": self.start, "end": self.end,
                "tau": self.tau, "v_min": self.v_min,
                "noise": "x~ = sqrt(1 - v) x + sqrt(v) eps in [-1, 1] pixel units, per optimizer step"}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mollify(x: torch.Tensor, variance: float, generator: torch.Generator, clamp: bool) -> torch.Tensor:
    """Mollified inputs (x in [0, 1]); `clamp` keeps discrete likelihoods' inputs in [0, 1]."""
    if variance <= 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noisy = (math.sqrt(1 - variance) * (2 * x - 1) + math.sqrt(variance) * eps + 1) / 2
    return noisy.clamp(0, 1) if clamp else noisy


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of D_train: a seeded random `fraction` held out, both sorted."""
    n_val = round(fraction * n)
    order = numpy_rng(seed, "vae-validation-split").permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
