"""The VAE contract the evaluator builds on: shapes, ELBO sanity, preprocessing, save/load, the conv VAE's
parameter counts (the paper's) and BatchNorm handling, and the closed forms of the linear-Gaussian VAE."""

import json
import math

import pytest
import torch

from trainer.models import build_vae, load_vae, save_vae
from vaegen.errors import VaegenError

torch.set_num_threads(1)

SMALL = {
    "fc": {"arch": "fc", "hidden": 32},
    "conv": {"arch": "conv", "n_c": 4, "m_z": 2},
    "linear": {"arch": "linear", "d_z": 3},
}


def u8_images(b, c=1, size=32, seed=0):
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def warm_up_batchnorm(vae, x, steps=3):
    """A few train-mode passes, so BatchNorm's running statistics are no longer their initial 0 and 1."""
    vae.train()
    with torch.no_grad():
        for _ in range(steps):
            vae.elbo(x)
    return vae.eval()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "dmol"])
@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_encode_decode_elbo_shapes_and_discrete_elbo_is_negative(arch, likelihood):
    torch.manual_seed(0)
    channels = 3 if arch == "conv" else 1
    vae = build_vae({**SMALL[arch], "likelihood": likelihood, "channels": channels, "n_mix": 2}
                    if likelihood == "dmol" else {**SMALL[arch], "likelihood": likelihood, "channels": channels})
    x = vae.preprocess(u8_images(5, channels))
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (5, vae.latent_dim)
    assert vae.latent_dim == (16 if arch == "fc" else 64 * 2)
    params = vae.decode(mean)
    assert params.shape == (5, vae.likelihood.num_params(channels), 32, 32)
    assert vae.log_likelihood(x, params).shape == (5,)
    elbo = vae.elbo(x, n_samples=3)
    assert elbo.shape == (5,) and torch.isfinite(elbo).all()
    if likelihood != "gaussian":  # discrete probabilities: ELBO <= log p(x) <= 0
        assert (elbo < 0).all()
    elbo.mean().backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_elbo_is_deterministic_given_a_generator_and_its_kl_matches_torch_distributions():
    torch.manual_seed(0)
    vae = build_vae(SMALL["fc"])
    x = vae.preprocess(u8_images(4))
    a = vae.elbo(x, 2, generator=torch.Generator().manual_seed(1))
    b = vae.elbo(x, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    mean, logvar = vae.encode(x)
    kl = vae.kl_to_prior(mean, logvar)
    assert (kl >= 0).all()
    assert not torch.equal(a, vae.elbo(x, 2, generator=torch.Generator().manual_seed(2)))  # z is sampled
    kl_direct = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl, kl_direct)


def test_bernoulli_preprocess_binarizes_afresh_each_call_and_reproducibly_per_seed():
    vae = build_vae({"arch": "fc", "hidden": 8, "likelihood": "bernoulli"})
    images = u8_images(64)
    a = vae.preprocess(images, torch.Generator().manual_seed(0))
    b = vae.preprocess(images, torch.Generator().manual_seed(1))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, vae.preprocess(images, torch.Generator().manual_seed(0)))
    assert abs(a.mean().item() - images.float().mean().item() / 255) < 0.01


def test_gaussian_and_dmol_preprocess_scale_to_unit_interval_exactly():
    images = u8_images(3)
    for likelihood in ("gaussian", "dmol"):
        x = build_vae({"arch": "fc", "hidden": 8, "likelihood": likelihood}).preprocess(images)
        torch.testing.assert_close(x, images.float() / 255)


def test_preprocess_refuses_wrong_dtype_or_shape():
    vae = build_vae({"arch": "fc", "hidden": 8})
    with pytest.raises(VaegenError, match="uint8 images of shape"):
        vae.preprocess(u8_images(2, c=3))
    with pytest.raises(VaegenError, match="uint8"):
        vae.preprocess(u8_images(2).float())


def test_build_config_errors_are_one_line_vaegen_errors():
    for bad, message in [({"arch": "mlp"}, "unknown VAE arch"), ({"arch": "fc", "d_zz": 3}, "unknown keys"),
                         ({"arch": "fc", "likelihood": "poisson"}, "unknown likelihood"),
                         ({"arch": "linear", "likelihood": "bernoulli"}, "linear-Gaussian")]:
        with pytest.raises(VaegenError, match=message) as info:
            build_vae(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch", ["fc", "conv", "linear"])
def test_save_then_load_rebuilds_the_same_model_in_eval_mode_with_batch_independent_outputs(arch, tmp_path):
    torch.manual_seed(0)
    vae = build_vae({**SMALL[arch], "dataset": "fmnist"})
    x = vae.preprocess(u8_images(16))
    warm_up_batchnorm(vae, x)  # the running statistics must travel with the weights
    save_vae(vae, tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["arch"] == arch and saved["dataset"] == "fmnist" and saved["sigma"] == 0.1
    loaded = load_vae(tmp_path)
    assert not loaded.training
    with torch.no_grad():
        mean = vae.encode(x)[0]
        torch.testing.assert_close(loaded.encode(x)[0], mean)
        torch.testing.assert_close(loaded.decode(mean), vae.decode(mean))
        torch.testing.assert_close(loaded.encode(x[5:6])[0], loaded.encode(x)[0][5:6])
        torch.testing.assert_close(loaded.decode(mean[5:6]), loaded.decode(mean)[5:6])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_load_refuses_a_directory_without_a_vae_or_with_mismatched_weights(tmp_path):
    with pytest.raises(VaegenError, match="not a trained VAE directory"):
        load_vae(tmp_path)
    save_vae(build_vae({"arch": "fc", "hidden": 8}), tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"arch": "fc", "hidden": 16}))
    with pytest.raises(VaegenError, match="does not match"):
        load_vae(tmp_path)


# --- parameter counts -------------------------------------------------------------------------------------

def conv_counts(n_c, m_z):
    """CIFAR-10's conv VAE (dmol, 10 components), counted on the meta device: no memory, no initialization."""
    with torch.device("meta"):
        vae = build_vae({"arch": "conv", "channels": 3, "likelihood": "dmol", "n_c": n_c, "m_z": m_z})
    return vae.parameter_counts()


@pytest.mark.parametrize("n_c", [64, 128, 256, 512])
def test_conv_vae_parameter_counts_are_the_papers(n_c):
    # |Theta| = 88 n_c^2 + 177 n_c + 102 at m_z = 1 (CIFAR-10, dmol with 10 components); each +1 of m_z adds
    # 3 n_c + 2 (encoder 1x1 conv n_c -> 2 with bias, decoder 1x1 conv 1 -> n_c without), all in Theta_z.
    base = conv_counts(n_c, 1)
    assert base["total"] == 88 * n_c ** 2 + 177 * n_c + 102
    for m_z in (1, 2, 8, 64):
        counts = conv_counts(n_c, m_z)
        assert counts["total"] - base["total"] == (m_z - 1) * (3 * n_c + 2)
        assert counts["z"] == m_z * (3 * n_c + 2)
        assert counts["not_z"] == base["not_z"] == counts["total"] - counts["z"]
    paper_millions = {256: 5.81, 512: 23.16}  # Fig. 8's x-axis
    if n_c in paper_millions:
        assert round(base["total"] / 1e6, 2) == paper_millions[n_c]


def test_conv_vae_counts_do_not_include_batchnorm_running_statistics():
    counts = conv_counts(8, 1)
    vae = build_vae({"arch": "conv", "channels": 3, "likelihood": "dmol", "n_c": 8})
    n_batchnorm = sum(isinstance(m, torch.nn.BatchNorm2d) for m in vae.modules())
    assert n_batchnorm == 13  # encoder 2 + 2x2 (residual blocks), decoder 1 + 2x2 + 2
    assert sum(b.numel() for b in vae.buffers()) == n_batchnorm * (8 + 8 + 1)  # mean, var, batch count
    assert counts["total"] == sum(p.numel() for p in vae.parameters()) == 88 * 64 + 177 * 8 + 102


def test_fc_and_linear_parameter_counts_split_at_the_layers_touching_z():
    z = (32 * 10 + 10) + (5 * 32 + 32)  # encoder 32 -> 2 d_z, decoder d_z -> 32
    not_z = (1024 * 32 + 32) + 2 * (32 * 32 + 32) + (32 * 1024 + 1024)
    counts = build_vae({"arch": "fc", "hidden": 32, "d_z": 5}).parameter_counts()
    assert counts == {"total": z + not_z, "z": z, "not_z": not_z}
    linear = 2 * (1024 * 3 + 3) + (3 * 1024 + 1024)  # mean and log-variance encoders, decoder
    counts = build_vae({"arch": "linear", "d_z": 3}).parameter_counts()
    assert counts == {"total": linear, "z": linear, "not_z": 0}


# --- the conv VAE: one-channel images, BatchNorm -----------------------------------------------------------

@pytest.mark.parametrize("m_z", [1, 3])
def test_conv_vae_on_one_channel_gaussian_images(m_z):
    # The FashionMNIST use: C = 1, fixed-variance Gaussian, P = 1 parameter per pixel.
    torch.manual_seed(0)
    vae = build_vae({"arch": "conv", "channels": 1, "likelihood": "gaussian", "n_c": 8, "m_z": m_z})
    assert vae.latent_dim == 64 * m_z
    x = vae.preprocess(u8_images(4))
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (4, 64 * m_z)
    assert vae.decode(mean).shape == (4, 1, 32, 32)
    assert vae.reconstruct(x).shape == x.shape
    elbo = vae(x)
    assert elbo.shape == (4,) and torch.isfinite(elbo).all()
    elbo.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    # first conv 16 C n_c, output conv P n_c + P: 88 n_c^2 + (16 + 26 + 1) n_c + 1 + m_z (3 n_c + 2)
    assert vae.parameter_counts()["total"] == 88 * 64 + 43 * 8 + 1 + m_z * (3 * 8 + 2)


def test_conv_vae_in_eval_mode_scores_an_image_the_same_alone_and_in_a_batch():
    torch.manual_seed(0)
    vae = build_vae({**SMALL["conv"], "channels": 3, "likelihood": "dmol", "n_mix": 2})
    x = vae.preprocess(u8_images(16, c=3))
    z = torch.randn(16, vae.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        vae.train()  # batch statistics: the control, an image's encoding does depend on its batch
        assert not torch.allclose(vae.encode(x[3:4])[0], vae.encode(x)[0][3:4], atol=1e-3)
        warm_up_batchnorm(vae, x)
        mean, logvar = vae.encode(x)
        params = vae.decode(z)
        for i in (0, 3, 15):
            alone_mean, alone_logvar = vae.encode(x[i:i + 1])
            torch.testing.assert_close(alone_mean, mean[i:i + 1], rtol=0, atol=1e-5)
            torch.testing.assert_close(alone_logvar, logvar[i:i + 1], rtol=0, atol=1e-5)
            torch.testing.assert_close(vae.decode(z[i:i + 1]), params[i:i + 1], rtol=0, atol=1e-5)
        # The ELBO of image 0 draws the same noise alone and first in the batch (n_samples = 1).
        elbo = vae.elbo(x, generator=torch.Generator().manual_seed(2))
        alone = vae.elbo(x[:1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(alone, elbo[:1])


def test_conv_vae_updates_batchnorm_running_statistics_in_train_mode_only():
    torch.manual_seed(0)
    vae = build_vae(SMALL["conv"])
    x = vae.preprocess(u8_images(8))

    def running_stats():
        return {k: v.clone() for k, v in vae.state_dict().items() if "running" in k or "num_batches" in k}

    initial = running_stats()
    with torch.no_grad():
        vae.eval()
        vae.elbo(x)
        assert all(torch.equal(v, initial[k]) for k, v in running_stats().items())
        vae.train()
        vae.elbo(x)
    after = running_stats()
    assert all(not torch.equal(v, initial[k]) for k, v in after.items())
    assert all(v.item() == 1 for k, v in after.items() if "num_batches" in k)


# --- the linear-Gaussian VAE: closed forms ---------------------------------------------------------------

def linear_vae(seed=0, d_z=3, size=4, sigma=0.3, **weights):
    torch.manual_seed(seed)
    return build_vae({"arch": "linear", "d_z": d_z, "image_size": size, "sigma": sigma, **weights})


def test_linear_vae_takes_explicit_decoder_and_encoder_weights():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(16, 2, generator=g), torch.rand(16, generator=g)
    vae = linear_vae(d_z=2, W=W.tolist(), b=b.numpy(), enc_logvar_bias=[-1.0, -2.0])
    torch.testing.assert_close(vae.decoder.weight, W)
    torch.testing.assert_close(vae.decoder.bias, b)
    torch.testing.assert_close(vae.enc_logvar.bias, torch.tensor([-1.0, -2.0]))
    with pytest.raises(VaegenError, match="must have shape"):
        linear_vae(d_z=2, W=W.T.tolist())


def test_linear_vae_log_marginal_matches_full_covariance_gaussian():
    vae = linear_vae()
    x = vae.preprocess(u8_images(5, size=4))
    W, b = vae.decoder.weight.double(), vae.decoder.bias.double()
    full = torch.distributions.MultivariateNormal(b, W @ W.T + 0.09 * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(vae.log_marginal(x), full.log_prob(x.flatten(1).double()))


def test_linear_vae_monte_carlo_elbo_converges_to_the_closed_form():
    vae = linear_vae()
    x = vae.preprocess(u8_images(4, size=4))
    n = 20000
    with torch.no_grad():
        mc = vae.elbo(x, n_samples=n, generator=torch.Generator().manual_seed(0)).double()
        single = vae.elbo(x.repeat(n, 1, 1, 1), 1, generator=torch.Generator().manual_seed(1)).reshape(n, 4)
    standard_error = single.double().std(0) / math.sqrt(n)
    exact = vae.exact_elbo(x)
    assert ((mc - exact).abs() < 5 * standard_error).all()
    assert ((single.double().mean(0) - exact).abs() < 5 * standard_error).all()


def test_linear_vae_gap_ordering_and_zero_amortization_gap_at_the_optimal_encoder():
    vae = linear_vae(seed=1)
    x = vae.preprocess(u8_images(6, size=4))
    elbo, elbo_star, log_px = vae.exact_elbo(x), vae.optimal_elbo(x), vae.log_marginal(x)
    assert (elbo < elbo_star).all() and (elbo_star <= log_px + 1e-9).all()
    torch.testing.assert_close(vae.amortization_gap(x), elbo_star - elbo)
    # q* really is the best diagonal Gaussian: its closed-form ELBO is ELBO*, and perturbing it lowers it.
    mean, logvar = vae.optimal_posterior(x)
    torch.testing.assert_close(vae.exact_elbo(x, mean, logvar), elbo_star)
    assert (vae.exact_elbo(x, mean + 0.05, logvar) < elbo_star).all()
    assert (vae.exact_elbo(x, mean, logvar + 0.1) < elbo_star).all()
    # An encoder that computes q* exactly (it is affine in x) has zero amortization gap.
    W, b = vae.decoder.weight.detach().double(), vae.decoder.bias.detach().double()
    _, cov = vae.exact_posterior(x)
    A = cov @ W.T / 0.3 ** 2
    optimal = linear_vae(seed=1, W=W.numpy(), b=b.numpy(), enc_mean_weight=A.numpy(),
                         enc_mean_bias=(-A @ b).numpy(), enc_logvar_weight=torch.zeros(3, 16).numpy(),
                         enc_logvar_bias=logvar[0].numpy())
    assert optimal.amortization_gap(x).abs().max() < 1e-3


def test_linear_vae_with_orthogonal_decoder_has_exact_diagonal_posterior():
    W = torch.zeros(16, 3)
    W[0, 0], W[5, 1], W[10, 2] = 1.0, 2.0, 0.5  # orthogonal columns -> diagonal posterior precision
    vae = linear_vae(W=W.numpy())
    x = vae.preprocess(u8_images(3, size=4))
    torch.testing.assert_close(vae.optimal_elbo(x), vae.log_marginal(x))
    assert math.isclose(vae.exact_posterior(x)[1][0, 1].item(), 0.0, abs_tol=1e-12)
