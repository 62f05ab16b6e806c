"""`vaegen dm frontier`: sample quality per network evaluation (NFE), for every sampler, against Heun at 35.

Every (sampler, NFE, seed) point is scored exactly as `vaegen dm score --sampler S --steps N --seed SEED`
would score it, by one shared `Scorer` (the stores, the feature classifier and each seed's real references
are computed once), and written to <out>/points/<sampler>-nfe<NN>-seed<S>.json: that score.json plus the
target NFE and the wall time of sampling. A point file that exists is kept, so a frontier resumes where it
stopped. Then, from all points:

  frontier.json  the config, every point, mean and sd over seeds per (sampler, NFE), the reference band and
                 the recommendation (with its rule)
  frontier.csv   one row per point
  frontier.png   one panel per metric against NFE, one line per sampler (mean, error bars: sd over seeds),
                 the reference's mean +- 2 sd over seeds shaded

NFE. Heun costs 2 * steps - 1 evaluations, the other samplers one per step; a target NFE becomes the step
count whose NFE is closest to it (the cheaper one on a tie), and points record the actual NFE. The
reference, edm-heun at 18 steps (NFE 35, EDM's setting), is always scored.

Recommendation: RULE below, stated in frontier.json too. The band is two-sided on purpose: the aim is samples
distributed like the reference's (the ODE solved well), so a point that scores far better than the
reference on a metric is as suspect as one far worse.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from generator.sampling import SAMPLERS, SamplerConfig, sample
from generator.score import ScoreConfig, Scorer
from vaegen.errors import VaegenError
from vaegen.provenance import read_json, run_record, write_json_atomic, write_text_atomic
from vaegen.runlock import run_lock

REFERENCE = SamplerConfig(name="edm-heun", steps=18)
METRICS = ("fd", "precision", "recall", "c2st_accuracy", "nn_distance_ratio_to_test", "near_copy_share")
BAND_METRICS = ("fd", "precision", "recall", "c2st_accuracy")
RULE = ("the cheapest (sampler, NFE) whose mean over seeds of every one of fd, precision, recall and "
        "c2st_accuracy lies within the reference's noise band: the reference's mean +- 2 * max(sd over the "
        "reference's seeds, within-point sd over seeds pooled across all points); equal NFE goes to the "
        "shorter sampling time. bound_by: the metrics outside the band at the recommended sampler's next "
        "cheaper NFE (empty when none was scored)")


@dataclass(frozen=True)
class FrontierConfig:
    dm: str
    samplers: tuple[str, ...] = SAMPLERS
    nfe: tuple[int, ...] = (5, 7, 9, 13, 17, 23, 35)  # target network evaluations per image
    seeds: tuple[int, ...] = (0, 1, 2)
    n: int = 1000                       # samples per point (and real images they are compared with)
    out: str | None = None              # None: <dm>/frontier
    dataset: str | None = None          # None: from the DM's dm.json
    data_root: str = "data"
    device: str = "cpu"
    chunk: int = 64
    classifier_steps: int = 800         # as in `dm score`: part of the feature classifier's cache key

    def __post_init__(self):
        unknown = sorted(set(self.samplers) - set(SAMPLERS))
        if unknown or not self.samplers:
            raise VaegenError(f"unknown or no samplers {unknown}; choose from {', '.join(SAMPLERS)}")
        distinct_seeds = bool(self.seeds) and min(self.seeds) >= 0 and len(set(self.seeds)) == len(self.seeds)
        if not self.nfe or min(self.nfe) < 1 or not distinct_seeds:
            raise VaegenError(f"need target NFEs >= 1 and distinct seeds >= 0, got nfe={self.nfe} seeds={self.seeds}")


def steps_for(sampler: str, target_nfe: int) -> int:
    """The step count whose NFE is closest to `target_nfe`, the cheaper one on a tie."""
    return min(range(1, target_nfe + 2),
               key=lambda steps: (abs(SamplerConfig(sampler, steps).network_evaluations - target_nfe), steps))


def plan(config: FrontierConfig) -> list[tuple[SamplerConfig, int | None]]:
    """(sampler, target NFE) of every point to score, each once, the reference included."""
    planned: dict[tuple[str, int], int | None] = {}
    for name in config.samplers:
        for target in config.nfe:
            planned.setdefault((name, steps_for(name, target)), target)
    planned.setdefault((REFERENCE.name, REFERENCE.steps), None)
    return [(SamplerConfig(name, steps, chunk=config.chunk), target) for (name, steps), target in planned.items()]


def check_kept(point: dict, config: ScoreConfig, dm_sha256: str, path: Path) -> None:
    """A kept point must come from this DM and this scoring recipe (only the device may differ)."""
    expected = {k: v for k, v in asdict(config).items() if k not in ("device", "out")}
    recorded = {k: point.get("config", {}).get(k) for k in expected}
    if recorded != expected or point.get("dm", {}).get("sha256") != dm_sha256:
        raise VaegenError(f"{path} was scored from another DM or with other settings; "
                          "delete it or pass another --out")


def point_row(point: dict) -> dict:
    """The flat row of a point file: what frontier.json, frontier.csv and the plot use."""
    return {"sampler": point["sampler"]["name"], "steps": point["sampler"]["steps"],
            "nfe": point["network_evaluations"], "target_nfe": point["target_nfe"], "seed": point["seed"],
            "sampling_seconds": point["sampling_seconds"], **{m: point["samples"][m] for m in METRICS}}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds of every metric (and the sampling time) per (sampler, NFE), cheapest first."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["sampler"], row["nfe"]].append(row)
    summary = []
    for (sampler, nfe), members in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        values = {m: np.array([r[m] for r in members], dtype=float) for m in (*METRICS, "sampling_seconds")}
        summary.append({"sampler": sampler, "nfe": nfe, "steps": members[0]["steps"],
                        "seeds": sorted(r["seed"] for r in members),
                        "mean": {m: float(v.mean()) for m, v in values.items()},
                        "sd": {m: float(v.std(ddof=1)) if len(v) > 1 else None for m, v in values.items()}})
    return summary


def recommend(summary: list[dict], reference: tuple[str, int] = (REFERENCE.name, REFERENCE.steps)) -> dict:
    """The recommendation of RULE from a `summarize` table; `reference` is (sampler, steps)."""
    ref = next(g for g in summary if (g["sampler"], g["steps"]) == reference)
    if len(ref["seeds"]) < 2:
        return {"rule": RULE, "point": None, "reason": "the reference's noise band needs at least 2 seeds"}
    dof = [len(g["seeds"]) - 1 for g in summary]
    pooled = {m: math.sqrt(sum(d * (g["sd"][m] or 0.0) ** 2 for d, g in zip(dof, summary)) / sum(dof))
              for m in BAND_METRICS}
    half_width = {m: 2 * max(ref["sd"][m], pooled[m]) for m in BAND_METRICS}

    def outside(g: dict) -> list[str]:
        return [m for m in BAND_METRICS if abs(g["mean"][m] - ref["mean"][m]) > half_width[m]]

    by_cost = sorted(summary, key=lambda g: (g["nfe"], g["mean"]["sampling_seconds"]))
    best = next(g for g in by_cost if not outside(g))  # the reference always qualifies
    cheaper = [{"sampler": g["sampler"], "nfe": g["nfe"], "outside": outside(g)}
               for g in by_cost if g["nfe"] < best["nfe"]]
    same_sampler = [c for c in cheaper if c["sampler"] == best["sampler"]]
    return {
        "rule": RULE,
        "point": {"sampler": best["sampler"], "nfe": best["nfe"], "steps": best["steps"]},
        "bound_by": max(same_sampler, key=lambda c: c["nfe"])["outside"] if same_sampler else [],
        "band": {m: [ref["mean"][m] - half_width[m], ref["mean"][m] + half_width[m]] for m in BAND_METRICS},
        "reference_sd": {m: ref["sd"][m] for m in BAND_METRICS},
        "pooled_sd": pooled,
        "rejected_cheaper": cheaper,
    }


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def plot(summary: list[dict], recommendation: dict, path: Path) -> None:
    """One panel per metric against NFE, one line per sampler; the reference's mean as a line and, for the
    metrics the rule uses, the band it accepts (its mean +- 2 sd) shaded; the recommended point ringed."""
    from matplotlib.figure import Figure

    ref = next(g for g in summary if (g["sampler"], g["steps"]) == (REFERENCE.name, REFERENCE.steps))
    band = recommendation.get("band") or {}
    best = recommendation.get("point")
    fig = Figure(figsize=(15, 8.5))
    for ax, metric in zip(fig.subplots(2, 3).flat, METRICS):
        if metric in band:
            ax.axhspan(*band[metric], color="0.85", label="accepted: Heun-18 mean ± 2 sd (see rule)")
        ax.axhline(ref["mean"][metric], color="0.5", lw=0.8)
        for i, name in enumerate(sorted({g["sampler"] for g in summary}, key=SAMPLERS.index)):
            line = [g for g in summary if g["sampler"] == name]
            ax.errorbar([g["nfe"] for g in line], [g["mean"][metric] for g in line],
                        yerr=[g["sd"][metric] or 0.0 for g in line], marker="o", ms=4, capsize=3,
                        color=f"C{i}", label=name)
        if best:
            point = next(g for g in summary if (g["sampler"], g["steps"]) == (best["sampler"], best["steps"]))
            ax.plot(point["nfe"], point["mean"][metric], "o", ms=13, mfc="none", mec="k", label="recommended")
        if metric == "fd":
            ax.set_yscale("log")  # bad samplers reach ~100, the good ones differ by ~1
        if metric == "near_copy_share":
            ax.set_ylim(bottom=0, top=max(0.05, ax.get_ylim()[1]))  # 0 is common: keep the axis readable
        ax.set_xscale("log")
        ticks = sorted({g["nfe"] for g in summary})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel="network evaluations per image (NFE)", title=metric)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("Sample quality per NFE (mean, error bars: sd over seeds)"
                 + (f"; recommended: {best['sampler']} at NFE {best['nfe']}" if best else ""))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def frontier(config: FrontierConfig) -> dict:
    """Score every point (keeping existing point files), then write frontier.json/.csv/.png; returns the JSON."""
    out = Path(config.out) if config.out else Path(config.dm) / "frontier"
    with run_lock(out):
        return _frontier(config, out)


def _frontier(config: FrontierConfig, out: Path) -> dict:
    (out / "points").mkdir(parents=True, exist_ok=True)
    base = ScoreConfig(dm=config.dm, dataset=config.dataset, data_root=config.data_root, n=config.n,
                       device=config.device, classifier_steps=config.classifier_steps)
    scorer = Scorer(base)
    todo = []
    for sampler, target in plan(config):
        for seed in config.seeds:
            path = out / "points" / f"{sampler.name}-nfe{sampler.network_evaluations:02d}-seed{seed}.json"
            todo.append((path, replace(base, seed=seed, sampler=sampler, out=str(path)), target))
    if not all(path.exists() for path, _, _ in todo):
        # One throwaway chunk first, so that no point's time includes one-off setup (CUDA context, kernels).
        sample(scorer.dm, [0], 0, replace(REFERENCE, steps=1, chunk=config.chunk), config.device)
    rows = []
    for path, point_config, target in tqdm(todo, desc="frontier", unit="point"):
        if path.exists():
            point = read_json(path)
            check_kept(point, point_config, scorer.dm.sha256, path)
        else:
            start = time.perf_counter()
            samples = sample(scorer.dm, range(scorer.n), point_config.seed, point_config.sampler, config.device)
            seconds = time.perf_counter() - start
            point = scorer.record(point_config, samples.numpy(), target_nfe=target, sampling_seconds=seconds)
            write_json_atomic(path, point)
        rows.append(point_row(point))

    summary = summarize(rows)
    recommendation = recommend(summary)
    result = run_record(config, dataset=scorer.dataset, n=scorer.n, dm=scorer.dm.describe(),
                        reference={"sampler": REFERENCE.name, "steps": REFERENCE.steps,
                                   "nfe": REFERENCE.network_evaluations},
                        metrics=list(METRICS), points=rows, summary=summary, recommendation=recommendation)
    write_csv(rows, out / "frontier.csv")
    plot(summary, recommendation, out / "frontier.png")
    write_json_atomic(out / "frontier.json", result)  # last: its presence means the frontier is complete
    return result
