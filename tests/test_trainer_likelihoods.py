"""Every likelihood's log-probability against a direct computation (torch.distributions / brute-force sums)."""

import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from trainer.likelihoods import Bernoulli, DiscretizedMixtureOfLogistics, Gaussian, build_likelihood

torch.set_num_threads(1)


def grid_images(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g).float() / 255


def test_bernoulli_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g) * 3
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.4), generator=g)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().log_prob(x, logits), expected)


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, x = torch.randn(4, 3, 5, 5, generator=g), grid_images(4, 3, 5, 5)
    expected = torch.distributions.Normal(mu, 0.1).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Gaussian(0.1).log_prob(x, mu), expected)


def test_dmol_grey_probabilities_sum_to_one_over_the_256_levels():
    # One 1x1 grey pixel per batch row: put all 256 levels in the batch and sum their probabilities.
    lik = DiscretizedMixtureOfLogistics(n_mix=3)
    g = torch.Generator().manual_seed(2)
    for log_scale_shift in (-5.0, -2.0, 0.0):  # very sharp (exercises the density fallback) to very wide
        params = torch.randn(1, lik.num_params(1), 1, 1, generator=g)
        params[:, 6:9] += log_scale_shift
        levels = torch.arange(256, dtype=torch.float32).reshape(256, 1, 1, 1) / 255
        total = lik.log_prob(levels, params.expand(256, -1, -1, -1)).exp().sum()
        torch.testing.assert_close(total, torch.tensor(1.0), atol=2e-3, rtol=0)


def logistic_cdf(value, loc, scale):
    dist = TransformedDistribution(Uniform(torch.zeros_like(loc), torch.ones_like(loc)),
                                   [SigmoidTransform().inv, AffineTransform(loc, scale)])
    return dist.cdf(value.clamp(-1e6, 1e6))


def test_dmol_rgb_log_prob_matches_direct_mixture_of_logistic_cdfs():
    """PixelCNN++ layout with channel coupling, computed directly in float64 from logistic CDFs."""
    k, b, h, w = 4, 2, 3, 3
    lik = DiscretizedMixtureOfLogistics(n_mix=k)
    g = torch.Generator().manual_seed(3)
    params = torch.randn(b, lik.num_params(3), h, w, generator=g, dtype=torch.float64) * 0.5
    x = grid_images(b, 3, h, w, seed=4).double()
    x[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # the edge bins
    got = lik.log_prob(x, params).double()

    logits = params[:, :k]
    means = params[:, k:4 * k].reshape(b, k, 3, h, w)
    scales = params[:, 4 * k:7 * k].reshape(b, k, 3, h, w).clamp(min=-7).exp()
    coeffs = torch.tanh(params[:, 7 * k:].reshape(b, k, 3, h, w))
    xs = 2 * x - 1
    m = torch.stack([means[:, :, 0],
                     means[:, :, 1] + coeffs[:, :, 0] * xs[:, None, 0],
                     means[:, :, 2] + coeffs[:, :, 1] * xs[:, None, 0] + coeffs[:, :, 2] * xs[:, None, 1]], 2)
    upper = torch.where(xs > 0.999, torch.full_like(xs, float("inf")), xs + 1 / 255)[:, None]
    lower = torch.where(xs < -0.999, torch.full_like(xs, -float("inf")), xs - 1 / 255)[:, None]
    bin_prob = logistic_cdf(upper, m, scales) - logistic_cdf(lower, m, scales)  # (B, K, 3, H, W)
    p = (torch.softmax(logits, 1) * bin_prob.prod(2)).sum(1)
    expected = p.log().flatten(1).sum(1)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-5)


def test_dmol_samples_and_means_are_images_on_the_256_level_grid():
    lik = build_likelihood("dmol", n_mix=5)
    params = torch.randn(2, lik.num_params(3), 4, 4, generator=torch.Generator().manual_seed(5))
    x = lik.sample(params, generator=torch.Generator().manual_seed(6))
    assert x.shape == (2, 3, 4, 4) and x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x * 255, (x * 255).round())
    mean = lik.mean(params)
    assert mean.shape == (2, 3, 4, 4) and mean.min() >= 0 and mean.max() <= 1


def test_discrete_likelihoods_never_exceed_probability_one():
    x = grid_images(3, 1, 8, 8)
    for lik in (build_likelihood("dmol", n_mix=2), Bernoulli()):
        params = torch.randn(3, lik.num_params(1), 8, 8, generator=torch.Generator().manual_seed(7)) * 4
        target = x.round() if lik.name == "bernoulli" else x
        assert (lik.log_prob(target, params) <= 0).all()


def test_calibrated_gaussian_trains_with_the_batch_optimal_sigma_and_scores_with_its_running_average():
    lik = build_likelihood("gaussian-calibrated")
    g = torch.Generator().manual_seed(8)
    batches = [(grid_images(6, 1, 8, 8, seed=s), torch.rand(6, 1, 8, 8, generator=g) * 0.5 + 0.2) for s in range(3)]
    mses = []
    for x, mu in batches:  # train mode: sigma* = sqrt(batch MSE), the maximum-likelihood sigma of the batch
        mse = (x - mu).square().mean()
        mses.append(mse.double())
        expected = torch.distributions.Normal(mu, mse.sqrt()).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(lik.log_prob(x, mu), expected)
        for factor in (0.97, 1.03):  # any other shared sigma scores the batch lower
            assert Gaussian(mse.sqrt().item() * factor).log_prob(x, mu).sum() < expected.sum()
    # eval mode: sigma^2 = the bias-corrected exponential average of the batch MSEs, whatever the batch holds
    m = lik.MSE_MOMENTUM
    average = sum(m * (1 - m) ** (2 - i) * v for i, v in enumerate(mses)) / (1 - (1 - m) ** 3)
    lik.eval()
    x, mu = batches[0]
    expected = torch.distributions.Normal(mu, average.sqrt().float()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, mu), expected)
    torch.testing.assert_close(lik.log_prob(x[:1], mu[:1]), expected[:1])
    assert torch.equal(lik.log_prob(x, mu), lik.log_prob(x, mu))  # scoring changes nothing


def test_calibrated_gaussian_gradient_is_the_same_as_through_sigma_star():
    # The loss is stationary in sigma at sigma*, so not differentiating through it changes no gradient.
    lik = build_likelihood("gaussian-calibrated")
    x = grid_images(5, 1, 6, 6, seed=9)
    mu = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(10), requires_grad=True)
    (grad,) = torch.autograd.grad(-lik.log_prob(x, mu).mean(), mu)
    sigma = (x - mu).square().mean().sqrt()  # differentiated through
    through = -torch.distributions.Normal(mu, sigma).log_prob(x).flatten(1).sum(1).mean()
    (expected,) = torch.autograd.grad(through, mu)
    torch.testing.assert_close(grad, expected)
