"""Every study, as a short declaration of its runs and of the report sections that read them.

A declaration is a function of a `RunFactory` (the dataset and the preset, with the preset's defaults filled in)
that returns the study's `VaeRun`s in the order they should start. The skeleton in studies/study.py builds each
run's inputs (store, DM, shards) and runs it; studies/report.py shows the declared sections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from studies.runs import RunFactory, Store, VaeRun


@dataclass(frozen=True)
class StudyKind:
    name: str
    declare: Callable[[RunFactory], list[VaeRun]]
    sections: tuple[str, ...]      # report sections beyond the results table (studies/report.py SECTIONS)
    scores_dms: bool = False       # `vaegen dm score` every DM behind the runs

    @property
    def help(self) -> str:
        return (self.declare.__doc__ or "").strip()


def compare(runs: RunFactory) -> list[VaeRun]:
    """Normal vs DMaaPx vs Aug.Naive vs Aug.Tuned, one run per seed, with the paper's downstream probes (paper
    Table 7; the probes are its Table 11)."""
    k = runs.preset.compare_scale
    return [run for seed in runs.preset.seeds
            for run in (runs.normal(seed, probes=True), runs.dmaapx(seed, k, probes=True),
                        runs.augmented(seed, "naive", probes=True), runs.augmented(seed, "tuned", probes=True))]


def demo(runs: RunFactory) -> list[VaeRun]:
    """The method at work in minutes (`make demo`): the four methods of `compare`, DMaaPx at every SCALE of the
    preset, one report that opens with what it shows."""
    seeds = runs.preset.seeds
    return [*(runs.normal(s) for s in seeds),
            *(runs.augmented(s, aug) for aug in ("naive", "tuned") for s in seeds),
            *(runs.dmaapx(s, k) for k in sorted(runs.preset.scales) for s in seeds)]


def ablation(runs: RunFactory) -> list[VaeRun]:
    """Sample-size ablation (§5.4): DMaaPx at each SCALE, Normal as the reference. Shards grow with SCALE
    (smaller scales use a prefix of the largest); a budget stops the sweep at the first run it cannot start."""
    seeds = runs.preset.seeds
    return [*(runs.normal(s) for s in seeds), *(runs.dmaapx(s, k) for k in sorted(runs.preset.scales) for s in seeds)]


def overparam_sizes(p) -> list[tuple[int, int]]:
    """(m_z, n_c) of the sweeps: m_z over its grid at n_c = mz_sweep_nc, n_c over its grid at each m_z of
    nc_sweep_mz (which together hold the paper's double-descent trajectory), each once."""
    sizes = [(mz, p.mz_sweep_nc) for mz in p.mz_grid] + [(mz, nc) for mz in p.nc_sweep_mz for nc in p.nc_grid]
    return list(dict.fromkeys(sizes))


def overparam(runs: RunFactory) -> list[VaeRun]:
    """Model size (§5.5-5.7, figures 6-8): the conv VAE over the m_z grid at fixed n_c and over the n_c grid at each
    of several m_z, Normal and DMaaPx; |Theta|, |Theta_z| and |Theta_not_z| are recorded."""
    p, k = runs.preset, runs.preset.compare_scale
    size = dict(epochs=p.overparam_vae_epochs, evaluation=p.overparam_eval or p.eval)
    return [run for mz, nc in overparam_sizes(p) for s in (p.overparam_seeds or p.seeds)
            for run in (runs.normal(s, f"normal-mz{mz}-nc{nc}", mz=mz, nc=nc, **size),
                        runs.dmaapx(s, k, f"dmaapx-k{k}-mz{mz}-nc{nc}-seed{s}", mz=mz, nc=nc, **size))]


def mix(runs: RunFactory) -> list[VaeRun]:
    """Real/synthetic mixtures (appendix B.7): a fraction of every epoch real, the rest DM samples; each fraction
    without and with Aug.Tuned on the real part. 0% real is DMaaPx, 100% real is Normal (and Aug.Tuned)."""
    k, out = runs.preset.compare_scale, []
    for f in runs.preset.mix_fractions:
        name = f"mix{int(round(f * 100)):03d}"
        for s in runs.preset.seeds:
            if f >= 1:
                out += [runs.normal(s, name), runs.normal(s, f"{name}-tuned", augment="tuned")]
            elif f <= 0:
                out += [runs.dmaapx(s, k, f"{name}-seed{s}")]
            else:
                out += [runs.dmaapx(s, k, f"{name}-seed{s}", mix_real=f),
                        runs.dmaapx(s, k, f"{name}-tuned-seed{s}", mix_real=f, augment="tuned")]
    return out


def dm_subsets(runs: RunFactory) -> list[VaeRun]:
    """DMs trained on subsets of D_train, each feeding a DMaaPx VAE trained on the full D_train (appendix B.8);
    each DM is scored, so that the report puts its quality next to the VAE's gaps."""
    p, n = runs.preset, runs.store.train_size
    out = []
    for fraction in p.dm_subset_fractions:
        dm_n = max(10, int(round(fraction * n)))
        dm = runs.dm(Store(runs.dataset, None if dm_n >= n and p.subset is None else dm_n))
        out += [runs.dmaapx(s, p.compare_scale, f"dm{int(round(fraction * 100)):03d}pct-seed{s}", dm=dm)
                for s in p.seeds]
    return out


def regularizers(runs: RunFactory) -> list[VaeRun]:
    """DMaaPx against the paper's other remedies (§5.2, appendix B.6), with gap curves during training for every
    arm (the paper's Fig. 11): Normal, Normal+RHA, Aug.Mollify, Aug.Naive, Aug.Tuned, DMaaPx, DMaaPx+RHA,
    DMaaPx+Mollify."""
    k, track = runs.preset.compare_scale, runs.tracking()
    out = []
    for s in runs.preset.seeds:
        out += [runs.normal(s, tracking=track), runs.normal(s, "normal-rha", rha=True, tracking=track),
                runs.normal(s, "mollify", mollify=True, tracking=track),
                runs.dmaapx(s, k, tracking=track), runs.dmaapx(s, k, f"dmaapx-k{k}-rha-seed{s}", rha=True, tracking=track),
                runs.dmaapx(s, k, f"dmaapx-k{k}-mollify-seed{s}", mollify=True, tracking=track),
                runs.augmented(s, "naive", tracking=track), runs.augmented(s, "tuned", tracking=track)]
    return out


def dm_quality(runs: RunFactory) -> list[VaeRun]:
    """How much the DM's quality matters: snapshots of one DM training run at graded steps (up to the full run),
    each scored, each feeding DMaaPx VAEs at the compare scale."""
    from generator.presets import get_preset as dm_preset

    p = runs.preset
    full = p.dm_max_steps or dm_preset(p.dm_preset).max_steps
    steps = sorted({s for s in p.dm_quality_steps if s <= full} | {full})
    return [runs.dmaapx(s, p.compare_scale, f"dm-steps{step}-seed{s}",
                        dm=runs.dm(snapshot=None if step == full else step))
            for step in steps for s in p.seeds]


def real_vs_synthetic(runs: RunFactory) -> list[VaeRun]:
    """The control the paper lacks: Normal training on k*N real images against DMaaPx on k*N DM samples of the DM
    trained on the N images, at the same compute (N images per effective epoch, the same epochs)."""
    p, n = runs.preset, runs.store.train_size
    full = Store(runs.dataset, None).train_size
    out = []
    for k in sorted(set(p.real_scales) | set(p.scales)):
        for s in p.seeds:
            if k in p.real_scales and k * n <= full and p.subset is not None:
                store = Store(runs.dataset, None if k * n >= full else k * n)
                # k = 1 is Normal itself (the same command, so a finished Normal run is reused, not retrained)
                out.append(runs.normal(s, f"real-k{k}", store=store, epoch_size=n if k > 1 else None))
            if k in p.scales:
                out.append(runs.dmaapx(s, k))
    return out


def controls(runs: RunFactory) -> list[VaeRun]:
    """Is DMaaPx just a regularizer? Normal training with early stopping (on a validation split of D_train) and
    with weight decay, beside Normal and DMaaPx."""
    p = runs.preset
    out = []
    for s in p.seeds:
        out += [runs.normal(s), runs.dmaapx(s, p.compare_scale),
                runs.normal(s, "early-stopping", early_stopping=(p.early_stopping_split, p.early_stopping_patience))]
        out += [runs.normal(s, f"weight-decay{wd:g}", weight_decay=wd) for wd in p.weight_decays]
    return out


# G_r by Kuzina et al.'s protocol, and nothing else: IWAE is not a gap, so it is turned off (at its default k=5000
# on every image it would cost an hour a run on a CPU).
KUZINA = (("eval-kuzina", ("--robustness-protocol", "kuzina", "--gaps", "robustness", "--iwae-k", "0")),)


def robustness(runs: RunFactory) -> list[VaeRun]:
    """Why G_r orders the methods as it does: the four compare methods at each likelihood sigma of the preset (the
    default sigma at every seed, the others at the first), Aug.Naive with the augmentation's float output (no
    rounding, no clamp), DMaaPx on DPM-Solver++ 7 samples and the four with a calibrated Gaussian decoder (one seed);
    every run's G_r measured by both protocols (eval/: vaegen's, eval-kuzina/: Kuzina et al.'s code)."""
    from trainer.likelihoods import (
        DEFAULT_SIGMA as default,  # runs at it pass no --sigma: other studies' runs
    )

    p, k = runs.preset, runs.preset.compare_scale
    both = dict(probes=True, extra_evaluations=KUZINA)  # probes: eval/ is then compare's, and reused with its run
    out = []
    for sigma in p.robustness_sigmas:
        for s in p.seeds if sigma == default else p.seeds[:1]:
            arms = (runs.normal(s, **both), runs.dmaapx(s, k, **both), runs.augmented(s, "naive", **both),
                    runs.augmented(s, "tuned", **both))
            out += [replace(r, name=f"sigma{sigma:g}-{r.name}", sigma=None if sigma == default else sigma)
                    for r in arms]
    dpm = RunFactory(runs.dataset, replace(p, sampler="dpm-solver++", sampler_steps=7))
    for s in p.seeds:
        out += [replace(runs.augmented(s, "naive", augment_output="float", **both),
                        name=f"sigma{default:g}-aug-naive-float-seed{s}"),
                dpm.dmaapx(s, k, f"sigma{default:g}-dmaapx-k{k}-dpmsolver7-seed{s}", **both)]
    # A calibrated decoder (sigma learned: Rybkin et al. 2021) costs what a fixed sigma costs; one seed.
    out += [replace(r, name=f"calibrated-{r.name}", sigma=None, likelihood="gaussian-calibrated")
            for s in p.seeds[:1] for r in (runs.normal(s, **both), runs.dmaapx(s, k, **both),
                                           runs.augmented(s, "naive", **both), runs.augmented(s, "tuned", **both))]
    return out


STUDIES = {kind.name: kind for kind in (
    StudyKind("demo", demo, ("headline", "reading", "scale", "dm_scores")),
    StudyKind("compare", compare, ("reading", "probes", "smoothness", "dm_scores")),
    StudyKind("ablation", ablation, ("reading", "scale", "dm_scores")),
    StudyKind("overparam", overparam, ("overparam",)),
    StudyKind("mix", mix, ("reading", "dm_scores"), scores_dms=True),
    StudyKind("dm-subsets", dm_subsets, ("dm_scores",), scores_dms=True),
    StudyKind("regularizers", regularizers, ("reading", "gap_curves", "smoothness", "dm_scores")),
    StudyKind("dm-quality", dm_quality, ("dm_quality", "dm_scores"), scores_dms=True),
    StudyKind("real-vs-synthetic", real_vs_synthetic, ("real_vs_synthetic", "dm_scores")),
    StudyKind("controls", controls, ("reading", "dm_scores")),
    StudyKind("robustness", robustness, ("robustness", "dm_scores")),
)}
