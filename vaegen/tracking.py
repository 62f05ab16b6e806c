"""Experiment trackers for the training stages (`--report-to`), through Accelerate's trackers.

One tracker run per training run, grouped by study; a run logs its config once and then, at the points its own
log file gets a line (the VAE's metrics.jsonl), the numbers of that line. The log files stay the record: a
tracker is a view for people.

    none          nothing (the default)
    tensorboard   event files in RUN_DIR/tensorboard/; `tensorboard --logdir STUDY_DIR` shows a study's runs
    wandb         W&B project = the group, run name = the run directory's name (resumes the same W&B run);
                  WANDB_MODE=offline writes RUN_DIR/wandb/ without an account
    mlflow        MLflow experiment = the group, run name = the run directory's name (MLFLOW_TRACKING_URI)

Accelerate drops a requested tracker whose package is missing with only a log message; `check_report_to`
makes that a one-line error before anything runs. Packages (the `tracking` extra): tensorboard, wandb, mlflow.

For a stage: `Accelerator(..., **accelerator_kwargs(report_to, run_dir))`, then on every process
`start_trackers(accelerator, report_to, run_dir, group, config)`, `log_values(accelerator, line, step)` per log
line, and `finish_trackers(accelerator)` at the end (not `accelerator.end_training()`, which also destroys the
process group).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from vaegen.errors import VaegenError
from vaegen.options import REPORT_TO  # declared with the CLI option

DEFAULT_GROUP = "vaegen"
TENSORBOARD_DIR = "tensorboard"
_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}


def check_report_to(report_to: str) -> None:
    """A one-line error for an unknown tracker, or one whose package is not installed."""
    if report_to not in REPORT_TO:
        raise VaegenError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to != "none" and not _AVAILABLE[report_to]():
        raise VaegenError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to} "
                          "(or the project's `tracking` extra)")


def accelerator_kwargs(report_to: str, run_dir: str | Path) -> dict:
    """`log_with` and `project_dir` for the stage's Accelerator (none: nothing, the Accelerator as without)."""
    check_report_to(report_to)
    return {} if report_to == "none" else {"log_with": report_to, "project_dir": str(run_dir)}


def start_trackers(accelerator: Accelerator, report_to: str, run_dir: str | Path, group: str | None,
                   config: dict) -> None:
    """Start this run's tracker run (main process only) and log its config, flattened to scalars."""
    if report_to == "none":
        return
    run_dir = Path(run_dir).resolve()
    group = group or DEFAULT_GROUP
    # A stable W&B id per run directory, so a resumed run continues its tracker run instead of starting another.
    run_id = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    init_kwargs = {
        "wandb": {"name": run_dir.name, "id": run_id, "resume": "allow", "dir": str(run_dir)},
        "mlflow": {"run_name": run_dir.name},
    }
    # TensorBoard writes to project_dir/<project name>: RUN_DIR/tensorboard (the directory tree groups runs).
    project = TENSORBOARD_DIR if report_to == "tensorboard" else group
    accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)


def log_values(accelerator: Accelerator, line: dict, step: int) -> None:
    """The numbers of one log line (bools and strings left out) at `step`."""
    values = {k: v for k, v in line.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=step)


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the tracker runs (main process; the others have none)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar}: trackers' hyperparameter tables take only bool/int/float/str. Lists
    become JSON (long ones a count: config.json keeps them), None becomes "none"."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            text = json.dumps(value)
            flat[name] = text if len(text) <= 200 else f"<{len(value)} values>"
        elif value is None:
            flat[name] = "none"
        else:
            flat[name] = value
    return flat
