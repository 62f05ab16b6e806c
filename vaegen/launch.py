"""Which process am I: one rule for every launcher a stage supports.

    accelerate launch ...            Accelerate's own environment (RANK, WORLD_SIZE, LOCAL_RANK, ACCELERATE_*)
    torchrun / python -m torch.distributed.run ...   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    srun -n N vaegen ...             Slurm's task variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID)
    mpirun -n N ...                  PMI_* / OMPI_COMM_WORLD_* (Accelerate reads these itself, CPU only)
    plain `vaegen ...`               one process

`launch_state()` builds Accelerate's `PartialState` from that, on CPU and on GPU, and checks that Accelerate sees
the same rank and world size as the launcher says. Bare `PartialState()` does not: under torchrun on a machine
without CUDA it reports one process per rank, so every rank took the run lock and wrote the run. Every stage asks
here before it locks, writes, logs or draws a progress bar, and a launch whose ranks cannot be told apart is
refused with one line instead of racing.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from vaegen.errors import VaegenError


@dataclass(frozen=True)
class ProcessIdentity:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "single" | "torchrun" (accelerate launch and torchrun) | "slurm" | "mpi"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise VaegenError(f"the launcher set {name}={value!r}, which is not a number; cannot tell this "
                          "process's rank") from None


def _slurm_tasks_per_node(spec: str, node_index: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE ('2(x3),1') -> the task count of node `node_index`."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return 1
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_index] if node_index < len(counts) else 1


def process_identity() -> ProcessIdentity:
    """This process's rank and world size, from the environment its launcher left (no side effects)."""
    world = _int("WORLD_SIZE")
    if world is not None:  # accelerate launch and torchrun (also `srun accelerate launch ...` / `srun torchrun`)
        rank, local = _int("RANK"), _int("LOCAL_RANK")
        if world > 1 and (rank is None or local is None):
            raise VaegenError(f"launched with WORLD_SIZE={world} but without RANK and LOCAL_RANK; cannot tell the "
                              "processes apart (use accelerate launch, torchrun or srun)")
        local_world = _int("LOCAL_WORLD_SIZE") or world
        return ProcessIdentity(rank or 0, world, local or 0, local_world, "torchrun" if world > 1 else "single")
    step_tasks = _int("SLURM_STEP_NUM_TASKS")  # set inside an srun step only, not in the batch script itself
    if step_tasks is not None and step_tasks > 1:
        rank, local = _int("SLURM_PROCID"), _int("SLURM_LOCALID")
        if rank is None or local is None:
            raise VaegenError(f"an srun step of {step_tasks} tasks without SLURM_PROCID/SLURM_LOCALID; cannot tell "
                              "the processes apart")
        local_world = _slurm_tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1"),
                                            _int("SLURM_NODEID") or 0)
        return ProcessIdentity(rank, step_tasks, local, local_world, "slurm")
    mpi_world = _int("PMI_SIZE") or _int("OMPI_COMM_WORLD_SIZE")
    if mpi_world is not None and mpi_world > 1:
        rank = _int("PMI_RANK") if _int("PMI_SIZE") else _int("OMPI_COMM_WORLD_RANK")
        if rank is None:
            raise VaegenError(f"an MPI launch of {mpi_world} processes without a rank variable; cannot tell the "
                              "processes apart")
        local = _int("MPI_LOCALRANKID") or _int("OMPI_COMM_WORLD_LOCAL_RANK") or 0
        return ProcessIdentity(rank, mpi_world, local, mpi_world, "mpi")
    return ProcessIdentity(0, 1, 0, 1, "single")


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    if nodes and not re.search(r"[\[,]", nodes):
        return nodes
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    if not hosts:
        raise VaegenError(f"an srun step over nodes {nodes!r}: cannot find the first node's name (scontrol is "
                          "missing); set MASTER_ADDR")
    return hosts[0]


def _export_slurm_rendezvous(identity: ProcessIdentity) -> None:
    """torch.distributed reads RANK/WORLD_SIZE/MASTER_*: translate an srun step into them (as submitit does)."""
    os.environ.update(RANK=str(identity.rank), WORLD_SIZE=str(identity.world_size),
                      LOCAL_RANK=str(identity.local_rank), LOCAL_WORLD_SIZE=str(identity.local_world_size))
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    # One port per job step, so two steps on one node do not meet at the same rendezvous.
    job, step = _int("SLURM_JOB_ID") or 0, _int("SLURM_STEP_ID") or 0
    os.environ.setdefault("MASTER_PORT", str(20000 + (job * 7 + step) % 20000))


def launch_state():
    """Accelerate's `PartialState` for this launch (created once per process, shared by every Accelerator made
    after it). Raises VaegenError when Accelerate would see another rank or world size than the launcher set."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    identity = process_identity()
    if identity.launcher == "slurm":
        _export_slurm_rendezvous(identity)
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (identity.world_size > 1 and not has_accelerator)
    state = PartialState(cpu=cpu)
    if (state.num_processes, state.process_index) != (identity.world_size, identity.rank):
        raise VaegenError(f"the launcher started {identity.world_size} processes (this is rank {identity.rank}), "
                          f"but Accelerate sees {state.num_processes} (rank {state.process_index}); refusing to "
                          "run with ranks that cannot be told apart")
    return state


def is_main_process() -> bool:
    """Whether this process writes, logs and locks for its launch (no distributed setup needed)."""
    return process_identity().is_main
