"""`vaegen report STUDY_DIR`: report.md, CSV tables and PNG plots, built purely from the run directories.

Reads <study_dir>/study.json (optional: what was planned, where a budget stopped the study) and, for every
<study_dir>/runs/<run>/, its config.json (what was trained), metrics.jsonl (ELBO on real train/test during
training) and eval/gaps.json (the evaluator's gaps). Nothing is recomputed; a run without eval/ is listed as
unfinished.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from vaegen.errors import VaegenError
from vaegen.provenance import read_json
from vaegen.vaerun import CONFIG_NAME, EVAL_DIR, GAPS_NAME, METRICS_NAME

GAP_KEYS = ("G_g", "G_a", "G_r")
GAP_TITLES = {"G_g": "generalization gap G_g (nats)", "G_a": "amortization gap G_a (nats)",
              "G_r": "robustness gap G_r (MS-SSIM)"}


@dataclass
class Run:
    name: str
    method: str
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

    @property
    def label(self) -> str:
        label = f"DMaaPx k={self.scale}" if self.method == "DMaaPx" else self.method
        return f"{label}, DM on {self.dm_n} images" if self.dm_n else label


def method_of(config: dict) -> str:
    if config.get("source") == "shards":
        mix = config.get("mix_real") or 0.0
        return f"Mix {mix:.0%} real" if mix > 0 else "DMaaPx"
    return {None: "Normal", "naive": "Aug.Naive", "tuned": "Aug.Tuned"}[config.get("augment")]


def read_run(run_dir: Path) -> Run | None:
    if not (run_dir / CONFIG_NAME).exists():
        return None
    config = read_json(run_dir / CONFIG_NAME)
    metrics_path = run_dir / METRICS_NAME
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.exists() else []
    shards = config.get("source") == "shards"
    model = config.get("model", {})
    run = Run(run_dir.name, method_of(config), int(config.get("seed", 0)),
              config.get("scale") if shards else None,
              model.get("m_z") if model.get("arch") == "conv" else None,
              model.get("n_c") if model.get("arch") == "conv" else None,
              config.get("mix_real") if shards else None, metrics)
    if shards:
        data = config.get("data", {})
        generation = data.get("generation", {})
        run.dm = generation.get("dm", {}).get("path")
        vae_n = data.get("pool_size", 0) // max(data.get("scale") or 1, 1)
        if generation.get("n_train") and generation["n_train"] < vae_n:
            run.dm_n = generation["n_train"]
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
        if metrics and "batch_elbo" in metrics[-1]:
            r["pool_elbo"] = metrics[-1]["batch_elbo"]
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


RESULT_COLUMNS = ("test_elbo", "train_elbo", "pool_elbo", "G_g", "G_a", "G_r", "iwae_test", "psnr")


def write_tables(runs: list[Run], groups: dict[str, list[Run]], out: Path) -> None:
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "seed", "scale", "m_z", "n_c", "mix_real", "finished", *RESULT_COLUMNS])
        for r in runs:
            w.writerow([r.name, r.method, r.seed, r.scale, r.mz, r.nc, r.mix_real, r.finished,
                        *(r.results.get(c, "") for c in RESULT_COLUMNS)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n_seeds", *(f"{c}_{s}" for c in RESULT_COLUMNS for s in ("mean", "sd"))])
        for label, members in groups.items():
            stats = [mean_sd([m.results.get(c) for m in members]) for c in RESULT_COLUMNS]
            w.writerow([label, len(members), *(x for pair in stats for x in pair)])


def group_key(run: Run) -> str:
    parts = [run.label]
    if run.mz is not None:
        parts.append(f"m_z={run.mz} n_c={run.nc}")
    return ", ".join(parts)


def plot_elbo_curves(groups: dict[str, list[Run]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gaps(groups: dict[str, list[Run]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    labels = list(groups)
    for ax, key in zip(axes, GAP_KEYS):
        stats = [mean_sd([m.results.get(key) for m in groups[label]]) for label in labels]
        ax.bar(range(len(labels)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
               color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(GAP_TITLES[key])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Gaps per method (bars: mean over seeds; error bars: standard deviation across seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_vs(runs: list[Run], attr: str, xlabel: str, path: Path, reference: list[Run] | None = None,
            logx: bool = True) -> None:
    """Test ELBO and G_g against a swept quantity (SCALE, m_z or n_c), one line per method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    by_method = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if getattr(r, attr) is not None and r.finished:
            by_method[r.method][getattr(r, attr)].append(r)
    for ax, key, ylabel in ((axes[0], "test_elbo", "test ELBO (nats per image)"),
                            (axes[1], "G_g", "generalization gap G_g (nats)")):
        for i, (method, points) in enumerate(sorted(by_method.items())):
            xs = sorted(points)
            stats = [mean_sd([r.results.get(key) for r in points[x]]) for x in xs]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                        color=f"C{i}", label=method)
        if reference:
            m, sd = mean_sd([r.results.get(key) for r in reference])
            if not math.isnan(m):
                ax.axhline(m, color="k", ls="--", label="Normal (train on D_train)")
                ax.axhspan(m - sd, m + sd, color="k", alpha=0.08)
        if logx:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    for r in sorted(finished, key=lambda r: (r.method != "Normal", r.method, r.scale or 0, r.dm_n is None,
                                             r.dm_n or 0, r.mz or 0, r.nc or 0)):
        groups[group_key(r)].append(r)

    write_tables(runs, groups, study_dir)
    figures = []
    if finished:
        plot_elbo_curves(groups, study_dir / "elbo_curves.png")
        plot_gaps(groups, study_dir / "gaps.png")
        figures += [("ELBO during training", "elbo_curves.png"), ("Gaps per method", "gaps.png")]
    normal = [r for r in finished if r.method == "Normal" and r.mz is None]
    if len({r.scale for r in finished if r.method == "DMaaPx"}) > 1:
        plot_vs([r for r in finished if r.method == "DMaaPx"], "scale", "SCALE (DM samples / |D_train|)",
                study_dir / "scale.png", reference=normal)
        figures.append(("Sample-size ablation", "scale.png"))
    for attr, xlabel in (("mz", "m_z (latent channels)"), ("nc", "n_c (network width)")):
        if len({getattr(r, attr) for r in finished} - {None}) > 1:
            plot_vs(finished, attr, xlabel, study_dir / f"{attr}.png")
            figures.append((f"Model size: {xlabel}", f"{attr}.png"))

    title = f"{study['study'].capitalize()} study of {study['dataset']}" if study else f"Study {study_dir.name}"
    lines = [f"# {title}", ""]
    if study:
        preset = study.get("preset", {})
        lines += [f"Preset `{preset.get('name')}`: |D_train| = {preset.get('subset') or 'full'}, "
                  f"{preset.get('epochs')} effective epochs, seeds {preset.get('seeds')}, DM preset "
                  f"`{preset.get('dm_preset')}`, sampler {preset.get('sampler')} with {preset.get('sampler_steps')} "
                  f"steps. Wall time of the study's last invocation (a rerun skips finished work): "
                  f"{study.get('minutes')} min.", ""]
        if study.get("stopped_at"):
            lines += [f"**The time budget stopped the study before run `{study['stopped_at']}`**; the runs below "
                      "are the ones that finished.", ""]
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished:
        lines += [f"Unfinished (no eval/ yet): {', '.join(unfinished)}.", ""]
    lines += ["## Results (mean ± sd across seeds)", "",
              "| group | seeds | test ELBO | train ELBO | ELBO on its training batches | G_g | G_a | G_r "
              "| IWAE log p(x) test | PSNR (dB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, members in groups.items():
        cells = [fmt(*mean_sd([m.results.get(c) for m in members]), digits=3 if c == "G_r" else 1)
                 for c in RESULT_COLUMNS]
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    lines += ["", "Nats per image summed over pixels; G_r in MS-SSIM units. Train ELBO is on the real D_train; "
              "\"its training batches\" is the mean ELBO over the last epoch's batches of what the VAE trained on "
              "(synthetic samples for DMaaPx, augmented images for Aug.*; one Monte Carlo sample, during training). "
              "Tables: `summary.csv`, `runs.csv`.", ""]
    lines += reading(groups, normal, finished)
    lines += dm_table(finished)
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    (study_dir / "report.md").write_text("\n".join(lines))
    return study_dir / "report.md"


DM_SCORE_KEYS = ("fd", "precision", "recall", "c2st_accuracy")


def dm_table(runs: list[Run]) -> list[str]:
    """The `vaegen dm score` of every DM behind the runs (where it was scored), next to the real-data floor."""
    rows = []
    for dm in sorted({r.dm for r in runs if r.dm}):
        path = Path(dm) / "score.json"
        if path.exists():
            score = read_json(path)
            got, floor = score["samples"], score["floor_real_test_vs_train"]
            rows.append(f"| `{dm}` | " + " | ".join(f"{got[k]:.3g} ({floor[k]:.3g})" for k in DM_SCORE_KEYS) + " |")
    if not rows:
        return []
    return ["## Diffusion models (`vaegen dm score`; real-vs-real floor in brackets)", "",
            "| DM | FD | precision | recall | two-sample classifier accuracy |", "|---|---|---|---|---|", *rows, ""]


def reading(groups: dict[str, list[Run]], normal: list[Run], finished: list[Run]) -> list[str]:
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


@click.command(context_settings={"show_default": True})
@click.argument("study_dir", type=click.Path(file_okay=False))
def report(study_dir):
    """Build report.md, CSV tables and PNG plots for STUDY_DIR from its run directories."""
    click.echo(str(build_report(study_dir)))
