"""Every random stream in vaegen, by name: one seed per (user seed, purpose, keys).

A stage never invents a seed of its own (`seed + 1`, `seed * 1000 + k`): it asks for a stream by purpose,

    derive(seed, "vae-reparam", epoch, rank, batch)        # a 63-bit int
    torch_generator(seed, "eval-attack-start", i)          # a seeded torch.Generator
    numpy_rng(seed, "eval-subsample", SUBSAMPLE["test"])   # a seeded numpy Generator

Each purpose has a fixed id and a fixed number of keys, and the id and key count enter numpy's SeedSequence
ahead of the keys, so two purposes (or one purpose with other keys) never share a stream -- not even when the
user's seeds differ by one, which is what `seed + 1` schemes get wrong. Ids are never reused or renumbered:
renumbering would silently change every result.
"""

from __future__ import annotations

import numpy as np

# purpose -> (id, number of keys after the seed). Add new purposes at the end with a new id.
PURPOSES: dict[str, tuple[int, int]] = {
    # data
    "data-subset": (0, 1),             # the balanced --subset: permutation of each class (class,)
    # generator
    "sample-noise": (1, 1),            # initial noise of DM sample i: (index,)
    "dm-init": (2, 0),                 # the UNet's initial weights
    "dm-data-order": (3, 1),           # per-epoch permutation of D_train: (epoch,)
    "dm-train-noise": (4, 2),          # sigma and noise of a training step: (step, rank)
    "score-subsample": (5, 1),         # which real images `dm score` compares with: (which,)
    "score-classifier": (6, 0),        # the feature classifier's init and batches
    "score-two-sample": (7, 0),        # the two-sample test's split
    # trainer
    "vae-init": (20, 0),               # the VAE's initial weights
    "vae-binarize": (21, 3),           # binary-mnist: Bernoulli draws of a training batch (epoch, rank, batch)
    "vae-reparam": (22, 3),            # reparameterization noise of a training batch (epoch, rank, batch)
    "vae-log-binarize": (23, 3),       # binarization of the logged ELBO's images (split, rank, first image)
    "vae-log-reparam": (24, 3),        # noise of the logged ELBO (split, rank, first image)
    "vae-log-subsample": (25, 1),      # --eval-images subsample: (split,)
    "shard-assignment": (26, 1),       # which process reads which shard piece: (epoch,)
    "batch-order": (27, 2),            # order of an epoch's images on a process: (epoch, rank)
    "real-epoch-sample": (28, 1),      # which real images an epoch (or its real part) uses: (epoch,)
    "augment": (29, 3),                # augmentation draws of a batch: (epoch, rank, batch)
    "real-pool-pass": (30, 1),         # --epoch-size: permutation of pass p over the real pool: (pass,)
    "vae-mollify": (31, 3),            # Aug.Mollify: input noise of a batch (epoch, rank, batch)
    "vae-rha-sample": (32, 3),         # RHA: z ~ p(z), x ~ p(x|z) for a batch (epoch, rank, batch)
    "vae-validation-split": (33, 0),   # early stopping: which D_train images are held out
    # evaluator
    "eval-subsample": (40, 1),         # seeded subsets of the evaluated images: (SUBSAMPLE[...],)
    "eval-binarize": (41, 1),          # binary-mnist: one binarization per split for the evaluation: (split,)
    "eval-elbo": (42, 1),              # Monte Carlo noise of the ELBO of G_g: (split,)
    "eval-qstar": (43, 0),             # q* optimization and ELBO* noise
    "eval-attack-start": (44, 1),      # random start of attack seed i: (i,)
    "eval-iwae": (45, 1),              # IWAE proposals: (split,)
    "eval-probe-split": (46, 0),       # which half of D_test fits the probes
    # studies
    "report-bootstrap": (60, 0),       # bootstrap resamples of seeds in a study report
    "report-permutation": (61, 0),     # random pairings of a rank correlation's permutation test (n! > 9999)
}

SPLIT = {"train": 0, "test": 1, "validation": 2}
# What an evaluation subsample is for (the key of "eval-subsample").
SUBSAMPLE = {"train": 0, "test": 1, "amortization": 2, "robustness": 3, "iwae-train": 4, "iwae-test": 5,
             "probe-train": 6, "smoothness": 7}
_WORD = 1 << 32


def derive(seed: int, purpose: str, *keys: int) -> int:
    """The 63-bit seed of stream `purpose` under the user's `seed` (see the module docstring)."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown seed purpose {purpose!r}; add it to vaegen.seeding.PURPOSES")
    pid, arity = PURPOSES[purpose]
    if len(keys) != arity:
        raise ValueError(f"seed purpose {purpose!r} takes {arity} key(s), got {len(keys)}")
    words = [int(seed), *map(int, keys)]
    if any(not 0 <= w < _WORD for w in words):  # a larger int would span two words and could alias others
        raise ValueError(f"seeds and keys must be in [0, 2^32), got {words}")
    state = np.random.SeedSequence([pid, arity, *words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def torch_generator(seed: int, purpose: str, *keys: int, device="cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(derive(seed, purpose, *keys))


def numpy_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive(seed, purpose, *keys))
