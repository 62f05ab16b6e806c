"""MS-SSIM configured for 32x32 images (torchmetrics' maintained implementation).

The standard MS-SSIM (Wang et al. 2003) uses 5 scales and an 11x11 Gaussian window, which needs images of at
least ~176 px: at 32x32 the coarsest scales would be 2x2. We keep the first three scales (32, 16, 8 px) with
their standard exponents renormalised to sum to one, and a 7x7 window with sigma 1.0 (3 sigma each side, the
largest odd window torchmetrics accepts for three scales at 32 px). Pixels are in [0, 1] (data_range 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

# Wang et al.'s exponents for the five scales; we keep the first three (finest first).
_WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class MSSSIMConfig:
    scales: int = 3
    kernel_size: int = 7
    sigma: float = 1.0
    data_range: float = 1.0
    k1: float = 0.01
    k2: float = 0.03
    # torchmetrics' default: clamp negative per-scale terms at 0 so fractional exponents stay real.
    normalize: str = "relu"

    @property
    def betas(self) -> tuple[float, ...]:
        kept = _WANG_BETAS[: self.scales]
        return tuple(b / sum(kept) for b in kept)

    def describe(self) -> dict:
        return {**asdict(self), "betas": list(self.betas), "gaussian_kernel": True,
                "implementation": "torchmetrics.functional.image.multiscale_structural_similarity_index_measure"}


def ms_ssim(a: torch.Tensor, b: torch.Tensor, config: MSSSIMConfig | None = None) -> torch.Tensor:
    """Per-image MS-SSIM of two (B, C, 32, 32) batches in [0, 1] -> (B,)."""
    config = config or MSSSIMConfig()
    return multiscale_structural_similarity_index_measure(
        a.float(), b.float(), gaussian_kernel=True, sigma=config.sigma, kernel_size=config.kernel_size,
        reduction="none", data_range=config.data_range, k1=config.k1, k2=config.k2, betas=config.betas,
        normalize=config.normalize,
    )
