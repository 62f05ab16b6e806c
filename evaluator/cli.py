"""`vaegen eval` / `vaegen-eval`: a thin click shell over `evaluator.evaluate.evaluate`."""

from __future__ import annotations

from pathlib import Path

import click

from evaluator.attack import UPDATES
from evaluator.evaluate import GAPS, EvalConfig, paper_config, quick_config, read_run
from evaluator.evaluate import evaluate as run_evaluation
from vaegen.errors import VaegenError
from vaegen.options import CONTEXT, device_option, resolve_device, set_threads, threads_option

POSITIVE = click.IntRange(min=1)
PER_DATASET = "paper, per dataset"


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
@click.option("--iwae-k", type=click.IntRange(min=0), default=None, show_default="5000; 100 with --quick",
              help="Importance samples for IWAE log p(x) on train and test; 0 skips it.")
@click.option("--probes", is_flag=True, help="Fit logistic regression, linear/RBF SVM and 5-NN on posterior means.")
@click.option("--probe-split", type=click.Choice(["test-halves", "train-test"]), default=EvalConfig.probe_split,
              help="test-halves: fit on a seeded half of D_test, score on the other half (the paper); "
                   "train-test: fit on D_train, score on D_test.")
@click.option("--quick", is_flag=True,
              help="CPU smoke settings: 1000 train/test images, 100 for G_a (300 Adam steps), 10 images x 3 "
                   "seeds for G_r, k=100 on 200 images. Explicit options still win.")
@device_option
@threads_option
@click.option("--seed", default=EvalConfig.seed, type=click.IntRange(min=0),
              help="Seeds every subsample, noise draw and attack.")
@click.option("--elbo-samples", type=POSITIVE, default=None, show_default="10; 1 with --quick",
              help="Monte-Carlo samples per image for the ELBO of G_g.")
@click.option("--train-images", type=POSITIVE, default=None, show_default="full split; 1000 with --quick",
              help="Seeded subsample of D_train.")
@click.option("--test-images", type=POSITIVE, default=None, show_default="full split; 1000 with --quick",
              help="Seeded subsample of D_test.")
@click.option("--amortization-images", type=POSITIVE, default=None, show_default="all test images; 100 with --quick",
              help="Test images whose q* is optimized for G_a.")
@click.option("--qstar-lr", type=click.FloatRange(min=0, min_open=True), default=None, show_default="0.01",
              help="Adam learning rate of q*.")
@click.option("--qstar-max-iters", type=POSITIVE, default=None, show_default="2000; 300 with --quick",
              help="Most Adam steps per datapoint.")
@click.option("--qstar-samples", type=POSITIVE, default=None, show_default="4",
              help="Monte-Carlo samples per Adam step.")
@click.option("--qstar-check-every", type=POSITIVE, default=None, show_default="50",
              help="Convergence test window (steps).")
@click.option("--qstar-patience", type=POSITIVE, default=None, show_default="3",
              help="Windows without improvement before a datapoint is frozen.")
@click.option("--qstar-tol", type=click.FloatRange(min=0), default=None, show_default="0.01",
              help="Smallest window-mean ELBO gain (nats) that counts as improvement.")
@click.option("--qstar-eval-samples", type=POSITIVE, default=None, show_default="100; 20 with --quick",
              help="Monte-Carlo samples of the final ELBO* and ELBO (shared noise).")
@click.option("--attack-delta", type=click.FloatRange(0, 1, min_open=True), default=None,
              show_default="0.1 (MNIST-type), 0.05 (cifar10)", help="L-inf radius of the attack.")
@click.option("--attack-iters", type=POSITIVE, default=None, show_default="50 (MNIST-type), 100 (cifar10)",
              help="PGD iterations.")
@click.option("--attack-step-size", type=click.FloatRange(min=0, min_open=True), default=None, show_default="1.0",
              help="PGD learning rate (sgd) or fraction of delta per step (sign).")
@click.option("--attack-update", type=click.Choice(UPDATES), default=None, show_default="sgd",
              help="sgd: raw-gradient steps as Kuzina et al. 2022; sign: Madry et al. signed steps.")
@click.option("--attack-images", type=POSITIVE, default=None,
              show_default="50 (MNIST-type), 20 (cifar10); 10 with --quick", help="Attacked test images.")
@click.option("--attack-seeds", type=POSITIVE, default=None, show_default="10; 3 with --quick",
              help="Random starts per image; G_r's confidence interval is over these.")
@click.option("--iwae-images", type=POSITIVE, default=None, show_default="all evaluated images; 200 with --quick",
              help="Images per split for IWAE.")
@click.option("--probe-train-images", type=POSITIVE, default=None, show_default="10000; 1000 with --quick",
              help="--probe-split train-test: training images for the probes (RBF-SVM cost is quadratic).")
@click.option("--smoothness-pairs", type=click.IntRange(min=0), default=None, show_default="50",
              help="Latent smoothness (the paper's Fig. 3): seeded pairs of test images along whose latent "
                   "interpolation log q(z|x~) is measured; 0 skips it.")
@click.option("--smoothness-alphas", type=click.IntRange(min=3), default=None, show_default="21",
              help="Interpolation points in [0, 1] per pair, both ends included.")
@click.option("--batch-size", type=POSITIVE, default=None, show_default="1000; 128 for conv VAEs",
              help="Images per forward pass and per q* optimization batch.")
@click.option("--max-decode", type=POSITIVE, default=None, show_default="8192; 512 for conv VAEs",
              help="Most latents decoded in one forward pass (bounds memory).")
def evaluate(run_dir, gaps, iwae_k, probes, probe_split, quick, device, threads, seed, elbo_samples,
             train_images, test_images, amortization_images, qstar_lr, qstar_max_iters, qstar_samples, qstar_check_every, qstar_patience,
             qstar_tol, qstar_eval_samples, attack_delta, attack_iters, attack_step_size, attack_update,
             attack_images, attack_seeds, iwae_images, probe_train_images, smoothness_pairs, smoothness_alphas,
             batch_size, max_decode):
    """Measure a trained VAE's generalization, amortization and robustness gaps (plus IWAE log p(x), PSNR and
    optional probes) and write RUN_DIR/eval/gaps.json and RUN_DIR/eval/per_example.zarr."""
    set_threads(threads)
    device = str(resolve_device(device))
    run_config, model_config = read_run(run_dir)
    dataset, arch = run_config["dataset"], model_config.get("arch", "fc")
    overrides = {
        "gaps": gaps, "seed": seed, "device": device, "probes": probes, "probe_split": probe_split, "iwae_k": iwae_k,
        "elbo_samples": elbo_samples, "train_images": train_images, "test_images": test_images,
        "amortization_images": amortization_images, "attack_images": attack_images, "attack_seeds": attack_seeds,
        "iwae_images": iwae_images, "probe_train_images": probe_train_images, "batch_size": batch_size,
        "max_decode": max_decode,
        "posterior_opt.lr": qstar_lr, "posterior_opt.max_iters": qstar_max_iters,
        "posterior_opt.samples_per_step": qstar_samples, "posterior_opt.check_every": qstar_check_every,
        "posterior_opt.patience": qstar_patience, "posterior_opt.tol": qstar_tol,
        "posterior_opt.eval_samples": qstar_eval_samples, "posterior_opt.batch_size": batch_size,
        "attack.delta": attack_delta, "attack.iterations": attack_iters, "attack.step_size": attack_step_size,
        "attack.update": attack_update,
        "smoothness.pairs": smoothness_pairs, "smoothness.alphas": smoothness_alphas,
    }
    config = (quick_config if quick else paper_config)(run_dir, dataset, arch, **overrides)
    out = run_evaluation(config)
    click.echo(str(out))
