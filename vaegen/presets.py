"""Where a study runs: `demo` (minutes on a laptop), `cpu` (about two hours per study on 2 cores) and `paper`
(the paper's protocol, for GPUs). Each is plain data; `vaegen study ... --preset NAME` prints and saves it."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StudyPreset:
    name: str
    subset: int | None            # |D_train|; None = the full training split
    dm_preset: str                # generator preset (tiny | small | paper)
    dm_max_steps: int | None      # DM training steps (None: the generator preset's own, sized for its hardware)
    sampler: str
    sampler_steps: int
    epochs: int                   # effective epochs of N images per VAE
    eval_every: int               # epochs between real train/test ELBO points in metrics.jsonl
    seeds: tuple[int, ...]
    compare_scale: int            # SCALE of the DMaaPx pool in `compare` (the paper's headline uses 10x+)
    scales: tuple[int, ...]       # sample-size ablation
    budget_minutes: float | None  # a study stops starting new runs past this (None: no limit)
    batch_size: int               # VAE batch size
    eval_args: tuple[str, ...]    # extra `vaegen eval` options (the evaluator's defaults are the paper's)
    mix_fractions: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)  # 1.0 is Normal training
    dm_subset_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    mz: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    nc: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


PRESETS = {
    # The whole pipeline in minutes on 2 CPU cores: a 200-image subset, the tiny DM sampled with few steps,
    # batch 32 so that 100 epochs of 200 images are still 700 steps. A pipeline check, not a result.
    "demo": StudyPreset(
        name="demo", subset=200, dm_preset="tiny", dm_max_steps=None, sampler="edm-heun", sampler_steps=6,
        epochs=100, eval_every=5, seeds=(0,), compare_scale=5, scales=(1, 2, 5), budget_minutes=None,
        batch_size=32, eval_args=("--quick", "--qstar-max-iters", "100"), mix_fractions=(0.0, 0.5), dm_subset_fractions=(0.5, 1.0), mz=(1, 2), nc=(8, 16),
    ),
    # FashionMNIST subset of 1000 (the small-data regime where normal training overfits hard); the `small` DM;
    # the fewest sampler steps `dm score` cannot tell from Heun-18; the ablation stops starting new runs after
    # two hours and the report says where it stopped.
    "cpu": StudyPreset(
        name="cpu", subset=1000, dm_preset="small", dm_max_steps=None, sampler="edm-heun", sampler_steps=12,
        epochs=500, eval_every=5, seeds=(0, 1, 2), compare_scale=10, scales=(1, 2, 5, 10, 20, 50, 100),
        budget_minutes=120, batch_size=128,
        # Paper settings for G_g and G_r; G_a and IWAE on subsamples (their full versions take CPU-hours).
        eval_args=("--amortization-images", "200", "--qstar-max-iters", "500", "--iwae-k", "1000",
                   "--iwae-images", "500"),
    ),
    # The paper: full training split, 1000 effective epochs, 3 seeds, Heun-18, k up to 1000.
    "paper": StudyPreset(
        name="paper", subset=None, dm_preset="paper", dm_max_steps=None, sampler="edm-heun", sampler_steps=18,
        epochs=1000, eval_every=10, seeds=(0, 1, 2), compare_scale=10,
        scales=(1, 2, 5, 10, 20, 50, 100, 250, 1000), budget_minutes=None, batch_size=128, eval_args=(),
    ),
}


def get_preset(name: str, **overrides) -> StudyPreset:
    from vaegen.errors import VaegenError

    if name not in PRESETS:
        raise VaegenError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
