"""One checkpoint scheme for the training stages.

A checkpoint is a directory: Accelerate's state (model, optimizer, RNG states, objects registered with
`accelerator.register_for_checkpointing`) plus, optionally, the loop's own counters as one JSON file. It is
written under a temporary name and renamed into place; replacing one of the same name moves the old one aside
first and deletes it last. So a kill at any moment leaves a complete checkpoint: the new one, or the one before
(`resume_point` finds it), and nothing half-written under a checkpoint's name.

    VAE runs (trainer/train.py)    RUN_DIR/checkpoint/ + trainer_state.json, replaced at every save
    DM runs (generator/train_dm)   RUN_DIR/checkpoints/step-NNNNNNNN/, the newest ones kept (`prune`)

Temporary and set-aside copies are hidden siblings (.NAME.tmp, .NAME.old), so a glob over checkpoint names never
sees them. Every process calls `save_checkpoint` (Accelerate writes each process's RNG state); only the main
process renames, prunes and writes the JSON.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from vaegen.provenance import fsync_dir, read_json, write_json_atomic


def _aside(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.{what}"


def save_checkpoint(accelerator: Accelerator, path: str | Path, state: dict | None = None,
                    state_name: str | None = None, prune: str | None = None, keep: int = 1) -> Path:
    """Write a checkpoint at `path` (replacing one there), with `state` as `state_name` inside; then, with
    `prune` (a glob in path's directory, e.g. "step-*"), delete all but the newest `keep` matching ones
    (by name order)."""
    path = Path(path)
    tmp, old = _aside(path, "tmp"), _aside(path, "old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state is not None:
            write_json_atomic(tmp / state_name, state)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        if prune is not None:
            for stale in sorted(path.parent.glob(prune))[:-keep]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return path


def checkpoints(directory: str | Path, pattern: str) -> list[Path]:
    """The complete checkpoints in `directory` whose names match `pattern`, oldest (by name) first."""
    directory = Path(directory)
    return sorted(directory.glob(pattern)) if directory.is_dir() else []


def resume_point(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the one set aside there if a kill hit between the two renames of a
    replacement; None when there is neither."""
    path = Path(path)
    for candidate in (path, _aside(path, "old")):
        if candidate.is_dir():
            return candidate
    return None


def load_checkpoint(accelerator: Accelerator, path: str | Path, state_name: str | None = None) -> dict | None:
    """Load Accelerate's state from a checkpoint into the prepared objects; returns its JSON state, if named."""
    path = Path(path)
    accelerator.load_state(str(path))
    return read_json(path / state_name) if state_name else None
