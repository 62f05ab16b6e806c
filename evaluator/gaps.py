"""The paper's three gaps as functions of a VAE (trainer contract) and preprocessed images x in [0, 1].

- generalization: mean ELBO(D_train) - mean ELBO(D_test), amortized posterior (`amortized_elbo`);
- amortization:   mean over D_test of ELBO*(x) - ELBO(x), with q*(z|x) optimized per datapoint
                  (`optimize_posteriors`, all points at once) and the decoder frozen;
- robustness:     E[MS-SSIM(x_r, x_a) - MS-SSIM(x~_r, x~_a)] under the encoder attack of `evaluator.attack`.

Each returns per-image arrays; `evaluator.evaluate` turns them into means with confidence intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from evaluator.attack import AttackConfig, pgd_symmetric_kl, random_start
from evaluator.likelihood import gaussian_elbo
from evaluator.msssim import MSSSIMConfig, ms_ssim


def batches(n: int, size: int, desc: str | None = None):
    """Slices covering range(n) in order; a progress bar when `desc` is given."""
    starts = range(0, n, size)
    if desc is not None:
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        yield slice(start, min(start + size, n))


@torch.no_grad()
def amortized_elbo(vae, x: torch.Tensor, n_samples: int, generator: torch.Generator | None = None,
                   batch_size: int = 1024, max_decode: int = 8192, desc: str | None = None) -> torch.Tensor:
    """Per-image ELBO with the encoder's q(z|x), n_samples Monte-Carlo draws each -> (N,)."""
    out = []
    for sl in batches(len(x), batch_size, desc):
        mean, logvar = vae.encode(x[sl])
        noise = torch.randn(n_samples, *mean.shape, generator=generator, device=x.device, dtype=mean.dtype)
        out.append(gaussian_elbo(vae, x[sl], mean, logvar, noise, max_decode))
    return torch.cat(out)


# --- amortization gap --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PosteriorOptConfig:
    """How q*(z|x) is fitted; the paper leaves all of this unstated (README explains the choice).

    Adam on (mean, log-variance) of every datapoint at once. Adam is per-coordinate and each point's loss
    depends only on its own parameters, so optimizing a batch is the same computation as optimizing each
    point alone -- only faster. Every `check_every` steps a point's average ELBO estimate over that window is
    compared with its best window so far; after `patience` windows without a gain of more than `tol` nats
    the point is frozen (converged) and no longer decoded.
    """

    lr: float = 1e-2
    max_iters: int = 2000
    samples_per_step: int = 4
    check_every: int = 50
    patience: int = 3
    tol: float = 0.01  # nats per image
    eval_samples: int = 100  # MC draws for the final ELBO* and ELBO (shared noise)
    batch_size: int = 1000  # datapoints optimized together


@dataclass
class OptimizedPosteriors:
    mean: torch.Tensor  # (N, d_z)
    logvar: torch.Tensor  # (N, d_z)
    iterations: torch.Tensor  # (N,) Adam steps each point took before it converged (or max_iters)


def optimize_posteriors(vae, x: torch.Tensor, config: PosteriorOptConfig,
                        generator: torch.Generator | None = None, max_decode: int = 8192,
                        progress: bool = True) -> OptimizedPosteriors:
    """Fit q*(z|x) = N(mean, diag(exp(logvar))) per datapoint, initialized at the encoder, decoder frozen."""
    means, logvars, iters = [], [], []
    desc = "q* batches" if progress else None
    for sl in batches(len(x), config.batch_size, desc):
        m, lv, it = _optimize_batch(vae, x[sl], config, generator, max_decode, progress)
        means.append(m)
        logvars.append(lv)
        iters.append(it)
    return OptimizedPosteriors(torch.cat(means), torch.cat(logvars), torch.cat(iters))


def _optimize_batch(vae, x, config: PosteriorOptConfig, generator, max_decode, progress):
    with torch.no_grad():
        mean0, logvar0 = vae.encode(x)
    mean = mean0.clone().requires_grad_(True)
    logvar = logvar0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mean, logvar], lr=config.lr)
    n = len(x)
    final_mean, final_logvar = mean0.clone(), logvar0.clone()
    iterations = torch.full((n,), config.max_iters, dtype=torch.long, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    window_sum = torch.zeros(n, dtype=torch.float64, device=x.device)
    best_window = torch.full((n,), -float("inf"), dtype=torch.float64, device=x.device)
    stalls = torch.zeros(n, dtype=torch.long, device=x.device)
    steps = tqdm(range(1, config.max_iters + 1), desc="q* Adam", unit="step", leave=False, disable=not progress)
    for step in steps:
        idx = active.nonzero().squeeze(1)
        noise = torch.randn(config.samples_per_step, len(idx), mean.shape[1], generator=generator,
                            device=x.device, dtype=mean.dtype)
        elbo = gaussian_elbo(vae, x[idx], mean[idx], logvar[idx], noise, max_decode)
        # Gradients for (mean, logvar) only: the decoder stays frozen and its .grad untouched.
        mean.grad, logvar.grad = torch.autograd.grad(-elbo.sum(), [mean, logvar])
        optimizer.step()  # frozen rows may drift through Adam momentum; their results were saved at freezing
        window_sum[idx] += elbo.detach().double()
        if step % config.check_every:
            continue
        window_mean = window_sum[idx] / config.check_every
        gained = window_mean > best_window[idx] + config.tol
        best_window[idx] = torch.maximum(best_window[idx], window_mean)
        stalls[idx] = torch.where(gained, 0, stalls[idx] + 1)
        window_sum.zero_()
        done = idx[stalls[idx] >= config.patience]
        if len(done):
            final_mean[done] = mean.detach()[done]
            final_logvar[done] = logvar.detach()[done]
            iterations[done] = step
            active[done] = False
        steps.set_postfix(active=int(active.sum()))
        if not active.any():
            break
    final_mean[active] = mean.detach()[active]
    final_logvar[active] = logvar.detach()[active]
    return final_mean, final_logvar, iterations


@dataclass
class AmortizationResult:
    elbo: torch.Tensor  # (N,) ELBO with the encoder's q(z|x)
    elbo_star: torch.Tensor  # (N,) ELBO with the optimized q*(z|x), same noise
    iterations: torch.Tensor  # (N,)

    @property
    def gap(self) -> torch.Tensor:
        return self.elbo_star - self.elbo


def amortization_gap(vae, x: torch.Tensor, config: PosteriorOptConfig, generator: torch.Generator | None = None,
                     max_decode: int = 8192, progress: bool = True) -> AmortizationResult:
    """ELBO*(x) - ELBO(x) per image. Both ELBOs use the same noise draws, so their difference is precise."""
    q_star = optimize_posteriors(vae, x, config, generator, max_decode, progress)
    elbo, elbo_star = [], []
    with torch.no_grad():
        for sl in batches(len(x), config.batch_size):
            mean, logvar = vae.encode(x[sl])
            noise = torch.randn(config.eval_samples, *mean.shape, generator=generator, device=x.device,
                                dtype=mean.dtype)
            elbo.append(gaussian_elbo(vae, x[sl], mean, logvar, noise, max_decode))
            elbo_star.append(gaussian_elbo(vae, x[sl], q_star.mean[sl], q_star.logvar[sl], noise, max_decode))
    return AmortizationResult(torch.cat(elbo), torch.cat(elbo_star), q_star.iterations)


# --- robustness gap ----------------------------------------------------------------------------------------

@dataclass
class RobustnessResult:
    msssim_input: torch.Tensor  # (seeds, N) MS-SSIM(x_r, x_a)
    msssim_recon: torch.Tensor  # (seeds, N) MS-SSIM(x~_r, x~_a)
    skl: torch.Tensor  # (seeds, N) symmetric KL the attack reached
    # The same attacked inputs scored otherwise: {name: (MS-SSIM(x_r, x_a), MS-SSIM(x~_r, x~_a))}, each (seeds, N)
    variants: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def gap(self) -> torch.Tensor:
        return self.msssim_input - self.msssim_recon


def robustness_gap(vae, x_ref: torch.Tensor, attack: AttackConfig, seeds: list[int],
                   msssim: MSSSIMConfig | None = None, batch_size: int = 1000,
                   progress: bool = True) -> RobustnessResult:
    """Attack every image once per seed (seeds differ in the random start), all seeds in one batch."""
    msssim = msssim or MSSSIMConfig()
    starts = []
    for seed in seeds:
        generator = torch.Generator(device=x_ref.device).manual_seed(seed)
        starts.append(random_start(x_ref, attack.delta, generator))
    x_rep = x_ref.repeat(len(seeds), *[1] * (x_ref.dim() - 1))
    x_start = torch.cat(starts)
    ms_in, ms_rec, skl = [], [], []
    for sl in batches(len(x_rep), batch_size):
        result = pgd_symmetric_kl(vae, x_rep[sl], x_start[sl], attack, progress)
        ms_in.append(ms_ssim(x_rep[sl], result.x_adv, msssim))
        with torch.no_grad():
            ms_rec.append(ms_ssim(vae.reconstruct(x_rep[sl]), vae.reconstruct(result.x_adv), msssim))
        skl.append(result.skl)
    shape = (len(seeds), len(x_ref))
    return RobustnessResult(torch.cat(ms_in).view(shape), torch.cat(ms_rec).view(shape), torch.cat(skl).view(shape))
