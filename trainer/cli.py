"""`vaegen train` / `vaegen-train` / `accelerate launch -m trainer`: a thin click shell over `trainer.train.train`."""

from __future__ import annotations

import click

from vaegen.data import DATASETS


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)), help="Which dataset's D_train/D_test.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory, e.g. runs/vae/NAME.")
@click.option("--shards", default=None,
              help="DMaaPx data: a shard run directory or a pattern like 'shards/fmnist/RUN/shard-{000000..000099}.tar'.")
@click.option("--source", type=click.Choice(["shards", "real"]), default="shards",
              help="shards (DMaaPx, needs --shards) or real (normal training on D_train).")
@click.option("--subset", default=None, type=click.IntRange(min=1),
              help="D_train is the seeded subset store data/<dataset>-n<SUBSET>-s<SEED>.zarr (vaegen data --subset).")
@click.option("--subset-seed", default=0, type=click.IntRange(min=0), help="Seed of the subset store.")
@click.option("--data-root", default="data", type=click.Path(file_okay=False), help="Where the dataset stores are.")
@click.option("--scale", default=None, type=click.IntRange(min=1),
              help="Pool = the first SCALE*N shard samples (fresh data for SCALE epochs) [default: all whole epochs].")
@click.option("--augment", default=None, type=click.Choice(["naive", "tuned"]),
              help="ADA-style augmentation of real data (paper's Aug.Naive / Aug.Tuned).")
@click.option("--augment-p", default=0.1, type=click.FloatRange(0, 1), help="Probability of each augmentation op.")
@click.option("--mix-real", default=0.0, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of every epoch drawn from D_train when training on shards.")
@click.option("--epochs", default=1000, type=click.IntRange(min=1), help="Effective epochs of N = |D_train| images.")
@click.option("--seed", default=0, type=click.IntRange(min=0), help="Seed of init, data order and all noise.")
@click.option("--arch", default=None, type=click.Choice(["fc", "conv"]),
              help="VAE architecture [default: fc for 1-channel datasets, conv for cifar10].")
@click.option("--likelihood", default=None, type=click.Choice(["bernoulli", "gaussian", "dmol"]),
              help="Decoder likelihood [default: the dataset's: gaussian fmnist/mnist, bernoulli binary-mnist, "
                   "dmol cifar10].")
@click.option("--sigma", default=0.1, type=click.FloatRange(min=0, min_open=True),
              help="Fixed standard deviation of the Gaussian likelihood (pixels in [0, 1]).")
@click.option("--n-mix", default=10, type=click.IntRange(min=1), help="Mixture components of the dmol likelihood.")
@click.option("--mz", default=1, type=click.IntRange(min=1), help="Conv VAE latent channels (d_z = 64*mz).")
@click.option("--nc", default=256, type=click.IntRange(min=1), help="Conv VAE width.")
@click.option("--batch-size", default=128, type=click.IntRange(min=1), help="Images per step and process.")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate [default: 1e-3 fc, 2e-4 conv].")
@click.option("--eval-every", default=10, type=click.IntRange(min=1),
              help="Epochs between real train/test ELBO points in metrics.jsonl.")
@click.option("--eval-images", default=None, type=click.IntRange(min=1),
              help="Evaluate on a fixed random sample of this many real train/test images [default: all].")
@click.option("--eval-batch-size", default=500, type=click.IntRange(min=1), help="Images per evaluation step.")
@click.option("--checkpoint-every", default=10, type=click.IntRange(min=1), help="Epochs between checkpoints.")
@click.option("--bf16", is_flag=True, help="bf16 autocast (GPU); likelihoods and the ELBO stay float32.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train(**options):
    """Train a VAE on diffusion-model samples (DMaaPx), real data, or augmented real data.

    Multi-GPU: accelerate launch -m trainer --dataset ... (same options).
    """
    from trainer.train import TrainConfig
    from trainer.train import train as run_training

    click.echo(str(run_training(TrainConfig(**options))))
