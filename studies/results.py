"""A study's VAE runs as the report sees them: what each trained (from its config.json), what it measured (its
eval/gaps.json), and how runs group into methods. Nothing is recomputed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vaegen import dmrun, vaerun
from vaegen.provenance import read_json

Section = tuple[list[str], list[tuple[str, str]]]  # a report section: markdown lines, (caption, png) figures

RESULT_COLUMNS = ("test_elbo", "train_elbo", "pool_elbo", "G_g", "G_a", "G_r", "iwae_test", "psnr")


@dataclass
class Run:
    """One run directory: its training settings as typed fields, and its measurements."""

    name: str
    seed: int
    source: str                     # "shards" | "real"
    epochs: int | None = None       # effective epochs it was set to train (early stopping may end it sooner)
    augment: str | None = None
    augment_output: str | None = None
    mix_real: float | None = None
    scale: int | None = None        # DMaaPx pool, in multiples of |D_train|
    mz: int | None = None
    nc: int | None = None
    rha: bool = False
    mollify: bool = False
    early_stopping: bool = False
    weight_decay: float | None = None
    sigma: float | None = None
    likelihood: str | None = None
    dm: str | None = None           # the DM behind the shards
    sampler: str | None = None      # how the shards were sampled ("edm-heun 12")
    dm_n: int | None = None         # its training-set size, when smaller than the VAE's D_train (dm-subsets)
    real_k: int | None = None       # Normal training on k*N real images at N's compute (real-vs-synthetic)
    metrics: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)  # RESULT_COLUMNS
    gaps: dict = field(default_factory=dict)     # eval/gaps.json as written
    more_gaps: dict = field(default_factory=dict)  # {eval directory: its gaps.json} of further evaluations
    finished: bool = False
    parameters: dict = field(default_factory=dict)  # {"total", "z", "not_z"} from model.json
    curves: list[dict] = field(default_factory=list)  # eval/gap_curves.jsonl

    @property
    def probes(self) -> dict | None:
        return self.gaps.get("probes")

    @property
    def smoothness(self) -> dict | None:
        return self.gaps.get("smoothness")

    @property
    def base(self) -> str:
        """The training data: Normal, Aug.*, Aug.Mollify, DMaaPx, or a real/synthetic mixture."""
        if self.source == "shards":
            if self.mix_real:
                tuned = f" + Aug.{self.augment.capitalize()} (real part)" if self.augment else ""
                return f"Mix {self.mix_real:.0%} real{tuned}"
            return "DMaaPx"
        if self.mollify and self.augment is None:
            return "Aug.Mollify"
        return {None: "Normal", "naive": "Aug.Naive", "tuned": "Aug.Tuned"}[self.augment]

    @property
    def modifiers(self) -> list[str]:
        out = ["Mollify"] if self.mollify and self.base != "Aug.Mollify" else []
        out += ["RHA"] if self.rha else []
        out += ["early stopping"] if self.early_stopping else []
        out += [f"weight decay {self.weight_decay:g}"] if self.weight_decay else []
        out += ["float augmentation"] if self.augment_output == "float" else []
        out += ["calibrated decoder"] if self.likelihood == "gaussian-calibrated" else []
        return out

    @property
    def method(self) -> str:
        return " + ".join([self.base, *self.modifiers])

    @property
    def dm_step(self) -> int | None:
        """The training step of a DM snapshot (`dm train --snapshot-steps`); None for a DM's final export."""
        return dmrun.snapshot_step(self.dm) if self.dm else None

    @property
    def dm_name(self) -> str:
        return f"DM at step {self.dm_step}" if self.dm_step is not None else f"DM {Path(self.dm or '?').name}"

    @property
    def label(self) -> str:
        """The method with its pool size: what the report's tables group by (with model size, see group_key)."""
        base = self.base
        if base == "DMaaPx":
            base = f"DMaaPx k={self.scale}"
        if self.real_k:
            base = f"Normal on {self.real_k}xN real"
        label = " + ".join([base, *self.modifiers])
        return f"{label}, DM on {self.dm_n} images" if self.dm_n else label


def run_of(config: dict, name: str = "run", metrics: list[dict] | None = None) -> Run:
    """A run's training settings, from its config.json."""
    shards = config.get("source") == "shards"
    model = config.get("model", {})
    conv = model.get("arch") == "conv"
    data = config.get("data", {})
    run = Run(name, int(config.get("seed", 0)), "shards" if shards else "real",
              augment=config.get("augment"), augment_output=config.get("augment_output"),
              mix_real=config.get("mix_real") if shards else None, scale=config.get("scale") if shards else None,
              mz=model.get("m_z") if conv else None, nc=model.get("n_c") if conv else None,
              rha=bool(config.get("rha")), mollify=bool(config.get("mollify")),
              early_stopping=bool(config.get("early_stopping_split")), weight_decay=config.get("weight_decay") or None,
              sigma=config.get("sigma"), likelihood=config.get("likelihood"), metrics=metrics or [],
              epochs=config.get("epochs"))
    epoch_size = data.get("epoch_size")
    if not shards and epoch_size and config.get("n_train", 0) > epoch_size:
        run.real_k = round(config["n_train"] / epoch_size)
    if shards:
        generation = data.get("generation", {})
        run.dm = generation.get("dm", {}).get("path")
        sampler = generation.get("sampler") or {}
        run.sampler = f"{sampler['name']} {sampler['steps']}" if isinstance(sampler, dict) and "name" in sampler else None
        vae_n = data.get("pool_size", 0) // max(data.get("scale") or 1, 1)
        if generation.get("n_train") and generation["n_train"] < vae_n:
            run.dm_n = generation["n_train"]
    return run


def read_result(run_dir: Path) -> Run | None:
    """A run directory's settings and results; None when it holds no config.json yet."""
    if not vaerun.is_run_dir(run_dir):
        return None
    files = vaerun.read_run(run_dir)
    run = run_of(files.config, run_dir.name, files.metrics)
    run.parameters = (files.model or {}).get("parameters", {})
    if files.gaps is not None:
        run.finished = True
        run.gaps = files.gaps
        run.results = results_of(run.gaps, run.metrics)
        run.curves = files.gap_curves
    run.more_gaps = {p.parent.name: read_json(p) for p in sorted(run_dir.glob(f"{vaerun.EVAL_DIR}-*/{vaerun.GAPS_NAME}"))}
    return run


def results_of(gaps: dict, metrics: list[dict]) -> dict:
    """The numbers the tables show, from eval/gaps.json (and the last training metrics)."""
    r = {}
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
    # What the VAE itself trained on (synthetic samples for DMaaPx, augmented images for Aug.*): a DMaaPx run can
    # overfit its pool (small K) while G_g, measured on the real D_train, stays near zero.
    if metrics and "batch_elbo" in metrics[-1]:
        r["pool_elbo"] = metrics[-1]["batch_elbo"]
    return r


def group_key(run: Run, with_sigma: bool = False, with_sampler: bool = False, with_dm: bool = False) -> str:
    """A report's group: the run's label, with the model size, the likelihood's fixed sigma, the shards' sampler
    and their DM where the study varies them."""
    return ", ".join([run.label, *factors(run, with_sigma, with_sampler, with_dm)])


def factors(run: Run, with_sigma: bool = False, with_sampler: bool = False, with_dm: bool = False) -> list[str]:
    """What sets a run apart from its method's other runs in a study that varies these."""
    out = [f"m_z={run.mz} n_c={run.nc}"] if run.mz is not None else []
    if with_dm and run.dm:
        out.append(run.dm_name)
    if with_sampler and run.sampler:
        out.append(run.sampler)
    if with_sigma and run.sigma is not None and run.likelihood != "gaussian-calibrated":
        out.append(f"sigma={run.sigma:g}")
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(mean: float, sd: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"
