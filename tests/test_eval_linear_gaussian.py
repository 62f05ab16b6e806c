"""The evaluator's estimators against closed-form truth on a linear-Gaussian VAE.

x = W z + b + sigma * noise, z ~ N(0, I): log p(x) = log N(x; b, W W^T + sigma^2 I), the exact posterior is
Gaussian, the best diagonal-Gaussian ELBO* and the ELBO of any encoder are closed-form (trainer.models.LinearVAE),
so IWAE, the q* optimization and the amortization gap can be checked against exact numbers.
"""

import math

import pytest
import torch

from evaluator.gaps import PosteriorOptConfig, amortization_gap, amortized_elbo, optimize_posteriors
from evaluator.likelihood import iwae_log_px
from trainer.models import build_vae

D_Z, SIZE, SIGMA, N_IMAGES = 4, 8, 0.2, 200


def linear_vae(mean_scale=1.0, logvar_offset=0.0, sigma=SIGMA, seed=0):
    """A linear-Gaussian VAE whose encoder is the best diagonal Gaussian, optionally mis-set on purpose:
    its mean map scaled by `mean_scale`, its log-variance shifted by `logvar_offset`."""
    g = torch.Generator().manual_seed(seed)
    d_x = SIZE * SIZE
    W = torch.randn(d_x, D_Z, generator=g) * 0.3  # columns not orthogonal: q* is not the exact posterior
    b = 0.25 + 0.5 * torch.rand(d_x, generator=g)
    precision = torch.eye(D_Z) + W.T @ W / sigma**2
    A = torch.linalg.solve(precision, W.T) / sigma**2  # posterior mean = A (x - b)
    config = {
        "arch": "linear", "image_size": SIZE, "d_z": D_Z, "sigma": sigma, "W": W.tolist(), "b": b.tolist(),
        "enc_mean_weight": (mean_scale * A).tolist(), "enc_mean_bias": (-mean_scale * A @ b).tolist(),
        "enc_logvar_weight": torch.zeros(D_Z, d_x).tolist(),
        "enc_logvar_bias": (logvar_offset - precision.diagonal().log()).tolist(),
    }
    vae = build_vae(config).eval()
    vae.requires_grad_(False)
    z = torch.randn(N_IMAGES, D_Z, generator=g)
    x = (z @ W.T + b + sigma * torch.randn(N_IMAGES, d_x, generator=g)).view(-1, 1, SIZE, SIZE)
    return vae, x


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_closed_form_log_marginal_matches_a_dense_gaussian():
    vae, x = linear_vae()
    W, b = vae.decoder.weight.double(), vae.decoder.bias.double()
    dense = torch.distributions.MultivariateNormal(b, W @ W.T + SIGMA**2 * torch.eye(len(b), dtype=torch.float64))
    torch.testing.assert_close(vae.log_marginal(x), dense.log_prob(x.flatten(1).double()))


def test_iwae_approaches_exact_log_px_from_below_as_k_grows():
    vae, x = linear_vae(mean_scale=0.9, logvar_offset=1.0)
    exact = vae.log_marginal(x)
    generator = torch.Generator().manual_seed(0)
    errors = {k: (iwae_log_px(vae, x, k, generator, max_decode=4096).double() - exact) for k in (1, 10, 100, 1000)}
    means = [errors[k].mean().item() for k in errors]
    assert all(m < 0 for m in means), means  # a lower bound in expectation
    assert means == sorted(means), means  # tighter with every tenfold k
    e = errors[1000]
    assert e.mean() + 3 * e.std() / math.sqrt(len(e)) < 0.05  # still below, beyond noise
    assert abs(e.mean()) < 0.05 and abs(means[0]) > 50 * abs(e.mean())


def test_iwae_with_one_sample_is_the_elbo():
    vae, x = linear_vae(mean_scale=0.8, logvar_offset=0.5)
    estimate = iwae_log_px(vae, x, 1, torch.Generator().manual_seed(1)).double()
    difference = estimate - vae.exact_elbo(x)
    assert abs(difference.mean()) < 3 * difference.std() / math.sqrt(len(difference))


def test_iwae_is_stable_when_log_weights_are_huge():
    # sigma = 0.01: log p(x|z) is about -1e4 away from its mode, so exp() of a weight would underflow
    vae, x = linear_vae(sigma=0.01, mean_scale=0.9)
    estimate = iwae_log_px(vae, x[:20], 5000, torch.Generator().manual_seed(2), max_decode=1000)
    assert torch.isfinite(estimate).all()
    assert (estimate.double() <= vae.log_marginal(x[:20]) + 1.0).all()


def test_amortized_elbo_is_unbiased_for_the_closed_form_elbo():
    vae, x = linear_vae(mean_scale=0.7, logvar_offset=1.0)
    estimate = amortized_elbo(vae, x, n_samples=200, generator=torch.Generator().manual_seed(3), batch_size=64)
    error = estimate.double() - vae.exact_elbo(x)
    assert abs(error.mean()) < 3 * error.std() / math.sqrt(len(error))


def test_optimized_elbo_star_reaches_the_closed_form_optimum():
    vae, x = linear_vae(mean_scale=0.5, logvar_offset=2.0)
    config = PosteriorOptConfig()
    q_star = optimize_posteriors(vae, x, config, torch.Generator().manual_seed(4), progress=False)
    target_mean, target_logvar = vae.optimal_posterior(x)
    assert (q_star.mean.double() - target_mean).abs().max() < 0.08
    # the ELBO is flat in the log-variance (curvature 1/2 per dimension): it converges more loosely
    assert (q_star.logvar.double() - target_logvar).abs().mean() < 0.25
    elbo_star = vae.exact_elbo(x, q_star.mean, q_star.logvar)  # exact ELBO of the fitted q*
    shortfall = vae.optimal_elbo(x) - elbo_star
    assert (shortfall > -1e-6).all()  # nothing beats the optimum
    assert shortfall.mean() < 0.15 and shortfall.max() < 0.5  # closed-form gap: ~80 nats
    # the convergence test stops points individually, before the iteration cap
    assert (q_star.iterations < config.max_iters).float().mean() > 0.9
    assert q_star.iterations.unique().numel() > 1


def test_amortization_gap_equals_the_closed_form_gap_for_a_misset_encoder():
    vae, x = linear_vae(mean_scale=0.7, logvar_offset=1.0)
    result = amortization_gap(vae, x, PosteriorOptConfig(), torch.Generator().manual_seed(5), progress=False)
    exact = vae.amortization_gap(x)
    assert exact.mean() > 10  # the encoder really is mis-set
    assert abs(result.gap.mean().item() - exact.mean().item()) < 0.02 * exact.mean().item()
    # per image, ELBO* is precise (q* is narrow); the encoder's ELBO carries Monte-Carlo noise
    torch.testing.assert_close(result.elbo_star.double(), vae.optimal_elbo(x), atol=1.0, rtol=0)


def test_amortization_gap_vanishes_for_the_optimal_encoder():
    vae, x = linear_vae()
    result = amortization_gap(vae, x, PosteriorOptConfig(), torch.Generator().manual_seed(6), progress=False)
    assert vae.amortization_gap(x).abs().max() < 1e-6
    assert abs(result.gap.mean().item()) < 0.1


# --- the encoder attack ------------------------------------------------------------------------------------

def rank_one_encoder_vae(seed=0, d_z=3, size=32):
    """A linear VAE whose posterior mean moves only along one pixel direction u: mean = v (u . x), log-variances
    fixed. Then SKL(q(x_r), q(x_r + eps)) = c (u . eps)^2 with c = sum_k v_k^2 / sigma_k^2, a convex function of
    eps whose maximum over a box lies at the vertex eps_j = (upper_j if s u_j > 0 else lower_j), s = +-1."""
    g = torch.Generator().manual_seed(seed)
    d_x = size * size
    u = (0.5 + torch.rand(d_x, generator=g)) * torch.where(torch.rand(d_x, generator=g) < 0.5, -1.0, 1.0)
    v = 0.5 + torch.rand(d_z, generator=g)
    logvar = torch.randn(d_z, generator=g) * 0.3
    config = {
        "arch": "linear", "image_size": size, "d_z": d_z, "W": torch.zeros(d_x, d_z).tolist(),
        "b": torch.zeros(d_x).tolist(), "enc_mean_weight": torch.outer(v, u).tolist(),
        "enc_mean_bias": torch.zeros(d_z).tolist(), "enc_logvar_weight": torch.zeros(d_z, d_x).tolist(),
        "enc_logvar_bias": logvar.tolist(),
    }
    vae = build_vae(config).eval()
    vae.requires_grad_(False)
    x = 0.2 + 0.6 * torch.rand(6, 1, size, size, generator=g)  # the pixel range [0, 1] never binds
    return vae, x, u.view(1, 1, size, size), (v**2 / logvar.exp()).sum()


def box_vertex(u, lower, upper, sign):
    return torch.where(sign * u > 0, upper, lower)


@pytest.mark.parametrize("protocol", ["vaegen", "kuzina"])
def test_each_protocols_attack_finds_the_closed_form_best_perturbation(protocol):
    from evaluator import kuzina
    from evaluator.attack import AttackConfig, pgd_symmetric_kl, random_start
    from evaluator.gaps import robustness_gap

    vae, x_ref, u, c = rank_one_encoder_vae()
    delta, seeds = 0.1, [3, 4]
    config = AttackConfig(delta, iterations=50)
    if protocol == "vaegen":  # pixels in [0, 1], which these images never reach
        low, high = torch.zeros_like(x_ref), torch.ones_like(x_ref)
        x_adv = pgd_symmetric_kl(vae, x_ref, random_start(x_ref, delta, torch.Generator().manual_seed(0)),
                                 config).x_adv
        skl = robustness_gap(vae, x_ref, config, seeds, progress=False).skl
    else:  # pixels in the reference image's own [min, max], which binds at its darkest and brightest pixels
        low = x_ref.amin(dim=(1, 2, 3), keepdim=True).expand_as(x_ref)
        high = x_ref.amax(dim=(1, 2, 3), keepdim=True).expand_as(x_ref)
        x_adv = kuzina.attack(vae, x_ref, kuzina.start_noise(x_ref.shape, torch.Generator().manual_seed(0)),
                              config)
        skl = kuzina.robustness_gap(vae, x_ref, config, seeds, progress=False).skl
    lower, upper = (low - x_ref).clamp(min=-delta), (high - x_ref).clamp(max=delta)
    eps = x_adv - x_ref
    sign = torch.sign((u * eps).sum(dim=(1, 2, 3), keepdim=True))  # which of the two vertices it climbed to
    torch.testing.assert_close(eps, box_vertex(u, lower, upper, sign), atol=1e-6, rtol=0)
    # the SKL it reports is the closed form's value at that vertex, the best one when the box is symmetric
    vertex_values = torch.stack([c * (u * box_vertex(u, lower, upper, s)).sum(dim=(1, 2, 3)) ** 2 for s in (1, -1)])
    if protocol == "vaegen":
        best = c * (delta * u.abs().sum()) ** 2
        torch.testing.assert_close(skl, best.expand_as(skl), rtol=1e-4, atol=0)
    else:
        assert all(torch.isclose(value, vertex_values[:, i], rtol=1e-4).any()
                   for row in skl for i, value in enumerate(row))
