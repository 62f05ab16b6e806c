"""The VAE run directory contract between the trainer (writes), the evaluator and the studies (read).

    runs/vae/<name>/config.json        the resolved training config (dataset, subset, source, model, ...)
    runs/vae/<name>/metrics.jsonl      real train/test ELBO every --eval-every epochs
    runs/vae/<name>/model.json, model.safetensors   the VAE (trainer.models.save_vae / load_vae)
    runs/vae/<name>/snapshots/epoch-NNNNNN.safetensors   --track-gaps: the model at the tracking epochs
    runs/vae/<name>/done.json          written last: the run finished
    runs/vae/<name>/eval/gaps.json     the evaluator's summary (eval/per_example.zarr beside it)
    runs/vae/<name>/eval/gap_curves.jsonl   --track-gaps: G_a and G_r of every snapshot (one line each)

`read_run` is the one reader of these files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vaegen.errors import VaegenError
from vaegen.provenance import read_json, read_jsonl

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
MODEL_CONFIG_NAME = "model.json"  # trainer.models' names for the files save_vae writes
MODEL_WEIGHTS_NAME = "model.safetensors"
DONE_NAME = "done.json"
EVAL_DIR = "eval"
GAPS_NAME = "gaps.json"
SNAPSHOTS = "snapshots"
GAP_CURVES_NAME = "gap_curves.jsonl"


@dataclass(frozen=True)
class RunFiles:
    """What a VAE run directory holds, read once. Files a run writes later are empty until it has."""

    path: Path
    config: dict                 # config.json
    model: dict | None           # model.json: the VAE's build config (None until the trainer saved the model)
    metrics: list[dict]          # metrics.jsonl ([] before the first logged epoch)
    finished: bool               # done.json exists
    gaps: dict | None            # eval/gaps.json (None until evaluated)
    gap_curves: list[dict]       # eval/gap_curves.jsonl ([] unless trained with --track-gaps and evaluated)


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` looks like a VAE run directory (it has a config.json), finished or not."""
    return (Path(path) / CONFIG_NAME).is_file()


def read_run(run_dir: str | Path, require_finished: bool = False) -> RunFiles:
    """Read a VAE run directory; a one-line VaegenError when it is not one (or, with `require_finished`, when
    the trainer has not finished it) or when a file is not valid JSON."""
    run_dir = Path(run_dir)
    expected = (CONFIG_NAME, MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, DONE_NAME) if require_finished else (CONFIG_NAME,)
    missing = [name for name in expected if not (run_dir / name).is_file()]
    if missing:
        state = "finished VAE run" if require_finished else "VAE run"
        raise VaegenError(f"{run_dir} is not a {state} (missing {', '.join(missing)}); "
                          "pass a runs/vae/NAME directory written by vaegen-train")
    eval_dir = run_dir / EVAL_DIR
    return RunFiles(
        path=run_dir,
        config=_read_object(run_dir / CONFIG_NAME),
        model=_read_object(run_dir / MODEL_CONFIG_NAME) if (run_dir / MODEL_CONFIG_NAME).is_file() else None,
        metrics=_read_lines(run_dir / METRICS_NAME),
        finished=(run_dir / DONE_NAME).is_file(),
        gaps=_read_object(eval_dir / GAPS_NAME) if (eval_dir / GAPS_NAME).is_file() else None,
        gap_curves=_read_lines(eval_dir / GAP_CURVES_NAME),
    )


def _read_object(path: Path) -> dict:
    try:
        value = read_json(path)
    except (OSError, ValueError) as e:
        raise VaegenError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise VaegenError(f"{path} is not a JSON object")
    return value


def _read_lines(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)
    except (OSError, ValueError) as e:
        raise VaegenError(f"{path} is not valid JSON lines ({e})") from None
