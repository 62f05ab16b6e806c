"""`--robustness-protocol kuzina` (evaluator.kuzina): their attack loop, start, kept iterate, sampled
reconstructions, image choice and MS-SSIM, each checked against what their code does."""

import numpy as np
import pytest
import torch

from evaluator import kuzina
from evaluator.attack import AttackConfig, symmetric_kl
from trainer.models import build_vae
from vaegen.errors import VaegenError


def fc_vae(seed=0):
    torch.manual_seed(seed)
    vae = build_vae({"arch": "fc", "hidden": 32, "d_z": 4}).eval()
    vae.requires_grad_(False)
    return vae


def images(n=3, seed=0, size=32):
    """Blurred random images in [0.1, 0.8]: each has its own darkest and brightest pixel inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return 0.1 + 0.7 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def one_image_attack(vae, x_ref, eps0, delta, iterations, lr):
    """Their AttackVAE.train_eps (unsupervised) restated for one image (1, C, H, W): a Parameter, torch's SGD
    and ReduceLROnPlateau, the loop order of attack/attacker.py:76-95."""
    eps = torch.nn.Parameter(eps0.clone())
    optimizer = torch.optim.SGD([eps], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=20, factor=0.5)
    low, high = x_ref.min(), x_ref.max()
    with torch.no_grad():
        mean_r, logvar_r = vae.encode(x_ref)
    for _ in range(iterations):
        eps.data = torch.clamp(x_ref + eps.data, low, high) - x_ref
        optimizer.zero_grad()
        mean_a, logvar_a = vae.encode(x_ref + eps)
        loss = -kuzina.average_symmetric_kl(mean_a, logvar_a, mean_r, logvar_r)
        loss.backward()
        optimizer.step()
        scheduler.step(loss.item())
        eps.data = torch.clamp(eps.data, -delta, delta)
        if optimizer.param_groups[0]["lr"] < 1e-6:
            break
    return torch.clamp(x_ref + eps, low, high).detach()


@pytest.mark.parametrize("lr", [1.0, 5e-7])  # 5e-7: below their 1e-6 floor, so the loop breaks after one step
def test_batched_attack_equals_their_loop_one_image_at_a_time(lr):
    vae, x_ref = fc_vae(), images(3)
    eps0 = kuzina.start_noise(x_ref.shape, torch.Generator().manual_seed(1))
    config = AttackConfig(delta=0.1, iterations=30, step_size=lr)
    batched = kuzina.attack(vae, x_ref, eps0, config)
    for b in range(len(x_ref)):
        alone = one_image_attack(vae, x_ref[b:b + 1], eps0[b:b + 1], 0.1, 30, lr)
        torch.testing.assert_close(batched[b:b + 1], alone, atol=1e-6, rtol=0)
    moved = (batched - x_ref).abs().amax(dim=(1, 2, 3))
    assert (moved > 0.05).all() and (moved <= 0.1 + 1e-6).all()
    if lr < 1e-6:  # it stopped after the first iteration, as their break does
        torch.testing.assert_close(batched, kuzina.attack(vae, x_ref, eps0, AttackConfig(0.1, 1, lr)), rtol=0, atol=0)


def test_the_attack_starts_from_unprojected_gaussian_noise_in_the_images_range(support):
    vae, x_ref, delta = support.recording_vae(fc_vae()), images(4), 0.1
    eps0 = kuzina.start_noise(x_ref.shape, torch.Generator().manual_seed(2))
    torch.testing.assert_close(eps0, 0.2 * torch.randn(x_ref.shape, generator=torch.Generator().manual_seed(2)),
                               rtol=0, atol=0)
    kuzina.attack(vae, x_ref, eps0, AttackConfig(delta, 3))
    low, high = x_ref.amin(dim=(1, 2, 3), keepdim=True), x_ref.amax(dim=(1, 2, 3), keepdim=True)
    first = vae.seen[1]  # seen[0] is the reference image
    torch.testing.assert_close(first, torch.clamp(x_ref + eps0, low, high), atol=1e-6, rtol=0)
    outside = ((first - x_ref).abs() > delta).float().mean()
    assert outside > 0.3  # N(0, 0.2^2): 62% of pixels beyond 0.1 before the range clamp; no delta-ball projection
    assert (first >= low - 1e-6).all() and (first <= high + 1e-6).all()  # their x_r + (clamp(...) - x_r)


def test_the_attack_returns_its_last_iterate(support):
    vae, x_ref = support.recording_vae(fc_vae()), images(3)
    eps0 = kuzina.start_noise(x_ref.shape, torch.Generator().manual_seed(3))
    for n in (4, 9):
        vae.seen.clear()
        returned = kuzina.attack(vae, x_ref, eps0, AttackConfig(0.1, n))
        vae.seen.clear()
        kuzina.attack(vae, x_ref, eps0, AttackConfig(0.1, n + 1))
        # the point the (n+1)-th iteration starts from is what n iterations return
        torch.testing.assert_close(returned, vae.seen[n + 1], atol=1e-6, rtol=0)


def test_reconstructions_decode_one_posterior_sample():
    vae, x = fc_vae(), images(5)
    noise = torch.randn(5, vae.latent_dim, generator=torch.Generator().manual_seed(4))
    mean, logvar = vae.encode(x)
    expected = vae.likelihood.mean(vae.decode(mean + (0.5 * logvar).exp() * noise))
    torch.testing.assert_close(kuzina.sampled_reconstruction(vae, x, noise), expected, rtol=0, atol=0)
    torch.testing.assert_close(kuzina.sampled_reconstruction(vae, x, torch.zeros_like(noise)), vae.reconstruct(x))
    assert not torch.allclose(kuzina.sampled_reconstruction(vae, x, noise), vae.reconstruct(x))


def test_a_restarts_numbers_depend_only_on_its_own_seed():
    vae, x_ref, config = fc_vae(), images(3), AttackConfig(0.1, 5)
    first = kuzina.robustness_gap(vae, x_ref, config, seeds=[7, 8], progress=False)
    second = kuzina.robustness_gap(vae, x_ref, config, seeds=[7, 9], progress=False)
    for field in ("msssim_input", "msssim_recon", "skl"):
        torch.testing.assert_close(getattr(first, field)[0], getattr(second, field)[0], rtol=0, atol=0)
        assert not torch.equal(getattr(first, field)[1], getattr(second, field)[1])
    torch.testing.assert_close(first.gap, first.msssim_input - first.msssim_recon)


def test_the_same_attacked_inputs_are_rescored_with_vaegens_ms_ssim_and_reconstruction():
    """An attack that cannot move (delta 0) leaves x_a = x_r: the posterior-mean reconstructions of the two are
    the same image (G_r exactly 0), the sampled ones are two draws (G_r > 0), whichever MS-SSIM scores them."""
    vae, x_ref = fc_vae(), images(3)
    still = kuzina.robustness_gap(vae, x_ref, AttackConfig(0.0, 2), seeds=[7, 8], progress=False)
    assert set(still.variants) == {"attack", "attack+msssim", "attack+reconstruction"}
    for name in ("attack", "attack+msssim"):  # posterior-mean x~
        ms_in, ms_rec = still.variants[name]
        torch.testing.assert_close(ms_in - ms_rec, torch.zeros(2, 3))
    for ms_in, ms_rec in (still.variants["attack+reconstruction"], (still.msssim_input, still.msssim_recon)):
        assert ((ms_in - ms_rec) > 0.01).all()  # sampled x~
    moved = kuzina.robustness_gap(vae, x_ref, AttackConfig(0.1, 5), seeds=[7], progress=False)
    vaegen_in, vaegen_rec = moved.variants["attack"]
    theirs_in, theirs_rec = moved.variants["attack+msssim"]
    torch.testing.assert_close(theirs_in, moved.msssim_input, rtol=0, atol=0)  # the same pairs, their MS-SSIM
    torch.testing.assert_close(moved.variants["attack+reconstruction"][0], vaegen_in, rtol=0, atol=0)
    assert not torch.allclose(vaegen_in, theirs_in)  # the two MS-SSIMs differ on attacked images


def test_the_objective_is_the_average_of_the_two_kl_divergences():
    g = torch.Generator().manual_seed(5)
    m_a, m_b, lv_a, lv_b = (torch.randn(5, 4, generator=g) for _ in range(4))
    a, b = torch.distributions.Normal(m_a, (0.5 * lv_a).exp()), torch.distributions.Normal(m_b, (0.5 * lv_b).exp())
    expected = (torch.distributions.kl_divergence(a, b) + torch.distributions.kl_divergence(b, a)).sum(1) / 2
    torch.testing.assert_close(kuzina.average_symmetric_kl(m_a, lv_a, m_b, lv_b), expected)
    torch.testing.assert_close(2 * kuzina.average_symmetric_kl(m_a, lv_a, m_b, lv_b), symmetric_kl(m_a, lv_a, m_b, lv_b))


def test_images_are_class_stratified_from_the_first_test_batch():
    labels = np.arange(3000) % 10
    picked = kuzina.choose_images(labels, 50)
    assert len(picked) == 50 and picked.max() < 1024 and list(picked) == sorted(picked)
    assert np.bincount(labels[picked], minlength=10).tolist() == [5] * 10
    assert np.array_equal(picked, kuzina.choose_images(labels, 50))  # their fixed seed: every run, same images
    assert not np.array_equal(picked, kuzina.choose_images(np.roll(labels, 1), 50))
    with pytest.raises(VaegenError, match="cannot draw 5 class-stratified images"):
        kuzina.choose_images(labels, 5)  # fewer images than classes


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (32, 3)])
def test_their_msssim_of_an_image_with_itself_is_one(size, channels):
    x = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(kuzina.ms_ssim(x, x), torch.ones(4), atol=1e-5, rtol=0)


def test_their_msssim_falls_as_noise_grows():
    x = images(4, size=28)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    scores = [kuzina.ms_ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1 and scores[-1] < 0.9, scores


def test_their_msssim_of_flat_images_raises_the_coarsest_luminance_to_four_times_its_weight():
    # Flat images: contrast-structure terms are 1 at every scale, SSIM is the luminance term l at every scale.
    # Their torch.prod(pow1[:-1] * pow2[-1]) gives l^(4 x 0.1333); Wang et al.'s MS-SSIM would give l^0.1333.
    p, q, c1 = 0.3, 0.7, 0.01**2
    luminance = (2 * p * q + c1) / (p * p + q * q + c1)
    a, b = torch.full((1, 1, 28, 28), p, dtype=torch.float64), torch.full((1, 1, 28, 28), q, dtype=torch.float64)
    assert abs(kuzina.ms_ssim(a, b).item() - luminance ** (4 * 0.1333)) < 1e-3


def test_their_msssim_on_a_frame_is_their_msssim_of_the_cropped_images():
    a = images(2, seed=8)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9))).clamp(0, 1)
    torch.testing.assert_close(kuzina.ms_ssim(a, b, frame=28), kuzina.ms_ssim(a[..., 2:30, 2:30], b[..., 2:30, 2:30]))
    assert not torch.allclose(kuzina.ms_ssim(a, b, frame=28), kuzina.ms_ssim(a, b))
    assert kuzina.msssim_frame("fmnist") == kuzina.msssim_frame("binary-mnist") == 28
    assert kuzina.msssim_frame("cifar10") == 32
