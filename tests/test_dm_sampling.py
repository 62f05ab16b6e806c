"""The sampling core: loading any DM layout, per-index determinism, quantization, preconditioning."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from generator.edm import edm_scheduler
from generator.sampling import SamplerConfig, load_dm, sample, to_uint8, weights_sha256
from vaegen.errors import VaegenError

torch.set_num_threads(1)


def random_unet(channels=1):
    torch.manual_seed(0)
    # Small, but with an attention block so that every kernel type of a real DM is exercised.
    return UNet2DModel(sample_size=32, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def edm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm-dm")
    random_unet().save_pretrained(path)
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


@pytest.mark.parametrize("name", ["edm-heun", "dpm-solver++", "ddim"])
def test_every_sampler_is_independent_of_batch_composition(edm_dir, name):
    dm = load_dm(str(edm_dir))
    config = SamplerConfig(name=name, steps=4, chunk=4)
    several = sample(dm, [3, 4, 5, 6, 9], seed=1, config=config)  # two chunks, the second one padded
    assert several.dtype == torch.uint8 and several.shape == (5, 1, 32, 32)
    assert torch.equal(sample(dm, [5], seed=1, config=config)[0], several[2])
    assert torch.equal(sample(dm, [9], seed=1, config=config)[0], several[4])
    assert not torch.equal(several[0], several[1])  # different indices, different noise
    assert not torch.equal(sample(dm, [5], seed=2, config=config)[0], several[2])  # the seed matters


def test_heun_costs_two_evaluations_per_step_but_the_last():
    assert SamplerConfig().network_evaluations == 35
    assert SamplerConfig(name="dpm-solver++", steps=10).network_evaluations == 10


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
    for name in ("edm-heun", "dpm-solver++", "ddim"):
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
