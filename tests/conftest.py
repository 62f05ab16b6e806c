"""Fixtures shared by the tests: tiny dataset stores, tiny diffusion models and tiny shard runs, each written
through the project's own writers (`vaegen.data.write_store`, `vaegen.shardformat.write_run`), so the tests
exercise the same file contracts the stages use. Factories are fixtures, so no test imports from another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vaegen.data import store_attrs, store_path, write_store
from vaegen.shardformat import write_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests are small: one thread each is fastest and keeps the suite from oversubscribing the cores."""
    torch.set_num_threads(1)


def smooth_images(n: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, C, 32, 32) images made of 4x4 blocks: something a VAE can learn in a few steps."""
    coarse = rng.integers(0, 256, (n, channels, 8, 8)).astype(np.uint8)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


def write_tiny_store(root, dataset: str = "fmnist", n_train: int = 48, n_test: int = 24, subset: int | None = None,
                     subset_seed: int = 0, seed: int = 0, channels: int | None = None) -> Path:
    """A store in the layout `vaegen data` writes, with seeded smooth images and labels 0..9 cycling."""
    attrs = store_attrs(dataset, subset={"n": subset, "seed": subset_seed} if subset else None)
    channels = channels or attrs["channels"]
    attrs["channels"] = channels
    rng = np.random.default_rng(seed)
    splits = {split: (smooth_images(n, channels, rng), (np.arange(n) % 10).astype(np.uint8))
              for split, n in (("train", n_train), ("test", n_test))}
    return write_store(store_path(dataset, subset, subset_seed, root), splits, attrs)


def write_tiny_dm(root, channels: int = 1, seed: int = 0, widths=(8, 16)) -> Path:
    """A randomly initialised EDM-preconditioned diffusers UNet2DModel directory (no dm.json: a foreign DM)."""
    from diffusers import UNet2DModel

    from generator.edm import edm_scheduler

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, in_channels=channels, out_channels=channels, block_out_channels=widths,
                       layers_per_block=1, norm_num_groups=4 if widths[0] % 8 else 8,
                       down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths))
    unet.save_pretrained(root)
    edm_scheduler().save_pretrained(root)
    return Path(root)


def numbered_images(n: int, channels: int = 1, start: int = 0) -> np.ndarray:
    """uint8 images whose pixels (0, 0, 0..3) encode the sample index, so a batch says which samples it holds."""
    images = np.zeros((n, channels, 32, 32), np.uint8)
    idx = np.arange(start, start + n)
    for k in range(4):
        images[:, 0, 0, k] = (idx >> (8 * k)) & 255
    return images


def image_ids(batch) -> np.ndarray:
    """The sample indices `numbered_images` encoded in a batch."""
    pixels = np.asarray(batch)[:, 0, 0, :4].astype(np.int64)
    return sum(pixels[:, k] << (8 * k) for k in range(4))


def write_shard_run(run_dir, n_samples: int, shard_size: int, dataset: str = "fmnist", channels: int = 1,
                    n_train: int | None = None) -> Path:
    """A complete shard run of `numbered_images` (the shard contract's own writer, without a DM)."""
    return write_run(run_dir, numbered_images(n_samples, channels), shard_size,
                     {"dataset": dataset, "subset": None, "n_train": n_train},
                     {"sampler": "test", "dm_sha256": "0" * 64})


class RecordingVAE:
    """The real VAE, plus a record of every image the attack asks it to encode."""

    def __init__(self, vae):
        self.vae, self.seen = vae, []

    def encode(self, x):
        self.seen.append(x.detach().clone())
        return self.vae.encode(x)


class Support:
    """The factories above, as one fixture: `support.store(root, ...)`, `support.dm(root)`,
    `support.shard_run(run_dir, n, shard_size)`, `support.numbered_images(n)`, `support.image_ids(batch)`,
    `support.recording_vae(vae)`."""

    store = staticmethod(write_tiny_store)
    dm = staticmethod(write_tiny_dm)
    shard_run = staticmethod(write_shard_run)
    numbered_images = staticmethod(numbered_images)
    image_ids = staticmethod(image_ids)
    smooth_images = staticmethod(smooth_images)
    recording_vae = RecordingVAE


@pytest.fixture(scope="session")
def support() -> Support:
    return Support()


@pytest.fixture
def memory_url():
    """A run location on object storage, fsspec's in-process memory:// store (a real S3 server: tests/test_s3.py):
    memory://bucket/<fresh prefix>/run, removed afterwards."""
    import uuid

    import fsspec

    prefix = f"/bucket/{uuid.uuid4().hex[:8]}"
    yield f"memory:/{prefix}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
