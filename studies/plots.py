"""The study report's figures: matplotlib, headless (Agg), one PNG per figure, from `Run`s alone."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from studies.results import Run, mean_sd

GAP_KEYS = ("G_g", "G_a", "G_r")
GAP_TITLES = {"G_g": "generalization gap G_g (nats)", "G_a": "amortization gap G_a (nats)",
              "G_r": "robustness gap G_r (MS-SSIM)"}
ALL_OUTCOMES = (("test_elbo", "test ELBO (nats per image)"), *GAP_TITLES.items())


def figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_elbo_curves(groups: dict[str, list[Run]], path: Path) -> None:
    plt, fig, ax = figure(figsize=(8, 5))
    for i, (label, members) in enumerate(groups.items()):
        curves = [m.metrics for m in members if m.metrics]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        epochs = [p["epoch"] for p in curves[0][:length]]
        for key, style in (("train_elbo", "--"), ("test_elbo", "-")):
            y = np.mean([[p[key] for p in c[:length]] for c in curves], axis=0)
            ax.plot(epochs, y, style, color=f"C{i % 10}", label=f"{label} ({key.split('_')[0]})")
    ax.set(xlabel="effective epoch (multiples of |D_train|)", ylabel="ELBO (nats per image)",
           title="ELBO on real train (dashed) and test (solid) data during training")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def plot_gaps(groups: dict[str, list[Run]], path: Path) -> None:
    plt, fig, axes = figure(1, 3, figsize=(14, 4.5))
    labels = list(groups)
    for ax, key in zip(axes, GAP_KEYS):
        stats = [mean_sd([m.results.get(key) for m in groups[label]]) for label in labels]
        ax.bar(range(len(labels)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
               color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(GAP_TITLES[key])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Gaps per method (bars: mean over seeds; error bars: standard deviation across seeds)")
    save_figure(plt, fig, path)


def plot_gap_curves(groups: dict[str, list[Run]], path: Path) -> None:
    """G_g (from the logged ELBOs), G_a and G_r (from the snapshots) against effective epoch, per method."""
    plt, fig, axes = figure(1, 3, figsize=(15, 4.5))
    for i, (label, members) in enumerate(groups.items()):
        color = f"C{i % 10}"
        logged = [m.metrics for m in members if m.metrics]
        if logged:
            length = min(len(c) for c in logged)
            axes[0].plot([p["epoch"] for p in logged[0][:length]],
                         np.mean([[p["generalization_gap"] for p in c[:length]] for c in logged], axis=0),
                         color=color, label=label)
        for ax, gap in zip(axes[1:], ("amortization", "robustness")):
            by_epoch = defaultdict(list)
            for m in members:
                for c in m.curves:
                    if c["gap"] == gap:
                        by_epoch[c["epoch"]].append(c["mean"])
            if by_epoch:
                epochs = sorted(by_epoch)
                stats = [mean_sd(by_epoch[e]) for e in epochs]
                ax.errorbar(epochs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", ms=3,
                            capsize=2, color=color, label=label)
    for ax, key in zip(axes, GAP_KEYS):
        ax.set(xlabel="effective epoch", title=GAP_TITLES[key])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Gaps during training (mean over seeds; G_g from the ELBOs logged with one Monte Carlo sample, "
                 "G_a and G_r measured on model snapshots; error bars: sd across seeds)")
    save_figure(plt, fig, path)


def plot_smoothness(groups: dict[str, list[Run]], path: Path) -> None:
    plt, fig, ax = figure(figsize=(8, 5))
    for i, (label, members) in enumerate(groups.items()):
        curves = [m.smoothness["mean_curve"] for m in members if m.smoothness]
        if curves:
            alphas = next(m.smoothness["alphas"] for m in members if m.smoothness)
            ax.plot(alphas, np.mean(curves, axis=0), marker="o", ms=3, color=f"C{i % 10}", label=label)
    ax.set(xlabel="alpha (z_alpha = alpha z_0 + (1 - alpha) z_1)", ylabel="log q(z_alpha | x~_alpha)",
           title="Latent smoothness: mean over test pairs (higher and flatter = smoother)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def plot_vs(runs: list[Run], x_of, xlabel: str, path: Path, series_of=lambda r: r.method,
            reference: list[Run] | None = None, logx: bool = True,
            keys=None) -> None:
    """Test ELBO and the gaps against a swept quantity, one line per series (mean over seeds, sd error bars)."""
    keys = keys or ALL_OUTCOMES
    plt, fig, axes = figure(1, len(keys), figsize=(5 * len(keys), 4.5))
    by_series = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if x_of(r) is not None and r.finished:
            by_series[series_of(r)][x_of(r)].append(r)
    for ax, (key, ylabel) in zip(np.atleast_1d(axes), keys):
        for i, (series, points) in enumerate(sorted(by_series.items(), key=lambda kv: str(kv[0]))):
            xs = sorted(points)
            stats = [mean_sd([r.results.get(key) for r in points[x]]) for x in xs]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", ms=4, capsize=3,
                        color=f"C{i % 10}", label=str(series))
        if reference:
            m, sd = mean_sd([r.results.get(key) for r in reference])
            if not math.isnan(m):
                ax.axhline(m, color="k", ls="--", label="Normal (train on D_train)")
                ax.axhspan(m - sd, m + sd, color="k", alpha=0.08)
        if logx:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_figure(plt, fig, path)
