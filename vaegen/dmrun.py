"""The diffusion-model run directory: written by `vaegen dm train` (generator/train_dm.py) and `vaegen dm score`
(generator/score.py); read by `generate`, `dm sample/score/frontier` and the studies.

    runs/dm/<name>/dm.json                                what the exported model is (dataset, subset, preset, steps,
                                                          images seen, weights sha256, ...); written with the weights
    runs/dm/<name>/diffusion_pytorch_model.safetensors, config.json, scheduler_config.json   diffusers format
    runs/dm/<name>/samples.png                            a grid of samples
    runs/dm/<name>/score.json                             `vaegen dm score`
    runs/dm/<name>/train_run.json, train_log.jsonl        resolved config and every (re)start; the loss log
    runs/dm/<name>/checkpoints/step-NNNNNNNN/             Accelerate state for --resume (last 2 kept)
    runs/dm/<name>/snapshots/step-NNNNNNNN/               --snapshot-steps: the EMA model at that step, a DM directory
    runs/dm/<name>-retrained/                             a committed reference DM trained again for its snapshots;
                                                          studies use them only if it ends in the reference's weights

A directory without dm.json (any diffusers UNet or pipeline) is a foreign DM: it says nothing about its training
data, so the commands that need D_train ask for --dataset. Reference DMs committed with the repository live in
models/<name>/ and are found by name when runs/dm/<name>/ does not exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vaegen.data import store_name
from vaegen.errors import VaegenError
from vaegen.provenance import read_json, write_json_atomic

RECORD_NAME = "dm.json"
SCORE_NAME = "score.json"
TRAIN_RUN_NAME = "train_run.json"
TRAIN_LOG_NAME = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SNAPSHOTS_DIR = "snapshots"
SAMPLES_NAME = "samples.png"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DM_ROOT = Path("runs/dm")
REFERENCE_ROOT = Path(__file__).resolve().parent.parent / "models"  # committed reference DMs


def dm_name(dataset: str, subset: int | None, subset_seed: int, preset: str, steps: int | None = None) -> str:
    """runs/dm/<this>: the store's name, the preset and, when it is not the preset's own length, the steps."""
    store = store_name(dataset, subset, subset_seed).removesuffix(".zarr")
    return f"{store}-{preset}" + (f"-steps{steps}" if steps else "")


def snapshot_dir(out: str | os.PathLike, step: int) -> Path:
    """Where `--snapshot-steps` puts the EMA model of `step` (a DM directory of its own)."""
    return Path(out) / SNAPSHOTS_DIR / f"step-{step:08d}"


def snapshot_step(path: str | os.PathLike) -> int | None:
    """The step of a `snapshot_dir`; None for any other DM directory (a training run's final export)."""
    path = Path(path)
    if path.parent.name != SNAPSHOTS_DIR or not path.name.startswith("step-"):
        return None
    return int(path.name.removeprefix("step-"))


def checkpoint_dir(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS_DIR


def write_record(directory: str | os.PathLike, record: dict) -> None:
    write_json_atomic(Path(directory) / RECORD_NAME, record)


def read_record(dm_dir: str | os.PathLike) -> dict | None:
    """dm.json of a DM directory, or None for a foreign DM (and for a DM still training)."""
    path = Path(dm_dir) / RECORD_NAME
    return read_json(path) if path.is_file() else None


def is_trained(dm_dir: str | os.PathLike) -> bool:
    """A model ready to sample: a completed run's final export, or a snapshot (dm.json is written with the weights;
    a snapshot's says `finished: false`, since its run went on)."""
    record = read_record(dm_dir)
    return record is not None and (record.get("finished", True) or "snapshot_of" in record)


def is_reference(dm_dir: str | os.PathLike) -> bool:
    """A reference DM committed under models/ (its snapshots are not committed)."""
    return Path(dm_dir).resolve().parent == REFERENCE_ROOT


def retraining_dir(reference: str | os.PathLike) -> Path:
    """Where a committed reference DM is trained again for its snapshots: beside runs/dm/<name>, never in it, so
    that every other study keeps finding the committed model."""
    return DM_ROOT / f"{Path(reference).name}-retrained"


def recorded_threads(record: dict) -> int | None:
    """The torch thread count a DM was trained with (training is bit-exact only at the same count), read off the
    command line dm.json recorded: `dm train` has no other record of it."""
    words = str(record.get("command", "")).split()
    if "--threads" in words[:-1]:
        value = words[words.index("--threads") + 1]
        return int(value) if value.isdigit() else None
    return next((int(w.split("=", 1)[1]) for w in words if w.startswith("--threads=") and w[10:].isdigit()), None)


def write_score(dm_dir: str | os.PathLike, score: dict, path: str | os.PathLike | None = None) -> Path:
    path = Path(path) if path else Path(dm_dir) / SCORE_NAME
    write_json_atomic(path, score)
    return path


def read_score(dm_dir: str | os.PathLike) -> dict | None:
    path = Path(dm_dir) / SCORE_NAME
    return read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class TrainingData:
    """What a DM was trained on: the store `vaegen data DATASET [--subset N --subset-seed S]` wrote."""

    dataset: str
    subset: int | None          # None: the full training split
    subset_seed: int | None     # None when subset is None
    train_images: int | None    # |D_train| the DM saw (None for a foreign DM)


def training_data(dm_dir: str | os.PathLike, dataset: str | None = None, subset: int | None = None,
                  subset_seed: int = 0) -> TrainingData:
    """D_train of a DM. dm.json says it, and the flags may only repeat it; a foreign DM needs the flags.

    This is the one reading of dm.json's data fields: `generate`, `dm score` and `dm frontier` all use it.
    """
    record = read_record(dm_dir)
    if record is None:
        if dataset is None:
            raise VaegenError(f"{dm_dir} has no {RECORD_NAME} saying what it was trained on; pass --dataset "
                              "(and --subset / --subset-seed)")
        return TrainingData(dataset, subset, subset_seed if subset is not None else None, None)
    recorded_subset, recorded_seed = record.get("subset"), record.get("subset_seed")
    if isinstance(recorded_subset, dict):  # an early form: the store attrs' {"n": N, "seed": S}
        recorded_subset, recorded_seed = recorded_subset.get("n"), recorded_subset.get("seed")
    if dataset is not None and dataset != record["dataset"]:
        raise VaegenError(f"--dataset {dataset} but {Path(dm_dir) / RECORD_NAME} says the DM was trained on "
                          f"{record['dataset']}")
    if subset is not None and subset != recorded_subset:
        raise VaegenError(f"--subset {subset} but {Path(dm_dir) / RECORD_NAME} says the DM was trained on "
                          f"{'the full training split' if recorded_subset is None else f'{recorded_subset} images'}")
    return TrainingData(record["dataset"], recorded_subset,
                        (recorded_seed or 0) if recorded_subset is not None else None, record.get("train_images"))


def find_dm(name: str, root: str | os.PathLike = DM_ROOT) -> Path:
    """runs/dm/<name> if it holds (or is training) a DM, else the committed reference models/<name> if there is
    one, else runs/dm/<name> (where a new one is trained)."""
    local = Path(root) / name
    if local.exists() or not (REFERENCE_ROOT / name / RECORD_NAME).is_file():
        return local
    return Path(os.path.relpath(REFERENCE_ROOT / name))  # "models/<name>" from the repository root
