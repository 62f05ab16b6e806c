"""MS-SSIM at 32x32, the symmetric KL, and the batched PGD encoder attack behind the robustness gap."""

import pytest
import torch

from evaluator.attack import AttackConfig, pgd_symmetric_kl, random_start, symmetric_kl
from evaluator.gaps import robustness_gap
from evaluator.msssim import ms_ssim
from trainer.models import build_vae


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def images(n=6, channels=1, seed=0):
    """Blobs on an exactly black background with saturated centres: pixels sit on both ends of [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, 32)
    r2 = grid.view(1, -1) ** 2 + grid.view(-1, 1) ** 2
    radius = 0.3 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    x = (1.5 - r2 / radius**2).clamp(0, 1) * (0.6 + 0.4 * torch.rand(n, channels, 1, 1, generator=g))
    return torch.where(r2 < 0.05, torch.ones_like(x), x)


def encoder_vae(seed=0):
    """A real (linear) VAE from the trainer whose posterior moves visibly with its input."""
    torch.manual_seed(seed)
    vae = build_vae({"arch": "linear", "d_z": 8}).eval()
    vae.requires_grad_(False)
    return vae


@pytest.mark.parametrize("channels", [1, 3])
def test_msssim_of_an_image_with_itself_is_one(channels):
    noise = torch.rand(3, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    x = torch.cat([noise, images(2, channels), torch.zeros(1, channels, 32, 32)])
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(len(x)), atol=1e-5, rtol=0)


def test_msssim_falls_as_noise_grows():
    x = images(4)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [ms_ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1 and scores[-1] < 0.8, scores


def test_msssim_of_two_flat_images_is_the_coarsest_luminance_term_to_its_share_of_three_scales():
    # Flat images have no contrast or structure (those terms are 1 at every scale), so MS-SSIM is the luminance
    # term l = (2pq + C1) / (p^2 + q^2 + C1) to the coarsest kept scale's exponent: 0.3001 / (0.0448 + 0.2856 +
    # 0.3001) for three scales. Five scales would give l^0.1333, unnormalized weights l^0.3001.
    p, q, c1 = 0.3, 0.7, 0.01**2
    luminance = (2 * p * q + c1) / (p * p + q * q + c1)
    flat = [torch.full((1, 1, 32, 32), v) for v in (p, q)]
    assert abs(ms_ssim(*flat).item() - luminance ** (0.3001 / 0.6305)) < 1e-3


def test_symmetric_kl_is_the_sum_of_both_kl_divergences():
    g = torch.Generator().manual_seed(2)
    m_a, m_b, lv_a, lv_b = (torch.randn(5, 4, generator=g) for _ in range(4))
    a, b = torch.distributions.Normal(m_a, (0.5 * lv_a).exp()), torch.distributions.Normal(m_b, (0.5 * lv_b).exp())
    expected = (torch.distributions.kl_divergence(a, b) + torch.distributions.kl_divergence(b, a)).sum(1)
    torch.testing.assert_close(symmetric_kl(m_a, lv_a, m_b, lv_b), expected)
    torch.testing.assert_close(symmetric_kl(m_a, lv_a, m_a, lv_a), torch.zeros(5))


@pytest.mark.parametrize("update,step_size", [("sgd", 1.0), ("sign", 0.25)])
def test_attack_never_leaves_the_delta_ball_or_the_pixel_range(update, step_size, support):
    vae, x_ref, delta = support.recording_vae(encoder_vae()), images(), 0.1
    start = random_start(x_ref, delta, torch.Generator().manual_seed(0))
    result = pgd_symmetric_kl(vae, x_ref, start, AttackConfig(delta, 20, step_size, update))
    assert len(vae.seen) == 22  # the reference, then the start and 20 steps
    for x in [*vae.seen[1:], result.x_adv]:
        assert (x - x_ref).abs().max() <= delta + 1e-6
        assert x.min() >= 0 and x.max() <= 1
    moved = (result.x_adv - x_ref).abs().amax(dim=(1, 2, 3))
    assert (moved > 0.9 * delta).all()  # the budget is used, not ignored


@pytest.mark.parametrize("update,step_size", [("sgd", 1.0), ("sign", 0.1)])
def test_attack_increases_the_symmetric_kl_monotonically_within_its_budget(update, step_size):
    vae, x_ref, delta = encoder_vae(), images(), 0.05
    start = random_start(x_ref, delta, torch.Generator().manual_seed(0))
    short = pgd_symmetric_kl(vae, x_ref, start, AttackConfig(delta, 10, step_size, update))
    long = pgd_symmetric_kl(vae, x_ref, start, AttackConfig(delta, 30, step_size, update))
    trace = long.skl_trace
    assert (trace[1:] >= trace[:-1]).all()  # never decreases with more iterations
    assert (trace[-1] > 2 * trace[0]).all()  # and really climbs from the random start
    torch.testing.assert_close(long.skl_trace[:11], short.skl_trace)  # a longer budget extends the same path
    assert (long.skl >= short.skl).all()
    # the reported value is the SKL of the returned image
    torch.testing.assert_close(long.skl, symmetric_kl(*vae.encode(long.x_adv), *vae.encode(x_ref)))


def test_robustness_gap_is_reproducible_per_seed_and_seeds_differ():
    vae, x_ref = encoder_vae(), images(4)
    attack = AttackConfig(0.1, 5)
    first = robustness_gap(vae, x_ref, attack, seeds=[0, 1], progress=False)
    again = robustness_gap(vae, x_ref, attack, seeds=[0, 1], progress=False)
    assert first.gap.shape == (2, 4)
    torch.testing.assert_close(first.gap, again.gap, rtol=0, atol=0)
    assert not torch.equal(first.msssim_input[0], first.msssim_input[1])
    assert ((first.msssim_input > 0) & (first.msssim_input < 1)).all()
