"""Downstream probes on posterior means (the paper's Table 11) and reconstruction PSNR (beyond the paper).

A probe is fitted on the posterior means of one seeded half of D_test and scored on the other half, as the
paper does (`evaluator.evaluate.measure_probes` makes the split; `--probe-split train-test` fits on D_train and
scores on D_test instead): how much class information the encoder keeps, and how linearly it keeps it. Features
are standardized inside each pipeline (the SVMs and kNN are scale-sensitive; posterior means of different VAEs
have very different scales).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm


def make_probes(seed: int) -> dict:
    return {
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "linear_svm": make_pipeline(StandardScaler(), LinearSVC(random_state=seed)),
        "rbf_svm": make_pipeline(StandardScaler(), SVC(kernel="rbf", random_state=seed)),
        "knn5": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5)),
    }


def probe_accuracies(fit_features: np.ndarray, fit_labels: np.ndarray, score_features: np.ndarray,
                     score_labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Accuracy on (score_features, score_labels) of each probe fitted on (fit_features, fit_labels). The fits run on one BLAS/OpenMP
    thread: a multi-threaded BLAS sums in another order, and the logistic regression turned that into 2 of 5000
    images between evaluations of the same VAE with 1 and 2 threads (a --jobs study gives each job fewer). On one
    thread the accuracies are the same however many threads the evaluation has."""
    scores = {}
    with threadpool_limits(limits=1):
        for name, probe in tqdm(make_probes(seed).items(), desc="probes", unit="probe", leave=False):
            probe.fit(fit_features, fit_labels)
            scores[name] = float((probe.predict(score_features) == score_labels).mean())
    return scores


def psnr(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB for pixels in [0, 1] -> (B,); inf for a perfect match."""
    mse = (x.float() - x_rec.float()).square().flatten(1).mean(1)
    return -10 * torch.log10(mse)
