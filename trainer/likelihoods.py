"""Decoder likelihoods p(x|z) for images x in [0, 1], shape (B, C, H, W).

A decoder outputs a parameter map (B, P, H, W) with P = `likelihood.num_params(C)`; `log_prob` turns it into
log p(x|z) in nats per image, summed over pixels and channels. Bernoulli and the discretized mixture of
logistics give discrete probabilities (x on {0, 1} resp. the 256-level grid u8/255); the Gaussians give a
continuous density on x in [0, 1] (comparable only between Gaussian models: with the same fixed sigma, or each
with its own calibrated one).
All computations run in float32 even under bf16 autocast: per-image sums over 1024-3072 pixels lose too much
precision otherwise.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaegen.errors import VaegenError

# Defaults the paper leaves unstated (see README, "Trainer"): sigma = 0.1 on [0, 1] pixels (sharp FashionMNIST
# reconstructions), 10 mixture components as in PixelCNN++.
DEFAULT_SIGMA = 0.1
DEFAULT_N_MIX = 10


class Likelihood(nn.Module, metaclass=abc.ABCMeta):
    """p(x | decoder parameters); no trainable weights (fixed sigma / n_mix are hyperparameters; the calibrated
    Gaussian's sigma is a buffer saved with the model)."""

    name: str
    continuous: bool  # a density on real-valued x (inputs outside [0, 1] allowed), not probabilities of levels

    @abc.abstractmethod
    def num_params(self, channels: int) -> int:
        """Decoder output channels needed for images with `channels` channels."""

    @abc.abstractmethod
    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x | params) summed over pixels: (B, C, H, W), (B, P, H, W) -> (B,)."""

    @abc.abstractmethod
    def mean(self, params: Tensor) -> Tensor:
        """A reconstruction in [0, 1] (B, C, H, W): the likelihood's mean (used for MS-SSIM, PSNR, plots)."""

    @abc.abstractmethod
    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | params), (B, C, H, W) in [0, 1] (on the 256-level grid for the discrete likelihoods)."""


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels; params are logits. x must be binary (the VAE binarizes in preprocess)."""

    name = "bernoulli"
    continuous = False

    def num_params(self, channels: int) -> int:
        return channels

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(params.float(), x.float(), reduction="none")
        return -nll.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float())

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(self.mean(params), generator=generator)


class _Gaussian(Likelihood):
    """What the two Gaussian decoders share: params are the mean mu, read and sampled with the decoder's sigma."""

    continuous = True

    def num_params(self, channels: int) -> int:
        return channels

    @abc.abstractmethod
    def scale(self) -> float | Tensor:
        """The decoder's sigma."""

    def mean(self, params: Tensor) -> Tensor:
        return params.float().clamp(0, 1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu = params.float()
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return (mu + self.scale() * noise).clamp(0, 1)


class Gaussian(_Gaussian):
    """N(x; mu, sigma^2 I) with a fixed sigma; params are the mean mu (unconstrained, so the linear VAE's
    decoder x = W z + b is exactly this likelihood)."""

    name = "gaussian"

    def __init__(self, sigma: float):
        super().__init__()
        if not sigma > 0:
            raise VaegenError(f"the Gaussian likelihood needs sigma > 0, got {sigma}")
        self.sigma = float(sigma)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        z = (x.float() - params.float()) / self.sigma
        per_pixel = -0.5 * z.square() - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)
        return per_pixel.flatten(1).sum(1)

    def scale(self) -> float:
        return self.sigma


class CalibratedGaussian(_Gaussian):
    """N(x; mu, sigma^2 I) with one sigma shared by all pixels and calibrated to the data: the "optimal
    sigma-VAE" of Rybkin, Daniilidis & Levine 2021 ("Simple and effective VAE training with calibrated
    decoders"), the variant they recommend over learning sigma by gradient: in a training step sigma is its
    maximum-likelihood value for the batch in closed form, sigma*^2 = the mean squared error of the decoder means
    over the batch's pixels, floored at log sigma = -6 as in their code (there a soft floor, which would put
    sigma a few percent above sigma* at FashionMNIST's errors; a hard one keeps sigma* exact above it).

    A trained model needs one fixed sigma, so that its ELBO is a proper ELBO of a fixed Gaussian decoder and an
    image's score never depends on its batch: the buffer `mse` keeps a bias-corrected exponential average of the
    batch MSEs (momentum MSE_MOMENTUM, about the last 100 steps), saved with the weights. Eval mode (the logged
    and evaluated ELBOs, samples, RHA's frozen decoder) uses it, train mode the batch's sigma*, like BatchNorm's
    running and batch statistics. sigma* is not differentiated through: at sigma* the loss is stationary in
    sigma, so the gradient of the decoder means is the same either way and the backward pass is cheaper.
    """

    name = "gaussian-calibrated"
    MSE_MOMENTUM = 0.01
    LOG_SIGMA_MIN = -6.0

    def __init__(self):
        super().__init__()
        self.register_buffer("mse", torch.zeros((), dtype=torch.float64))  # running average (before correction)
        self.register_buffer("updates", torch.zeros((), dtype=torch.float64))

    def log_sigma(self) -> Tensor:
        """The trained model's log sigma (from the running MSE; 0 before any training step)."""
        if self.updates == 0:
            return torch.zeros((), device=self.mse.device)
        mse = self.mse / (1 - (1 - self.MSE_MOMENTUM) ** self.updates)
        return (0.5 * mse.float().log()).clamp(min=self.LOG_SIGMA_MIN)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        residual = x.float() - params.float()
        if self.training:
            mse = residual.detach().square().mean()
            with torch.no_grad():
                self.mse.lerp_(mse.double(), self.MSE_MOMENTUM)
                self.updates += 1
            log_sigma = (0.5 * mse.log()).clamp(min=self.LOG_SIGMA_MIN)
        else:
            log_sigma = self.log_sigma()
        per_pixel = -0.5 * (residual * torch.exp(-log_sigma)).square() - log_sigma - 0.5 * math.log(2 * math.pi)
        return per_pixel.flatten(1).sum(1)

    def scale(self) -> Tensor:
        return self.log_sigma().exp()


class DiscretizedMixtureOfLogistics(Likelihood):
    """PixelCNN++'s discretized mixture of logistics (Salimans et al. 2017) on 256 levels.

    Per pixel: K mixture logits, then per component and channel a mean and a log-scale, then (for C > 1) the
    linear autoregressive coefficients that let channel c's mean depend on channels < c of the same pixel.
    Parameter layout along dim 1: [logits K | means K*C | log_scales K*C | coeffs K*C(C-1)/2].
    Values live on [-1, 1] internally (x' = 2x - 1, bin half-width 1/255), as in PixelCNN++.
    """

    name = "dmol"
    continuous = False

    def __init__(self, n_mix: int):
        super().__init__()
        if n_mix < 1:
            raise VaegenError(f"the mixture of logistics needs n_mix >= 1, got {n_mix}")
        self.n_mix = int(n_mix)

    def num_params(self, channels: int) -> int:
        return self.n_mix * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _split(self, params: Tensor, channels: int):
        b, p, h, w = params.shape
        k, c = self.n_mix, channels
        if p != self.num_params(c):
            raise ValueError(f"dmol with n_mix={k} on {c} channels needs {self.num_params(c)} params, got {p}")
        params = params.float()
        logits = params[:, :k]
        means = params[:, k: k + k * c].reshape(b, k, c, h, w)
        log_scales = params[:, k + k * c: k + 2 * k * c].reshape(b, k, c, h, w).clamp(min=-7.0)
        coeffs = torch.tanh(params[:, k + 2 * k * c:].reshape(b, k, c * (c - 1) // 2, h, w))
        return logits, means, log_scales, coeffs

    @staticmethod
    def _coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
        """Channel c's mean plus sum_{j<c} coeff * x_j (x on [-1, 1], broadcast over components)."""
        out, idx = [means[:, :, 0]], 0
        for c in range(1, means.shape[2]):
            m = means[:, :, c]
            for j in range(c):
                m = m + coeffs[:, :, idx] * x[:, :, j]
                idx += 1
            out.append(m)
        return torch.stack(out, dim=2)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        logits, means, log_scales, coeffs = self._split(params, x.shape[1])
        xs = (2 * x.float() - 1).unsqueeze(1)  # (B, 1, C, H, W)
        centered = xs - self._coupled_means(means, coeffs, xs)
        inv_s = torch.exp(-log_scales)
        plus_in = inv_s * (centered + 1 / 255)
        min_in = inv_s * (centered - 1 / 255)
        mid_in = inv_s * centered
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the bin of level 0
        log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): the bin of level 255
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        # Where the bin mass underflows float32, use the density at the bin centre times the bin width.
        log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in) + math.log(2 / 255)
        log_inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        log_bins = torch.where(xs < -0.999, log_cdf_plus, torch.where(xs > 0.999, log_one_minus_cdf_min, log_inner))
        log_per_component = log_bins.sum(2) + F.log_softmax(logits, dim=1)  # (B, K, H, W)
        return torch.logsumexp(log_per_component, dim=1).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        channels = _dmol_channels(params.shape[1], self.n_mix)
        logits, means, _, coeffs = self._split(params, channels)
        weights = torch.softmax(logits, dim=1).unsqueeze(2)  # (B, K, 1, H, W)
        # Channel by channel so that the coupling uses the reconstruction of the earlier channels.
        x = torch.zeros_like(means[:, 0])  # (B, C, H, W) on [-1, 1]
        for c in range(channels):
            coupled = self._coupled_means(means, coeffs, x.unsqueeze(1).expand_as(means))
            x[:, c] = (weights[:, :, 0] * coupled[:, :, c].clamp(-1, 1)).sum(1)
        return (x + 1) / 2

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        channels = _dmol_channels(params.shape[1], self.n_mix)
        logits, means, log_scales, coeffs = self._split(params, channels)
        b, k, c, h, w = means.shape
        probs = torch.softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(-1, k)
        component = torch.multinomial(probs, 1, generator=generator).reshape(b, 1, 1, h, w).expand(b, 1, c, h, w)
        mu, log_s = means.gather(1, component).squeeze(1), log_scales.gather(1, component).squeeze(1)
        coef = coeffs.gather(1, component[:, :, :1].expand(b, 1, coeffs.shape[2], h, w)).squeeze(1)
        u = torch.rand(mu.shape, generator=generator, device=mu.device).clamp(1e-5, 1 - 1e-5)
        noise = torch.log(u) - torch.log1p(-u)  # standard logistic
        x = torch.zeros_like(mu)
        idx = 0
        for ch in range(c):
            m = mu[:, ch]
            for j in range(ch):
                m = m + coef[:, idx] * x[:, j]
                idx += 1
            x[:, ch] = (m + torch.exp(log_s[:, ch]) * noise[:, ch]).clamp(-1, 1)
        return torch.round((x + 1) / 2 * 255) / 255


def _dmol_channels(num_params: int, n_mix: int) -> int:
    per_component = num_params // n_mix
    for c in range(1, 5):
        if 1 + 2 * c + c * (c - 1) // 2 == per_component:
            return c
    raise ValueError(f"{num_params} parameters do not fit a dmol with n_mix={n_mix}")


LIKELIHOOD_CLASSES: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli, "gaussian": Gaussian, "gaussian-calibrated": CalibratedGaussian,
    "dmol": DiscretizedMixtureOfLogistics,
}
LIKELIHOODS = tuple(LIKELIHOOD_CLASSES)


def build_likelihood(name: str, sigma: float = DEFAULT_SIGMA, n_mix: int = DEFAULT_N_MIX) -> Likelihood:
    if name == "gaussian":
        return Gaussian(sigma)
    if name == "dmol":
        return DiscretizedMixtureOfLogistics(n_mix)
    if name in LIKELIHOOD_CLASSES:
        return LIKELIHOOD_CLASSES[name]()
    raise VaegenError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
