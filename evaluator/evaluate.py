"""The evaluation run, in one file: a trained VAE run dir -> <run>/eval/gaps.json + <run>/eval/per_example.zarr.

    run dir check -> `load_inputs` (the VAE + real D_train / D_test of the run's config.json, preprocessed once)
    -> one `measure_*` function per measurement, each returning (summary, per-image arrays):
       G_g (ELBO train vs test), G_a (q* per datapoint), G_r (attack + MS-SSIM), IWAE log p(x), PSNR, probes
    -> write eval/ under a temporary name, then rename.

Every number in gaps.json is a mean over images with a 95% confidence interval (mean +- 1.96 standard errors;
for G_r also over attack seeds), next to every setting that produced it. Settings the paper fixes are the
defaults (`paper_config`); `--quick` shrinks the work for a CPU smoke run (`quick_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from evaluator import kuzina
from evaluator.attack import AttackConfig
from evaluator.gaps import (
    PosteriorOptConfig,
    amortization_gap,
    amortized_elbo,
    batches,
    robustness_gap,
)
from evaluator.likelihood import iwae_log_px
from evaluator.msssim import MSSSIMConfig
from evaluator.probes import probe_accuracies, psnr
from evaluator.smoothness import SmoothnessConfig, latent_smoothness, smoothness_arrays, smoothness_summary
from evaluator.stats import difference_ci, mean_ci
from trainer.models import VAE, load_vae
from vaegen.data import open_dataset, store_path
from vaegen.errors import VaegenError
from vaegen.interrupts import set_resume_hint
from vaegen.provenance import (
    fsync_dir,
    run_record,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from vaegen.runlock import run_lock
from vaegen.seeding import SPLIT, SUBSAMPLE, derive, numpy_rng, torch_generator
from vaegen.vaerun import (
    CONFIG_NAME,
    EVAL_DIR,
    GAP_CURVES_NAME,
    GAPS_NAME,
    MODEL_WEIGHTS_NAME,
    SNAPSHOTS,
    RunFiles,
    read_run,
)

GAPS = ("generalization", "amortization", "robustness")
# How G_r is measured: vaegen's own protocol, or Kuzina et al.'s code step by step (evaluator.kuzina).
ROBUSTNESS_PROTOCOLS = ("vaegen", "kuzina")

# The paper's attack settings per dataset: (delta, PGD iterations, test images); 10 seeds and step size 1.0
# for all. MNIST in grey levels is an MNIST-type set like its binarized twin.
PAPER_ATTACK = {
    "binary-mnist": (0.1, 50, 50),
    "mnist": (0.1, 50, 50),
    "fmnist": (0.1, 50, 50),
    "cifar10": (0.05, 100, 20),
}


@dataclass(frozen=True)
class EvalConfig:
    run_dir: str
    gaps: tuple[str, ...] = GAPS
    eval_dir: str = EVAL_DIR  # the directory in run_dir the results go to
    seed: int = 0
    device: str = "cpu"
    quick: bool = False
    # generalization gap
    elbo_samples: int = 10  # MC samples per image for the amortized ELBO
    train_images: int | None = None  # None: the full split (the paper); else a seeded subsample
    test_images: int | None = None
    # amortization gap
    amortization_images: int | None = None  # None: all of D_test (the paper)
    posterior_opt: PosteriorOptConfig = field(default_factory=PosteriorOptConfig)
    # robustness gap
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(delta=0.1, iterations=50))
    attack_images: int = 50
    attack_seeds: int = 10
    robustness_protocol: str = "vaegen"  # ROBUSTNESS_PROTOCOLS; kuzina ignores `msssim` (it has its own)
    msssim: MSSSIMConfig = field(default_factory=MSSSIMConfig)
    # beyond the paper
    iwae_k: int = 5000  # 0 skips IWAE
    iwae_images: int | None = None  # None: every image used for the generalization gap
    probes: bool = False
    probe_split: str = "test-halves"  # the paper's: fit on one seeded half of D_test, score on the other
    probe_train_images: int | None = 10000  # train-test split only: RBF-SVM training is quadratic in this
    smoothness: SmoothnessConfig = field(default_factory=SmoothnessConfig)  # the paper's Fig. 3; pairs=0 skips
    batch_size: int = 1000  # images per forward pass / per q* optimization batch
    max_decode: int = 8192  # at most this many latents decoded at once (bounds memory)


# How much is decoded at once, per architecture: the conv decoder keeps ~20 maps of n_c x 32 x 32 per image
# alive (under autograd for q*), the FC decoder a few kilobytes. Results do not depend on these.
CONV_BATCH_SIZE, CONV_MAX_DECODE = 128, 512


def paper_config(run_dir, dataset: str, arch: str = "fc") -> EvalConfig:
    """The paper's settings for `dataset`, batched for `arch`."""
    delta, iterations, images = PAPER_ATTACK.get(dataset, PAPER_ATTACK["fmnist"])
    config = EvalConfig(run_dir=str(run_dir), attack=AttackConfig(delta=delta, iterations=iterations),
                        attack_images=images)
    if arch == "conv":
        config = with_batching(config, CONV_BATCH_SIZE, CONV_MAX_DECODE)
    return config


def quick_config(run_dir, dataset: str, arch: str = "fc") -> EvalConfig:
    """Minutes on a CPU: subsampled splits, a shorter q* optimization, k=100, fewer attacked images and seeds."""
    paper = paper_config(run_dir, dataset, arch)
    return dataclasses.replace(
        paper, quick=True, elbo_samples=1, train_images=1000, test_images=1000, amortization_images=100,
        posterior_opt=dataclasses.replace(paper.posterior_opt, max_iters=300, eval_samples=20),
        attack_images=10, attack_seeds=3, iwae_k=100, iwae_images=200, probe_train_images=1000,
    )


def with_batching(config: EvalConfig, batch_size: int | None = None, max_decode: int | None = None) -> EvalConfig:
    """`batch_size` images per forward pass and per q* optimization batch, at most `max_decode` latents decoded
    at once; None keeps the current value."""
    return replace_given(config, batch_size=batch_size, max_decode=max_decode,
                         posterior_opt=replace_given(config.posterior_opt, batch_size=batch_size))


def replace_given(settings, **changes):
    """`dataclasses.replace` with the changes that are not None (an option the user did not give)."""
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})


# --- inputs ------------------------------------------------------------------------------------------------

def read_finished_run(run_dir: Path) -> RunFiles:
    """A VAE run the trainer finished, whose config names its dataset; a one-line error otherwise."""
    run = read_run(run_dir, require_finished=True)
    if "dataset" not in run.config:
        raise VaegenError(f"{run_dir / CONFIG_NAME} does not name the dataset the VAE was trained on")
    return run


def real_split(run_config: dict, split: str):
    """D_train / D_test exactly as the run defined them (same dataset, subset and subset seed); a run that held
    out a validation split for early stopping trained without those images, so they are not part of D_train."""
    data = open_dataset(run_config["dataset"], split, run_config.get("subset"), run_config.get("subset_seed", 0),
                        run_config.get("data_root", "data"))
    held_out = run_config.get("validation", {}).get("indices") if split == "train" else None
    if held_out:
        keep = np.setdiff1d(np.arange(len(data.labels)), held_out)
        data = dataclasses.replace(data, images=data.images[keep], labels=data.labels[keep])
    return data


# --- the measurements: each reads the same inputs and returns (summary, per-image arrays) --------------------

@dataclass
class EvalInputs:
    """What every measurement reads: the VAE and the preprocessed real images it is measured on."""

    vae: VAE
    dataset: str                   # the run's dataset (vaegen.data.DATASETS)
    x_train: torch.Tensor          # preprocessed D_train images (a seeded subsample with --train-images)
    x_test: torch.Tensor
    train_idx: np.ndarray          # their rows in the run's D_train / D_test
    test_idx: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
    device: torch.device


def subsample(n: int, size: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted indices of the seeded subsample `what` of range(n) (all of them when size is None or >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(numpy_rng(seed, "eval-subsample", SUBSAMPLE[what]).choice(n, size, replace=False))


def load_inputs(config: EvalConfig, run_config: dict, vae=None) -> EvalInputs:
    """Load the run's VAE (unless given) and its real D_train / D_test, subsampled and preprocessed once."""
    device = torch.device(config.device)
    run_dir = Path(config.run_dir)
    if vae is None:
        vae = load_vae(run_dir, device)  # eval mode: BatchNorm uses its running statistics throughout
        vae.requires_grad_(False)  # every gradient below is w.r.t. images or posterior parameters, never weights
    train, test = real_split(run_config, "train"), real_split(run_config, "test")
    if train.images.shape[1:] != vae.image_shape:
        raise VaegenError(f"the VAE in {run_dir} takes images {vae.image_shape}, but {run_config['dataset']} "
                          f"has {train.images.shape[1:]}")
    train_idx = subsample(len(train.images), config.train_images, config.seed, "train")
    test_idx = subsample(len(test.images), config.test_images, config.seed, "test")

    def preprocess(images_u8: np.ndarray, split: str) -> torch.Tensor:
        # binary-mnist: one fixed binarization per image for the whole evaluation
        g = torch_generator(config.seed, "eval-binarize", SPLIT[split], device=device)
        return vae.preprocess(torch.from_numpy(images_u8).to(device), g)

    return EvalInputs(vae, run_config["dataset"], preprocess(train.images[train_idx], "train"),
                      preprocess(test.images[test_idx], "test"), train_idx, test_idx, train.labels[train_idx],
                      test.labels[test_idx], device)


def measure_generalization(inp: EvalInputs, config: EvalConfig) -> tuple[dict, dict]:
    """G_g: mean amortized ELBO on the real D_train minus that on D_test."""
    common = {"batch_size": config.batch_size, "max_decode": config.max_decode}
    elbo = {split: amortized_elbo(inp.vae, x, config.elbo_samples,
                                  torch_generator(config.seed, "eval-elbo", SPLIT[split], device=inp.device),
                                  desc=f"ELBO {split}", **common)
            for split, x in (("train", inp.x_train), ("test", inp.x_test))}
    summary = {
        **difference_ci(elbo["train"].cpu(), elbo["test"].cpu()),
        "elbo_train": mean_ci(elbo["train"].cpu()), "elbo_test": mean_ci(elbo["test"].cpu()),
        "mc_samples_per_image": config.elbo_samples,
        "definition": "mean ELBO(real D_train) - mean ELBO(D_test), encoder posterior",
    }
    return summary, {"train/elbo": elbo["train"], "test/elbo": elbo["test"]}


def measure_amortization(inp: EvalInputs, config: EvalConfig, progress: bool = True) -> tuple[dict, dict]:
    """G_a: ELBO with q*(z|x) optimized per test image (decoder fixed) minus the amortized ELBO."""
    pick = subsample(len(inp.x_test), config.amortization_images, config.seed, "amortization")
    result = amortization_gap(inp.vae, inp.x_test[pick], config.posterior_opt,
                              torch_generator(config.seed, "eval-qstar", device=inp.device), config.max_decode,
                              progress=progress)
    converged = (result.iterations < config.posterior_opt.max_iters).float().mean()
    gap = mean_ci(result.gap.cpu())
    summary = {
        "gap": gap["mean"], "se": gap["se"], "ci95": gap["ci95"], "n_images": gap["n"],
        "elbo": mean_ci(result.elbo.cpu()), "elbo_star": mean_ci(result.elbo_star.cpu()),
        "iterations_mean": float(result.iterations.float().mean()), "converged_fraction": float(converged),
        "optimizer": dataclasses.asdict(config.posterior_opt),
        "definition": "mean over D_test of ELBO*(x) - ELBO(x); q* diagonal Gaussian per datapoint, "
                      "Adam from the encoder's output, decoder frozen; both ELBOs share their noise draws",
    }
    arrays = {"amortization/index": inp.test_idx[pick], "amortization/elbo": result.elbo,
              "amortization/elbo_star": result.elbo_star, "amortization/iterations": result.iterations}
    return summary, arrays


def g_r_summary(msssim_input: torch.Tensor, msssim_recon: torch.Tensor) -> dict:
    """G_r with its 95% interval over attack seeds, and its two terms, from (seeds, N) MS-SSIMs."""
    gap = (msssim_input - msssim_recon).cpu()
    over_seeds = mean_ci(gap.mean(1))
    return {"gap": over_seeds["mean"], "se": over_seeds["se"], "ci95": over_seeds["ci95"],
            "ci_over": "attack seeds (per-seed mean over images)", "per_seed": gap.mean(1).tolist(),
            "over_images": mean_ci(gap.mean(0)),
            "msssim_input": mean_ci(msssim_input.cpu()), "msssim_recon": mean_ci(msssim_recon.cpu())}


def measure_robustness(inp: EvalInputs, config: EvalConfig, progress: bool = True) -> tuple[dict, dict]:
    """G_r: MS-SSIM of attacked inputs minus MS-SSIM of their reconstructions, under Kuzina et al. 2022's
    encoder attack, measured by vaegen's protocol or by theirs (`evaluator.kuzina`; README: the differences)."""
    seeds = [derive(config.seed, "eval-attack-start", i) for i in range(config.attack_seeds)]
    if config.robustness_protocol == "kuzina":
        pick = kuzina.choose_images(inp.test_labels, config.attack_images)
        frame = kuzina.msssim_frame(inp.dataset)
        result = kuzina.robustness_gap(inp.vae, inp.x_test[pick], config.attack, seeds, frame, config.batch_size,
                                       progress=progress)
        protocol = kuzina.describe(frame)
    else:
        pick = subsample(len(inp.x_test), config.attack_images, config.seed, "robustness")
        result = robustness_gap(inp.vae, inp.x_test[pick], config.attack, seeds, config.msssim, config.batch_size,
                                progress=progress)
        protocol = {"reconstruction": "decoder mean at the posterior mean", "msssim_config": config.msssim.describe()}
    summary = {
        **g_r_summary(result.msssim_input, result.msssim_recon),
        "symmetric_kl": mean_ci(result.skl.cpu()), "n_images": len(pick), "seeds": seeds,
        "protocol": config.robustness_protocol, **protocol, "attack": dataclasses.asdict(config.attack),
        "definition": "E[MS-SSIM(x_r, x_a) - MS-SSIM(x~_r, x~_a)] = msssim_input - msssim_recon, x_a = L-inf "
                      f"attack maximizing SKL(q(z|x_r), q(z|x_a)), x~ = {protocol['reconstruction']}",
    }
    if result.variants:  # the same attacked inputs, scored with vaegen's MS-SSIM and/or x~ (evaluator.kuzina)
        summary["variants"] = {name: g_r_summary(*scores) for name, scores in result.variants.items()}
    arrays = {"robustness/index": inp.test_idx[pick], "robustness/seeds": np.asarray(seeds, dtype=np.uint64),
              "robustness/msssim_input": result.msssim_input, "robustness/msssim_recon": result.msssim_recon,
              "robustness/skl": result.skl}
    return summary, arrays


def measure_log_likelihood(inp: EvalInputs, config: EvalConfig) -> tuple[dict, dict]:
    """IWAE log p(x) on train and test (beyond the paper): how much of the ELBO's gap is the bound's."""
    log_px, arrays = {}, {}
    for split, x, idx in (("train", inp.x_train, inp.train_idx), ("test", inp.x_test, inp.test_idx)):
        pick = subsample(len(x), config.iwae_images, config.seed, f"iwae-{split}")
        xs, gen = x[pick], torch_generator(config.seed, "eval-iwae", SPLIT[split], device=inp.device)
        log_px[split] = torch.cat([
            iwae_log_px(inp.vae, xs[sl], config.iwae_k, gen, config.max_decode, progress=True)
            for sl in batches(len(xs), config.batch_size, f"IWAE k={config.iwae_k} {split}")
        ])
        arrays[f"{split}/iwae_index"], arrays[f"{split}/iwae"] = idx[pick], log_px[split]
    summary = {
        "k": config.iwae_k, "train": mean_ci(log_px["train"].cpu()), "test": mean_ci(log_px["test"].cpu()),
        "generalization_gap": difference_ci(log_px["train"].cpu(), log_px["test"].cpu()),
        "definition": "IWAE bound log (1/k) sum p(x, z_i)/q(z_i|x), encoder proposal",
    }
    return summary, arrays


def measure_psnr(inp: EvalInputs, config: EvalConfig) -> tuple[dict, dict]:
    with torch.no_grad():
        reconstructions = torch.cat([inp.vae.reconstruct(inp.x_test[sl])
                                     for sl in batches(len(inp.x_test), config.batch_size)])
    values = psnr(inp.x_test, reconstructions)
    summary = {"test": mean_ci(values.clamp(max=100).cpu()),
               "definition": "10 log10(1 / MSE(x, x~)) in dB, x~ = decoder mean at the posterior mean"}
    return summary, {"test/psnr": values}


def measure_probes(inp: EvalInputs, config: EvalConfig) -> tuple[dict, dict]:
    """Classifiers on posterior means (the paper's downstream test, Table 11): fit on one seeded half of the
    evaluated D_test and scored on the other half ("test-halves", the paper's protocol), or fit on D_train and
    scored on D_test ("train-test")."""
    def posterior_means(x):
        return torch.cat([inp.vae.encode(x[sl])[0] for sl in batches(len(x), config.batch_size)]).cpu().numpy()

    if config.probe_split == "test-halves":
        order = numpy_rng(config.seed, "eval-probe-split").permutation(len(inp.x_test))
        fit, score = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
        features = posterior_means(inp.x_test)
        fit_x, fit_y, score_x, score_y = features[fit], inp.test_labels[fit], features[score], inp.test_labels[score]
        split = {"fit": "D_test", "score": "D_test", "fit_images": len(fit), "score_images": len(score),
                 "seed": config.seed, "stream": "eval-probe-split"}
        arrays = {"probes/fit_index": inp.test_idx[fit], "probes/score_index": inp.test_idx[score]}
    else:
        fit = subsample(len(inp.x_train), config.probe_train_images, config.seed, "probe-train")
        fit_x, fit_y = posterior_means(inp.x_train[fit]), inp.train_labels[fit]
        score_x, score_y = posterior_means(inp.x_test), inp.test_labels
        split = {"fit": "D_train", "score": "D_test", "fit_images": len(fit), "score_images": len(score_y),
                 "seed": config.seed, "stream": "eval-subsample probe-train"}
        arrays = {"probes/fit_index": inp.train_idx[fit], "probes/score_index": inp.test_idx}
    accuracies = probe_accuracies(fit_x, fit_y, score_x, score_y, config.seed)
    return {"accuracy": accuracies, "split": {"kind": config.probe_split, **split},
            "features": "posterior means of the encoder"}, arrays


def measure_smoothness(inp: EvalInputs, config: EvalConfig) -> tuple[dict, dict]:
    """Latent smoothness (the paper's §5.3, Fig. 3): log q(z_a | x~_a) along lines between the posterior means
    of seeded pairs of test images."""
    result = latent_smoothness(inp.vae, inp.x_test, config.smoothness, config.seed, config.max_decode,
                               progress=True)
    return smoothness_summary(result), smoothness_arrays(result, inp.test_idx)


# --- the run -----------------------------------------------------------------------------------------------

def measurements(config: EvalConfig) -> dict:
    """name in gaps.json -> measurement, in the order they run."""
    chosen = {"generalization": measure_generalization, "amortization": measure_amortization,
              "robustness": measure_robustness}
    plan = {name: fn for name, fn in chosen.items() if name in config.gaps}
    if config.iwae_k > 0:
        plan["log_likelihood"] = measure_log_likelihood
    plan["psnr"] = measure_psnr
    if config.probes:
        plan["probes"] = measure_probes
    if config.smoothness.pairs > 0:
        plan["smoothness"] = measure_smoothness
    return plan


def evaluate(config: EvalConfig) -> Path:
    """Run every requested measurement and write <run_dir>/eval/; returns that directory."""
    run_dir = Path(config.run_dir)
    run_config = read_finished_run(run_dir).config
    if Path(config.eval_dir).name != config.eval_dir or config.eval_dir in (".", ".."):
        raise VaegenError(f"--eval-dir {config.eval_dir!r}: a directory name inside the run, without '/'")
    unknown = sorted(set(config.gaps) - set(GAPS))
    if unknown:
        raise VaegenError(f"unknown gap(s) {', '.join(unknown)}; choose from {', '.join(GAPS)}")
    if config.robustness_protocol not in ROBUSTNESS_PROTOCOLS:
        raise VaegenError(f"unknown robustness protocol {config.robustness_protocol!r}; choose from "
                          f"{', '.join(ROBUSTNESS_PROTOCOLS)}")
    if config.robustness_protocol == "kuzina" and config.attack.update != "sgd":
        raise VaegenError("--robustness-protocol kuzina takes their plain SGD steps; drop --attack-update "
                          f"{config.attack.update}")
    set_resume_hint("rerun the same command: an evaluation starts over, the previous eval/ is kept until then")
    with run_lock(run_dir):
        inp = load_inputs(config, run_config)
        summary, arrays = {}, {"train/index": inp.train_idx, "test/index": inp.test_idx}
        for name, measure in measurements(config).items():
            summary[name], new_arrays = measure(inp, config)
            arrays.update(new_arrays)
        # A tracked run copied for an untracked request (studies reuse it) comes without its snapshots: no curves.
        tracked = run_config.get("track_gaps") and (run_dir / SNAPSHOTS).is_dir()
        curves = gap_curves(inp, config, run_config) if tracked else None
        summary.update({
            "run_dir": str(run_dir), "dataset": run_config["dataset"], "model": inp.vae.config,
            "units": "nats per image, summed over pixels; x in [0, 1] (densities for gaussian, probabilities for "
                     "bernoulli/dmol); MS-SSIM in [0, 1]; PSNR in dB; smoothness log q: nats of the "
                     "d_z-dimensional latent density",
            "n_train": len(inp.train_idx), "n_test": len(inp.test_idx),
            "provenance": run_record(config, inputs={
                "model_sha256": sha256_file(run_dir / MODEL_WEIGHTS_NAME),
                "data_store": str(store_path(run_config["dataset"], run_config.get("subset"),
                                             run_config.get("subset_seed", 0), run_config.get("data_root", "data"))),
            }),
        })
        if curves is not None:
            summary["gap_curves"] = {"file": GAP_CURVES_NAME, "points": len(curves),
                                     "settings": tracking_settings(run_config)}
        return write_eval_dir(run_dir / config.eval_dir, summary, arrays, curves)


def tracking_settings(run_config: dict) -> dict:
    return {k: run_config[f"track_{k}"] for k in ("amortization_every", "robustness_every", "amortization_images",
                                                   "robustness_images", "robustness_seeds")}


def gap_curves(inp: EvalInputs, config: EvalConfig, run_config: dict) -> list[dict]:
    """G_a and G_r of every snapshot the trainer kept (--track-gaps), by the same measurements as the final
    gaps, on the run's tracking subsample sizes; the last point is the final model's."""
    track = tracking_settings(run_config)
    tracked = dataclasses.replace(config, amortization_images=track["amortization_images"],
                                  attack_images=track["robustness_images"], attack_seeds=track["robustness_seeds"])
    epochs = run_config.get("epochs")
    points = []
    snapshots = sorted((Path(config.run_dir) / SNAPSHOTS).glob("epoch-*.safetensors"))
    for path in tqdm(snapshots, desc="gap curves", unit="snapshot"):
        epoch = int(path.stem.split("-")[1])
        last = epoch == epochs or path == snapshots[-1]
        inp.vae.load_state_dict(load_file(str(path), device=str(inp.device)))
        for gap, every, measure in (("amortization", track["amortization_every"], measure_amortization),
                                    ("robustness", track["robustness_every"], measure_robustness)):
            if epoch % every == 0 or last:
                result, _ = measure(inp, tracked, progress=False)
                points.append({"epoch": epoch, "gap": gap, "mean": result["gap"], "se": result["se"],
                               "ci95": result["ci95"], "n_images": result["n_images"]})
    return points


def write_eval_dir(final: Path, summary: dict, arrays: dict, curves: list[dict] | None = None) -> Path:
    """Write gaps.json + per_example.zarr (+ gap_curves.jsonl) under a temporary name, then swap it in for
    `final` (<run>/eval)."""
    import zarr

    run_dir = final.parent
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    old = run_dir / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        root = zarr.open_group(str(tmp / "per_example.zarr"), mode="w", zarr_format=3)
        for name, values in tqdm(sorted(arrays.items()), desc="write", leave=False):
            data = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
            root.create_array(name, data=data)
        root.attrs.update({"description": "per-image evaluation arrays; */index are rows of the run's real "
                                          "D_train / D_test; see gaps.json for settings"})
        if curves is not None:
            write_text_atomic(tmp / GAP_CURVES_NAME, "".join(json.dumps(c) + "\n" for c in curves))
        write_json_atomic(tmp / GAPS_NAME, summary)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final
