"""ADA-style augmentation of uint8 image batches (the paper's Aug.Naive and Aug.Tuned baselines), with kornia.

Each op is applied to each image independently with probability p (default 0.1, as in the paper). Batches are
converted to [0, 1] floats, augmented, and quantized back to uint8, so augmented data looks like every other
source to the rest of the trainer. Randomness comes only from the seed passed per batch, so a run (and its
resume) is reproducible.

Op strengths follow ADA (Karras et al. 2020) where the task statement leaves them open: translation up to
3 px (integer, nearest sampling), isotropic scaling in [0.8, 1.25], anisotropic scaling with independent
x/y factors in [0.8, 1.25], rotation up to 10 degrees, additive brightness +-0.2, contrast x[0.7, 1.4],
hue +-0.1 turn, saturation x[0.7, 1.4]. Geometric ops pad by reflection, as ADA does.

Tuned sets (we could not recall the paper's tables 8-10 exactly; these are our choices, one line of reasoning
each):
    fmnist        flip, translate, scale, brightness, contrast: garments are left-right symmetric, positioned
                  and sized slightly differently, photographed under different exposure; no rotation
                  (the catalogue images are all upright) and no colour ops (grey images).
    mnist         translate, scale, aniso_scale, rotate: handwriting varies in position, size, aspect and
                  slant; no flips (a mirrored 2 or 7 is not a digit) and no intensity or colour ops (ink is
                  near-binary).
    binary-mnist  as mnist (the Bernoulli binarization already randomizes intensities).
    cifar10       flip, translate, scale, rotate, brightness, contrast, saturation: natural photos are
                  mirror-symmetric and vary in framing and exposure; no hue (it changes object colours
                  unnaturally, e.g. blue horses) and no anisotropic scaling (distorts shapes).
Hue and saturation leave grey images unchanged, so they are left out for 1-channel datasets.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch

from vaegen.errors import VaegenError

NAIVE_OPS = ("flip", "translate", "scale", "aniso_scale", "rotate", "brightness", "contrast", "hue", "saturation")
TUNED_OPS = {
    "fmnist": ("flip", "translate", "scale", "brightness", "contrast"),
    "mnist": ("translate", "scale", "aniso_scale", "rotate"),
    "binary-mnist": ("translate", "scale", "aniso_scale", "rotate"),
    "cifar10": ("flip", "translate", "scale", "rotate", "brightness", "contrast", "saturation"),
}
COLOUR_OPS = ("hue", "saturation")
SCALE_RANGE = (0.8, 1.25)


def make_op(name: str, p: float, image_size: int) -> K.AugmentationBase2D:
    shift = 3 / image_size
    if name == "flip":
        return K.RandomHorizontalFlip(p=p)
    if name == "translate":
        return K.RandomTranslate((-shift, shift), (-shift, shift), resample="nearest",
                                 padding_mode="reflection", p=p)
    if name == "scale":
        return K.RandomAffine(degrees=0, scale=SCALE_RANGE, padding_mode="reflection", p=p)
    if name == "aniso_scale":
        return K.RandomAffine(degrees=0, scale=(*SCALE_RANGE, *SCALE_RANGE), padding_mode="reflection", p=p)
    if name == "rotate":
        return K.RandomAffine(degrees=10.0, padding_mode="reflection", p=p)
    if name == "brightness":
        return K.RandomBrightness(brightness=(0.8, 1.2), p=p)
    if name == "contrast":
        return K.RandomContrast(contrast=(0.7, 1.4), p=p)
    if name == "hue":
        return K.RandomHue(hue=(-0.1, 0.1), p=p)
    if name == "saturation":
        return K.RandomSaturation(saturation=(0.7, 1.4), p=p)
    raise VaegenError(f"unknown augmentation op {name!r}; choose from {', '.join(NAIVE_OPS)}")


def augmentation_ops(kind: str, dataset: str, channels: int) -> tuple[str, ...]:
    """The op names of the `naive` or `tuned` set for a dataset."""
    if kind == "naive":
        ops = NAIVE_OPS
    elif kind == "tuned":
        if dataset not in TUNED_OPS:
            raise VaegenError(f"no tuned augmentation set for {dataset!r}; use --augment naive")
        ops = TUNED_OPS[dataset]
    else:
        raise VaegenError(f"unknown augmentation {kind!r}; choose naive or tuned")
    return tuple(op for op in ops if channels == 3 or op not in COLOUR_OPS)


class Augmenter:
    """uint8 (B, C, H, W) -> augmented uint8 batch of the same shape, seeded per call."""

    def __init__(self, ops: tuple[str, ...], p: float = 0.1, image_size: int = 32):
        if not 0 <= p <= 1:
            raise VaegenError(f"augmentation probability must be in [0, 1], got {p}")
        self.ops, self.p = tuple(ops), p
        self.pipeline = K.AugmentationSequential(*(make_op(op, p, image_size) for op in ops))

    def __call__(self, images_u8: torch.Tensor, seed: int) -> torch.Tensor:
        devices = [images_u8.device] if images_u8.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # kornia draws from the global RNG; keep it untouched
            torch.manual_seed(seed)
            out = self.pipeline(images_u8.float() / 255)
        return (out * 255).round().clamp(0, 255).to(torch.uint8)
