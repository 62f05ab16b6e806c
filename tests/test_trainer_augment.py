"""Aug.Naive / Aug.Tuned: each op's parameter distribution, measured on known patterns, is Tables 8-10's."""

import json
import math

import numpy as np
import pytest
import torch

from trainer.augment import OPS, Augmenter, augmentation_ops
from trainer.data import RealSource
from vaegen.errors import VaegenError

torch.set_num_threads(1)
N = 2000  # draws per distribution check; tolerances are about 4 standard errors


def smooth_images(n, channels, seed=0):
    # Smooth random images (not symmetric, not constant): every op visibly changes them when applied.
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, channels, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False)
    return (big * 200 + 20).round().to(torch.uint8)


def constant_images(n, value):
    return torch.tensor(value, dtype=torch.uint8).view(1, -1, 1, 1).expand(n, -1, 32, 32).contiguous()


def gaussian_dots(n, centres, std=1.2):
    # Grey images with small Gaussian dots at (x, y) offsets from the image centre; their centroids survive
    # bilinear resampling, so geometry can be measured to a fraction of a pixel.
    y, x = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    image = sum(torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * std**2)) for cx, cy in centres)
    return (image * 250).round().to(torch.uint8).expand(n, 1, 32, 32).contiguous()


def centroids_of_left_and_right_halves(images):
    y, x = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    w = images[:, 0].double()
    points = []
    for half in (x < 0, x > 0):
        mass = (w * half).sum((1, 2))
        points.append(torch.stack([(w * half * x).sum((1, 2)) / mass, (w * half * y).sum((1, 2)) / mass], 1))
    return points


def log2_mass_ratio(before, after):
    # The pixel sum of a well-sampled blob scales with the determinant of the geometric map.
    return (after.double().sum((1, 2, 3)) / before.double().sum((1, 2, 3))).log2()


def changed(before, after):
    return (before != after).flatten(1).any(1)


@pytest.mark.parametrize("channels", [1, 3])
def test_probability_zero_returns_the_input_bytes(channels):
    images = smooth_images(64, channels)
    ops = augmentation_ops("naive", "cifar10" if channels == 3 else "fmnist", channels)
    assert torch.equal(Augmenter(ops, p=0.0)(images, seed=0), images)
    assert torch.equal(Augmenter(ops, p=1e-12)(images, seed=0), images)  # identity resampling is exact too


@pytest.mark.parametrize("channels", [1, 3])
def test_output_is_uint8_of_the_input_shape_and_every_image_changes_at_p_one(channels):
    images = smooth_images(64, channels)
    ops = augmentation_ops("naive", "cifar10" if channels == 3 else "mnist", channels)
    out = Augmenter(ops, p=1.0)(images, seed=0)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    assert changed(images, out).all()


def test_same_seed_same_bytes_other_seed_other_bytes_and_the_global_rng_is_untouched():
    images = smooth_images(32, 3)
    augment = Augmenter(augmentation_ops("naive", "cifar10", 3), p=0.5)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = augment(images, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a, augment(images, seed=7))
    assert not torch.equal(a, augment(images, seed=8))


@pytest.mark.parametrize("name", [op for op in OPS if op != "aniso_rotate"])
def test_each_op_changes_images_with_probability_p(name):
    images = smooth_images(1000, 3)
    frac = changed(images, Augmenter([name], p=0.3)(images, seed=1)).float().mean().item()
    expected = 0.3 * (0.5 if name in ("xflip", "yflip") else 1)  # an applied ADA flip mirrors half the time
    # Binomial(1000, 0.3): 4 standard deviations is 0.06; a few draws are too small to change a pixel.
    assert expected - 0.07 <= frac <= expected + 0.06, (name, frac)


def test_translation_is_an_integer_shift_uniform_over_minus_3_to_3_px_in_each_axis():
    images = torch.zeros(N, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 16, 16] = 255
    out = Augmenter(["translate"], p=1.0)(images, seed=0)
    assert (out.flatten(1).max(1).values == 255).all() and (out.flatten(1).sum(1) == 255).all()  # no blur
    where = out.flatten(1).argmax(1)
    for shift in (where % 32 - 16, where // 32 - 16):
        assert shift.min() == -3 and shift.max() == 3
        freq = torch.bincount(shift + 3, minlength=7).double() / N
        assert (freq - 1 / 7).abs().max() < 0.03, freq


@pytest.mark.parametrize(("reading", "log2_std"), [("std", 0.2), ("range", 0.2 / math.sqrt(3))])
def test_scale_factor_is_2_to_a_normal_with_the_tables_std(reading, log2_std):
    # "range": sigma ~ U(0, 0.2) per image, so the log2 factor's std is 0.2 / sqrt(3).
    images = gaussian_dots(N, [(0, 0)], std=2.5)
    out = Augmenter(["scale"], p=1.0, sigma_reading=reading)(images, seed=0)
    log2_scale = log2_mass_ratio(images, out) / 2
    assert abs(log2_scale.mean()) < 0.025 and abs(log2_scale.std() - log2_std) < 0.015, (log2_scale.std())


def test_rotation_angle_is_uniform_within_plus_minus_10_degrees():
    images = gaussian_dots(N, [(-7, 0), (7, 0)])
    left, right = centroids_of_left_and_right_halves(Augmenter(["rotate"], p=1.0)(images, seed=0))
    angle = torch.rad2deg(torch.atan2(right[:, 1] - left[:, 1], right[:, 0] - left[:, 0]))
    assert angle.abs().max() < 10.3 and angle.abs().max() > 9.5
    assert abs(angle.mean()) < 0.6 and abs(angle.std() - 10 / math.sqrt(3)) < 0.3  # U(-10, 10)
    assert abs((angle.abs() < 5).double().mean() - 0.5) < 0.045


def test_anisotropic_scaling_preserves_area_and_its_axis_turns_with_the_tables_probability():
    for kind, dataset, turn_probability in (("naive", "cifar10", 0.5), ("tuned", "mnist", 0.4)):
        ops = [{**op, "probability": 1.0} if op["name"] == "aniso" else op
               for op in augmentation_ops(kind, dataset, 1) if op["name"] in ("aniso", "aniso_rotate")]
        geometric, _ = Augmenter(ops).matrices(N, seed=0)
        assert torch.allclose(torch.linalg.det(geometric), torch.ones(N), atol=1e-5)
        turned = (geometric[:, 0, 1].abs() > 1e-6).double().mean()  # an axis-aligned stretch is diagonal
        assert abs(turned - turn_probability) < 0.04, (dataset, turned)

    # In pixels: a blob's mass (its area) stays put up to resampling error, where isotropic scaling moves it.
    images = gaussian_dots(N, [(0, 0)], std=2.5)
    stretched = log2_mass_ratio(images, Augmenter(["aniso", "aniso_rotate"], p=1.0)(images, seed=0))
    scaled = log2_mass_ratio(images, Augmenter(["scale"], p=1.0)(images, seed=0))
    assert abs(stretched.mean()) < 0.01 and stretched.std() < 0.02
    assert abs(scaled.std() - 2 * 0.2) < 0.03


def test_brightness_adds_a_normal_offset_with_std_0_2_in_adas_minus_1_to_1_units():
    out = Augmenter(["brightness"], p=1.0)(constant_images(N, [128]), seed=0)
    offset = (out.double().mean((1, 2, 3)) - 128) / 127.5
    assert (out == out[:, :, :1, :1]).all()  # the same offset everywhere
    assert abs(offset.mean()) < 0.018 and abs(offset.std() - 0.2) < 0.013


def test_contrast_scales_about_mid_grey_by_2_to_a_normal_with_std_0_25():
    images = constant_images(N, [64])
    images[..., 16:] = 191  # 127.5 -+ 63.5
    out = Augmenter(["contrast"], p=1.0)(images, seed=0).double()
    low, high = out[:, 0, 0, 0], out[:, 0, 0, 31]
    assert ((low + high - 255).abs() <= 1).all()  # mid-grey stays put
    log2_contrast = ((high - low) / 127).log2()
    assert abs(log2_contrast.mean()) < 0.025 and abs(log2_contrast.std() - 0.25) < 0.017


def test_hue_rotates_and_saturation_scales_around_the_grey_axis():
    images = constant_images(N, [152, 104, 128])

    def chroma(batch):  # [-1, 1] RGB minus its grey component, per image
        rgb = batch[:, :, 0, 0].double() / 127.5 - 1
        return rgb - rgb.mean(1, keepdim=True), rgb.mean(1)

    before, grey = chroma(images)
    for name in ("hue", "saturation"):
        after, grey_after = chroma(Augmenter([name], p=1.0)(images, seed=0))
        assert (grey_after - grey).abs().max() < 1 / 127.5  # rounding of the three channels only
        if name == "saturation":
            log2_s = (after.norm(dim=1) / before.norm(dim=1)).log2()
            assert abs(log2_s.mean()) < 0.045 and abs(log2_s.std() - 0.5) < 0.035
        else:
            axis = torch.ones(3, dtype=torch.double) / math.sqrt(3)
            sine, cosine = torch.linalg.cross(before, after) @ axis, (before * after).sum(1)
            angle = torch.rad2deg(torch.atan2(sine, cosine))
            assert (after.norm(dim=1) - before.norm(dim=1)).abs().max() < 0.02  # a rotation
            assert angle.abs().max() < 46 and abs(angle.std() - 45 / math.sqrt(3)) < 1.0  # U(-45, 45) degrees


def test_hue_and_saturation_are_identity_on_grey_images():
    images = smooth_images(64, 1)
    assert torch.equal(Augmenter(["hue", "saturation"], p=1.0)(images, seed=0), images)
    assert not {"hue", "saturation"} & {op["name"] for op in augmentation_ops("naive", "fmnist", 1)}


@pytest.mark.parametrize(("flip_reading", "mirrored"), [("ada", 0.5), ("always", 1.0)])
def test_cifar10_tuned_with_other_ops_off_flips_horizontally_with_probability_1(flip_reading, mirrored):
    # Table 10's flip has its own probability 1, so p=0 turns off everything else. An applied ADA flip
    # mirrors half the images; read "always", every image.
    images = smooth_images(400, 3)
    out = Augmenter(augmentation_ops("tuned", "cifar10", 3), p=0.0, flip_reading=flip_reading)(images, seed=0)
    xflipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    untouched = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert (xflipped | untouched).all()
    assert abs(xflipped.double().mean() - mirrored) < 0.1
    out = Augmenter(["yflip"], p=1.0, flip_reading="always")(images, seed=0)
    assert torch.equal(out, images.flip(-2))


def test_the_op_sets_are_tables_8_9_and_10():
    def table(kind, dataset, channels):
        ops = augmentation_ops(kind, dataset, channels)
        return {op["name"]: {key: value for key, value in op.items() if key != "name"} for op in ops}

    assert table("naive", "cifar10", 3) == {
        "xflip": {}, "translate": {"max_px": 3}, "scale": {"log2_std": 0.2}, "rotate": {"max_deg": 10.0},
        "aniso": {"log2_std": 0.2}, "aniso_rotate": {"probability": 0.5}, "brightness": {"std": 0.2},
        "contrast": {"log2_std": 0.25}, "hue": {"max_deg": 45.0}, "saturation": {"log2_std": 0.5}}
    tuned_mnist_like = {"translate": {"max_px": 3}, "scale": {"log2_std": 0.15}, "rotate": {"max_deg": 10.0},
                        "aniso": {"log2_std": 0.15}, "aniso_rotate": {"probability": 0.4}}
    for dataset in ("binary-mnist", "mnist", "fmnist"):
        assert table("tuned", dataset, 1) == tuned_mnist_like
        assert set(table("naive", dataset, 1)) == set(table("naive", "cifar10", 3)) - {"hue", "saturation"}
    assert table("tuned", "cifar10", 3) == {
        "xflip": {"probability": 1.0}, "yflip": {}, "scale": {"log2_std": 0.2}, "rotate": {"max_deg": 360.0},
        "aniso": {"log2_std": 0.2}, "aniso_rotate": {"probability": 0.5}}
    for kind, dataset in (("fancy", "mnist"), ("naive", "svhn"), ("tuned", "svhn")):
        with pytest.raises(VaegenError):
            augmentation_ops(kind, dataset, 1)


def test_describe_is_json_and_resolves_every_probability_and_parameter():
    naive = Augmenter(augmentation_ops("naive", "cifar10", 3)).describe()
    assert json.loads(json.dumps(naive)) == naive
    assert [entry["name"] for entry in naive] == [op for op in OPS if op != "yflip"]
    by_name = {entry["name"]: entry for entry in naive}
    assert by_name["translate"].items() >= {"probability": 0.1, "max_px": 3, "integer": True}.items()
    assert by_name["scale"].items() >= {"probability": 0.1, "log2_std": 0.2, "sigma_reading": "std"}.items()
    assert by_name["aniso_rotate"]["probability"] == 0.5 and by_name["xflip"]["mirror_probability"] == 0.5
    tuned = {e["name"]: e for e in Augmenter(augmentation_ops("tuned", "cifar10", 3), 0.12, 32, "range",
                                              "always").describe()}
    assert tuned["xflip"]["probability"] == 1.0 and tuned["yflip"]["probability"] == 0.12
    assert tuned["xflip"]["mirror_probability"] == 1.0 and tuned["rotate"]["max_deg"] == 360.0
    assert tuned["aniso"]["sigma_reading"] == "range"


@pytest.mark.parametrize("bad", [
    dict(ops=["shear"]), dict(ops=[{"name": "scale", "std": 0.2}]), dict(ops=["aniso_rotate"]),
    dict(ops=["scale", "scale"]), dict(ops=["scale"], p=1.5), dict(ops=["scale"], sigma_reading="uniform"),
    dict(ops=[{"name": "xflip", "probability": 2.0}]), dict(ops=["xflip"], flip_reading="sometimes"),
    dict(ops=[{"name": "translate", "max_px": 2.5}]), dict(ops=[{"name": "rotate", "max_deg": "10"}]),
])
def test_bad_configurations_are_one_line_errors(bad):
    with pytest.raises(VaegenError):
        Augmenter(**bad)


def test_wrong_images_are_one_line_errors():
    augment = Augmenter(["scale"])
    for images in (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, 1, 32, 32),
                   torch.zeros(2, 2, 32, 32, dtype=torch.uint8)):
        with pytest.raises(VaegenError):
            augment(images, seed=0)


def test_augmented_source_yields_augmented_uint8_batches_reproducibly():
    images = smooth_images(100, 1).numpy()
    plain = RealSource(images, 32, seed=0)
    aug = RealSource(images, 32, seed=0, augmenter=Augmenter(["xflip"], p=1.0))
    again = RealSource(images, 32, seed=0, augmenter=Augmenter(["xflip"], p=1.0))
    for epoch in range(2):
        a, b, c = (list(s.batches(epoch)) for s in (plain, aug, again))
        assert [x.shape for x in a] == [x.shape for x in b] and all(x.dtype == torch.uint8 for x in b)
        assert all(torch.equal(x, y) for x, y in zip(b, c))
        flipped = np.mean([changed(x, y).float().mean().item() for x, y in zip(a, b)])
        assert 0.3 < flipped < 0.7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_batches_stay_on_the_gpu_and_are_seeded():
    images = smooth_images(256, 3).cuda()
    augment = Augmenter(augmentation_ops("naive", "cifar10", 3), p=0.5)
    torch.cuda.manual_seed(123)
    expected_next = torch.rand(1, device="cuda")
    torch.cuda.manual_seed(123)
    out = augment(images, seed=3)
    assert torch.equal(torch.rand(1, device="cuda"), expected_next)  # the global CUDA RNG is untouched
    assert out.device == images.device and out.dtype == torch.uint8 and out.shape == images.shape
    again, other = augment(images, seed=3), augment(images, seed=4)
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert changed(images, out).float().mean() > 0.9  # at p = 0.5 nearly every image meets one of the ops


def test_float_output_brightness_shifts_a_black_image_by_exactly_its_drawn_offset_without_clamping():
    augment = Augmenter(["brightness"], p=1.0, output="float")
    _, colour = augment.matrices(N, seed=4)
    offset = colour[:, 0, 3]  # the drawn brightness offset, in ADA's [-1, 1] units
    out = augment(torch.zeros(N, 1, 32, 32, dtype=torch.uint8), seed=4)
    assert out.dtype == torch.float32 and (out == out[:, :, :1, :1]).all()
    torch.testing.assert_close(out[:, 0, 0, 0], offset / 2, rtol=0, atol=1e-6)  # [0, 1] units: half of it
    assert (out < 0).float().mean() > 0.4  # half the offsets darken black: nothing clamps them
    clamped = Augmenter(["brightness"], p=1.0)(torch.zeros(N, 1, 32, 32, dtype=torch.uint8), seed=4)
    assert clamped.min() == 0 and torch.equal(clamped[:, 0, 0, 0], (offset * 127.5).round().clamp(0, 255).byte())


def test_float_output_mixed_source_gives_model_inputs_with_synthetic_rows_exactly_u8_over_255(tmp_path, support):
    from trainer.data import MixedSource, open_shard_pool

    n = 40
    real = support.numbered_images(n, start=10_000)
    pool = open_shard_pool(support.shard_run(tmp_path, n, 20), "fmnist", (1, 32, 32), n, scale=1)
    source = MixedSource(real, pool, 0.5, 16, seed=0, augmenter=Augmenter(["brightness"], p=1.0, output="float"))
    plain = MixedSource(real, pool, 0.5, 16, seed=0)
    for a, b in zip(source.batches(0), plain.batches(0), strict=True):
        synthetic = torch.from_numpy(support.image_ids(b) < 10_000)
        assert a.dtype == torch.float32 and 0 < synthetic.sum() < len(b)
        assert torch.equal(a[synthetic], b[synthetic].float() / 255)  # what VAE.preprocess makes of them
        assert not torch.equal(a[~synthetic], b[~synthetic].float() / 255)
    source.close()
    plain.close()
