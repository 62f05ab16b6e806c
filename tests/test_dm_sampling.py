"""The sampling core: loading any DM layout, per-index determinism, quantization, preconditioning, and that
every sampler solves the same ODE at the cost it claims."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel, UniPCMultistepScheduler

from generator.edm import edm_denoise, edm_scheduler
from generator.sampling import (
    SAMPLERS,
    SamplerConfig,
    denoiser_sample,
    heun_sample,
    initial_noise,
    karras_sigmas,
    load_dm,
    sample,
    scheduler_sample,
    solve,
    to_uint8,
    unipc_scheduler,
    weights_sha256,
)
from vaegen.errors import VaegenError

torch.set_num_threads(1)


def random_unet(channels=1, size=32):
    torch.manual_seed(0)
    # Small, but with an attention block so that every kernel type of a real DM is exercised.
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def edm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm-dm")
    random_unet().save_pretrained(path)
    edm_scheduler().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_edm_dir(tmp_path_factory):
    """16x16 images: the ODE-convergence tests need hundreds of network evaluations."""
    path = tmp_path_factory.mktemp("small-edm-dm")
    random_unet(size=16).save_pretrained(path)
    edm_scheduler().save_pretrained(path)
    return path


def write_pipeline(path, prediction_type="epsilon", unet_class="UNet2DModel"):
    random_unet().save_pretrained(path / "unet")
    DDPMScheduler(prediction_type=prediction_type).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", unet_class], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return path


def test_image_is_the_same_sampled_alone_or_in_a_batch_of_64(edm_dir):
    dm = load_dm(str(edm_dir))
    config = SamplerConfig(steps=4)  # fewer steps than the paper's 18: determinism does not depend on them
    batch = sample(dm, np.arange(64), seed=7, config=config)
    for i in (0, 37, 63):
        assert torch.equal(sample(dm, [i], seed=7, config=config)[0], batch[i])


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_is_deterministic_and_independent_of_batch_composition(edm_dir, name):
    dm = load_dm(str(edm_dir))
    config = SamplerConfig(name=name, steps=4, chunk=4)
    several = sample(dm, [3, 4, 5, 6, 9], seed=1, config=config)  # two chunks, the second one padded
    assert several.dtype == torch.uint8 and several.shape == (5, 1, 32, 32)
    assert torch.equal(sample(dm, [3, 4, 5, 6, 9], seed=1, config=config), several)
    assert torch.equal(sample(dm, [5], seed=1, config=config)[0], several[2])
    assert torch.equal(sample(dm, [9], seed=1, config=config)[0], several[4])
    assert not torch.equal(several[0], several[1])  # different indices, different noise
    assert not torch.equal(sample(dm, [5], seed=2, config=config)[0], several[2])  # the seed matters


def test_heun_rounds_exactly_as_edm_algorithm_1_written_out(edm_dir):
    """The in-place Heun loop with cached preconditioning constants gives, bit for bit, EDM's Algorithm 1 as
    written (out-of-place, `edm_denoise` from the scheduler at every call): runs made before the rewrite resume
    with the same bytes."""
    dm = load_dm(str(edm_dir))
    config = SamplerConfig(steps=4)
    noise = initial_noise(np.arange(3), 0, (1, 32, 32))

    def denoise(x, sigma):
        return edm_denoise(dm.unet, dm.edm, x, sigma)

    with torch.inference_mode():
        sigmas = karras_sigmas(dm, config).tolist()
        x = noise * sigmas[0]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            d = (x - denoise(x, sigma)) / sigma
            x_next = x + (sigma_next - sigma) * d
            if sigma_next > 0:
                d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)
            x = x_next
        assert torch.equal(heun_sample(dm, noise, config), x)
        assert torch.equal(dm.denoise(noise * 3, 2.5), denoise(noise * 3, 2.5))


def test_heun_costs_two_evaluations_per_step_but_the_last():
    assert SamplerConfig().network_evaluations == 35
    for name in SAMPLERS[1:]:
        assert SamplerConfig(name=name, steps=10).network_evaluations == 10


@pytest.mark.parametrize("kind", ["edm", "vp"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_network_evaluations_count_the_actual_unet_calls(edm_dir, tmp_path, kind, name):
    dm = load_dm(str(edm_dir if kind == "edm" else write_pipeline(tmp_path)))
    calls = []
    dm.unet.register_forward_hook(lambda *_: calls.append(1))
    config = SamplerConfig(name=name, steps=5, chunk=2)
    sample(dm, [0, 1], seed=0, config=config)  # one chunk: one call per evaluation
    assert len(calls) == config.network_evaluations


@pytest.fixture(scope="module")
def ode_reference(small_edm_dir):
    """Heun at 60 steps (119 evaluations) from two noise images: the ODE solution the others must approach."""
    dm = load_dm(str(small_edm_dir))
    noise = initial_noise([0, 1], seed=0, shape=(1, 16, 16))
    with torch.inference_mode():
        return dm, noise, solve(dm, noise, SamplerConfig(steps=60))


@pytest.mark.parametrize("name", SAMPLERS[1:])
def test_every_sampler_converges_to_the_heun_solution_of_the_same_ode(ode_reference, name):
    """Many steps land ~10x closer to Heun's solution than 4 steps do, and within 0.1 of it (5% of the [-1, 1]
    range; ddim, first order, is the slowest: 0.05 with the philox noise of images 0 and 1)."""
    dm, noise, reference = ode_reference
    with torch.inference_mode():
        few = (solve(dm, noise, SamplerConfig(name=name, steps=4)) - reference).abs().max()
        many = (solve(dm, noise, SamplerConfig(name=name, steps=120)) - reference).abs().max()
    assert many < 0.1 * few and many < 0.1


def test_unipc_steps_through_the_karras_sigmas_of_the_model_range(edm_dir):
    dm, config = load_dm(str(edm_dir)), SamplerConfig(name="unipc", steps=7)
    scheduler = unipc_scheduler(dm, config)
    scheduler.set_timesteps(config.steps)
    torch.testing.assert_close(scheduler.sigmas, karras_sigmas(dm, config), rtol=1e-5, atol=0)


def test_the_denoiser_wrapper_reproduces_edm_dpm_solver_at_the_same_order(small_edm_dir):
    """UniPC's predictor at order 2 without its corrector is DPM-Solver++(2M): run in VP form on the EDM
    denoiser it must give what diffusers' EDM DPM-Solver++ gives."""
    dm, steps = load_dm(str(small_edm_dir)), 10
    noise = initial_noise([0, 1], seed=0, shape=(1, 16, 16))
    unip2 = UniPCMultistepScheduler.from_config(unipc_scheduler(dm, SamplerConfig(name="unipc")).config,
                                                solver_order=2, disable_corrector=list(range(steps)))
    sigma_max = dm.sigma_max
    with torch.inference_mode():
        edm = scheduler_sample(dm, noise, SamplerConfig(name="dpm-solver++", steps=steps))
        # diffusers' EDM schedulers start at sqrt(sigma_max^2 + 1) noise, edm-heun and the wrapper at sigma_max.
        wrapped = denoiser_sample(dm, noise * (sigma_max**2 + 1) ** 0.5 / sigma_max, unip2, steps)
    torch.testing.assert_close(wrapped, edm, rtol=0, atol=1e-4)


def test_quantization_inverts_the_real_data_mapping_and_clamps():
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(u8.float() / 127.5 - 1), u8)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_weights_hash_is_the_file_hash_and_stable_across_loads(edm_dir):
    import hashlib

    expected = hashlib.sha256((edm_dir / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert load_dm(str(edm_dir)).sha256 == expected == load_dm(str(edm_dir)).sha256 == weights_sha256(edm_dir)


def test_edm_model_is_read_as_edm_from_its_scheduler_config(edm_dir):
    dm = load_dm(str(edm_dir))
    assert (dm.kind, dm.channels, dm.image_size) == ("edm", 1, 32)
    assert (dm.sigma_min, dm.sigma_max) == (0.002, 80.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pipeline_model_denoises_like_its_own_ddpm_scheduler(tmp_path, prediction_type):
    """The VP -> EDM conversion gives the same clean-image estimate as diffusers' DDPMScheduler at a timestep."""
    dm = load_dm(str(write_pipeline(tmp_path, prediction_type)))
    assert (dm.kind, dm.prediction_type) == ("vp", prediction_type)
    ddpm = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    t = 400
    alpha_bar = ddpm.alphas_cumprod[t].item()
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    x_t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ddpm.step(dm.unet(x_t, t).sample, t, x_t).pred_original_sample
        ours = dm.denoise(x_t / alpha_bar**0.5, sigma)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_pipeline_model_samples_with_every_sampler(tmp_path):
    dm = load_dm(str(write_pipeline(tmp_path)))
    for name in SAMPLERS:
        images = sample(dm, [0, 1], seed=0, config=SamplerConfig(name=name, steps=3, chunk=2))
        assert images.shape == (2, 1, 32, 32) and images.dtype == torch.uint8


def test_unet_without_scheduler_config_is_refused(tmp_path):
    random_unet().save_pretrained(tmp_path)
    with pytest.raises(VaegenError, match="scheduler_config.json"):
        load_dm(str(tmp_path))


def test_unet_in_a_pipeline_subfolder_finds_the_scheduler_beside_it(tmp_path):
    write_pipeline(tmp_path)
    assert load_dm(str(tmp_path / "unet")).kind == "vp"


def test_conditional_pipeline_and_foreign_directories_are_refused(tmp_path):
    with pytest.raises(VaegenError, match="unconditional UNet2DModel"):
        load_dm(str(write_pipeline(tmp_path / "p", unet_class="UNet2DConditionModel")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaegenError, match="not a diffusion model directory"):
        load_dm(str(tmp_path / "empty"))
    with pytest.raises(VaegenError, match="no diffusion model at"):
        load_dm(str(tmp_path / "missing" / "dir"))


def test_weights_that_do_not_match_dm_json_are_refused(tmp_path):
    random_unet().save_pretrained(tmp_path)
    edm_scheduler().save_pretrained(tmp_path)
    (tmp_path / "dm.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    with pytest.raises(VaegenError, match="do not match dm.json"):
        load_dm(str(tmp_path))
