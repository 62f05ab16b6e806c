"""Initial noise of DM samples (generator.sampling): a pure function of (noise stream, seed, index, shape).

The philox stream is checked against an independent pure-Python Philox4x64-10 (itself checked against the
Random123 known answers), for batch and process independence, for its distribution, and for a float64
transform that a second float64 implementation rounds to the same float32 values. The per-image generator
stream must stay what it always was: runs made with it resume with it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from generator.sampling import (
    DEFAULT_NOISE,
    NOISE_PER_IMAGE_GENERATOR,
    NOISE_PHILOX,
    box_muller,
    contiguous_runs,
    initial_noise,
    philox_words,
)
from vaegen.errors import VaegenError
from vaegen.seeding import PURPOSES, torch_generator

SHAPE = (1, 32, 32)
M64 = 2**64 - 1
PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)


def philox4x64_10(counter: list[int], key: list[int]) -> list[int]:
    """Random123's Philox4x64-10 in plain Python integers (Salmon et al. 2011, the reference algorithm)."""
    x, k = list(counter), list(key)
    for round_ in range(10):
        if round_:
            k = [(k[0] + PHILOX_W[0]) & M64, (k[1] + PHILOX_W[1]) & M64]
        p0, p1 = PHILOX_M[0] * x[0], PHILOX_M[1] * x[2]
        x = [(p1 >> 64) ^ x[1] ^ k[0], p1 & M64, (p0 >> 64) ^ x[3] ^ k[1], p0 & M64]
    return x


def test_the_reference_philox_gives_the_random123_known_answers():
    assert philox4x64_10([0] * 4, [0, 0]) == [0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B,
                                                0x7E68B68AEC7BA23B]
    assert philox4x64_10([M64] * 4, [M64, M64]) == [0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6,
                                                      0xA09CAEBF594F0BA0]


@pytest.mark.parametrize("index", [0, 1, 7, 2**40 + 3])
def test_image_i_owns_philox_blocks_i_times_b_onwards_under_the_key_seed_and_purpose(index):
    seed, words = 12345, 10  # 10 words: 3 blocks of 4, the last one half used
    got = philox_words(np.array([index]), seed, words)[0].tolist()
    key = [seed, PURPOSES["sample-noise"][0]]
    expected = [w for b in range(3) for w in philox4x64_10([index * 3 + b, 0, 0, 0], key)][:words]
    assert got == expected


def test_contiguous_runs_split_where_indices_jump():
    assert contiguous_runs(np.array([3, 4, 5, 9, 10, 2])) == [(3, 3), (9, 2), (2, 1)]
    assert contiguous_runs(np.array([], np.int64)) == []


@pytest.mark.parametrize("noise", [NOISE_PHILOX, NOISE_PER_IMAGE_GENERATOR])
def test_noise_rows_are_the_same_for_batch_sizes_1_7_and_64_and_any_order(noise):
    whole = initial_noise(np.arange(64), 3, SHAPE, noise)
    for batch in (1, 7, 64):
        rows = torch.cat([initial_noise(np.arange(lo, min(lo + batch, 64)), 3, SHAPE, noise)
                          for lo in range(0, 64, batch)])
        assert torch.equal(rows, whole), batch
    scattered = np.array([63, 5, 6, 7, 40, 0])
    assert torch.equal(initial_noise(scattered, 3, SHAPE, noise), whole[scattered])


@pytest.mark.slow
def test_another_process_draws_the_same_noise_rows():
    """Rank 1 of 2 (a fresh interpreter) draws the odd rows of one process's batch, byte for byte."""
    code = ("import sys, numpy as np; from generator.sampling import initial_noise; "
            "sys.stdout.buffer.write(initial_noise(np.arange(1, 64, 2), 3, (1, 32, 32)).numpy().tobytes())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    here = initial_noise(np.arange(64), 3, SHAPE)[1::2].contiguous().numpy().tobytes()
    assert other == here


def test_philox_noise_depends_on_seed_index_and_stream():
    a = initial_noise([0, 1], 0, SHAPE)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(initial_noise([0], 1, SHAPE)[0], a[0])
    assert not torch.equal(initial_noise([0], 0, SHAPE, NOISE_PER_IMAGE_GENERATOR)[0], a[0])
    assert DEFAULT_NOISE == NOISE_PHILOX


def test_philox_noise_is_standard_normal():
    """Moments and interval probabilities of 2M values, each bound about 4 standard errors wide."""
    x = initial_noise(np.arange(2048), 0, SHAPE).double()
    assert x.isfinite().all()
    assert abs(x.mean()) < 3e-3 and abs(x.std() - 1) < 2.5e-3 and abs((x**4).mean() - 3) < 0.03
    assert abs((x.abs() < 1).double().mean() - 0.682689) < 1.5e-3  # the normal CDF at 1 and 2
    assert abs((x.abs() < 2).double().mean() - 0.954500) < 7e-4
    flat = x.reshape(2048, -1)
    cos_half, sin_half = flat[:, :512], flat[:, 512:]  # the two members of each Box-Muller pair
    assert abs((cos_half * sin_half).mean()) < 4e-3  # uncorrelated
    assert abs((cos_half**2 * sin_half**2).mean() - 1) < 0.012  # and independent in their squares


def test_the_float64_transform_rounds_like_an_independent_float64_implementation():
    """numpy's float64 log/cos/sin differ from torch's in the last ulp of ~1% of the values; after rounding to
    float32 the noise must not (this is what keeps CPU and CUDA noise identical)."""
    words = philox_words(np.arange(2048), 7, 512)
    ours = box_muller(torch.from_numpy(words.view(np.int64)), 1024).numpy()
    u1 = ((words >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
    u2 = ((words & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * 2.0**-32
    radius, angle = np.sqrt(-2 * np.log(u1)), 2 * np.pi * u2
    theirs = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1).astype(np.float32)
    assert np.array_equal(ours, theirs)


def test_odd_image_sizes_use_half_a_pair_at_the_end():
    x = initial_noise([4, 5], 0, (1, 3, 3))  # 9 values: 5 words, the last sine dropped
    words = philox_words(np.array([4]), 0, 5)
    full = box_muller(torch.from_numpy(words.view(np.int64)), 10)
    assert x.shape == (2, 1, 3, 3) and torch.equal(x[0].flatten(), full[0, :9])


def test_the_per_image_generator_stream_is_unchanged():
    """Runs made with it (generation.json: "vaegen.seeding sample-noise v1") must resume with the same noise."""
    got = initial_noise([0, 9], 4, SHAPE, NOISE_PER_IMAGE_GENERATOR)
    for row, i in zip(got, (0, 9)):
        assert torch.equal(row, torch.randn(SHAPE, generator=torch_generator(4, "sample-noise", i)))


def test_unknown_stream_is_a_one_line_error():
    with pytest.raises(VaegenError, match="unknown noise stream"):
        initial_noise([0], 0, SHAPE, "v3")
