"""Studies on a Slurm cluster: the VAE runs as one submitit job array, the prerequisites as single jobs.

    executor = SlurmExecutor(study_dir / "slurm", partition="gpu", time_min=240, gpus_per_task=1)
    executor.run("dm", ["dm", "train", ...])    # one job (accelerate launch over its GPUs), waited for
    for job in jobs:
        executor.submit(job)                    # queued
    executor.wait()                             # one job array, at most `array_parallelism` tasks at a time

Each array task runs its run's `job.commands()` (what the run directory still needs) one after the other.
Preemption and time limits: Slurm sends SIGUSR2 (submitit asks for it `signal_delay_s`, 90 s, before the limit;
`scancel --signal=USR2 JOB` does the same by hand) to every process of the task. The task stops the running `vaegen`
command with SIGTERM, which finishes its epoch or step and saves a checkpoint, and submitit requeues the task; it
starts again from its run directory and ends with the weights an uninterrupted run has (the stages resume bit for
bit). A task killed by a plain SIGTERM (scancel, a preemption without the warning signal) fails, and a rerun of the
study resubmits it, resuming.

The driver may die: the job id of every submission is recorded in FOLDER/submitted.json, and a rerun of the study
finds finished runs on disk (no commands left), waits for runs whose task is still in `squeue` (no accounting
database needed) and submits only the rest. Ctrl-C / SIGTERM to the driver cancels nothing: it stops waiting, the
tasks run on, and a rerun picks them up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import click
import submitit

from studies.jobs import RunJob, run_vaegen, shown, vaegen_command
from vaegen.errors import VaegenError
from vaegen.interrupts import Terminated

RECORD_NAME = "submitted.json"
STOP_GRACE_S = 60  # how long a signalled `vaegen` command may take to save its checkpoint before it is killed


# --- in the Slurm task -----------------------------------------------------------------------------------------

class CommandFailed(RuntimeError):
    """A `vaegen` command of a task exited non-zero; the message names it (the driver reports it)."""


def _task_env(processes: int = 1) -> dict:
    """The task's CPUs shared out as thread counts over the command's processes (Slurm sets SLURM_CPUS_PER_TASK
    with --cpus-per-task): no oversubscribed cores, and the thread count a local run with those CPUs would use."""
    env = dict(os.environ)
    if cpus := os.environ.get("SLURM_CPUS_PER_TASK"):
        threads = str(max(1, int(cpus) // processes))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def _run_shielded(run: Callable[[], int]) -> int:
    """`run()` (which runs a `vaegen` command and returns its exit code) with SIGUSR2 blocked in the command.

    Slurm sends SIGUSR2 to every process of the task, and a `vaegen` command would die of it (the default action)
    in the middle of an epoch. The command is started from a thread that blocks SIGUSR2, so the child inherits the
    blocked signal and only this process, whose main thread runs submitit's handler, acts on it: it stops the
    command with SIGTERM (see `_stop_commands`)."""
    outcome: dict = {}

    def target():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        try:
            outcome["code"] = run()
        except BaseException as e:  # noqa: B036 - handed to the main thread, which raises it
            outcome["error"] = e

    worker = threading.Thread(target=target, name="vaegen-command", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)  # short joins: the main thread stays free to run the signal handler
    if "error" in outcome:
        raise outcome["error"]
    return outcome["code"]


_stopping = threading.Event()


def _stop_commands() -> None:
    """Stop the running `vaegen` command cleanly (SIGTERM: it checkpoints and exits), killing it only after
    STOP_GRACE_S. A second SIGUSR2 while it saves only waits (a second SIGTERM would abandon the epoch)."""
    import psutil

    children = psutil.Process().children()
    if not _stopping.is_set():
        _stopping.set()
        for child in children:
            child.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(children, timeout=STOP_GRACE_S)
    for child in alive:
        child.kill()


class RunTask(submitit.helpers.Checkpointable):
    """One VAE run as a Slurm task: its remaining `vaegen` commands in order. On SIGUSR2 (preemption, time limit)
    the running command stops cleanly and submitit requeues this task, which then resumes from the run directory."""

    def __init__(self, job: RunJob):
        self.job = job

    def __call__(self) -> None:
        for args in self.job.commands():  # computed now: after a requeue, what is left
            code = _run_shielded(partial(run_vaegen, args, _task_env()))
            if code != 0:
                raise CommandFailed(f"`{shown(args)}` exited with {code}")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        _stop_commands()
        return super().checkpoint(*args, **kwargs)  # requeue this task, unchanged: its commands are recomputed


class StageTask:
    """A prerequisite (dm train, generate): `vaegen *args`, under `accelerate launch` over `processes` GPUs when
    there are several. On SIGUSR2 it stops cleanly and is not requeued (its arguments were computed for the
    state it started from): the study stops, and a rerun resumes it."""

    def __init__(self, args: list[str], processes: int):
        self.args, self.processes = args, processes

    def run(self) -> int:
        if self.processes <= 1:
            return run_vaegen(self.args, _task_env())
        # One port per job, so two jobs sharing a node do not meet at the same rendezvous.
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                  "--num_processes", str(self.processes), "--main_process_port", str(port),
                  *vaegen_command(self.args)[1:]]  # vaegen_command: [python, -m, module, *args]
        return subprocess.run(launch, env=_task_env(self.processes)).returncode

    def __call__(self) -> None:
        code = _run_shielded(self.run)
        if code != 0:
            raise CommandFailed(f"`{shown(self.args)}` exited with {code}")

    def checkpoint(self, *args, **kwargs) -> None:
        _stop_commands()
        return None  # submitit: no requeue; the task ends with an error the driver reports


# --- in the study driver ---------------------------------------------------------------------------------------

def sbatch_flags(extra: dict | list | tuple | None) -> dict:
    """Extra sbatch options as submitit's `additional_parameters`: {"account": "x", "exclusive": True} as given,
    or a flag list ["--account=x", "--qos", "high", "--exclusive"]."""
    if extra is None:
        return {}
    if isinstance(extra, dict):
        return dict(extra)
    flags, items = {}, list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            raise VaegenError(f"extra sbatch options: {item!r} is not a --flag (write --name=value or --name value)")
        name, equals, value = item[2:].partition("=")
        if not equals:
            value = items.pop(0) if items and not items[0].startswith("--") else True
        flags[name] = value
    return flags


def active_job_ids() -> set[str]:
    """The ids ("123" and, per array task, "124_0") of this user's jobs that are queued or running."""
    try:
        listed = subprocess.run(["squeue", "--me", "--noheader", "--array", "--format=%i"], capture_output=True,
                                text=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise VaegenError(f"squeue failed ({e}); is this a Slurm login node?") from None
    return set(listed.split())


@dataclass
class Tracked:
    job: submitit.Job
    key: str                # what submitted.json records it under (the run directory, or the stage command)
    label: str
    command: str            # named when it fails without saying more
    missing: int = field(default=0)   # squeue checks in a row that did not list it


class SlurmExecutor:
    """The `Executor` of studies (see studies/jobs.py) on Slurm, through submitit."""

    poll_s = 1.0            # result files are checked this often
    squeue_every_s = 30.0   # squeue (for tasks that ended without a result) this often: kind to the controller

    def __init__(self, folder, partition: str | None = None, time_min: int = 24 * 60, cpus_per_task: int = 1,
                 gpus_per_task: int = 0, array_parallelism: int = 64, extra_sbatch: dict | list | None = None,
                 prerequisite_gpus: int | None = None, prerequisite_cpus: int | None = None):
        if shutil.which("sbatch") is None or shutil.which("squeue") is None:
            raise VaegenError("--executor slurm: sbatch/squeue not found; run the study on a Slurm login node")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parameters = dict(time=time_min, cpus_per_task=cpus_per_task,
                               additional_parameters=sbatch_flags(extra_sbatch), stderr_to_stdout=True,
                               job_name=f"vaegen-{self.folder.resolve().parent.name}")
        if partition:
            self.parameters["partition"] = partition
        self.gpus_per_task, self.array_parallelism = gpus_per_task, array_parallelism
        self.prerequisite_gpus = gpus_per_task if prerequisite_gpus is None else prerequisite_gpus
        self.prerequisite_cpus = cpus_per_task if prerequisite_cpus is None else prerequisite_cpus
        self.queued: list[RunJob] = []
        self.tracked: dict[str, Tracked] = {}
        self.failures: list[str] = []
        self.stopped = False
        self._active: set[str] | None = None
        self._active_at = float("-inf")

    # --- submission ----------------------------------------------------------------------------------------------
    def _executor(self, gpus: int, **parameters) -> submitit.SlurmExecutor:
        executor = submitit.SlurmExecutor(folder=self.folder)
        executor.update_parameters(**{**self.parameters, **({"gpus_per_task": gpus} if gpus else {}), **parameters})
        return executor

    def _recorded(self) -> dict[str, str]:
        path = self.folder / RECORD_NAME
        return json.loads(path.read_text()) if path.exists() else {}

    def _record(self, submissions: dict[str, str]) -> None:
        record = {**self._recorded(), **submissions}
        tmp = self.folder / f".{RECORD_NAME}.tmp"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.folder / RECORD_NAME)

    def _active_ids(self, max_age_s: float) -> set[str]:
        if self._active is None or time.monotonic() - self._active_at > max_age_s:
            self._active, self._active_at = active_job_ids(), time.monotonic()
        return self._active

    def _still_queued(self, key: str, label: str, command: str) -> bool:
        """Track the task an earlier driver submitted for `key` if it is still queued or running."""
        job_id = self._recorded().get(key)
        if job_id is None or job_id not in self._active_ids(max_age_s=self.poll_s):
            return False
        click.echo(f"[{label}] still queued or running as Slurm job {job_id} (submitted by an earlier run of the "
                   "study)", err=True)
        self._track(submitit.SlurmJob(folder=self.folder, job_id=job_id), key, label, command)
        return True

    def _track(self, job: submitit.Job, key: str, label: str, command: str) -> None:
        self.tracked[job.job_id] = Tracked(job, key, label, command)

    def submit(self, job: RunJob) -> bool:
        """Queue one VAE run (submitted by `wait`, with the others, as one job array); nothing if it finished."""
        commands = job.commands()
        if commands and not self._still_queued(job.out, job.label, shown(commands[0])):
            self.queued.append(job)
        return True

    def _submit_queued(self) -> None:
        if not self.queued:
            return
        executor = self._executor(self.gpus_per_task, array_parallelism=self.array_parallelism)
        with executor.batch():
            jobs = [executor.submit(RunTask(run)) for run in self.queued]
        self._record({run.out: job.job_id for run, job in zip(self.queued, jobs)})
        for run, job in zip(self.queued, jobs):
            self._track(job, run.out, run.label, shown(run.commands()[0]))
        array = jobs[0].job_id.split("_")[0]
        click.echo(f"submitted {len(jobs)} VAE run(s) as Slurm job {array} (at most {self.array_parallelism} at "
                   f"a time); logs in {self.folder}", err=True)
        self.queued = []

    def run(self, label: str, args: list[str]) -> None:
        """A prerequisite, as one job with the prerequisite GPUs and CPUs; returns when it succeeded."""
        key = shown(args)
        if not self._still_queued(key, label, key):
            executor = self._executor(self.prerequisite_gpus, cpus_per_task=self.prerequisite_cpus)
            job = executor.submit(StageTask(args, self.prerequisite_gpus))
            self._record({key: job.job_id})
            self._track(job, key, label, key)
            click.echo(f"[{label}] $ {key}  (Slurm job {job.job_id}, log {job.paths.stdout})", err=True)
        self._wait_until(lambda: all(t.key != key for t in self.tracked.values()))
        self._raise_failures()

    # --- waiting -------------------------------------------------------------------------------------------------
    def _finished(self, job_id: str, tracked: Tracked) -> None:
        del self.tracked[job_id]
        error = tracked.job.exception()
        if error is None:
            return
        trace = str(error)
        named = re.search(r"CommandFailed: (.+)", trace)
        what = named.group(1) if named else f"`{tracked.command}` failed ({trace.strip().splitlines()[-1]})"
        self._failed(job_id, tracked, what)

    def _failed(self, job_id: str, tracked: Tracked, what: str) -> None:
        self.tracked.pop(job_id, None)
        message = f"{what} in Slurm job {job_id} (log {tracked.job.paths.stdout})"
        click.echo(f"[{tracked.label}] {message}", err=True)
        self.failures.append(message)

    def _poll(self) -> None:
        listed = None
        if self.tracked and time.monotonic() - self._active_at >= self.squeue_every_s:
            listed = self._active_ids(max_age_s=0)
        for job_id, tracked in list(self.tracked.items()):
            if tracked.job.paths.result_pickle.exists():
                self._finished(job_id, tracked)
            elif listed is not None:
                # Gone from squeue without a result: cancelled, killed, out of time or memory. Twice in a row,
                # since the result of a task that just ended may not be visible here yet.
                tracked.missing = 0 if job_id in listed else tracked.missing + 1
                if tracked.missing >= 2:
                    self._failed(job_id, tracked, f"`{tracked.command}` ended without a result (cancelled, killed, "
                                                  "out of time or memory)")

    def _wait_until(self, done) -> None:
        while not done():
            if self.stopped:
                raise Terminated()
            self._poll()
            if not done():
                time.sleep(self.poll_s)

    def _raise_failures(self) -> None:
        if self.failures:
            first, more = self.failures[0], len(self.failures) - 1
            self.failures = []
            raise VaegenError(f"study stopped: {first}{f' (and {more} more failed runs)' if more else ''}; fix the "
                              "cause and rerun the same study command to resume")

    def wait(self) -> None:
        """Submit the queued runs as one job array, wait until every tracked task ended; raise naming a failure."""
        self._submit_queued()
        self._wait_until(lambda: not self.tracked)
        self._raise_failures()

    def forward(self, signum: int) -> None:
        """Ctrl-C / SIGTERM to the driver: stop waiting and cancel nothing; a rerun of the study picks the tasks up."""
        self.stopped = True
        if self.tracked:
            click.echo(f"{len(self.tracked)} Slurm task(s) keep running ({', '.join(sorted(self.tracked))}); rerun "
                       "the same study command to wait for them and finish the study", err=True)
