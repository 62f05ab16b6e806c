"""`vaegen eval` / `vaegen-eval`: a thin click shell over `evaluator.evaluate.evaluate`."""

from __future__ import annotations

from pathlib import Path

import click

from evaluator.attack import UPDATES
from evaluator.evaluate import (
    GAPS,
    PAPER_ATTACK,
    ROBUSTNESS_PROTOCOLS,
    EvalConfig,
    paper_config,
    quick_config,
    read_finished_run,
    replace_given,
    with_batching,
)
from evaluator.evaluate import evaluate as run_evaluation
from vaegen.errors import VaegenError
from vaegen.options import CONTEXT, device_option, resolve_device, set_threads, threads_option

POSITIVE = click.IntRange(min=1)
# What --help shows as defaults is read off the configs themselves, so it cannot drift from them.
PAPER, QUICK = paper_config("RUN", "fmnist"), quick_config("RUN", "fmnist")
CONV = paper_config("RUN", "fmnist", arch="conv")
MNIST_TYPE, CIFAR = PAPER_ATTACK["fmnist"], PAPER_ATTACK["cifar10"]


def per_mode(paper, quick=None) -> str:
    """A shown default: the paper's value, and --quick's where it differs."""
    return str(paper) if quick is None or quick == paper else f"{paper}; {quick} with --quick"


def per_dataset(mnist_type, cifar10, quick=None) -> str:
    shown = f"{mnist_type} (MNIST-type), {cifar10} (cifar10)"
    return shown if quick is None else f"{shown}; {quick} with --quick"


def setting(name: str, type_, shown: str, help: str):
    """An option that overrides one evaluation setting; unset (None), the paper's or --quick's value holds."""
    return click.option(name, type=type_, default=None, show_default=shown, help=help)


def _parse_gaps(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(set(names) - set(GAPS))
    if unknown:
        raise VaegenError(f"--gaps: unknown gap(s) {', '.join(unknown)}; choose from {', '.join(GAPS)}")
    return names


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--gaps", default=",".join(GAPS), callback=_parse_gaps,
              help="Comma-separated gaps to measure (empty string: none).")
@setting("--iwae-k", click.IntRange(min=0),
         f"with --gaps generalization: {per_mode(PAPER.iwae_k, QUICK.iwae_k)}; else 0",
         "Importance samples for IWAE log p(x) on train and test; 0 skips it.")
@click.option("--probes", is_flag=True, help="Fit logistic regression, linear/RBF SVM and 5-NN on posterior means.")
@click.option("--probe-split", type=click.Choice(["test-halves", "train-test"]), default=EvalConfig.probe_split,
              help="test-halves: fit on a seeded half of D_test, score on the other half (the paper); "
                   "train-test: fit on D_train, score on D_test.")
@click.option("--quick", is_flag=True,
              help=f"CPU smoke settings: {QUICK.train_images} train/test images, {QUICK.amortization_images} for "
                   f"G_a ({QUICK.posterior_opt.max_iters} Adam steps), {QUICK.attack_images} images x "
                   f"{QUICK.attack_seeds} seeds for G_r, k={QUICK.iwae_k} on {QUICK.iwae_images} images. "
                   "Explicit options still win.")
@device_option
@threads_option
@click.option("--seed", default=EvalConfig.seed, type=click.IntRange(min=0),
              help="Seeds every subsample, noise draw and attack.")
@setting("--elbo-samples", POSITIVE, per_mode(PAPER.elbo_samples, QUICK.elbo_samples),
         "Monte-Carlo samples per image for the ELBO of G_g.")
@setting("--train-images", POSITIVE, per_mode("full split", QUICK.train_images), "Seeded subsample of D_train.")
@setting("--test-images", POSITIVE, per_mode("full split", QUICK.test_images), "Seeded subsample of D_test.")
@setting("--amortization-images", POSITIVE, per_mode("all test images", QUICK.amortization_images),
         "Test images whose q* is optimized for G_a.")
@setting("--qstar-lr", click.FloatRange(min=0, min_open=True), per_mode(PAPER.posterior_opt.lr),
         "Adam learning rate of q*.")
@setting("--qstar-max-iters", POSITIVE, per_mode(PAPER.posterior_opt.max_iters, QUICK.posterior_opt.max_iters),
         "Most Adam steps per datapoint.")
@setting("--qstar-samples", POSITIVE, per_mode(PAPER.posterior_opt.samples_per_step),
         "Monte-Carlo samples per Adam step.")
@setting("--qstar-check-every", POSITIVE, per_mode(PAPER.posterior_opt.check_every),
         "Convergence test window (steps).")
@setting("--qstar-patience", POSITIVE, per_mode(PAPER.posterior_opt.patience),
         "Windows without improvement before a datapoint is frozen.")
@setting("--qstar-tol", click.FloatRange(min=0), per_mode(PAPER.posterior_opt.tol),
         "Smallest window-mean ELBO gain (nats) that counts as improvement.")
@setting("--qstar-eval-samples", POSITIVE,
         per_mode(PAPER.posterior_opt.eval_samples, QUICK.posterior_opt.eval_samples),
         "Monte-Carlo samples of the final ELBO* and ELBO (shared noise).")
@click.option("--eval-dir", default=EvalConfig.eval_dir,
              help="Where in RUN_DIR to write (another name keeps a second evaluation beside the first, e.g. "
                   "eval-kuzina for another robustness protocol).")
@click.option("--robustness-protocol", type=click.Choice(ROBUSTNESS_PROTOCOLS),
              default=EvalConfig.robustness_protocol,
              help="How G_r is measured: vaegen's protocol, or kuzina: Kuzina et al.'s public attack code step by "
                   "step (stratified images, N(0, 0.2^2) start, last iterate, x~ from z ~ q, their MS-SSIM). "
                   "The README's evaluator section lists every difference.")
@setting("--attack-delta", click.FloatRange(0, 1, min_open=True), per_dataset(MNIST_TYPE[0], CIFAR[0]),
         "L-inf radius of the attack.")
@setting("--attack-iters", POSITIVE, per_dataset(MNIST_TYPE[1], CIFAR[1]), "PGD iterations.")
@setting("--attack-step-size", click.FloatRange(min=0, min_open=True), per_mode(PAPER.attack.step_size),
         "PGD learning rate (sgd) or fraction of delta per step (sign).")
@setting("--attack-update", click.Choice(UPDATES), per_mode(PAPER.attack.update),
         "sgd: raw-gradient steps as Kuzina et al. 2022; sign: Madry et al. signed steps.")
@setting("--attack-images", POSITIVE, per_dataset(MNIST_TYPE[2], CIFAR[2], QUICK.attack_images),
         "Attacked test images.")
@setting("--attack-seeds", POSITIVE, per_mode(PAPER.attack_seeds, QUICK.attack_seeds),
         "Random starts per image; G_r's confidence interval is over these.")
@setting("--iwae-images", POSITIVE, per_mode("all evaluated images", QUICK.iwae_images), "Images per split for IWAE.")
@setting("--probe-train-images", POSITIVE, per_mode(PAPER.probe_train_images, QUICK.probe_train_images),
         "--probe-split train-test: training images for the probes (RBF-SVM cost is quadratic).")
@setting("--smoothness-pairs", click.IntRange(min=0), per_mode(PAPER.smoothness.pairs),
         "Latent smoothness (the paper's Fig. 3): seeded pairs of test images along whose latent interpolation "
         "log q(z|x~) is measured; 0 skips it.")
@setting("--smoothness-alphas", click.IntRange(min=3), per_mode(PAPER.smoothness.alphas),
         "Interpolation points in [0, 1] per pair, both ends included.")
@setting("--batch-size", POSITIVE, f"{PAPER.batch_size}; {CONV.batch_size} for conv VAEs",
         "Images per forward pass and per q* optimization batch.")
@setting("--max-decode", POSITIVE, f"{PAPER.max_decode}; {CONV.max_decode} for conv VAEs",
         "Most latents decoded in one forward pass (bounds memory).")
def evaluate(run_dir, gaps, iwae_k, probes, probe_split, quick, device, threads, seed, elbo_samples,
             train_images, test_images, amortization_images, qstar_lr, qstar_max_iters, qstar_samples,
             qstar_check_every, qstar_patience, qstar_tol, qstar_eval_samples, robustness_protocol, attack_delta,
             attack_iters, attack_step_size, attack_update, attack_images, attack_seeds, iwae_images,
             probe_train_images, smoothness_pairs, smoothness_alphas, batch_size, max_decode, eval_dir):
    """Measure a trained VAE's generalization, amortization and robustness gaps (plus IWAE log p(x), PSNR and
    optional probes) and write RUN_DIR/eval/gaps.json and RUN_DIR/eval/per_example.zarr (or --eval-dir)."""
    set_threads(threads)
    run = read_finished_run(run_dir)
    base = (quick_config if quick else paper_config)(run_dir, run.config["dataset"], run.model.get("arch", "fc"))
    if iwae_k is None and "generalization" not in gaps:
        # IWAE log p(x) answers G_g's question (how much likelier train than test is) and costs the most of any
        # measurement (k=5000 on every image: an hour a run on a CPU); `--gaps robustness` alone should not pay it.
        iwae_k = 0
    config = replace_given(
        base, gaps=gaps, eval_dir=eval_dir, seed=seed, device=str(resolve_device(device)), probes=probes, probe_split=probe_split,
        iwae_k=iwae_k, elbo_samples=elbo_samples, train_images=train_images, test_images=test_images,
        amortization_images=amortization_images, robustness_protocol=robustness_protocol,
        attack_images=attack_images, attack_seeds=attack_seeds, iwae_images=iwae_images,
        probe_train_images=probe_train_images,
        posterior_opt=replace_given(base.posterior_opt, lr=qstar_lr, max_iters=qstar_max_iters,
                                    samples_per_step=qstar_samples, check_every=qstar_check_every,
                                    patience=qstar_patience, tol=qstar_tol, eval_samples=qstar_eval_samples),
        attack=replace_given(base.attack, delta=attack_delta, iterations=attack_iters, step_size=attack_step_size,
                             update=attack_update),
        smoothness=replace_given(base.smoothness, pairs=smoothness_pairs, alphas=smoothness_alphas),
    )
    out = run_evaluation(with_batching(config, batch_size, max_decode))
    click.echo(str(out))
