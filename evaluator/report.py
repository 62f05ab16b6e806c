"""`vaegen report STUDY_DIR`: report.md, CSV tables and PNG plots, built purely from the run directories.

Reads <study_dir>/study.json (optional: what was planned, where a budget stopped the study) and, for every
<study_dir>/runs/<run>/, its config.json (what was trained), model.json (parameter counts), metrics.jsonl (ELBO on
real train/test during training), eval/gaps.json (the evaluator's measurements) and eval/gap_curves.jsonl (gaps
during training). Nothing is recomputed; a run without eval/ is listed as unfinished. Each section appears when
the runs hold what it needs, whatever the study: the comparison table always; probes, latent smoothness, gap
curves, the SCALE curve, the model-size sweeps, DM quality and the real-vs-synthetic control when present.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from vaegen.errors import VaegenError
from vaegen.provenance import read_json, read_jsonl, write_text_atomic
from vaegen.vaerun import CONFIG_NAME, EVAL_DIR, GAP_CURVES_NAME, GAPS_NAME, METRICS_NAME

GAP_KEYS = ("G_g", "G_a", "G_r")
GAP_TITLES = {"G_g": "generalization gap G_g (nats)", "G_a": "amortization gap G_a (nats)",
              "G_r": "robustness gap G_r (MS-SSIM)"}
RESULT_COLUMNS = ("test_elbo", "train_elbo", "pool_elbo", "G_g", "G_a", "G_r", "iwae_test", "psnr")
PROBES = ("logistic_regression", "linear_svm", "rbf_svm", "knn5")
ALL_OUTCOMES = (("test_elbo", "test ELBO (nats per image)"), *GAP_TITLES.items())
DM_SCORE_KEYS = ("fd", "precision", "recall", "c2st_accuracy", "nn_distance_ratio_to_test")
DM_SCORE_TITLES = {"fd": "Frechet distance (lower = better)", "precision": "precision", "recall": "recall",
                   "c2st_accuracy": "two-sample classifier accuracy (0.5 = indistinguishable)",
                   "nn_distance_ratio_to_test": "NN-distance ratio to D_train (1 = like new real data)"}


@dataclass
class Run:
    name: str
    method: str                     # what was trained, e.g. "DMaaPx + RHA", "Normal + weight decay 0.001"
    seed: int
    scale: int | None
    mz: int | None
    nc: int | None
    mix_real: float | None
    metrics: list[dict]
    results: dict = field(default_factory=dict)  # RESULT_COLUMNS
    finished: bool = False
    dm: str | None = None           # the DM behind the shards
    dm_n: int | None = None         # its training-set size, when smaller than the VAE's D_train (dm-subsets)
    real_k: int | None = None       # Normal training on k*N real images at N's compute (real-vs-synthetic)
    parameters: dict = field(default_factory=dict)  # {"total", "z", "not_z"} from model.json
    curves: list[dict] = field(default_factory=list)  # eval/gap_curves.jsonl
    smoothness: dict | None = None
    probes: dict | None = None

    @property
    def label(self) -> str:
        base, _, modifiers = self.method.partition(" + ")
        if base == "DMaaPx":
            base = f"DMaaPx k={self.scale}"
        if self.real_k:
            base = f"Normal on {self.real_k}xN real"
        label = f"{base} + {modifiers}" if modifiers else base
        return f"{label}, DM on {self.dm_n} images" if self.dm_n else label


def method_of(config: dict) -> str:
    """A name for what a run trained, from its config.json alone."""
    if config.get("source") == "shards":
        mix = config.get("mix_real") or 0.0
        base = f"Mix {mix:.0%} real" if mix > 0 else "DMaaPx"
        if config.get("augment"):
            base += f" + Aug.{config['augment'].capitalize()} (real part)"
    else:
        base = {None: "Normal", "naive": "Aug.Naive", "tuned": "Aug.Tuned"}[config.get("augment")]
    modifiers = []
    if config.get("mollify"):
        if base == "Normal":
            base = "Aug.Mollify"
        else:
            modifiers.append("Mollify")
    if config.get("rha"):
        modifiers.append("RHA")
    if config.get("early_stopping_split"):
        modifiers.append("early stopping")
    if config.get("weight_decay"):
        modifiers.append(f"weight decay {config['weight_decay']:g}")
    return " + ".join([base, *modifiers])


def read_run(run_dir: Path) -> Run | None:
    if not (run_dir / CONFIG_NAME).exists():
        return None
    config = read_json(run_dir / CONFIG_NAME)
    shards = config.get("source") == "shards"
    model = config.get("model", {})
    conv = model.get("arch") == "conv"
    run = Run(run_dir.name, method_of(config), int(config.get("seed", 0)), config.get("scale") if shards else None,
              model.get("m_z") if conv else None, model.get("n_c") if conv else None,
              config.get("mix_real") if shards else None, read_jsonl(run_dir / METRICS_NAME))
    epoch_size = config.get("data", {}).get("epoch_size")
    if not shards and epoch_size and config.get("n_train", 0) > epoch_size:
        run.real_k = round(config["n_train"] / epoch_size)
    if shards:
        data = config.get("data", {})
        generation = data.get("generation", {})
        run.dm = generation.get("dm", {}).get("path")
        vae_n = data.get("pool_size", 0) // max(data.get("scale") or 1, 1)
        if generation.get("n_train") and generation["n_train"] < vae_n:
            run.dm_n = generation["n_train"]
    if (run_dir / "model.json").exists():
        run.parameters = read_json(run_dir / "model.json").get("parameters", {})
    gaps_path = run_dir / EVAL_DIR / GAPS_NAME
    if gaps_path.exists():
        gaps = read_json(gaps_path)
        run.finished = True
        r = run.results
        if "generalization" in gaps:
            r["G_g"] = gaps["generalization"]["gap"]
            r["train_elbo"] = gaps["generalization"]["elbo_train"]["mean"]
            r["test_elbo"] = gaps["generalization"]["elbo_test"]["mean"]
        if "amortization" in gaps:
            r["G_a"] = gaps["amortization"]["gap"]
        if "robustness" in gaps:
            r["G_r"] = gaps["robustness"]["gap"]
        if "log_likelihood" in gaps:
            r["iwae_test"] = gaps["log_likelihood"]["test"]["mean"]
        if "psnr" in gaps:
            r["psnr"] = gaps["psnr"]["test"]["mean"]
        # What the VAE itself trained on (synthetic samples for DMaaPx, augmented images for Aug.*): a DMaaPx run
        # can overfit its pool (small K) while G_g, measured on the real D_train, stays near zero.
        if run.metrics and "batch_elbo" in run.metrics[-1]:
            r["pool_elbo"] = run.metrics[-1]["batch_elbo"]
        run.smoothness = gaps.get("smoothness")
        run.probes = gaps.get("probes")
        run.curves = read_jsonl(run_dir / EVAL_DIR / GAP_CURVES_NAME)
    return run


def mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(mean: float, sd: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def group_key(run: Run) -> str:
    parts = [run.label]
    if run.mz is not None:
        parts.append(f"m_z={run.mz} n_c={run.nc}")
    return ", ".join(parts)


def write_tables(runs: list[Run], groups: dict[str, list[Run]], out: Path) -> None:
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "seed", "scale", "m_z", "n_c", "mix_real", "real_k", "parameters",
                    "parameters_z", "parameters_not_z", "finished", *RESULT_COLUMNS])
        for r in runs:
            w.writerow([r.name, r.method, r.seed, r.scale, r.mz, r.nc, r.mix_real, r.real_k,
                        r.parameters.get("total", ""), r.parameters.get("z", ""), r.parameters.get("not_z", ""),
                        r.finished, *(r.results.get(c, "") for c in RESULT_COLUMNS)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n_seeds", *(f"{c}_{s}" for c in RESULT_COLUMNS for s in ("mean", "sd"))])
        for label, members in groups.items():
            stats = [mean_sd([m.results.get(c) for m in members]) for c in RESULT_COLUMNS]
            w.writerow([label, len(members), *(x for pair in stats for x in pair)])


# --- plots ---------------------------------------------------------------------------------------------------

def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_elbo_curves(groups: dict[str, list[Run]], path: Path) -> None:
    plt, fig, ax = _figure(figsize=(8, 5))
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
    _save(plt, fig, path)


def plot_gaps(groups: dict[str, list[Run]], path: Path) -> None:
    plt, fig, axes = _figure(1, 3, figsize=(14, 4.5))
    labels = list(groups)
    for ax, key in zip(axes, GAP_KEYS):
        stats = [mean_sd([m.results.get(key) for m in groups[label]]) for label in labels]
        ax.bar(range(len(labels)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
               color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(GAP_TITLES[key])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Gaps per method (bars: mean over seeds; error bars: standard deviation across seeds)")
    _save(plt, fig, path)


def plot_gap_curves(groups: dict[str, list[Run]], path: Path) -> None:
    """G_g (from the logged ELBOs), G_a and G_r (from the snapshots) against effective epoch, per method."""
    plt, fig, axes = _figure(1, 3, figsize=(15, 4.5))
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
    _save(plt, fig, path)


def plot_smoothness(groups: dict[str, list[Run]], path: Path) -> None:
    plt, fig, ax = _figure(figsize=(8, 5))
    for i, (label, members) in enumerate(groups.items()):
        curves = [m.smoothness["mean_curve"] for m in members if m.smoothness]
        if curves:
            alphas = next(m.smoothness["alphas"] for m in members if m.smoothness)
            ax.plot(alphas, np.mean(curves, axis=0), marker="o", ms=3, color=f"C{i % 10}", label=label)
    ax.set(xlabel="alpha (z_alpha = alpha z_0 + (1 - alpha) z_1)", ylabel="log q(z_alpha | x~_alpha)",
           title="Latent smoothness: mean over test pairs (higher and flatter = smoother)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_vs(runs: list[Run], x_of, xlabel: str, path: Path, series_of=lambda r: r.method,
            reference: list[Run] | None = None, logx: bool = True,
            keys=None) -> None:
    """Test ELBO and the gaps against a swept quantity, one line per series (mean over seeds, sd error bars)."""
    keys = keys or ALL_OUTCOMES
    plt, fig, axes = _figure(1, len(keys), figsize=(5 * len(keys), 4.5))
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
    _save(plt, fig, path)


# --- sections ------------------------------------------------------------------------------------------------

def results_table(groups: dict[str, list[Run]]) -> list[str]:
    lines = ["## Results (mean ± sd across seeds)", "",
             "| group | seeds | test ELBO | train ELBO | ELBO on its training batches | G_g | G_a | G_r "
             "| IWAE log p(x) test | PSNR (dB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, members in groups.items():
        cells = [fmt(*mean_sd([m.results.get(c) for m in members]), digits=3 if c == "G_r" else 1)
                 for c in RESULT_COLUMNS]
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    return [*lines, "", "Nats per image summed over pixels; G_r in MS-SSIM units. Train ELBO is on the real "
            "D_train; \"its training batches\" is the mean ELBO over the last epoch's batches of what the VAE "
            "trained on (synthetic samples for DMaaPx, augmented images for Aug.*; one Monte Carlo sample, during "
            "training). Tables: `summary.csv`, `runs.csv`.", ""]


def probes_table(groups: dict[str, list[Run]]) -> list[str]:
    rows = []
    for label, members in groups.items():
        probed = [m.probes for m in members if m.probes]
        if probed:
            cells = [fmt(*mean_sd([p["accuracy"][k] for p in probed]), digits=3) for k in PROBES]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    split = next(m.probes["split"] for ms in groups.values() for m in ms if m.probes)
    how = (f"fit on a seeded half of D_test ({split['fit_images']} images) and scored on the other half "
           f"({split['score_images']})" if split["kind"] == "test-halves" else
           f"fit on {split['fit_images']} D_train images, scored on {split['score_images']} D_test images")
    return ["## Downstream probes on posterior means (accuracy, mean ± sd across seeds)", "",
            f"Classifiers {how}, as the paper does.", "",
            "| group | logistic regression | linear SVM | RBF SVM | 5-NN |", "|---|---|---|---|---|", *rows, ""]


def smoothness_table(groups: dict[str, list[Run]]) -> list[str]:
    rows = []
    for label, members in groups.items():
        s = [m.smoothness for m in members if m.smoothness]
        if s:
            rows.append(f"| {label} | {fmt(*mean_sd([x['mean_log_q']['mean'] for x in s]), 1)} | "
                        f"{fmt(*mean_sd([x['deepest_dip']['mean'] for x in s]), 1)} | "
                        f"{fmt(*mean_sd([x['roughness']['mean'] for x in s]), 2)} |")
    if not rows:
        return []
    return ["## Latent smoothness (the paper's Fig. 3)", "",
            "log q(z_alpha | x~_alpha) along the line between the posterior means of seeded pairs of test images: "
            "its mean, its deepest dip below the mean of the two endpoints (0 = no dip), and the mean squared "
            "second difference along alpha (roughness). Comparable between models of the same d_z only.", "",
            "| group | mean log q | deepest dip | roughness |", "|---|---|---|---|", *rows, ""]


def dm_table(runs: list[Run]) -> list[str]:
    """The `vaegen dm score` of every DM behind the runs (where it was scored), next to the real-data floor."""
    rows = []
    for dm in sorted({r.dm for r in runs if r.dm}):
        score = dm_score(dm)
        if score:
            got, floor = score["samples"], score["floor_real_test_vs_train"]
            rows.append(f"| `{dm}` | " + " | ".join(f"{got[k]:.3g} ({floor[k]:.3g})" for k in DM_SCORE_KEYS[:4])
                        + " |")
    if not rows:
        return []
    return ["## Diffusion models (`vaegen dm score`; real-vs-real floor in brackets)", "",
            "| DM | FD | precision | recall | two-sample classifier accuracy |", "|---|---|---|---|---|", *rows, ""]


def dm_score(dm: str) -> dict | None:
    path = Path(dm) / "score.json"
    return read_json(path) if path.exists() else None


def dm_quality_section(runs: list[Run], study_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Several DMs of one D_train: each VAE outcome against each DM score, with rank correlations."""
    from scipy.stats import spearmanr

    by_dm = defaultdict(list)
    for r in runs:
        if r.dm and r.finished and r.dm_n is None:
            by_dm[r.dm].append(r)
    scores = {dm: dm_score(dm) for dm in by_dm}
    dms = [dm for dm in by_dm if scores[dm]]
    if len(dms) < 3:
        return [], []
    outcome = {"test_elbo": "test ELBO", **{k: k for k in GAP_KEYS}}
    plt, fig, axes = _figure(len(outcome), len(DM_SCORE_KEYS), figsize=(4 * len(DM_SCORE_KEYS), 3.3 * len(outcome)))
    lines = ["## How much the DM's quality matters", "",
             "Each point is one DM (mean ± sd over its VAE seeds). Spearman rank correlation of each DM score with "
             f"each VAE outcome, over the DMs (n = {len(dms)}):", "",
             "| DM score | " + " | ".join(outcome.values()) + " |", "|---|" + "---|" * len(outcome)]
    for j, key in enumerate(DM_SCORE_KEYS):
        xs = [scores[dm]["samples"][key] for dm in dms]
        cells = []
        for i, (res, title) in enumerate(outcome.items()):
            stats = [mean_sd([r.results.get(res) for r in by_dm[dm]]) for dm in dms]
            ax = axes[i][j]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o", capsize=3)
            ax.set(xlabel=DM_SCORE_TITLES[key], ylabel=title)
            ax.grid(alpha=0.3)
            ys = [s[0] for s in stats]
            if len(set(ys)) < 2 or len(set(xs)) < 2:
                cells.append("– (constant)")
                continue
            rho, p = spearmanr(xs, ys)
            cells.append(f"{rho:+.2f} (p={p:.2g})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    _save(plt, fig, study_dir / "dm_quality.png")
    # Where quality stops mattering: successive DMs (by FD) whose test ELBOs differ by less than the seed noise.
    order = sorted(dms, key=lambda dm: -scores[dm]["samples"]["fd"])
    lines += ["", "DMs from worst to best FD, with the change in mean test ELBO to the next better DM and the "
              "seed noise (sd of the difference of two means):", "", "| DM | FD | recall | test ELBO | change | "
              "noise |", "|---|---|---|---|---|---|"]
    for a, b in zip(order, [*order[1:], None]):
        ma, sa = mean_sd([r.results.get("test_elbo") for r in by_dm[a]])
        change = noise = "–"
        if b is not None:
            mb, sb = mean_sd([r.results.get("test_elbo") for r in by_dm[b]])
            change = f"{mb - ma:+.1f}"
            noise = f"{math.sqrt(sa**2 / len(by_dm[a]) + sb**2 / len(by_dm[b])):.1f}"
        s = scores[a]["samples"]
        lines.append(f"| `{a}` | {s['fd']:.3g} | {s['recall']:.3g} | {fmt(ma, sa, 1)} | {change} | {noise} |")
    return [*lines, ""], [("DM quality against the VAE's outcome", "dm_quality.png")]


def real_vs_synthetic_section(runs: list[Run], study_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Normal training on k*N real images against DMaaPx on k*N DM samples, and DMaaPx's real-data worth."""
    real = defaultdict(list)
    synthetic = defaultdict(list)
    for r in runs:
        if not r.finished:
            continue
        if r.real_k or (r.method == "Normal" and r.scale is None and r.mz is None):
            real[r.real_k or 1].append(r.results.get("test_elbo"))
        elif r.method == "DMaaPx" and r.dm_n is None:
            synthetic[r.scale].append(r.results.get("test_elbo"))
    if len(real) < 2 or not synthetic or not any(r.real_k for r in runs):
        return [], []
    plot_vs([r for r in runs if r.finished and (r.real_k or r.method in ("Normal", "DMaaPx")) and r.mz is None],
            lambda r: r.real_k or (1 if r.method == "Normal" else r.scale), "k (pool = k x N images)",
            study_dir / "real_vs_synthetic.png",
            series_of=lambda r: "DMaaPx: k x N DM samples" if r.method == "DMaaPx" else "Normal: k x N real images")
    ks = sorted(real)
    lines = ["## A synthetic sample's worth in real images", "",
             "Normal training on k*N real images (N = |D_train|; at the same compute: N images per effective epoch, "
             "the same epochs) against DMaaPx with a pool of k*N samples of the DM trained on the N images (which "
             "never sees the extra real images). Real-data equivalent: the k at which normal training's test ELBO "
             "(interpolated linearly in log k between measured k) equals DMaaPx's, with a 95% interval from 2000 "
             "bootstrap resamples of the seeds at every k.", "",
             "| k | Normal on k x N real | DMaaPx, k x N samples | DMaaPx's real-data equivalent (k) |",
             "|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for k in sorted(set(ks) | set(synthetic)):
        cells = [fmt(*mean_sd(real[k]), 1) if k in real else "–",
                 fmt(*mean_sd(synthetic[k]), 1) if k in synthetic else "–"]
        if k in synthetic:
            point = real_equivalent(ks, [np.mean(real[x]) for x in ks], np.mean(synthetic[k]))
            boot = [real_equivalent(ks, [np.mean(rng.choice(real[x], len(real[x]))) for x in ks],
                                    np.mean(rng.choice(synthetic[k], len(synthetic[k])))) for _ in range(2000)]
            cells.append(_equivalent_text(point, boot, ks))
        else:
            cells.append("–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*lines, ""], [("Real vs synthetic data at equal compute", "real_vs_synthetic.png")]


def real_equivalent(ks: list[int], real_elbo: list[float], target: float) -> float:
    """The k where the (log-k-interpolated) real curve reaches `target`: -inf below its range, inf above."""
    logk = np.log(ks)
    for i in range(len(ks) - 1):
        lo, hi = real_elbo[i], real_elbo[i + 1]
        if min(lo, hi) <= target <= max(lo, hi) and hi != lo:
            return float(np.exp(logk[i] + (target - lo) / (hi - lo) * (logk[i + 1] - logk[i])))
    return math.inf if target > max(real_elbo) else -math.inf


def _equivalent_text(point: float, boot: list[float], ks: list[int]) -> str:
    def show(v):
        return f"> {ks[-1]}" if v == math.inf else f"< {ks[0]}" if v == -math.inf else f"{v:.2g}"

    lo, hi = np.percentile(boot, [2.5, 97.5], method="nearest")  # no interpolation: the ends may be infinite
    return f"{show(point)} [{show(lo)}, {show(hi)}]"


def overparam_section(finished: list[Run], study_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    conv = [r for r in finished if r.mz is not None]
    if len({r.mz for r in conv}) < 2 and len({r.nc for r in conv}) < 2:
        return [], []
    figures = []
    nc_counts = defaultdict(int)
    for r in conv:
        nc_counts[r.nc] += 1
    sweep_nc = max(nc_counts, key=lambda nc: len({r.mz for r in conv if r.nc == nc}))
    plot_vs([r for r in conv if r.nc == sweep_nc], lambda r: r.mz, f"m_z (latent channels; n_c = {sweep_nc})",
            study_dir / "mz.png")
    plot_vs(conv, lambda r: r.nc, "n_c (network width)", study_dir / "nc.png",
            series_of=lambda r: f"{r.method}, m_z={r.mz}")
    figures += [(f"Latent width m_z at n_c = {sweep_nc}", "mz.png"), ("Network width n_c per m_z", "nc.png")]
    # The paper's double-descent trajectory: n_c up at the smallest m_z, m_z up at sweep_nc, n_c up at the largest m_z.
    mzs = sorted({r.mz for r in conv})
    path = {(mzs[0], nc) for nc in {r.nc for r in conv} if nc <= sweep_nc} | {(mz, sweep_nc) for mz in mzs} | \
        {(mzs[-1], nc) for nc in {r.nc for r in conv} if nc >= sweep_nc}
    on_path = [r for r in conv if (r.mz, r.nc) in path and r.parameters.get("total")]
    if on_path:
        plot_vs(on_path, lambda r: r.parameters["total"], "|Theta| (parameters, along the paper's trajectory)",
                study_dir / "trajectory.png")
        figures.append(("The double-descent trajectory against |Theta|", "trajectory.png"))
    lines = ["## Model size", "",
             "Conv VAE sizes (parameters from model.json; Theta_z = the layers touching z):", "",
             "| m_z | n_c | |Theta| | |Theta_z| | |Theta_not_z| |", "|---|---|---|---|---|"]
    for (mz, nc), r in sorted({(r.mz, r.nc): r for r in conv if r.parameters}.items()):
        p = r.parameters
        lines.append(f"| {mz} | {nc} | {p['total']:,} | {p['z']:,} | {p['not_z']:,} |")
    return [*lines, ""], figures


def reading(groups: dict[str, list[Run]], normal: list[Run]) -> list[str]:
    """Plain statements of what the numbers say, relative to normal training; no interpretation beyond that."""
    if not normal:
        return []
    out = ["## Reading", ""]
    base = {k: mean_sd([r.results.get(k) for r in normal])[0] for k in (*GAP_KEYS, "test_elbo")}
    for label, members in groups.items():
        if label == "Normal":
            continue
        values = {k: mean_sd([r.results.get(k) for r in members])[0] for k in (*GAP_KEYS, "test_elbo")}
        parts = [f"{k} {values[k]:.3g} vs {base[k]:.3g}" for k in GAP_KEYS
                 if not (math.isnan(values[k]) or math.isnan(base[k]))]
        if not math.isnan(values["test_elbo"]):
            parts.append(f"test ELBO {values['test_elbo']:.1f} vs {base['test_elbo']:.1f}")
        out.append(f"- {label} vs Normal: " + "; ".join(parts) + ".")
    return [*out, ""]


def build_report(study_dir: str | Path) -> Path:
    study_dir = Path(study_dir)
    runs_dir = study_dir / "runs"
    if not runs_dir.is_dir():
        raise VaegenError(f"{study_dir} is not a study directory (no runs/); run a `vaegen study` command first")
    study = read_json(study_dir / "study.json") if (study_dir / "study.json").exists() else {}
    runs = [r for r in (read_run(d) for d in sorted(runs_dir.iterdir()) if d.is_dir()) if r is not None]
    if not runs:
        raise VaegenError(f"{runs_dir} holds no VAE runs yet")
    finished = [r for r in runs if r.finished]
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(finished, key=lambda r: (r.method != "Normal", r.real_k or 0, r.method, r.scale or 0,
                                             r.dm_n is None, r.dm_n or 0, str(r.dm), r.mz or 0, r.nc or 0)):
        groups[group_key(r)].append(r)

    write_tables(runs, groups, study_dir)
    figures, sections = [], []
    if finished:
        plot_elbo_curves(groups, study_dir / "elbo_curves.png")
        plot_gaps(groups, study_dir / "gaps.png")
        figures += [("ELBO during training", "elbo_curves.png"), ("Gaps per method", "gaps.png")]
    if any(r.curves for r in finished):
        plot_gap_curves(groups, study_dir / "gap_curves.png")
        figures.append(("Gaps during training", "gap_curves.png"))
    if any(r.smoothness for r in finished):
        plot_smoothness(groups, study_dir / "smoothness.png")
        figures.append(("Latent smoothness", "smoothness.png"))
    normal = [r for r in finished if r.method == "Normal" and r.mz is None and not r.real_k]
    dmaapx = [r for r in finished if r.method == "DMaaPx" and r.mz is None and r.dm_n is None]
    if len({r.scale for r in dmaapx}) > 1 and not any(r.real_k for r in finished):
        plot_vs(dmaapx, lambda r: r.scale, "SCALE (DM samples / |D_train|)", study_dir / "scale.png",
                reference=normal, keys=(("test_elbo", "test ELBO (nats per image)"), ("G_g", GAP_TITLES["G_g"])))
        figures.append(("Sample-size ablation", "scale.png"))
    for section in (overparam_section(finished, study_dir), dm_quality_section(finished, study_dir),
                    real_vs_synthetic_section(finished, study_dir)):
        sections += section[0]
        figures += section[1]

    title = f"{study['study'].capitalize()} study of {study['dataset']}" if study else f"Study {study_dir.name}"
    lines = [f"# {title}", ""]
    if study:
        preset = study.get("preset", {})
        lines += [f"Preset `{preset.get('name')}`: |D_train| = {preset.get('subset') or 'full'}, "
                  f"{preset.get('epochs')} effective epochs, seeds {preset.get('seeds')}, DM preset "
                  f"`{preset.get('dm_preset')}`, sampler {preset.get('sampler')} with {preset.get('sampler_steps')} "
                  f"steps. Wall time of the study's last invocation (a rerun skips finished work): "
                  f"{study.get('minutes')} min with {study.get('jobs', 1)} job(s).", ""]
        if study.get("stopped_at"):
            lines += [f"**The time budget stopped the study before run `{study['stopped_at']}`**; the runs below "
                      "are the ones that finished.", ""]
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished:
        lines += [f"Unfinished (no eval/ yet): {', '.join(unfinished)}.", ""]
    lines += results_table(groups)
    lines += reading(groups, normal)
    lines += probes_table(groups) + smoothness_table(groups) + sections + dm_table(finished)
    for caption, name in figures:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    write_text_atomic(study_dir / "report.md", "\n".join(lines))
    return study_dir / "report.md"


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("study_dir", type=click.Path(file_okay=False))
def report(study_dir):
    """Build report.md, CSV tables and PNG plots for STUDY_DIR from its run directories."""
    click.echo(str(build_report(study_dir)))
