"""Click options shared by every command, declared once so that a flag means the same thing everywhere.

    @click.command(context_settings=CONTEXT)
    @dataset_options()            # --dataset --subset --subset-seed --data-root
    @device_option
    @threads_option

Defaults come from the stage's config dataclass where there is one (a test checks every shown default against
its dataclass field), and `resolve_device` is the one place that turns `--device` into a torch device.
"""

from __future__ import annotations

import click

from vaegen.errors import VaegenError

# Every command: defaults shown in --help, and -h as a short form of --help.
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
DATASET_NAMES = ("fmnist", "mnist", "binary-mnist", "cifar10")  # vaegen.data.DATASETS, without importing numpy


def dataset_options(required: bool = False, default: str | None = "fmnist", help_suffix: str = "",
                    with_dataset: bool = True):
    """--dataset, --subset, --subset-seed and --data-root: which store D_train and D_test come from."""
    def decorate(f):
        f = data_root_option(f)
        f = click.option("--subset-seed", default=0, type=click.IntRange(min=0),
                         help="Seed of the subset (data/<dataset>-n<N>-s<SEED>.zarr).")(f)
        f = click.option("--subset", default=None, type=click.IntRange(min=1),
                         help="D_train is a seeded, class-balanced subset of N training images." + help_suffix)(f)
        if not with_dataset:
            return f
        return click.option("--dataset", required=required, default=None if required else default,
                            type=click.Choice(DATASET_NAMES), help="Dataset.")(f)
    return decorate


data_root_option = click.option("--data-root", default="data", type=click.Path(file_okay=False),
                                help="Directory of the dataset stores (<data-root>/<dataset>[-n<N>-s<S>].zarr).")
device_option = click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available).")
threads_option = click.option("--threads", default=None, type=click.IntRange(min=1),
                              help="torch CPU threads [default: torch's choice]. On a shared CPU, 1 thread per "
                                   "process is often faster: OpenMP threads spin-wait for busy cores.")


REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")  # vaegen.tracking's trackers (named here without importing it)


def tracking_options(f):
    """--report-to and --tracker-group: an experiment tracker that gets the config and every logged line."""
    f = click.option("--tracker-group", default=None,
                     help="Tracker project (W&B) / experiment (MLflow) grouping runs, e.g. the study's name "
                          "[default: vaegen].")(f)
    return click.option("--report-to", default="none", type=click.Choice(REPORT_TO),
                        help="Experiment tracker for the config and every logged line (tensorboard: "
                             "RUN_DIR/tensorboard; wandb: WANDB_MODE=offline works without an account).")(f)


def resolve_device(device: str):
    """`--device` -> torch.device; a one-line error when it names a device this machine does not have."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise VaegenError(f"--device {device!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VaegenError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    return resolved


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (see `threads_option`)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
