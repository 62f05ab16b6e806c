"""ADA-style augmentation: shapes and dtypes kept, images changed with the stated probability, seeded."""

import numpy as np
import pytest
import torch

from trainer.augment import NAIVE_OPS, TUNED_OPS, Augmenter, augmentation_ops
from trainer.data import AugmentedSource, RealSource

torch.set_num_threads(1)


def random_images(n, channels, seed=0):
    # Smooth random images (not symmetric, not constant): every op visibly changes them when applied.
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, channels, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False)
    return (big * 200 + 20).round().to(torch.uint8)


def changed_fraction(before, after):
    return (before != after).flatten(1).any(1).float().mean().item()


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_keeps_shape_and_dtype_and_changes_images_with_probability_p(channels):
    images = random_images(400, channels)
    for op in NAIVE_OPS:
        if channels == 1 and op in ("hue", "saturation"):
            continue
        out = Augmenter((op,), p=0.5)(images, seed=1)
        assert out.shape == images.shape and out.dtype == torch.uint8
        frac = changed_fraction(images, out)
        # Binomial(400, 0.5): 4 standard deviations is 0.1; translation by 0 px may leave a few unchanged.
        assert 0.5 - 0.12 <= frac <= 0.5 + 0.1, (op, frac)


def test_probability_zero_is_the_identity_and_one_changes_every_image():
    images = random_images(64, 3)
    ops = augmentation_ops("naive", "cifar10", 3)
    assert torch.equal(Augmenter(ops, p=0.0)(images, seed=0), images)
    assert changed_fraction(images, Augmenter(ops, p=1.0)(images, seed=0)) == 1.0


def test_naive_set_at_default_p_changes_about_one_minus_0_9_to_the_number_of_ops():
    images = random_images(1000, 3, seed=2)
    ops = augmentation_ops("naive", "cifar10", 3)
    frac = changed_fraction(images, Augmenter(ops)(images, seed=3))
    expected = 1 - 0.9 ** len(ops)  # 9 ops: 0.61
    assert abs(frac - expected) < 0.06, (frac, expected)


def test_augmentation_is_seeded_and_leaves_the_global_rng_alone():
    images = random_images(32, 1)
    aug = Augmenter(augmentation_ops("naive", "fmnist", 1), p=0.5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = aug(images, seed=7)
    assert torch.equal(torch.rand(1), before)
    assert torch.equal(a, aug(images, seed=7))
    assert not torch.equal(a, aug(images, seed=8))


def test_tuned_sets_follow_the_documented_per_dataset_choices():
    assert "flip" not in augmentation_ops("tuned", "mnist", 1)  # a mirrored digit is not a digit
    assert not {"hue", "saturation"} & set(augmentation_ops("naive", "fmnist", 1))  # no-ops on grey images
    assert "saturation" in augmentation_ops("tuned", "cifar10", 3) and "hue" not in TUNED_OPS["cifar10"]
    assert set(augmentation_ops("naive", "cifar10", 3)) == set(NAIVE_OPS)


def test_augmented_source_yields_augmented_uint8_batches_reproducibly():
    images = random_images(100, 1).numpy()
    plain = RealSource(images, 32, seed=0)
    aug = AugmentedSource(RealSource(images, 32, seed=0), Augmenter(("flip",), p=0.5))
    again = AugmentedSource(RealSource(images, 32, seed=0), Augmenter(("flip",), p=0.5))
    for epoch in range(2):
        a, b, c = (list(s.batches(epoch)) for s in (plain, aug, again))
        assert [x.shape for x in a] == [x.shape for x in b] and all(x.dtype == torch.uint8 for x in b)
        assert all(torch.equal(x, y) for x, y in zip(b, c))
        flipped = np.mean([changed_fraction(x, y) for x, y in zip(a, b)])
        assert 0.3 < flipped < 0.7
