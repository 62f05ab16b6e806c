"""`vaegen train` / `vaegen-train` / `accelerate launch -m trainer`: a thin click shell over `trainer.train.train`."""

from __future__ import annotations

import click

from trainer.augment import FLIP_READINGS, OUTPUTS, SIGMA_READINGS
from trainer.data import POOL_ON_DEVICE
from trainer.likelihoods import LIKELIHOODS
from trainer.train import TrainConfig as Defaults
from vaegen.launch import is_main_process
from vaegen.options import CONTEXT, dataset_options, tracking_options


@click.command(context_settings=CONTEXT)
@dataset_options(required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory, e.g. runs/vae/NAME.")
@click.option("--shards", default=None,
              help="DMaaPx data: a shard run directory or URL (s3://bucket/prefix/RUN, any fsspec URL), or a pattern "
                   "like 'shards/fmnist/RUN/shard-{000000..000099}.tar'.")
@click.option("--source", type=click.Choice(["shards", "real"]), default=Defaults.source,
              help="shards (DMaaPx, needs --shards) or real (normal training on D_train).")
@click.option("--scale", default=None, type=click.IntRange(min=1),
              help="Pool = the first SCALE*N shard samples (fresh data for SCALE epochs) [default: all whole epochs].")
@click.option("--augment", default=None, type=click.Choice(["naive", "tuned"]),
              help="StyleGAN2-ADA augmentation of the real data (the paper's Aug.Naive / Aug.Tuned: tables 8-10); "
                   "with --mix-real, of the real part only.")
@click.option("--augment-p", default=Defaults.augment_p, type=click.FloatRange(0, 1),
              help="b: the probability of each op (the paper names 0.1 and 0.12).")
@click.option("--augment-sigma-reading", default=Defaults.augment_sigma_reading, type=click.Choice(SIGMA_READINGS),
              help="Tables' 'sigma in [0, s]': std = log2 factor ~ N(0, s^2) (ADA); range = sigma ~ U(0, s) per image.")
@click.option("--augment-flip-reading", default=Defaults.augment_flip_reading, type=click.Choice(FLIP_READINGS),
              help="ada: an applied flip mirrors with probability 1/2 (ADA's xflip); always: it always mirrors.")
@click.option("--augment-output", default=Defaults.augment_output, type=click.Choice(OUTPUTS),
              help="uint8: augmented images rounded and clamped to [0, 255], like stored images; float: left as "
                   "unclamped floats, as StyleGAN2-ADA does (Gaussian likelihoods only).")
@click.option("--mix-real", default=Defaults.mix_real, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of every epoch drawn from D_train when training on shards.")
@click.option("--epochs", default=Defaults.epochs, type=click.IntRange(min=1), help="Effective epochs of N = |D_train| images.")
@click.option("--seed", default=Defaults.seed, type=click.IntRange(min=0), help="Seed of init, data order and all noise.")
@click.option("--arch", default=None, type=click.Choice(["fc", "conv"]),
              help="VAE architecture [default: fc for 1-channel datasets, conv for cifar10].")
@click.option("--likelihood", default=None, type=click.Choice(LIKELIHOODS),
              help="Decoder likelihood [default: the dataset's: gaussian fmnist/mnist, bernoulli binary-mnist, "
                   "dmol cifar10]; gaussian-calibrated: one sigma fitted to the data (Rybkin et al. 2021).")
@click.option("--sigma", default=Defaults.sigma, type=click.FloatRange(min=0, min_open=True),
              help="Fixed standard deviation of the gaussian likelihood (pixels in [0, 1]); gaussian-calibrated "
                   "sets its own.")
@click.option("--n-mix", default=Defaults.n_mix, type=click.IntRange(min=1), help="Mixture components of the dmol likelihood.")
@click.option("--mz", default=Defaults.mz, type=click.IntRange(min=1), help="Conv VAE latent channels (d_z = 64*mz).")
@click.option("--nc", default=Defaults.nc, type=click.IntRange(min=1), help="Conv VAE width.")
@click.option("--batch-size", default=Defaults.batch_size, type=click.IntRange(min=1), help="Images per step and process.")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate [default: 1e-3 fc, 2e-4 conv].")
@click.option("--eval-every", default=Defaults.eval_every, type=click.IntRange(min=1),
              help="Epochs between real train/test ELBO points in metrics.jsonl.")
@click.option("--eval-images", default=None, type=click.IntRange(min=1),
              help="Evaluate on a fixed random sample of this many real train/test images [default: all].")
@click.option("--eval-batch-size", default=Defaults.eval_batch_size, type=click.IntRange(min=1), help="Images per evaluation step.")
@click.option("--checkpoint-every", default=Defaults.checkpoint_every, type=click.IntRange(min=1), help="Epochs between checkpoints.")
@click.option("--bf16", is_flag=True, help="bf16 autocast (GPU); likelihoods and the ELBO stay float32.")
@click.option("--pool-on-device", default=Defaults.pool_on_device, type=click.Choice(POOL_ON_DEVICE),
              help="Keep the decoded shard pool on the training device and draw batches from it (the same batches "
                   "as streaming); auto: when it takes at most half the free memory and the run would stream it "
                   "all anyway.")
@tracking_options
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--epoch-size", default=None, type=click.IntRange(min=1),
              help="--source real: images per effective epoch [default: |D_train|]; a larger D_train then gives "
                   "fresh images for |D_train|/SIZE epochs at the same compute (real-vs-synthetic control).")
@click.option("--weight-decay", default=Defaults.weight_decay, type=click.FloatRange(min=0),
              help="Decoupled weight decay (AdamW) when > 0.")
@click.option("--mollify", is_flag=True,
              help="Aug.Mollify (Tran et al. 2023): annealed Gaussian input noise, then clean data.")
@click.option("--mollify-epochs", default=None, type=click.IntRange(min=1),
              help="Epochs of mollification [default: half of --epochs].")
@click.option("--rha", is_flag=True,
              help="Reverse Half Asleep: from --rha-start-epoch, train only the encoder on the VAE's own samples.")
@click.option("--rha-start-epoch", default=None, type=click.IntRange(min=0),
              help="Epoch at which the decoder freezes [default: half of --epochs].")
@click.option("--early-stopping-split", default=Defaults.early_stopping_split, type=click.FloatRange(0, 1, max_open=True),
              help="--source real: hold out this fraction of D_train as validation set and keep the best model.")
@click.option("--early-stopping-patience", default=Defaults.early_stopping_patience, type=click.IntRange(min=1),
              help="Evaluations (every --eval-every epochs) without a better validation ELBO before stopping.")
@click.option("--track-gaps", is_flag=True,
              help="Save model snapshots so that vaegen-eval measures G_a and G_r curves (eval/gap_curves.jsonl).")
@click.option("--track-amortization-every", default=Defaults.track_amortization_every, type=click.IntRange(min=1),
              help="Epochs between G_a points (the paper: 100).")
@click.option("--track-robustness-every", default=Defaults.track_robustness_every, type=click.IntRange(min=1),
              help="Epochs between G_r points (the paper: 10).")
@click.option("--track-amortization-images", default=Defaults.track_amortization_images, type=click.IntRange(min=1),
              help="Test images whose q* is optimized at each G_a point.")
@click.option("--track-robustness-images", default=Defaults.track_robustness_images, type=click.IntRange(min=1),
              help="Attacked test images at each G_r point.")
@click.option("--track-robustness-seeds", default=Defaults.track_robustness_seeds, type=click.IntRange(min=1),
              help="Attack seeds per image at each G_r point.")
def train(**options):
    """Train a VAE on diffusion-model samples (DMaaPx), real data, or augmented real data.

    Multi-GPU: accelerate launch -m trainer --dataset ... (same options).
    """
    from trainer.train import train as run_training

    out = run_training(Defaults(**options))
    if is_main_process():  # one line per launch, not per rank
        click.echo(str(out))
