"""The sections a study report can show, each a function of the finished runs: a study declares which it shows
(studies/catalog.py), in order. A section returns markdown lines and the (caption, PNG) figures it drew."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from studies.plots import GAP_KEYS, GAP_TITLES, figure, plot_gap_curves, plot_vs, save_figure
from studies.results import RESULT_COLUMNS, Run, Section, fmt, mean_sd
from studies.robustness import robustness_section
from vaegen import dmrun
from vaegen.seeding import numpy_rng

PROBES = ("logistic_regression", "linear_svm", "rbf_svm", "knn5")
DM_SCORE_KEYS = ("fd", "precision", "recall", "c2st_accuracy", "nn_distance_ratio_to_test")
DM_SCORE_TITLES = {"fd": "Frechet distance (lower = better)", "precision": "precision", "recall": "recall",
                   "c2st_accuracy": "two-sample classifier accuracy (0.5 = indistinguishable)",
                   "nn_distance_ratio_to_test": "NN-distance ratio to D_train (1 = like new real data)"}


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
        score = dmrun.read_score(dm)
        if score:
            got, floor = score["samples"], score["floor_real_test_vs_train"]
            sampler = score.get("config", {}).get("sampler", {})
            scored = f"{sampler.get('name', '?')} {sampler.get('steps', '')}".strip()
            rows.append(f"| `{dm}` | {scored} | "
                        + " | ".join(f"{got[k]:.3g} ({floor[k]:.3g})" for k in DM_SCORE_KEYS[:4]) + " |")
    if not rows:
        return []
    return ["## Diffusion models (`vaegen dm score`; real-vs-real floor in brackets)", "",
            "| DM | scored with | FD | precision | recall | two-sample classifier accuracy |",
            "|---|---|---|---|---|---|", *rows, ""]


PERMUTATIONS = 9999  # scipy enumerates every pairing instead when there are no more (n! <= 9999: n <= 7)


def rank_correlation(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Spearman's rho with a permutation p-value. spearmanr's own p-value comes from a t approximation that is
    meaningless for a handful of DMs (it gives 1e-24 for rho = 1 at n = 5, where the exact value is 2/120)."""
    from scipy.stats import permutation_test, spearmanr

    result = permutation_test((xs,), lambda x: spearmanr(x, ys).statistic, permutation_type="pairings",
                              n_resamples=PERMUTATIONS, rng=numpy_rng(0, "report-permutation"))
    return float(result.statistic), float(result.pvalue)


def dm_quality_section(runs: list[Run], study_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Several DMs of one D_train: each VAE outcome against each DM score, with rank correlations."""
    by_dm = defaultdict(list)
    for r in runs:
        if r.dm and r.finished:
            by_dm[r.dm].append(r)
    scores = {dm: dmrun.read_score(dm) for dm in by_dm}
    dms = [dm for dm in by_dm if scores[dm]]
    if len(dms) < 3:
        return [], []
    outcome = {"test_elbo": "test ELBO", **{k: k for k in GAP_KEYS}}
    plt, fig, axes = figure(len(outcome), len(DM_SCORE_KEYS), figsize=(4 * len(DM_SCORE_KEYS), 3.3 * len(outcome)))
    pairings = (f"exact: all {math.factorial(len(dms))} pairings" if math.factorial(len(dms)) <= PERMUTATIONS
                else f"from {PERMUTATIONS} random pairings")
    lines = ["## How much the DM's quality matters", "",
             "Each point is one DM (mean ± sd over its VAE seeds). Spearman rank correlation of each DM score with "
             f"each VAE outcome, over the DMs (n = {len(dms)}), with its two-sided permutation p-value "
             f"({pairings}; with n DMs no p-value is below 2/n!):", "",
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
            rho, p = rank_correlation(xs, ys)
            cells.append(f"{rho:+.2f} (p={p:.2g})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    save_figure(plt, fig, study_dir / "dm_quality.png")
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
        if r.base == "Normal":
            real[r.real_k or 1].append(r.results.get("test_elbo"))
        elif r.base == "DMaaPx":
            synthetic[r.scale].append(r.results.get("test_elbo"))
    if len(real) < 2 or not synthetic or not any(r.real_k for r in runs):
        return [], []
    plot_vs([r for r in runs if r.finished], lambda r: r.real_k or (1 if r.base == "Normal" else r.scale),
            "k (pool = k x N images)", study_dir / "real_vs_synthetic.png",
            series_of=lambda r: "DMaaPx: k x N DM samples" if r.base == "DMaaPx" else "Normal: k x N real images")
    ks = sorted(real)
    lines = ["## A synthetic sample's worth in real images", "",
             "Normal training on k*N real images (N = |D_train|; at the same compute: N images per effective epoch, "
             "the same epochs) against DMaaPx with a pool of k*N samples of the DM trained on the N images (which "
             "never sees the extra real images). Real-data equivalent: the k at which normal training's test ELBO "
             "(interpolated linearly in log k between measured k) equals DMaaPx's, with a 95% interval from 2000 "
             "bootstrap resamples of the seeds at every k.", "",
             "| k | Normal on k x N real | DMaaPx, k x N samples | DMaaPx's real-data equivalent (k) |",
             "|---|---|---|---|"]
    rng = numpy_rng(0, "report-bootstrap")
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
    # only the m_z with an n_c sweep: the m_z sweep's single points at sweep_nc would crowd out the lines
    swept = {mz for mz in {r.mz for r in conv} if len({r.nc for r in conv if r.mz == mz}) > 1}
    plot_vs([r for r in conv if r.mz in swept], lambda r: r.nc, "n_c (network width)", study_dir / "nc.png",
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


def scale_section(finished: list[Run], study_dir: Path) -> Section:
    normal = [r for r in finished if r.method == "Normal" and r.mz is None and not r.real_k]
    dmaapx = [r for r in finished if r.method == "DMaaPx" and r.mz is None]
    if len({r.scale for r in dmaapx}) < 2:
        return [], []
    plot_vs(dmaapx, lambda r: r.scale, "SCALE (DM samples / |D_train|)", study_dir / "scale.png",
            reference=normal, keys=(("test_elbo", "test ELBO (nats per image)"), ("G_g", GAP_TITLES["G_g"])))
    return [], [("Sample-size ablation", "scale.png")]


def gap_curves_section(groups: dict[str, list[Run]], study_dir: Path) -> Section:
    if not any(r.curves for members in groups.values() for r in members):
        return [], []
    plot_gap_curves(groups, study_dir / "gap_curves.png")
    return [], [("Gaps during training", "gap_curves.png")]


def dm_identities(study: dict) -> list[str]:
    """Which DMs fed the shards: path and weights sha256 (study.json)."""
    dms = study.get("dms") or {}
    if not dms:
        return []
    return ["DMs behind the shards: " + "; ".join(f"`{path}` (weights sha256 `{sha}`)" for path, sha in dms.items())
            + ".", ""]


# Each study declares which of these its report shows (studies/catalog.py); a study directory without
# study.json shows every section that has something to show.
SECTIONS = {
    "reading": lambda runs, groups, d: (reading(groups, [r for r in runs if r.label == "Normal" and r.mz is None]),
                                        []),
    "probes": lambda runs, groups, d: (probes_table(groups), []),
    "smoothness": lambda runs, groups, d: (smoothness_table(groups), [("Latent smoothness", "smoothness.png")]
                                           if any(r.gaps.get("smoothness") for r in runs) else []),
    "gap_curves": lambda runs, groups, d: gap_curves_section(groups, d),
    "scale": lambda runs, groups, d: scale_section(runs, d),
    "overparam": lambda runs, groups, d: overparam_section(runs, d),
    "dm_quality": lambda runs, groups, d: dm_quality_section(runs, d),
    "real_vs_synthetic": lambda runs, groups, d: real_vs_synthetic_section(runs, d),
    "robustness": lambda runs, groups, d: robustness_section(groups),
    "dm_scores": lambda runs, groups, d: (dm_table(runs), []),
}


def headline(groups: dict[str, list[Run]], study: dict) -> list[str]:
    """One line: what the study shows, at what scale (the demo's first line)."""
    normal = groups.get("Normal")
    dmaapx = [(label, members) for label, members in groups.items() if members[0].method == "DMaaPx"]
    if not normal or not dmaapx:
        return []
    label, members = max(dmaapx, key=lambda item: item[1][0].scale or 0)
    preset = study.get("preset", {})

    def mean(rs, key):
        return mean_sd([r.results.get(key) for r in rs])[0]

    seeds = len(members)
    return [f"**What this shows:** on {preset.get('subset') or 'all'} {study.get('dataset')} training images "
            f"({preset.get('epochs')} epochs, {seeds} seed{'s' if seeds > 1 else ''}), a VAE trained on "
            f"{members[0].scale} x N samples of a diffusion model fitted to those images ({label}; "
            f"{preset.get('sampler')}, {preset.get('sampler_steps')} steps) has a generalization gap of "
            f"{mean(members, 'G_g'):.0f} nats against {mean(normal, 'G_g'):.0f} for the VAE trained on the images "
            f"themselves (Normal), and a test ELBO of {mean(members, 'test_elbo'):.0f} against "
            f"{mean(normal, 'test_elbo'):.0f} nats per image.", ""]
