"""Latent smoothness (evaluator.smoothness) against exact ends, a linear-Gaussian VAE's closed form, hand-made
curves for the summaries, and the fc / conv (BatchNorm, dmol) VAEs the evaluator meets."""

import math

import numpy as np
import pytest
import torch

from evaluator.smoothness import (
    SmoothnessConfig,
    SmoothnessResult,
    alpha_grid,
    deepest_dip,
    draw_pairs,
    interpolate,
    latent_smoothness,
    roughness,
    smoothness_arrays,
    smoothness_summary,
)
from trainer.models import build_vae

D_Z, SIZE = 4, 8


def fc_vae(likelihood="gaussian", seed=0, **extra):
    torch.manual_seed(seed)
    vae = build_vae({"arch": "fc", "image_size": SIZE, "d_z": D_Z, "hidden": 32, "likelihood": likelihood,
                     **extra}).eval()
    vae.requires_grad_(False)
    return vae


def images(n, channels=1, size=SIZE, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def reference_log_q(vae, z):
    """log q(z | x~(z)) written out with torch.distributions, independently of the module."""
    mean, logvar = vae.encode(vae.likelihood.mean(vae.decode(z)))
    return torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)


def linear_vae(optimal_encoder: bool, sigma: float, w_scale: float, seed=0):
    """A linear-Gaussian VAE and its weights in float64: the best diagonal-Gaussian encoder (mean = posterior
    mean, log-variance = -log diag Lambda), or a random affine encoder whose log-variance depends on x too."""
    g = torch.Generator().manual_seed(seed)
    d_x = SIZE * SIZE
    W = torch.randn(d_x, D_Z, generator=g) * w_scale
    b = 0.4 + 0.2 * torch.rand(d_x, generator=g)
    precision = torch.eye(D_Z) + W.T @ W / sigma**2
    if optimal_encoder:
        A = torch.linalg.solve(precision, W.T) / sigma**2
        a, C, c = -A @ b, torch.zeros(D_Z, d_x), -precision.diagonal().log()
    else:
        A, a = torch.randn(D_Z, d_x, generator=g) * 0.3, torch.randn(D_Z, generator=g)
        C, c = torch.randn(D_Z, d_x, generator=g) * 0.05, torch.randn(D_Z, generator=g) * 0.3
    config = {"arch": "linear", "image_size": SIZE, "d_z": D_Z, "sigma": sigma, "W": W.tolist(), "b": b.tolist(),
              "enc_mean_weight": A.tolist(), "enc_mean_bias": a.tolist(), "enc_logvar_weight": C.tolist(),
              "enc_logvar_bias": c.tolist()}
    vae = build_vae(config).eval()
    vae.requires_grad_(False)
    weights = {k: getattr(vae, layer).weight.double() for k, layer in
               (("W", "decoder"), ("A", "enc_mean"), ("C", "enc_logvar"))}
    weights.update({k: getattr(vae, layer).bias.double() for k, layer in
                    (("b", "decoder"), ("a", "enc_mean"), ("c", "enc_logvar"))})
    z = torch.randn(40, D_Z, generator=g)
    x = (z @ W.T + b + sigma * torch.randn(40, d_x, generator=g)).view(-1, 1, SIZE, SIZE)
    return vae, x, weights


def test_interpolation_ends_are_the_two_codes_bit_for_bit():
    z0, z1 = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    alphas = alpha_grid(21)
    assert alphas[0] == 0 and alphas[-1] == 1 and alphas.to(torch.float32)[-1] == 1
    z = interpolate(z0, z1, alphas)
    assert z.shape == (6, 21, 5)
    assert torch.equal(z[:, -1], z0) and torch.equal(z[:, 0], z1)  # the paper's convention: alpha = 1 is z0
    torch.testing.assert_close(z[:, 10], (z0 + z1) / 2)


def test_curve_ends_equal_the_round_trip_of_the_posterior_means():
    vae, x = fc_vae(), images(30)
    result = latent_smoothness(vae, x, SmoothnessConfig(pairs=8, alphas=7), seed=3)
    z0 = vae.encode(x[result.pairs[:, 0]])[0]
    z1 = vae.encode(x[result.pairs[:, 1]])[0]
    torch.testing.assert_close(result.log_q[:, -1], reference_log_q(vae, z0))
    torch.testing.assert_close(result.log_q[:, 0], reference_log_q(vae, z1))
    # and an interior point, decoded on its own
    z_mid = 0.5 * z0 + 0.5 * z1
    torch.testing.assert_close(result.log_q[:, 3], reference_log_q(vae, z_mid), rtol=1e-5, atol=1e-4)


def test_linear_vae_curve_matches_an_independent_float64_computation():
    vae, x, w = linear_vae(optimal_encoder=False, sigma=0.2, w_scale=0.3)
    config = SmoothnessConfig(pairs=10, alphas=9)
    result = latent_smoothness(vae, x, config, seed=0)
    flat = x.flatten(1).double()
    z0, z1 = (flat[result.pairs[:, i]] @ w["A"].T + w["a"] for i in (0, 1))
    alpha = torch.linspace(0, 1, config.alphas, dtype=torch.float64).view(1, -1, 1)
    z = alpha * z0[:, None] + (1 - alpha) * z1[:, None]  # (P, A, d)
    x_tilde = (z @ w["W"].T + w["b"]).clamp(0, 1)  # the Gaussian likelihood's mean, clamped to [0, 1]
    mean, logvar = x_tilde @ w["A"].T + w["a"], x_tilde @ w["C"].T + w["c"]
    expected = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp()).sum(-1)
    assert ((z @ w["W"].T + w["b"]) > 1).any()  # the clamp is exercised
    torch.testing.assert_close(result.log_q.double(), expected, rtol=1e-4, atol=2e-3)


def test_linear_vae_with_optimal_encoder_has_the_closed_form_concave_quadratic_curve():
    # x~ = W z + b (no clamp), encoder mean A x~ + a = (I - Lambda^-1) z, variances 1 / Lambda_ii, so
    # log q(z | x~(z)) = -1/2 sum_i [log 2 pi - log Lambda_ii + Lambda_ii (Lambda^-1 z)_i^2]: quadratic and
    # concave in alpha, so its dip is -|f(1) - f(0)| / 2 and its second differences are f'' h^2 everywhere.
    sigma = 0.05
    vae, x, w = linear_vae(optimal_encoder=True, sigma=sigma, w_scale=0.02)
    config = SmoothnessConfig(pairs=12, alphas=11)
    result = latent_smoothness(vae, x, config, seed=1)
    precision = torch.eye(D_Z, dtype=torch.float64) + w["W"].T @ w["W"] / sigma**2
    lam = precision.diagonal()
    z0, z1 = (vae.encode(x[result.pairs[:, i]])[0].double() for i in (0, 1))
    alpha = result.alphas.view(1, -1, 1)
    z = alpha * z0[:, None] + (1 - alpha) * z1[:, None]
    assert ((z @ w["W"].T + w["b"]) > 0).all() and ((z @ w["W"].T + w["b"]) < 1).all()  # no clamp
    residual = torch.linalg.solve(precision, z.reshape(-1, D_Z).T).T.reshape(z.shape)
    f = -0.5 * (math.log(2 * math.pi) - lam.log() + lam * residual**2).sum(-1)
    torch.testing.assert_close(result.log_q.double(), f, rtol=1e-5, atol=1e-4)
    h = 1 / (config.alphas - 1)
    curvature = -(lam * torch.linalg.solve(precision, (z0 - z1).T).T ** 2).sum(-1)  # f''(alpha)
    assert (curvature < 0).all() and (curvature * h**2).abs().min() > 1e-3  # a measurable second difference
    np.testing.assert_allclose(roughness(result.curves()), (curvature * h**2).numpy() ** 2, rtol=0.02)
    np.testing.assert_allclose(deepest_dip(result.curves()), (-(f[:, -1] - f[:, 0]).abs() / 2).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_chunk_size_does_not_change_the_curves():
    vae, x = fc_vae(), images(40)
    config = SmoothnessConfig(pairs=15, alphas=9)
    whole = latent_smoothness(vae, x, config, seed=0, max_decode=10_000)
    for chunk in (1, 7, 64):
        chunked = latent_smoothness(vae, x, config, seed=0, max_decode=chunk)
        assert np.array_equal(chunked.pairs, whole.pairs)
        torch.testing.assert_close(chunked.log_q, whole.log_q, rtol=1e-5, atol=1e-4)


def test_pairs_are_seeded_distinct_and_disjoint():
    pairs = draw_pairs(100, 20, seed=0)
    assert pairs.shape == (20, 2) and pairs.min() >= 0 and pairs.max() < 100
    assert (pairs[:, 0] != pairs[:, 1]).all() and len(np.unique(pairs)) == 40  # no image in two pairs
    assert np.array_equal(pairs, draw_pairs(100, 20, seed=0))
    assert not np.array_equal(pairs, draw_pairs(100, 20, seed=1))
    assert np.array_equal(draw_pairs(100, 5, seed=0), pairs[:5])  # more pairs extend, never reshuffle
    assert draw_pairs(9, 50, seed=0).shape == (4, 2)  # at most n // 2
    with pytest.raises(ValueError):
        draw_pairs(1, 1, seed=0)
    vae, x = fc_vae(), images(30)
    config = SmoothnessConfig(pairs=6, alphas=5)
    a, b = latent_smoothness(vae, x, config, seed=5), latent_smoothness(vae, x, config, seed=5)
    assert np.array_equal(a.pairs, b.pairs) and torch.equal(a.log_q, b.log_q)
    c = latent_smoothness(vae, x, config, seed=6)
    assert not np.array_equal(a.pairs, c.pairs) and not torch.equal(a.log_q, c.log_q)


def test_constant_posterior_gives_a_flat_curve():
    vae = fc_vae()
    last = vae.encoder[-1]
    last.weight.zero_()  # q(z|x) ignores x: z0 = z1 = its mean, and every x~ encodes to the same posterior
    logvar = last.bias[D_Z:]
    result = latent_smoothness(vae, images(20), SmoothnessConfig(pairs=5, alphas=9), seed=0)
    expected = -0.5 * (math.log(2 * math.pi) + logvar).sum()  # log N(mu; mu, diag exp(logvar))
    torch.testing.assert_close(result.log_q, expected.expand(5, 9))
    summary = smoothness_summary(result)
    assert summary["roughness"]["mean"] == 0 and summary["roughness"]["ci95"] == [0, 0]
    assert summary["deepest_dip"]["mean"] == 0


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "dmol"])
def test_random_fc_vae_gives_finite_summaries_of_the_right_shape(likelihood):
    vae = fc_vae(likelihood, **({"n_mix": 2} if likelihood == "dmol" else {}))
    x = images(30)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(1))  # the model's x~ stays in [0, 1]
    result = latent_smoothness(vae, x, SmoothnessConfig(pairs=10, alphas=11), seed=0)
    summary = smoothness_summary(result)
    assert summary["n_pairs"] == 10 and summary["alphas"][0] == 0 and summary["alphas"][-1] == 1
    assert len(summary["alphas"]) == len(summary["mean_curve"]) == 11
    assert all(math.isfinite(v) for v in summary["mean_curve"])
    for key in ("mean_log_q", "deepest_dip", "roughness"):
        s = summary[key]
        assert s["n"] == 10 and math.isfinite(s["mean"]) and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    assert summary["deepest_dip"]["mean"] < 0 and summary["roughness"]["mean"] > 0  # not flat
    assert (deepest_dip(result.curves()) <= 0).all()
    np.testing.assert_allclose(summary["mean_log_q"]["mean"], result.curves().mean(), rtol=1e-12)
    index = np.arange(1000, 1030)  # rows of the run's D_test behind the 30 evaluated images
    arrays = smoothness_arrays(result, index)
    assert np.array_equal(arrays["smoothness/pairs"], index[result.pairs])
    assert arrays["smoothness/log_q"].shape == (10, 11)


def test_summaries_on_hand_made_curves():
    curves = torch.tensor([[0.0, -1.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(deepest_dip(curves), [-1.0, -1.0, 0.0])  # monotone: -|f(1) - f(0)| / 2
    np.testing.assert_array_equal(roughness(curves), [4.0, 0.0, 0.0])
    result = SmoothnessResult(curves, alpha_grid(3), np.array([[0, 1], [2, 3], [4, 5]]))
    summary = smoothness_summary(result)
    assert summary["mean_log_q"]["mean"] == pytest.approx(20 / 9)
    assert summary["deepest_dip"]["mean"] == pytest.approx(-2 / 3)
    assert summary["roughness"]["mean"] == pytest.approx(4 / 3)
    assert summary["mean_curve"] == pytest.approx([2.0, 2.0, 8 / 3])
    assert summary["alphas"] == [0.0, 0.5, 1.0]


def conv_vae(**config):
    torch.manual_seed(0)
    vae = build_vae({"arch": "conv", "image_size": SIZE, "n_c": 8, **config})
    with torch.no_grad():  # non-trivial running statistics, so eval mode really differs from identity
        for module in vae.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    vae.requires_grad_(False)
    return vae


@pytest.mark.parametrize("config", [{"channels": 1}, {"channels": 3, "likelihood": "dmol", "n_mix": 2}],
                         ids=["conv-gaussian", "conv-dmol-rgb"])
def test_conv_vaes_in_eval_mode(config):
    vae = conv_vae(**config)
    x = images(16, channels=config["channels"])
    smoothness = SmoothnessConfig(pairs=6, alphas=5)
    with pytest.raises(ValueError, match="eval mode"):
        latent_smoothness(vae, x, smoothness)  # build_vae leaves it in train mode
    vae.eval()
    result = latent_smoothness(vae, x, smoothness, seed=0, max_decode=1000)
    assert result.log_q.shape == (6, 5) and torch.isfinite(result.log_q).all()
    chunked = latent_smoothness(vae, x, smoothness, seed=0, max_decode=4)
    torch.testing.assert_close(chunked.log_q, result.log_q, rtol=1e-5, atol=1e-4)
    z0 = vae.encode(x[result.pairs[:, 0]])[0]
    torch.testing.assert_close(result.log_q[:, -1], reference_log_q(vae, z0), rtol=1e-5, atol=1e-4)
    summary = smoothness_summary(result)
    assert math.isfinite(summary["roughness"]["mean"]) and summary["deepest_dip"]["mean"] <= 0


def test_config_is_checked():
    with pytest.raises(ValueError):
        SmoothnessConfig(alphas=2)
    with pytest.raises(ValueError):
        SmoothnessConfig(pairs=-1)
    with pytest.raises(ValueError):
        latent_smoothness(fc_vae(), images(4), SmoothnessConfig(pairs=0))
