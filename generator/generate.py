"""Stage 1b: precompute SCALE x |D_train| samples of p_DM into WebDataset shards, on one or many processes.

The loop is `generate_run`, read top-down: what the run is (its dataset and identity), which shards are left
to do, then sampling batches handed to a writer thread that turns them into shards. Sample i in [0, K*N) is
drawn from noise seeded by (seed, i) and shard j holds samples [j*S, (j+1)*S), so a run's bytes depend only on
its identity (DM, sampler, seed, noise stream, S and the numerics: precision, channels_last, compile): not on
the number of processes or nodes, the batch size, or how often it was interrupted. Raising SCALE only adds
shards. A run keeps the noise stream it was made with (`generator.sampling`: runs made before the counter-based
scheme resume with the per-image generator one).

    vaegen-generate --dm runs/dm/fmnist --scale 100 --out shards/fmnist/heun18-s0
    accelerate launch --num_processes 8 -m generator --dm ... --scale 100 --out ...   # same bytes

Each process owns whole shards (shard j -> rank j % world_size) and writes them itself through the shard
contract (`vaegen.shardformat`: temporary name, fsync, rename, then the completion marker). Rank 0 holds the run
directory's lock, and writes index.json and generation.json after a barrier. A rerun of the same command skips
every verified shard and redoes the rest (resume after a crash, a kill, a signal or a full disk).

--out may be any fsspec URL instead of a directory (s3://bucket/prefix/run): the same files and bytes, each
shard uploaded whole to its final key before its marker (`vaegen.rundir.RemoteRunDir`), the run locked by
`remote_run_lock`, and no free-space check (object storage has no such figure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from vaegen import dmrun
from vaegen import shardformat as sf
from vaegen.data import IMAGE_SIZE, get_spec, store_path
from vaegen.errors import VaegenError
from vaegen.interrupts import set_resume_hint
from vaegen.launch import launch_state
from vaegen.provenance import refuse_changed_settings, run_record
from vaegen.rundir import RunDir, run_dir_at
from vaegen.runlock import remote_run_lock, run_lock

DEFAULT_SHARD_SIZE = 4096  # 4 MiB of grey (12 MiB of RGB) 32x32 pixels; 16 blocks; the unit of resume
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class GenerateConfig:
    dm: str                       # DM directory (`vaegen dm train` output, a diffusers UNet or pipeline dir)
    scale: int                    # K: generate K * |D_train| samples
    out: str                      # run directory shards/<dataset>/<run>, or an fsspec URL (s3://bucket/prefix/run)
    sampler: str = "edm-heun"
    steps: int = 18
    seed: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE  # images per sampling call (the handoff unit to the writer)
    chunk: int | None = None      # network batch; None: SamplerConfig's default. Part of the run's identity
    dataset: str | None = None    # required only for a DM without dm.json (a foreign diffusers directory)
    subset: int | None = None
    subset_seed: int = 0
    data_root: str = "data"
    precision: str = "auto"       # auto | fp32 | bf16 (auto: bf16 on CUDA devices that support it)
    tf32: bool = False            # fp32 on CUDA: TF32 tensor cores for convolutions and matmuls (identity: "tf32")
    compile: str = "auto"         # auto | on | off (auto: on for CUDA)
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" replays CUDA graphs (GPU)
    channels_last: bool = True
    writer_queue: int = 8         # batches in flight between sampler and writer thread
    noise: str | None = None      # noise stream; None: the run's own when resuming, else the current default


# --- what the run is ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingData:
    """What the DM was trained on: its dataset (and balanced subset) and N = |D_train|, read from the store."""

    dataset: str
    subset: int | None
    subset_seed: int | None       # None when there is no subset
    n_train: int
    channels: int
    image_size: int = IMAGE_SIZE


def resolve_dataset(cfg: GenerateConfig) -> TrainingData:
    """The DM's training data (its dm.json, vaegen.dmrun) with N read from its store."""
    import zarr

    dm_dir = Path(cfg.dm)
    if not dm_dir.is_dir():
        raise VaegenError(f"no diffusion model directory at {dm_dir}; train one with `vaegen dm train` (make dm)")
    data = dmrun.training_data(dm_dir, cfg.dataset, cfg.subset, cfg.subset_seed)
    dataset, subset, subset_seed, train_images = data.dataset, data.subset, data.subset_seed or 0, data.train_images
    spec = get_spec(dataset)
    store = store_path(dataset, subset, subset_seed, cfg.data_root)
    try:
        n_train = int(zarr.open_group(str(store), mode="r")["train/images"].shape[0])
    except Exception:  # zarr raises several types for a missing or foreign store
        how = f" --subset {subset} --subset-seed {subset_seed}" if subset is not None else ""
        raise VaegenError(f"cannot read the training split of {store} (N = |D_train| comes from it); "
                          f"build it with `vaegen data {dataset}{how}` or pass --data-root") from None
    if train_images not in (None, n_train):
        raise VaegenError(f"{dm_dir} was trained on {train_images} images but {store} holds {n_train}; "
                          "rebuild the store the DM was trained on or pass the right --data-root")
    return TrainingData(dataset, subset, subset_seed if subset is not None else None, n_train, spec.channels)


def identity_of(cfg: GenerateConfig, data: TrainingData, dm_sha256: str, sampler: dict, numerics: dict,
                noise: str) -> dict:
    """What a run directory's bytes depend on; a run may only be extended with exactly this.

    `numerics` (precision, channels_last, compile) is included because each changes which kernels run, and
    so the last bits of some pixels.
    """
    return {"dm_sha256": dm_sha256, "sampler": sampler, "seed": cfg.seed, "noise_stream": noise,
            "shard_size": cfg.shard_size, **numerics, "dataset": data.dataset, "subset": data.subset,
            "subset_seed": data.subset_seed, "n_train": data.n_train, "channels": data.channels,
            "image_size": data.image_size}


def existing_run(out: RunDir) -> dict | None:
    """The generation.json of the run in `out` (None for a new run); refuse a directory holding something else."""
    if out.size(sf.GENERATION_NAME) is None:
        if out.names():
            raise VaegenError(f"--out {out} is not empty and holds no {sf.GENERATION_NAME}; choose a new directory")
        return None
    previous = sf.read_generation(out)
    if not isinstance(previous.get("identity"), dict):
        raise VaegenError(f"{out.url(sf.GENERATION_NAME)} records no identity; --out {out} is not a run of "
                          "`vaegen generate`")
    return previous


def noise_stream_for(cfg: GenerateConfig, previous: dict | None) -> str:
    """The run's noise stream: the one asked for, else the one the run was made with, else the default."""
    from generator.sampling import DEFAULT_NOISE, check_noise_stream

    if cfg.noise is not None:
        return check_noise_stream(cfg.noise)
    return sf.noise_stream_of(previous["identity"]) if previous else DEFAULT_NOISE


def check_identity(out: RunDir, previous: dict | None, identity: dict) -> None:
    """Refuse to extend a run made with anything else (see `identity_of`)."""
    if previous is None:
        return
    recorded = dict(previous["identity"], noise_stream=sf.noise_stream_of(previous["identity"]))
    refuse_changed_settings(recorded, identity, where=f"--out {out}", hint="use a new --out directory")


def check_one_noise_stream(out: RunDir, noise: str) -> None:
    """Refuse a run directory holding a shard of another noise stream: a run never mixes two."""
    marked = sorted(j for name in out.names() if (j := sf.shard_id(name)) is not None and name == sf.marker_name(j))
    for j, marker in sf.read_markers(out, marked).items():
        if marker is not None and sf.noise_stream_of(marker) != noise:
            raise VaegenError(f"--out {out}: {sf.marker_name(j)} was made with noise stream "
                              f"{sf.noise_stream_of(marker)!r} but the run with {noise!r}, and a run never mixes "
                              "two; delete that shard and its marker (it is regenerated) or use a new --out")


def check_free_space(out: Path, n_images: int, n_shards: int, channels: int) -> None:
    """Refuse up front when the remaining shards cannot fit (tar and npy headers cost ~1.6% of the pixels)."""
    needed = int(n_images * channels * IMAGE_SIZE * IMAGE_SIZE * 1.02) + n_shards * 4096
    free = shutil.disk_usage(out).free
    if needed > free:
        raise VaegenError(f"{out}: the remaining {n_shards} shard(s) need about {needed / 2**20:.0f} MiB but only "
                          f"{free / 2**20:.0f} MiB are free; free some space (or lower --scale) and rerun")


# --- one writer per run on object storage -------------------------------------------------------------------

@contextlib.contextmanager
def cuda_matmul_precision(tf32: bool):
    """TF32 tensor cores on or off for CUDA convolutions and matmuls (cuDNN's own default is on), restored after."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- the writer thread: shard files off the sampling critical path ----------------------------------------

class BackgroundShardWriter:
    """Consumes (shard, images) batches in sample order and writes them as shards (`sf.ShardFile`).

    Sampling never waits on disk unless the bounded queue is full. An error in the thread is re-raised in the
    caller at its next `put` or at `close`, with its original type (a full disk stays an ENOSPC error).
    """

    def __init__(self, out: str | Path | RunDir, plan: sf.ShardPlan, marker_fields: dict, maxsize: int,
                 on_shard_done=None):
        self.out, self.plan, self.marker_fields, self.on_shard_done = run_dir_at(out), plan, marker_fields, \
            on_shard_done
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.busy_s = 0.0      # time the thread spent writing
        self.blocked_s = 0.0   # time the sampler waited on a full queue: the writer's cost on the critical path
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def put(self, j: int, images: np.ndarray) -> None:
        self._raise_if_failed()
        t0 = time.perf_counter()
        self.queue.put((j, images))
        self.blocked_s += time.perf_counter() - t0

    def close(self) -> None:
        t0 = time.perf_counter()
        self.queue.put(None)
        self.thread.join()
        self.blocked_s += time.perf_counter() - t0
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self.error is not None:
            raise self.error

    def _run(self):
        shard, pending = None, []  # the shard being written, and its images not yet in a full block
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the sampler never blocks on a dead writer
            t0 = time.perf_counter()
            try:
                j, images = item
                if shard is None:
                    shard = sf.ShardFile(self.out, j, self.plan.span(j)[0])
                pending.append(images)
                rest = np.concatenate(pending) if len(pending) > 1 else pending[0]
                complete = shard.count + len(rest) == self.plan.span(j)[1]
                while len(rest) >= sf.BLOCK_SIZE or (complete and len(rest)):
                    shard.write_block(rest[:sf.BLOCK_SIZE])
                    rest = rest[sf.BLOCK_SIZE:]
                pending = [rest] if len(rest) else []
                if complete:
                    shard.commit(self.marker_fields)
                    shard = None
                    if self.on_shard_done is not None:
                        self.on_shard_done(j)
            except BaseException as e:  # noqa: BLE001 - handed to the sampling thread
                self.error = e
                if shard is not None:
                    shard.abort()
                shard, pending = None, []
            self.busy_s += time.perf_counter() - t0
        if shard is not None:  # the sampler stopped mid-shard (a signal): drop the unfinished shard
            shard.abort()


# --- the loop ---------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """Everything `_generate` resolved before sampling: the model, the numerics and the run's identity."""

    run: RunDir                # where the run lives (cfg.out)
    data: TrainingData
    dm: object                    # generator.sampling.DiffusionModel
    sampler: object               # generator.sampling.SamplerConfig
    dtype: object                 # torch.dtype the network runs in
    compile_net: bool
    numerics: dict
    noise: str
    identity: dict
    previous: dict | None
    plan: sf.ShardPlan
    scale: int

    @property
    def marker_fields(self) -> dict:
        return {"sampler": self.identity["sampler"], "dm_sha256": self.dm.sha256, "seed": self.identity["seed"],
                "noise_stream": self.noise, **self.numerics}


def generate_run(cfg: GenerateConfig) -> dict:
    """Generate (or complete) the run directory `cfg.out`; returns its generation.json record."""
    state = launch_state()
    set_resume_hint("rerun the same command to resume: finished shards are kept")
    run = run_dir_at(cfg.out)
    if run.is_local:
        lock = run_lock(run.path, main_process=state.is_main_process)
    else:
        lock = remote_run_lock(run, main_process=state.is_main_process)
    with lock:
        return _generate(cfg, state, run)


def _setup(cfg: GenerateConfig, device, run: RunDir) -> Setup:
    """Resolve the numerics, load the DM and check `cfg.out` against the run it may already hold."""
    import torch

    from generator.sampling import SamplerConfig, load_dm

    data = resolve_dataset(cfg)
    use_cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    compile_net = cfg.compile == "on" or (cfg.compile == "auto" and use_cuda)
    sampler = SamplerConfig(name=cfg.sampler, steps=cfg.steps, **({"chunk": cfg.chunk} if cfg.chunk else {}))
    dm = load_dm(cfg.dm, device)
    if (dm.image_size, dm.channels) != (data.image_size, data.channels):
        raise VaegenError(f"{cfg.dm} makes {dm.channels}x{dm.image_size}x{dm.image_size} images but "
                          f"{data.dataset} has {data.channels}x{data.image_size}x{data.image_size}")
    # TF32 only changes fp32 CUDA kernels: elsewhere the run is plain fp32 (and recorded so).
    precision = "bf16" if bf16 else ("tf32" if cfg.tf32 and use_cuda else "fp32")
    numerics = {"precision": precision, "channels_last": cfg.channels_last,
                "compile": cfg.compile_mode if compile_net else False}
    run.refresh()  # what is there now that this process holds the lock
    previous = existing_run(run)  # every rank checks, so every rank raises on a mismatch
    noise = noise_stream_for(cfg, previous)
    identity = identity_of(cfg, data, dm.sha256, dataclasses.asdict(sampler), numerics, noise)
    check_identity(run, previous, identity)
    check_one_noise_stream(run, noise)
    # K only grows: a smaller SCALE than a completed run's is a no-op (its shards already exist).
    scale = max(cfg.scale, previous.get("scale") or 0 if previous else 0)
    plan = sf.ShardPlan(scale * data.n_train, cfg.shard_size)
    return Setup(run, data, dm, sampler, torch.bfloat16 if bf16 else torch.float32, compile_net, numerics, noise,
                 identity, previous, plan, scale)


def _prepare_run_dir(cfg: GenerateConfig, setup: Setup) -> None:
    """Main process: clear what an interrupted run left, check the disk, record the run as in progress."""
    from generator.sampling import sampler_record

    run, plan = setup.run, setup.plan
    run.makedirs()
    if removed := sf.remove_orphans(run):
        click.echo(f"{run}: removed {removed} file(s) left by an interrupted run", err=True)
    markers = sf.read_markers(run, range(plan.num_shards))
    left = [j for j in range(plan.num_shards) if not sf.shard_is_current(run, j, plan, setup.marker_fields, markers)]
    if run.is_local:  # object storage has no free-space figure to check against
        check_free_space(run.path, sum(plan.span(j)[1] for j in left), len(left), setup.data.channels)
    # "scale" stays the last completed K until this run completes (`shards verify` refuses complete=false).
    sf.write_generation(run, dict(
        setup.previous or {}, **run_record(cfg), **sampler_record(setup.dm, setup.sampler, cfg.seed, setup.noise),
        identity=setup.identity, **dataclasses.asdict(setup.data),
        scale=setup.previous["scale"] if setup.previous else 0, n_samples=plan.n_samples,
        shard_size=cfg.shard_size, num_shards=plan.num_shards, complete=False))


def _generate(cfg: GenerateConfig, state, run: RunDir) -> dict:
    import torch
    from tqdm import tqdm

    from generator.sampling import sample

    t_start = time.time()
    device = state.device
    rank, world = state.process_index, state.num_processes
    setup = _setup(cfg, device, run)
    plan, dm = setup.plan, setup.dm
    state.wait_for_everyone()  # all ranks have read generation.json before rank 0 rewrites it
    if state.is_main_process:
        _prepare_run_dir(cfg, setup)
    state.wait_for_everyone()  # orphans are gone before anyone writes
    run.refresh()

    mine = [j for j in range(plan.num_shards) if j % world == rank]
    markers = sf.read_markers(run, mine)
    todo = [j for j in mine if not sf.shard_is_current(run, j, plan, setup.marker_fields, markers)]
    if cfg.channels_last:
        dm.unet.to(memory_format=torch.channels_last)
    if setup.compile_net:
        dm.unet = torch.compile(dm.unet, mode=cfg.compile_mode)

    n_todo = sum(plan.span(j)[1] for j in todo)
    bar = tqdm(total=n_todo, unit="img", disable=not state.is_main_process, dynamic_ncols=True,
               desc=f"rank 0/{world}: {len(mine) - len(todo)}/{len(mine)} shards done")
    shards_done = [len(mine) - len(todo)]

    def on_shard_done(_j):
        shards_done[0] += 1
        bar.set_description(f"rank 0/{world}: {shards_done[0]}/{len(mine)} shards done", refresh=False)

    writer = BackgroundShardWriter(run, plan, setup.marker_fields, cfg.writer_queue, on_shard_done)
    t_loop = time.perf_counter()
    first_batch_s = first_batch_n = None  # includes one-off costs (torch.compile, CUDA context): excluded below
    try:
        with torch.inference_mode(), cuda_matmul_precision(setup.numerics["precision"] == "tf32"):
            for j in todo:
                first, count = plan.span(j)
                for lo in range(first, first + count, cfg.batch_size):
                    indices = np.arange(lo, min(lo + cfg.batch_size, first + count))
                    images = sample(dm, indices, cfg.seed, setup.sampler, device=device, dtype=setup.dtype,
                                    noise=setup.noise)
                    writer.put(j, images.numpy())
                    bar.update(len(indices))
                    if first_batch_s is None:
                        first_batch_s, first_batch_n = time.perf_counter() - t_loop, len(indices)
    finally:
        bar.close()
        writer.close()
    loop_s = time.perf_counter() - t_loop

    state.wait_for_everyone()
    record = None
    if state.is_main_process:
        # Every rank hashed what it wrote; here only that every shard of the plan is in place.
        run.refresh()  # the other ranks' shards too
        markers = sf.read_markers(run, range(plan.num_shards))
        problems = [p for j in range(plan.num_shards)
                    for p in sf.shard_problems(run, j, *plan.span(j), check_hash=False, check_blocks=False,
                                               markers=markers)]
        if problems:
            raise VaegenError(f"{len(problems)} shard(s) incomplete after generation: {'; '.join(problems[:5])}")
        sf.write_index(run, plan)
        record = sf.read_generation(run)
        steady = (n_todo - first_batch_n) / (loop_s - first_batch_s) \
            if first_batch_s is not None and n_todo > first_batch_n and loop_s > first_batch_s else None
        invocation = {"command": record["command"], "created": record["created"], "code_version": record["code_version"],
               "scale": setup.scale, "world_size": world, "device": str(device),
               # CPU kernels split work by thread count, and an image's last bits with it: recorded, not enforced
               "torch_threads": torch.get_num_threads(),
               "batch_size": cfg.batch_size, "shards_generated_rank0": len(todo), "images_generated_rank0": n_todo,
               "wall_s": round(time.time() - t_start, 3), "loop_s_rank0": round(loop_s, 3),
               "images_per_s_rank0": round(n_todo / loop_s, 3) if loop_s > 0 and n_todo else None,
               "first_batch_s_rank0": round(first_batch_s, 3) if first_batch_s is not None else None,
               "steady_images_per_s_rank0": round(steady, 3) if steady is not None else None,
               "writer_busy_s_rank0": round(writer.busy_s, 3),
               "writer_blocked_s_rank0": round(writer.blocked_s, 3)}
        record.update(scale=setup.scale, complete=True, runs=[*record.get("runs", []), invocation])
        sf.write_generation(run, record)
    state.wait_for_everyone()
    return record if record is not None else sf.read_generation(run)
