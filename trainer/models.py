"""The VAEs: N(0, I) prior, diagonal Gaussian posterior q(z|x), and a decoder likelihood p(x|z).

A model is rebuilt from plain JSON data (`build_vae(config)`); `save_vae` writes that config as model.json
next to the weights (model.safetensors), so the evaluator rebuilds exactly what was trained with `load_vae`.

Architectures (config["arch"]):
    fc      32*32*C -> 512 -> 512 -> d_z=16 (mean and log-variance), decoder mirrored; the paper's MNIST-type VAE.
    conv    the paper's residual VAE for CIFAR-10 (Tables 4-6, read so that its parameter counts come out):
            width n_c, latent map of m_z channels at 8x8 (d_z = 64*m_z), ReLU and BatchNorm; the encoder
            halves the image twice with 4x4 stride-2 convs, the decoder doubles it twice with 4x4 stride-2
            transposed convs.
    linear  linear-Gaussian VAE: decoder mean W z + b with a fixed-sigma Gaussian, affine encoder for the mean
            and the log-variance. log p(x), the exact posterior, the best diagonal-Gaussian ELBO* and hence the
            amortization gap have closed forms (`LinearVAE.log_marginal` etc.): the ground truth for tests.

The FC VAE's hidden layers use SiLU: smooth, so the evaluator's gradient-based per-datapoint q* optimization
and PGD attack see no dead units or kinks. The conv VAE keeps the paper's ReLU and BatchNorm. BatchNorm uses
batch statistics only in train mode (training steps); in eval mode (the trainer's logged ELBOs, and
`load_vae`, hence the evaluator) it uses its running statistics, so an image's ELBO never depends on the rest
of its batch.

`VAE.parameter_counts` splits the parameters as the paper does: Theta_z, the layers touching z (fc and conv:
the encoder's last and the decoder's first; linear: all), and Theta_not_z, everything else.
"""

from __future__ import annotations

import abc
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.likelihoods import DEFAULT_N_MIX, DEFAULT_SIGMA, LIKELIHOODS, Likelihood, build_likelihood
from vaegen.errors import VaegenError
from vaegen.provenance import fsync_dir, read_json, write_json_atomic

ARCHS = ("fc", "conv", "linear")
MODEL_CONFIG_NAME = "model.json"
MODEL_WEIGHTS_NAME = "model.safetensors"

COMMON_DEFAULTS = {"channels": 1, "image_size": 32, "likelihood": "gaussian", "sigma": DEFAULT_SIGMA,
                   "n_mix": DEFAULT_N_MIX}
ARCH_DEFAULTS = {
    "fc": {"d_z": 16, "hidden": 512},
    "conv": {"m_z": 1, "n_c": 256},
    "linear": {"d_z": 16},
}
# Optional explicit weights of the linear VAE (nested lists / arrays); they are loaded into the parameters
# and not repeated in model.json (the weights file holds them).
LINEAR_WEIGHT_KEYS = {
    "W": "decoder.weight",  # (D, d_z), D = C*H*W
    "b": "decoder.bias",  # (D,)
    "enc_mean_weight": "enc_mean.weight",  # (d_z, D)
    "enc_mean_bias": "enc_mean.bias",  # (d_z,)
    "enc_logvar_weight": "enc_logvar.weight",  # (d_z, D)
    "enc_logvar_bias": "enc_logvar.bias",  # (d_z,)
}
# Carried along for readers, ignored by the model: the dataset, and in model.json the parameter counts
# ({"total", "z", "not_z"}: `VAE.parameter_counts`) that the overparameterization study plots against.
INFO_KEYS = ("dataset", "parameters")


def resolve_model_config(config: dict) -> dict:
    """Fill in defaults and check a build config; unknown keys are an error (a typo must not pass silently)."""
    arch = config.get("arch")
    if arch not in ARCHS:
        raise VaegenError(f"unknown VAE arch {arch!r}; choose one of {', '.join(ARCHS)}")
    resolved = {"arch": arch, **COMMON_DEFAULTS, **ARCH_DEFAULTS[arch]}
    allowed = set(resolved) | set(INFO_KEYS) | (set(LINEAR_WEIGHT_KEYS) if arch == "linear" else set())
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise VaegenError(f"unknown keys {unknown} in the {arch} VAE config; allowed: {sorted(allowed)}")
    resolved.update({k: v for k, v in config.items() if k not in LINEAR_WEIGHT_KEYS})
    if resolved["likelihood"] not in LIKELIHOODS:
        raise VaegenError(f"unknown likelihood {resolved['likelihood']!r}; choose one of {', '.join(LIKELIHOODS)}")
    if arch == "linear" and resolved["likelihood"] != "gaussian":
        raise VaegenError("the linear VAE is linear-Gaussian: it needs likelihood 'gaussian'")
    if arch == "conv" and resolved["image_size"] % 4:
        raise VaegenError(f"the conv VAE halves the image twice; image_size {resolved['image_size']} is not a multiple of 4")
    # Keep only the hyperparameter of the chosen likelihood, so model.json says exactly what matters.
    if resolved["likelihood"] != "gaussian":
        resolved.pop("sigma")
    if resolved["likelihood"] != "dmol":
        resolved.pop("n_mix")
    return resolved


class VAE(nn.Module, metaclass=abc.ABCMeta):
    """Shared by all architectures: preprocessing, reparameterized sampling, the ELBO."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.channels = config["channels"]
        self.image_size = config["image_size"]
        # resolve_model_config keeps only the chosen likelihood's hyperparameter
        hyper = {key: config[key] for key in ("sigma", "n_mix") if key in config}
        self.likelihood: Likelihood = build_likelihood(config["likelihood"], **hyper)
        self.num_params = self.likelihood.num_params(self.channels)
        self.latent_dim: int = 0  # set by the architecture

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def preprocess(self, images_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, C, H, W) -> model input x in [0, 1]. Bernoulli models binarize by sampling
        x ~ Bernoulli(u8 / 255) with `generator`, afresh on every call (the paper's dynamic binarization)."""
        if images_u8.dtype != torch.uint8 or tuple(images_u8.shape[1:]) != self.image_shape:
            raise VaegenError(f"this VAE takes uint8 images of shape (B, {', '.join(map(str, self.image_shape))}), "
                              f"got {images_u8.dtype} {tuple(images_u8.shape)}")
        x = images_u8.float() / 255
        if self.likelihood.name == "bernoulli":
            x = torch.bernoulli(x, generator=generator)
        return x

    @abc.abstractmethod
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each (B, d_z)."""

    @abc.abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters (B, P, H, W) for latents (B, d_z)."""

    @abc.abstractmethod
    def z_layers(self) -> list[nn.Module]:
        """The layers touching z, whose size scales with d_z: the paper's Theta_z."""

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: total, in Theta_z (`z_layers`) and in the rest; BatchNorm running statistics
        are buffers, not parameters."""
        total = sum(p.numel() for p in self.parameters())
        z = sum(p.numel() for layer in self.z_layers() for p in layer.parameters())
        return {"total": total, "z": z, "not_z": total - z}

    def log_likelihood(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x|z) in nats per image, summed over pixels: (B,)."""
        return self.likelihood.log_prob(x, params)

    @staticmethod
    def kl_to_prior(mean: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mean, diag exp(logvar)) || N(0, I)) per row, in closed form: (B,)."""
        mean, logvar = mean.float(), logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(1)

    def elbo(self, x: Tensor, n_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Per-image ELBO in nats (B,): E_q[log p(x|z)] by Monte Carlo over n_samples, minus the analytic KL."""
        mean, logvar = self.encode(x)
        eps = torch.randn((n_samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        z = (mean + torch.exp(0.5 * logvar) * eps).reshape(-1, mean.shape[1])
        x_rep = x.unsqueeze(0).expand(n_samples, *x.shape).reshape(-1, *x.shape[1:])
        log_lik = self.log_likelihood(x_rep, self.decode(z)).reshape(n_samples, -1).mean(0)
        return log_lik - self.kl_to_prior(mean, logvar)

    def forward(self, x: Tensor, n_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """The ELBO; `forward` so that DistributedDataParallel sees the training computation."""
        return self.elbo(x, n_samples, generator)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the posterior mean, in [0, 1] (B, C, H, W)."""
        return self.likelihood.mean(self.decode(self.encode(x)[0]))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Images from the model, z ~ N(0, I), x ~ p(x|z): (n, C, H, W) in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn((n, self.latent_dim), generator=generator, device=device)
        return self.likelihood.sample(self.decode(z), generator=generator)


class FCVAE(VAE):
    def __init__(self, config: dict):
        super().__init__(config)
        d_in, hidden, self.latent_dim = math.prod(self.image_shape), config["hidden"], config["d_z"]
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2 * self.latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, self.num_params * self.image_size ** 2),
        )

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z):
        return self.decoder(z).reshape(-1, self.num_params, self.image_size, self.image_size)

    def z_layers(self):
        return [self.encoder[-1], self.decoder[0]]


class ResidualBlock(nn.Module):
    """x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))). The paper's Table 6 prints two 3x3 convs; its parameter
    counts need a 3x3 and a 1x1 (see ConvVAE)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width),
        )

    def forward(self, x):
        return x + self.body(x)


class ConvVAE(VAE):
    """The paper's residual VAE (Tables 4-6). Printed, the decoder upsamples only once and the counts come to
    ~104 n_c^2; this reading (two transposed convs, (3x3, 1x1) residual blocks, a 1x1 output conv) gives the
    paper's |Theta| = 88 n_c^2 + 177 n_c + 102 at m_z = 1 (CIFAR-10, dmol with 10 components), and each +1 of
    m_z adds 3 n_c + 2.

    BatchNorm (default momentum 0.1): train mode normalizes with the batch's statistics and updates the
    running ones; eval mode uses only the running statistics (saved with the weights), so an image's score
    does not depend on its batch.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        n_c, self.m_z = config["n_c"], config["m_z"]
        self.latent_size = self.image_size // 4
        self.latent_dim = self.m_z * self.latent_size ** 2
        self.encoder = nn.Sequential(
            nn.Conv2d(self.channels, n_c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(n_c), nn.ReLU(),
            nn.Conv2d(n_c, n_c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(n_c),
            ResidualBlock(n_c), ResidualBlock(n_c),
            nn.Conv2d(n_c, 2 * self.m_z, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(self.m_z, n_c, 1, bias=False), nn.BatchNorm2d(n_c),
            ResidualBlock(n_c), ResidualBlock(n_c),
            nn.ConvTranspose2d(n_c, n_c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(n_c), nn.ReLU(),
            nn.ConvTranspose2d(n_c, n_c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(n_c), nn.ReLU(),
            nn.Conv2d(n_c, self.num_params, 1),
        )

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean.flatten(1), logvar.flatten(1)

    def decode(self, z):
        return self.decoder(z.reshape(-1, self.m_z, self.latent_size, self.latent_size))

    def z_layers(self):
        return [self.encoder[-1], self.decoder[0]]


class LinearVAE(VAE):
    """Decoder x ~ N(W z + b, sigma^2 I), encoder mean A x + a and log-variance C x + c (x flattened).

    The marginal is x ~ N(b, W W^T + sigma^2 I); the exact posterior is N(Lambda^-1 W^T (x - b) / sigma^2,
    Lambda^-1) with Lambda = I + W^T W / sigma^2. The closed forms below run in float64.
    """

    def __init__(self, config: dict):
        super().__init__(config)
        d_in, self.latent_dim = math.prod(self.image_shape), config["d_z"]
        self.sigma = config["sigma"]
        self.decoder = nn.Linear(self.latent_dim, d_in)
        self.enc_mean = nn.Linear(d_in, self.latent_dim)
        self.enc_logvar = nn.Linear(d_in, self.latent_dim)

    def encode(self, x):
        flat = x.flatten(1)
        return self.enc_mean(flat), self.enc_logvar(flat)

    def decode(self, z):
        return self.decoder(z).reshape(-1, *self.image_shape)

    def z_layers(self):
        return [self.enc_mean, self.enc_logvar, self.decoder]  # every layer touches z

    def _decoder64(self):
        return self.decoder.weight.detach().double(), self.decoder.bias.detach().double()

    def _posterior_precision(self) -> Tensor:
        W, _ = self._decoder64()
        return torch.eye(self.latent_dim, dtype=W.dtype, device=W.device) + W.T @ W / self.sigma ** 2

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) in nats (B,), a density on R^D."""
        W, b = self._decoder64()
        marginal = torch.distributions.LowRankMultivariateNormal(
            b, W, torch.full_like(b, self.sigma ** 2))
        return marginal.log_prob(x.flatten(1).double())

    def exact_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B, d_z) and covariance (d_z, d_z) of p(z|x) (the covariance does not depend on x)."""
        W, b = self._decoder64()
        cov = torch.linalg.inv(self._posterior_precision())
        mean = (x.flatten(1).double() - b) @ W @ cov / self.sigma ** 2
        return mean, cov

    def exact_elbo(self, x: Tensor, mean: Tensor | None = None, logvar: Tensor | None = None) -> Tensor:
        """The ELBO of q = N(mean, diag exp(logvar)) in closed form (B,); default q is the encoder's."""
        if mean is None:
            mean, logvar = self.encode(x)
        W, b = self._decoder64()
        mean, var = mean.detach().double(), logvar.detach().double().exp()
        residual = x.flatten(1).double() - mean @ W.T - b
        d = residual.shape[1]
        expected_log_lik = (-0.5 * d * math.log(2 * math.pi * self.sigma ** 2)
                            - (residual.square().sum(1) + var @ W.square().sum(0)) / (2 * self.sigma ** 2))
        kl = 0.5 * (mean.square() + var - 1 - var.log()).sum(1)
        return expected_log_lik - kl

    def optimal_elbo(self, x: Tensor) -> Tensor:
        """ELBO* (B,): the best diagonal-Gaussian q, mean = posterior mean, variances 1 / diag(Lambda).
        It equals log p(x) - KL(q* || p(z|x)) = log p(x) - (sum log Lambda_ii - log det Lambda) / 2."""
        precision = self._posterior_precision()
        gap = 0.5 * (precision.diagonal().log().sum() - torch.linalg.slogdet(precision)[1])
        return self.log_marginal(x) - gap

    def optimal_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (B, d_z) of the best diagonal-Gaussian q* (the target of amortized inference)."""
        mean, _ = self.exact_posterior(x)
        logvar = -self._posterior_precision().diagonal().log()
        return mean, logvar.expand_as(mean)

    def amortization_gap(self, x: Tensor) -> Tensor:
        """ELBO* - ELBO(encoder), >= 0, (B,)."""
        return self.optimal_elbo(x) - self.exact_elbo(x)


ARCH_CLASSES = {"fc": FCVAE, "conv": ConvVAE, "linear": LinearVAE}


def build_vae(config: dict) -> VAE:
    """A freshly initialized VAE from a plain-JSON config (see `resolve_model_config`); the linear arch also takes
    explicit weights under the keys of LINEAR_WEIGHT_KEYS."""
    resolved = resolve_model_config(config)
    vae = ARCH_CLASSES[resolved["arch"]](resolved)
    if resolved["arch"] == "linear":
        params = dict(vae.named_parameters())
        with torch.no_grad():
            for key, name in LINEAR_WEIGHT_KEYS.items():
                if key in config:
                    value = torch.as_tensor(np.asarray(config[key], dtype=np.float32))
                    if value.shape != params[name].shape:
                        raise VaegenError(f"linear VAE {key} must have shape {tuple(params[name].shape)}, "
                                          f"got {tuple(value.shape)}")
                    params[name].copy_(value)
    return vae


def save_vae(vae: VAE, out_dir, name: str = MODEL_WEIGHTS_NAME, config_name: str | None = MODEL_CONFIG_NAME) -> None:
    """out_dir/model.safetensors + out_dir/model.json (the build config and the parameter counts), each written
    under a temporary name and renamed; a failed write (a full disk) leaves no temporary file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    try:
        save_file(weights, str(tmp), metadata={"arch": vae.config["arch"]})
        os.replace(tmp, out_dir / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    if config_name is not None:
        write_json_atomic(out_dir / config_name, {**vae.config, "parameters": vae.parameter_counts()})


def load_vae(run_dir, device="cpu") -> VAE:
    """The VAE saved by `save_vae` in run_dir, in eval mode on `device`."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / MODEL_CONFIG_NAME, run_dir / MODEL_WEIGHTS_NAME
    if not (config_path.is_file() and weights_path.is_file()):
        raise VaegenError(f"{run_dir} is not a trained VAE directory (no {MODEL_CONFIG_NAME} + "
                          f"{MODEL_WEIGHTS_NAME}); train one with vaegen-train")
    try:
        config = read_json(config_path)
        state = load_file(str(weights_path), device=str(device))
    except Exception as e:  # json / safetensors raise several types for damaged files
        raise VaegenError(f"{run_dir}: cannot read the saved VAE ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise VaegenError(f"{config_path} is not a VAE build config")
    vae = build_vae(config)
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0]
        raise VaegenError(f"{weights_path} does not match {config_path}: {first_line}") from None
    return vae.to(device).eval()
