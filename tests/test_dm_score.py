"""`dm score`: the metrics themselves, score.json with its real-vs-real floor, and ranking of trained models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from generator.edm import edm_scheduler
from generator.sampling import SamplerConfig, sample
from generator.score import (
    ScoreConfig,
    Scorer,
    frechet_distance,
    manifold_coverage,
    nearest_two,
    score_dm,
    two_sample_accuracy,
)
from generator.train_dm import DMTrainConfig, train_dm
from vaegen.data import DEBIAN_FMNIST_DIR, build_store, store_attrs, store_path, write_store

torch.set_num_threads(1)

needs_fmnist = pytest.mark.skipif(not Path(DEBIAN_FMNIST_DIR).is_dir(), reason="needs dataset-fashion-mnist")
METRICS = ("fd", "precision", "recall", "c2st_accuracy", "nn_distance_median", "near_copy_share",
           "nn_distance_ratio_to_test")


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_mean_shift():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(x, x)) < 1e-6
    assert frechet_distance(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_precision_and_recall_separate_fidelity_from_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 2))
    collapsed = rng.normal(size=(400, 2)) * 0.1  # inside the real manifold, covering little of it
    assert manifold_coverage(collapsed, real, k=3) > 0.95  # precision: high
    assert manifold_coverage(real, collapsed, k=3) < 0.3   # recall: low
    assert manifold_coverage(real + 10, real, k=3) == 0


def test_two_sample_test_is_at_chance_for_one_distribution_and_perfect_for_disjoint_ones():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 4)), rng.normal(size=(600, 4))
    assert abs(two_sample_accuracy(a, b, seed=0) - 0.5) < 0.07
    assert two_sample_accuracy(a, b + 5, seed=0) == 1.0


def test_nearest_two_finds_copies_and_second_neighbours():
    reference = np.zeros((5, 1, 2, 2), dtype=np.uint8)
    reference[:, 0, 0, 0] = [0, 51, 102, 153, 255]
    d = nearest_two(reference[[1]], reference, chunk=2)  # chunking over the reference must not matter
    assert d[0, 0] == 0 and d[0, 1] == pytest.approx(0.2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    if not Path(DEBIAN_FMNIST_DIR).is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("data")
    build_store("fmnist", root, download=False)
    build_store("fmnist", root, subset=500, subset_seed=0, download=False)
    return root


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


def train_tiny(out, data_root, steps):
    train_dm(DMTrainConfig(dataset="fmnist", preset="tiny", subset=500, out=str(out), data_root=str(data_root),
                      max_steps=steps, checkpoint_every=steps, grid_samples=4))
    return out


def test_one_scorer_scores_every_seed_as_a_fresh_score_would(tmp_path, monkeypatch):
    """`dm frontier` reuses one Scorer across samplers and seeds: its records must be score_dm()'s, key for key."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
              for split, n in (("train", 60), ("test", 30))}
    write_store(store_path("fmnist", root=tmp_path / "data"), splits, store_attrs("fmnist"))
    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=4,
                layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "dm")
    edm_scheduler().save_pretrained(tmp_path / "dm")
    (tmp_path / "dm" / "dm.json").write_text(json.dumps({"dataset": "fmnist"}))
    configs = [ScoreConfig(dm=str(tmp_path / "dm"), data_root=str(tmp_path / "data"), n=20, seed=seed,
                           classifier_steps=2, sampler=SamplerConfig(steps=2, chunk=20)) for seed in (1, 0)]
    scorer = Scorer(configs[0])
    shared = [scorer.record(c, sample(scorer.dm, range(20), c.seed, c.sampler).numpy()) for c in configs]
    for config, record in zip(configs, shared):
        fresh = score_dm(config)
        assert record.pop("created") and fresh.pop("created")
        assert record == fresh


@pytest.mark.slow  # ~22 s: trains the score classifier on all of FashionMNIST
@needs_fmnist
def test_score_json_reports_every_metric_and_the_real_vs_real_floor(data_root, isolated_cache, tmp_path):
    dm = train_tiny(tmp_path / "dm", data_root, steps=2)
    result = score_dm(ScoreConfig(dm=str(dm), data_root=str(data_root), n=40, classifier_steps=5,
                               sampler=SamplerConfig(steps=2, chunk=40)))
    written = json.loads((dm / "score.json").read_text())
    assert written["summary"] == result["summary"] and written["n"] == 40 and written["subset"] == 500
    for metric in METRICS:
        assert np.isfinite(written["samples"][metric]) and np.isfinite(written["floor_real_test_vs_train"][metric])
    assert written["dm"]["sha256"] and written["feature_classifier"]["steps"] == 5
    assert written["feature_classifier"]["cache_file"].startswith("score-classifier/")  # no machine paths
    assert written["network_evaluations"] == 3 and "code_version" in written


@pytest.mark.slow
@needs_fmnist
def test_score_ranks_a_longer_trained_model_above_a_barely_trained_one_on_every_metric(
        data_root, isolated_cache, tmp_path):
    config = dict(data_root=str(data_root), n=200, classifier_steps=200, sampler=SamplerConfig(steps=6))
    barely = score_dm(ScoreConfig(dm=str(train_tiny(tmp_path / "barely", data_root, 5)), **config))
    longer = score_dm(ScoreConfig(dm=str(train_tiny(tmp_path / "longer", data_root, 250)), **config))
    worse, better = barely["samples"], longer["samples"]
    assert better["fd"] < worse["fd"]
    assert better["precision"] > worse["precision"]
    assert better["recall"] > worse["recall"]
    assert better["c2st_accuracy"] < worse["c2st_accuracy"]
    # Fidelity of the pixel-space neighbours: nearer to how far new real images lie from D_train.
    assert abs(np.log(better["nn_distance_ratio_to_test"])) < abs(np.log(worse["nn_distance_ratio_to_test"]))
    floor = longer["floor_real_test_vs_train"]
    assert floor["fd"] < better["fd"] and abs(floor["c2st_accuracy"] - 0.5) < 0.1


@pytest.mark.slow
def test_two_fresh_processes_build_the_same_feature_classifier(tmp_path, support):
    """The classifier's cache key is its training data and steps: its initial weights must be seeded too."""
    import subprocess
    import sys

    support.store(tmp_path / "data", n_train=64, n_test=16)
    program = ("import hashlib, sys; from generator.score import feature_classifier; from vaegen.data import cache_dir\n"
               f"feature_classifier('fmnist', {str(tmp_path / 'data')!r}, steps=2)\n"
               "print(*(hashlib.sha256(p.read_bytes()).hexdigest() for p in "
               "sorted((cache_dir() / 'score-classifier').glob('*.safetensors'))))")
    weights = []
    for run in ("a", "b"):
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"cache-{run}"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        weights.append(done.stdout.split())
    assert weights[0] == weights[1] and len(weights[0]) == 1
