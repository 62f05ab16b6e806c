"""Means with 95% normal confidence intervals: how every number in gaps.json is summarized."""

from __future__ import annotations

import math

import numpy as np


def _ci(mean: float, se: float | None) -> list[float] | None:
    return None if se is None else [mean - 1.96 * se, mean + 1.96 * se]


def mean_ci(values) -> dict:
    """Mean with a 95% normal confidence interval over independent values (none from a single value)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    mean = float(v.mean())
    return {"mean": mean, "se": se, "ci95": _ci(mean, se), "n": len(v)}


def difference_ci(a, b) -> dict:
    """mean(a) - mean(b) for independent samples, with a 95% confidence interval."""
    ma, mb = mean_ci(a), mean_ci(b)
    gap = ma["mean"] - mb["mean"]
    se = None if None in (ma["se"], mb["se"]) else math.sqrt(ma["se"] ** 2 + mb["se"] ** 2)
    return {"gap": gap, "se": se, "ci95": _ci(gap, se)}
