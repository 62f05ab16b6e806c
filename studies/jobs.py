"""Running a study's stage commands: prerequisites one at a time, VAE runs side by side.

A VAE run is a `RunJob`: the `vaegen train` and `vaegen eval` commands it still needs, computed from its run
directory when the job starts (finished: nothing; started: train with --resume), so a job resubmitted after a
crash, a preemption or a rerun of the study does exactly the work that is left. An executor runs jobs:

    LocalExecutor     subprocesses on this machine, `jobs` at a time, each with its share of the CPU threads or
                      its own GPU (`runs_per_gpu` runs share one GPU, each in its own process)
    SlurmExecutor     (studies/slurm.py) one Slurm job array through submitit

Both have the same four methods: `run` (a prerequisite: dm train, generate, ... in the foreground), `submit` (a
VAE run), `wait` (until every submitted run ended; raises naming a failed command) and `forward` (pass Ctrl-C /
SIGTERM on).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import click

from vaegen.errors import VaegenError
from vaegen.interrupts import Terminated
from vaegen.vaerun import DONE_NAME, GAPS_NAME

INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class RunJob:
    """One VAE run of a study: train (unless finished), then eval (unless done). Picklable."""

    label: str
    out: str
    train: tuple[str, ...]   # `vaegen` arguments, without --resume
    evals: tuple[tuple[str, tuple[str, ...]], ...]  # (the eval directory it writes, `vaegen eval` arguments)

    def commands(self) -> list[list[str]]:
        out, commands = Path(self.out), []
        if not (out / DONE_NAME).exists():
            commands.append([*self.train, *(["--resume"] if out.exists() else [])])
        commands += [list(args) for eval_dir, args in self.evals if not (out / eval_dir / GAPS_NAME).exists()]
        return commands


def vaegen_command(args: list[str]) -> list[str]:
    """The program line of `vaegen *args` in this interpreter (what a user would type, as a subprocess)."""
    return [sys.executable, "-m", "studies", *args]


def run_vaegen(args: list[str], env: dict | None = None) -> int:
    """Run `vaegen *args` to its end in this interpreter; its exit code."""
    return subprocess.run(vaegen_command(args), env=env).returncode


def shown(args: list[str]) -> str:
    return shlex.join(["vaegen", *args])


class Executor(Protocol):
    def run(self, label: str, args: list[str]) -> None: ...
    def submit(self, job: RunJob) -> bool: ...
    def wait(self) -> None: ...
    def forward(self, signum: int) -> None: ...


def visible_gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except ImportError:
        return []


def default_jobs(runs_per_gpu: int = 1) -> int:
    """`runs_per_gpu` jobs per GPU where there are GPUs, else one per CPU core."""
    gpus = visible_gpus()
    return len(gpus) * runs_per_gpu if gpus else max(1, os.cpu_count() or 1)


class LocalExecutor:
    """Subprocesses on this machine: prerequisites in the foreground, VAE runs `jobs` at a time."""

    def __init__(self, jobs: int, runs_per_gpu: int = 1):
        self.jobs, self.runs_per_gpu = jobs, runs_per_gpu
        self.gpus = visible_gpus()
        # A GPU slot per run that may share it: runs_per_gpu x [0, 1, ..., n-1], interleaved so that runs spread
        # over the GPUs before they stack up on one.
        self.free_gpus = [g for _ in range(runs_per_gpu) for g in range(len(self.gpus))]
        self.running: dict[int, subprocess.Popen] = {}
        self.failed: str | None = None
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(jobs)
        self.threads: list[threading.Thread] = []

    def env(self, gpu: int | None, parallel: bool) -> dict:
        """A job's environment: its share of the CPU threads and its GPU; prerequisites get the machine."""
        env = dict(os.environ)
        if parallel and self.jobs > 1:
            threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TQDM_MININTERVAL="30")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[gpu])
        return env

    def run(self, label: str, args: list[str]) -> None:
        if not self._execute(label, args, None, prefix=False):
            self.wait()  # raises, naming the command

    def submit(self, job: RunJob) -> bool:
        """Start a job when a slot is free; False (nothing started) once a job has failed."""
        commands = job.commands()
        if not commands:
            return True
        self.slots.acquire()
        if self.failed is not None:
            self.slots.release()
            return False
        with self.lock:
            gpu = self.free_gpus.pop(0) if self.free_gpus else None
        thread = threading.Thread(target=self._job, args=(job.label, commands, gpu), daemon=True)
        self.threads.append(thread)
        thread.start()
        return True

    def _job(self, label: str, commands: list[list[str]], gpu: int | None) -> None:
        try:
            for args in commands:
                if self.failed is not None or not self._execute(label, args, gpu, prefix=self.jobs > 1):
                    break
        finally:
            with self.lock:
                if gpu is not None:
                    self.free_gpus.append(gpu)
            self.slots.release()

    def _execute(self, label: str, args: list[str], gpu: int | None, prefix: bool) -> bool:
        click.echo(f"{f'[{label}] ' if prefix else ''}$ {shown(args)}", err=True)
        if self.failed is not None:
            return False
        # The stage's own output goes to stderr: a study's stdout is only the report's path.
        proc = subprocess.Popen(vaegen_command(args), env=self.env(gpu, parallel=prefix),
                                stdout=subprocess.PIPE if prefix else sys.stderr,
                                stderr=subprocess.STDOUT if prefix else None)
        with self.lock:
            self.running[id(proc)] = proc
        try:
            if prefix:
                relay(proc.stdout, f"[{label}] ")
            code = proc.wait()
        finally:
            with self.lock:
                self.running.pop(id(proc), None)
        if code in (-signal.SIGINT, 130, -signal.SIGTERM, 143):
            self.failed = self.failed or INTERRUPTED
            return False
        if code != 0:
            self.failed = self.failed or shown(args)
            return False
        return True

    def wait(self) -> None:
        for thread in self.threads:
            while thread.is_alive():
                thread.join(0.2)  # short joins keep the main thread responsive to signals
        self.threads = []
        if self.failed == INTERRUPTED:
            raise Terminated()
        if self.failed is not None:
            raise VaegenError(f"study stopped: `{self.failed}` failed; fix the cause and rerun the same study "
                              "command to resume")

    def forward(self, signum: int) -> None:
        """Pass a signal on to every running command; no new one starts. Each stops cleanly (a training loop
        saves a checkpoint first), and `wait` then raises Terminated once they have."""
        self.failed = self.failed or INTERRUPTED
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)


def relay(stream, prefix: str) -> None:
    """Copy a child's output to stderr, each line (and each progress-bar redraw) prefixed."""
    buffer = b""
    while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
        buffer += chunk
        while True:
            cut = min((i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line, end, buffer = buffer[:cut], buffer[cut:cut + 1], buffer[cut + 1:]
            if line.strip():
                sys.stderr.write(prefix + line.decode(errors="replace") + ("\n" if end == b"\n" else "\r"))
                sys.stderr.flush()
    if buffer.strip():
        sys.stderr.write(prefix + buffer.decode(errors="replace") + "\n")
