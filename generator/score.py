"""`vaegen dm score`: how good is p_DM, offline (no Inception weights).

Features come from a small CNN classifier that vaegen trains once on the real training split of the full
dataset store (data/<ds>.zarr) and caches under ~/.cache/vaegen/score-classifier, keyed by the store's
source-file hashes and the classifier's recipe. In that feature space, against n images of D_train (the
split the DM was trained on: a subset store if the DM's dm.json says so):

  fd          Frechet distance between Gaussian fits of the features (lower is better).
  precision   share of samples inside the k-NN manifold of real images; recall: share of real images inside
              the k-NN manifold of the samples (Kynkaanniemi et al. 2019, k = 3; higher is better).
  c2st        classifier two-sample test: a logistic regression on the features, trained on one half of
              real and synthetic images and tested on the other halves; 0.5 means indistinguishable.
In pixel space ([0, 1], L2), against all of D_train:
  memorization  median nearest-neighbour distance of samples to D_train, its ratio to the same for D_test
                (1: like fresh real data; < 1: closer to the training images than new real images are;
                > 1: off the data manifold), and the share of near-copies: samples whose nearest training
                image is at least 3x closer than the second nearest (the "1/3 rule").
Every metric is also computed for n real test images in place of the samples: the real-vs-real floor.
All of this but the samples' own metrics is a `Scorer`'s, built once: `vaegen dm frontier` scores every
(sampler, steps, seed) with one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import linalg
from torch import nn
from tqdm.auto import tqdm

from generator.sampling import SamplerConfig, load_dm, sample, sampler_record
from vaegen import dmrun
from vaegen.data import cache_dir, open_dataset
from vaegen.errors import VaegenError
from vaegen.provenance import run_record, write_json_atomic
from vaegen.seeding import SPLIT, derive, numpy_rng, torch_generator

CLASSIFIER_VERSION = 3  # bump when FeatureNet or its training changes: invalidates the cache (3: seeded init)


@dataclass(frozen=True)
class ScoreConfig:
    dm: str
    dataset: str | None = None          # None: from the DM's dm.json
    data_root: str = "data"
    n: int = 1000
    out: str | None = None              # None: <dm>/score.json
    seed: int = 0                       # sample indices 0..n-1 of this seed; also subsampling of real sets
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "cpu"
    k: int = 3                          # neighbourhood size of precision/recall
    classifier_steps: int = 800         # Adam steps of batch 128 for the feature classifier (~1.7 epochs)
    near_copy_ratio: float = 1 / 3


class FeatureNet(nn.Module):
    """A small CNN classifier; its 128-d global-pooled penultimate layer is the feature space."""

    def __init__(self, channels: int, num_classes: int = 10):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        # One conv per resolution (32, 16, 8, 4): cheap enough to train in minutes on a CPU.
        self.body = nn.Sequential(*block(channels, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                                  *block(64, 128), nn.MaxPool2d(2), *block(128, 128),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def to_float(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1], the DM's data convention."""
    return torch.as_tensor(np.asarray(images_u8)).float() / 127.5 - 1


def feature_classifier(dataset: str, data_root: str, steps: int, device: str = "cpu") -> tuple[FeatureNet, dict]:
    """The cached feature classifier of a dataset, trained on its full training split on first use."""
    from safetensors.torch import load_file, save_file

    train = open_dataset(dataset, "train", root=data_root)
    key_src = json.dumps({"sources": train.attrs.get("sources"), "steps": steps, "version": CLASSIFIER_VERSION},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir() / "score-classifier" / f"{dataset}-{key}.safetensors"
    if path.exists():
        net = FeatureNet(train.images.shape[1])
        net.load_state_dict(load_file(path))
        info = json.loads(path.with_suffix(".json").read_text())
        info.pop("path", None)  # older caches recorded this machine's absolute path
        return net.to(device).eval(), {**info, "cache_file": str(path.relative_to(cache_dir()))}

    # One classifier per dataset, seed 0: the initial weights too (the cache is keyed by the training data and
    # steps alone, so two machines must build the same network).
    torch.manual_seed(derive(0, "score-classifier"))
    net = FeatureNet(train.images.shape[1])
    generator = torch_generator(0, "score-classifier")
    images, labels = to_float(train.images), torch.as_tensor(train.labels.astype(np.int64))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    net.to(device).train()
    for _ in tqdm(range(steps), desc="feature classifier (once)", unit="step"):
        rows = torch.randint(len(images), (128,), generator=generator)
        loss = nn.functional.cross_entropy(net(images[rows].to(device)), labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    test = open_dataset(dataset, "test", root=data_root)
    with torch.inference_mode():
        logits = torch.cat([net(x.to(device)).cpu() for x in to_float(test.images).split(512)])
    accuracy = float((logits.argmax(1).numpy() == test.labels).mean())
    info = {"key": key, "cache_file": str(path.relative_to(cache_dir())), "steps": steps, "test_accuracy": accuracy,
            "version": CLASSIFIER_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.cpu().contiguous() for k, v in net.state_dict().items()}, tmp)
    write_json_atomic(path.with_suffix(".json"), info)
    os.replace(tmp, path)  # the weights last: their presence means the cache entry is complete
    return net, info


@torch.inference_mode()
def features(net: FeatureNet, images_u8, device: str = "cpu") -> np.ndarray:
    return torch.cat([net.body(x.to(device)).cpu() for x in to_float(images_u8).split(512)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (as in FID).

    tr sqrt(A B) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix sqrt(A) B sqrt(A),
    which stays real and stable when a covariance is singular (fewer samples than feature dimensions).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigval, eigvec = linalg.eigh(cov_a)
    sqrt_a = (eigvec * np.sqrt(eigval.clip(min=0))) @ eigvec.T
    tr_covmean = np.sqrt(linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point of the same set."""
    d = torch.cdist(torch.as_tensor(x), torch.as_tensor(x))
    return d.kthvalue(k + 1, dim=1).values.numpy()  # k + 1: the point itself is at distance 0


def manifold_coverage(points: np.ndarray, support: np.ndarray, k: int) -> float:
    """Share of `points` inside the union of k-NN balls around `support` (Kynkaanniemi et al. 2019)."""
    radii = torch.as_tensor(knn_radii(support, k))
    d = torch.cdist(torch.as_tensor(points), torch.as_tensor(support))
    return float((d <= radii[None, :]).any(dim=1).double().mean())


def nearest_two(queries_u8: np.ndarray, reference_u8: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(n, 2) distances of each query to its nearest and second-nearest reference image, pixels in [0, 1]."""
    q = torch.as_tensor(np.asarray(queries_u8)).reshape(len(queries_u8), -1).float() / 255
    best = torch.full((len(q), 2), float("inf"))
    for start in range(0, len(reference_u8), chunk):
        r = torch.as_tensor(np.asarray(reference_u8[start:start + chunk])).reshape(-1, q.shape[1]).float() / 255
        d = torch.cdist(q, r)
        best = torch.cat([best, d.topk(min(2, d.shape[1]), dim=1, largest=False).values], 1)
        best = best.topk(2, dim=1, largest=False).values
    return best.numpy()  # topk keeps each row sorted ascending


def two_sample_accuracy(real: np.ndarray, fake: np.ndarray, seed: int) -> float:
    """Held-out accuracy of a logistic regression telling `real` from `fake` features (0.5 = same)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = numpy_rng(seed, "score-two-sample")
    n = min(len(real), len(fake))
    real, fake = real[rng.permutation(len(real))[:n]], fake[rng.permutation(len(fake))[:n]]
    half = n // 2
    x_fit = np.concatenate([real[:half], fake[:half]])
    y_fit = np.r_[np.zeros(half), np.ones(half)]
    x_test = np.concatenate([real[half:], fake[half:]])
    y_test = np.r_[np.zeros(n - half), np.ones(n - half)]
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_fit), y_fit)
    return float(clf.score(scaler.transform(x_test), y_test))


@dataclass(frozen=True)
class Reference:
    """What one seed's scores compare with: everything about its n real images that samples never change."""

    features: np.ndarray  # of n images of D_train: the reference set of fd, precision, recall and c2st
    test_nn: np.ndarray   # distance of n real test images to their nearest D_train image
    floor: dict           # those test images scored like samples: the real-vs-real floor


class Scorer:
    """The expensive parts of `dm score` that do not depend on the samples, computed once.

    The stores, the DM, the feature classifier and, per seed, the `Reference`: `score` uses one for one seed,
    `vaegen dm frontier` one for every (sampler, steps, seed) point. Only the shared fields of `config` are
    read (not seed, sampler or out).
    """

    def __init__(self, config: ScoreConfig):
        self.config = config
        data = dmrun.training_data(config.dm, config.dataset)
        self.dataset, self.subset, self.subset_seed = data.dataset, data.subset, data.subset_seed or 0
        self.train = open_dataset(self.dataset, "train", self.subset, self.subset_seed, config.data_root)
        self.test = open_dataset(self.dataset, "test", self.subset, self.subset_seed, config.data_root)
        self.dm = load_dm(config.dm, config.device)
        if (self.dm.channels, self.dm.image_size) != tuple(self.train.images.shape[1:3]):
            raise VaegenError(f"the DM makes {self.dm.channels}x{self.dm.image_size}x{self.dm.image_size} images "
                              f"but {self.dataset} has {'x'.join(map(str, self.train.images.shape[1:]))}")
        self.n = min(config.n, len(self.train.images), len(self.test.images))
        self.net, self.classifier_info = feature_classifier(self.dataset, config.data_root,
                                                            config.classifier_steps, config.device)
        self._references: dict[int, Reference] = {}

    def reference(self, seed: int) -> Reference:
        """The reference of `seed` (its real subsets are drawn with the seed, as the samples are)."""
        if seed not in self._references:
            train_rng, test_rng = (numpy_rng(seed, "score-subsample", SPLIT[s]) for s in ("train", "test"))
            images = self.train.images[np.sort(train_rng.permutation(len(self.train.images))[:self.n])]
            real_test = self.test.images[np.sort(test_rng.permutation(len(self.test.images))[:self.n])]
            reference_features = features(self.net, images, self.config.device)
            floor, test_nn = self._compare(real_test, reference_features, seed)
            floor["nn_distance_ratio_to_test"] = 1.0
            self._references[seed] = Reference(reference_features, test_nn, floor)
        return self._references[seed]

    def _compare(self, candidate_u8: np.ndarray, reference_features: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
        """The metrics of one image set against D_train, and its nearest-neighbour distances to D_train."""
        f_cand = features(self.net, candidate_u8, self.config.device)
        nn2 = nearest_two(candidate_u8, self.train.images)
        metrics = {
            "fd": frechet_distance(f_cand, reference_features),
            "precision": manifold_coverage(f_cand, reference_features, self.config.k),
            "recall": manifold_coverage(reference_features, f_cand, self.config.k),
            "c2st_accuracy": two_sample_accuracy(reference_features, f_cand, seed),
            "nn_distance_median": float(np.median(nn2[:, 0])),
            "near_copy_share": float((nn2[:, 0] < self.config.near_copy_ratio * nn2[:, 1]).mean()),
        }
        return metrics, nn2[:, 0]

    def metrics(self, samples_u8: np.ndarray, seed: int) -> dict:
        """Every metric of samples drawn with `seed` (see the module docstring)."""
        reference = self.reference(seed)
        result, _ = self._compare(samples_u8, reference.features, seed)
        result["nn_distance_ratio_to_test"] = result["nn_distance_median"] / float(np.median(reference.test_nn))
        return result

    def record(self, config: ScoreConfig, samples_u8: np.ndarray, **extra) -> dict:
        """score.json's content for samples 0..n-1 of (config.sampler, config.seed)."""
        model, floor = self.metrics(samples_u8, config.seed), self.reference(config.seed).floor
        summary = (f"FD {model['fd']:.2f} (floor {floor['fd']:.2f})  precision {model['precision']:.3f} "
                   f"(floor {floor['precision']:.3f})  recall {model['recall']:.3f} (floor {floor['recall']:.3f})  "
                   f"C2ST {model['c2st_accuracy']:.3f} (floor {floor['c2st_accuracy']:.3f})  "
                   f"NN-distance ratio {model['nn_distance_ratio_to_test']:.3f}  "
                   f"near-copies {model['near_copy_share']:.3f} (floor {floor['near_copy_share']:.3f})")
        return run_record(
            config, dataset=self.dataset, subset=self.subset,
            subset_seed=self.subset_seed if self.subset else None, n=self.n, train_images=len(self.train.images),
            feature_classifier=self.classifier_info, **sampler_record(self.dm, config.sampler, config.seed),
            samples=model, floor_real_test_vs_train=floor, summary=summary, **extra,
        )


def score_dm(config: ScoreConfig) -> dict:
    """Score a DM (see the module docstring); writes score.json and returns its content."""
    scorer = Scorer(config)
    samples = sample(scorer.dm, range(scorer.n), config.seed, config.sampler, config.device, progress=True)
    result = scorer.record(config, samples.numpy())
    dmrun.write_score(config.dm, result, config.out)
    return result
