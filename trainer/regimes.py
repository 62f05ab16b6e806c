"""Training regimes beyond plain ELBO steps on the data, as hooks the loop in trainer/train.py calls.

The loop is plain: per epoch, model inputs -> ELBO -> backward -> optimizer step; at evaluation points the real
train/test ELBOs; at checkpoint points the state. A regime acts only at the named points it overrides:

    describe()                   extra config.json entries (how the regime was set up)
    state_dict() / load_state_dict(state)   its counters, saved in every checkpoint's trainer_state.json
    on_start(config)             once the run directory holds config.json (every process; `config` is its content)
    epoch_inputs(epoch)          model inputs that replace the data for a whole epoch (None: the data)
    on_data_input(x, epoch, batch, step)    transform one data batch's model input
    after_backward()             edit the gradients before the optimizer step
    on_evaluation(metrics)       add to an evaluation point (before it is written to metrics.jsonl)
    should_stop()                end the run early (after this epoch, with a checkpoint)
    on_epoch_end(epoch, last)    after each epoch (`last`: the run's final epoch, early stop included)
    on_finish(record)            main process, before the final model is saved: change it, add to done.json

The regimes (trainer/regularizers.py holds their maths):
    ReverseHalfAsleep   RHA (Zhang et al. 2022): epoch_inputs, after_backward
    Mollification       Aug.Mollify (Tran et al. 2023): on_data_input
    EarlyStopping       a held-out part of D_train: on_evaluation, should_stop, on_finish
    GapTracking         model snapshots for the evaluator's G_a / G_r curves: on_epoch_end
    TrackerLogging      --report-to (vaegen/tracking.py): on_start, on_evaluation, on_finish
Every random draw is keyed by (seed, purpose, epoch, process, batch), so the regimes keep runs reproducible and
resumable bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from trainer.models import VAE, save_vae
from trainer.regularizers import MollifySchedule, mollify
from vaegen import tracking
from vaegen.seeding import torch_generator
from vaegen.vaerun import SNAPSHOTS

BEST_NAME = "best-model.safetensors"  # early stopping: the weights with the best validation ELBO so far


class Regime:
    """The hook points; each default does nothing."""

    def describe(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_start(self, config: dict) -> None:
        pass

    def epoch_inputs(self, epoch: int) -> Iterator[torch.Tensor] | None:
        return None

    def on_data_input(self, x: torch.Tensor, epoch: int, batch: int, step: int) -> torch.Tensor:
        return x

    def after_backward(self) -> None:
        pass

    def on_evaluation(self, metrics: dict) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_epoch_end(self, epoch: int, last: bool) -> None:
        pass

    def on_finish(self, record: dict) -> None:
        pass


class Regimes(Regime):
    """Several regimes as one, so the loop calls each hook once: in list order, inputs passed along."""

    def __init__(self, regimes: list[Regime]):
        self.regimes = regimes

    def describe(self):
        return {key: value for regime in self.regimes for key, value in regime.describe().items()}

    def state_dict(self):
        return {key: value for regime in self.regimes for key, value in regime.state_dict().items()}

    def load_state_dict(self, state):
        for regime in self.regimes:
            regime.load_state_dict(state)

    def on_start(self, config):
        for regime in self.regimes:
            regime.on_start(config)

    def epoch_inputs(self, epoch):
        replaced = [inputs for regime in self.regimes if (inputs := regime.epoch_inputs(epoch)) is not None]
        return replaced[0] if replaced else None

    def on_data_input(self, x, epoch, batch, step):
        for regime in self.regimes:
            x = regime.on_data_input(x, epoch, batch, step)
        return x

    def after_backward(self):
        for regime in self.regimes:
            regime.after_backward()

    def on_evaluation(self, metrics):
        for regime in self.regimes:
            regime.on_evaluation(metrics)

    def should_stop(self):
        return any(regime.should_stop() for regime in self.regimes)

    def on_epoch_end(self, epoch, last):
        for regime in self.regimes:
            regime.on_epoch_end(epoch, last)

    def on_finish(self, record):
        for regime in self.regimes:
            regime.on_finish(record)


class ReverseHalfAsleep(Regime):
    """From `start_epoch` on, the generative model (decoder and likelihood) is frozen, with its BatchNorm
    statistics, and the encoder learns to infer the model's own samples z ~ p(z), x ~ p(x|z): as many per
    epoch, batch by batch, as the epoch's data would hold."""

    def __init__(self, vae: VAE, start_epoch: int, batch_size: int, share_size: Callable[[int], int], seed: int,
                 rank: int, device):
        self.vae, self.start_epoch, self.batch_size, self.share_size = vae, start_epoch, batch_size, share_size
        self.seed, self.rank, self.device = seed, rank, device
        self.active = False

    def epoch_inputs(self, epoch):
        self.active = epoch >= self.start_epoch
        if not self.active:
            return None
        self.vae.decoder.eval()
        self.vae.likelihood.eval()
        return self._model_samples(epoch)

    def _model_samples(self, epoch):
        share = self.share_size(epoch)
        for b, first in enumerate(range(0, share, self.batch_size)):
            generator = torch_generator(self.seed, "vae-rha-sample", epoch, self.rank, b, device=self.device)
            with torch.no_grad():  # not around the yield: the consumer's step needs gradients
                x = self.vae.sample(min(self.batch_size, share - first), generator)
            yield x

    def after_backward(self):
        if self.active:
            for p in [*self.vae.decoder.parameters(), *self.vae.likelihood.parameters()]:
                p.grad = None  # Adam (and AdamW's decay) skip parameters without a gradient


class Mollification(Regime):
    """Aug.Mollify: annealed Gaussian noise on every data input, per optimizer step (then clean data)."""

    def __init__(self, schedule: MollifySchedule, seed: int, rank: int, device, clamp: bool):
        self.schedule, self.seed, self.rank, self.device, self.clamp = schedule, seed, rank, device, clamp

    def describe(self):
        return {"mollify_schedule": self.schedule.describe()}

    def on_data_input(self, x, epoch, batch, step):
        generator = torch_generator(self.seed, "vae-mollify", epoch, self.rank, batch, device=self.device)
        return mollify(x, self.schedule.variance(step), generator, clamp=self.clamp)


class EarlyStopping(Regime):
    """The validation ELBO at every evaluation point; stop after `patience` points without a better one, and
    keep the best model (saved as it happens, so a resumed run keeps it too)."""

    def __init__(self, vae: VAE, validation: np.ndarray, describe: dict, patience: int,
                 mean_elbo: Callable[[np.ndarray, str], float], out: Path, is_main: bool):
        self.vae, self.validation, self.description, self.patience = vae, validation, describe, patience
        self.mean_elbo, self.out, self.is_main = mean_elbo, out, is_main
        self.best_val_elbo: float | None = None
        self.best_epoch: int | None = None
        self.evals_since_best = 0

    def describe(self):
        return {"validation": self.description}

    def state_dict(self):
        return {"best_val_elbo": self.best_val_elbo, "best_epoch": self.best_epoch,
                "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state):
        self.best_val_elbo, self.best_epoch = state["best_val_elbo"], state["best_epoch"]
        self.evals_since_best = state["evals_since_best"]

    def on_evaluation(self, metrics):
        val_elbo = metrics["val_elbo"] = self.mean_elbo(self.validation, "validation")
        if self.best_val_elbo is None or val_elbo > self.best_val_elbo:
            self.best_val_elbo, self.best_epoch, self.evals_since_best = val_elbo, metrics["epoch"], 0
            if self.is_main:
                save_vae(self.vae, self.out, name=BEST_NAME, config_name=None)
        else:
            self.evals_since_best += 1

    def should_stop(self):
        return self.evals_since_best >= self.patience

    def on_finish(self, record):
        self.vae.load_state_dict(load_file(str(self.out / BEST_NAME), device=str(next(self.vae.parameters()).device)))
        record.update(best_epoch=self.best_epoch, best_val_elbo=self.best_val_elbo, stopped_early=self.should_stop())


class GapTracking(Regime):
    """The model at every G_a / G_r tracking epoch and at the last one, for `vaegen-eval`'s gap curves."""

    def __init__(self, vae: VAE, out: Path, amortization_every: int, robustness_every: int, is_main: bool):
        self.vae, self.out, self.is_main = vae, out, is_main
        self.every = (amortization_every, robustness_every)

    def on_epoch_end(self, epoch, last):
        if self.is_main and (last or any(epoch % every == 0 for every in self.every)):
            save_vae(self.vae, self.out / SNAPSHOTS, name=snapshot_name(epoch), config_name=None)


class TrackerLogging(Regime):
    """--report-to: the run's config once, then every metrics.jsonl line at its epoch, to the tracker. Last in
    the list, so it logs what the other regimes added to the line."""

    def __init__(self, accelerator, report_to: str, out: Path, group: str | None):
        self.accelerator, self.report_to, self.out, self.group = accelerator, report_to, out, group

    def on_start(self, config):
        tracking.start_trackers(self.accelerator, self.report_to, self.out, self.group, config)

    def on_evaluation(self, metrics):
        tracking.log_values(self.accelerator, metrics, step=metrics["epoch"])

    def on_finish(self, record):
        tracking.finish_trackers(self.accelerator)


def snapshot_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}.safetensors"
