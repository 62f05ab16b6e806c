"""Stage 1b: precompute SCALE x |D_train| samples of p_DM into WebDataset shards, on one or many processes.

The whole loop is in `generate_run`. Sample i in [0, K*N) is drawn from noise seeded by (seed, i) and shard j
holds samples [j*S, (j+1)*S), so a run's bytes depend only on its identity (DM, sampler, seed, S and the
numerics: precision, channels_last, compile): not on the number of processes or nodes, the batch size, or how
often it was interrupted. Raising SCALE only adds shards.

    vaegen-generate --dm runs/dm/fmnist --scale 100 --out shards/fmnist/heun18-s0
    accelerate launch --num_processes 8 -m generator --dm ... --scale 100 --out ...   # same bytes

Each process owns whole shards (shard j -> rank j % world_size) and writes them itself: tar under a temporary
name, fsync, rename, then the completion marker. Rank 0 writes index.json and generation.json after a barrier.
A rerun of the same command skips every verified shard and redoes the rest (resume after a crash or kill).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from vaegen import shardformat as sf
from vaegen.data import IMAGE_SIZE, get_spec, store_path
from vaegen.errors import VaegenError
from vaegen.provenance import fsync_dir, read_json, run_record, write_json_atomic

DEFAULT_SHARD_SIZE = 4096  # 4 MiB of grey (12 MiB of RGB) 32x32 pixels; 16 blocks; the unit of resume
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class GenerateConfig:
    dm: str                       # DM directory (`vaegen dm train` output, a diffusers UNet or pipeline dir)
    scale: int                    # K: generate K * |D_train| samples
    out: str                      # run directory, shards/<dataset>/<run>
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
    compile: str = "auto"         # auto | on | off (auto: on for CUDA)
    channels_last: bool = True
    writer_queue: int = 8         # batches in flight between sampler and writer thread


# --- what the run is ----------------------------------------------------------------------------------------

def resolve_dataset(cfg: GenerateConfig) -> dict:
    """Dataset, subset and N = |D_train| for the DM: from its dm.json, else from --dataset/--subset."""
    import zarr

    dm_dir = Path(cfg.dm)
    if not dm_dir.is_dir():
        raise VaegenError(f"no diffusion model directory at {dm_dir}; train one with `vaegen dm train` (make dm)")
    dm_json = read_json(dm_dir / "dm.json") if (dm_dir / "dm.json").is_file() else {}
    dataset = dm_json.get("dataset") or cfg.dataset
    subset, subset_seed = dm_json.get("subset", cfg.subset), dm_json.get("subset_seed", cfg.subset_seed)
    if isinstance(subset, dict):  # the store attrs' form {"n": N, "seed": S}
        subset, subset_seed = subset.get("n"), subset.get("seed", subset_seed)
    if dataset is None:
        raise VaegenError(f"{dm_dir} has no dm.json saying what it was trained on; pass --dataset (and --subset)")
    if cfg.dataset is not None and cfg.dataset != dataset:
        raise VaegenError(f"--dataset {cfg.dataset} but {dm_dir}/dm.json says the DM was trained on {dataset}")
    spec = get_spec(dataset)
    store = store_path(dataset, subset, subset_seed, cfg.data_root)
    try:
        n_train = int(zarr.open_group(str(store), mode="r")["train/images"].shape[0])
    except Exception:  # zarr raises several types for a missing or foreign store
        how = f" --subset {subset} --seed {subset_seed}" if subset is not None else ""
        raise VaegenError(f"cannot read the training split of {store} (N = |D_train| comes from it); "
                          f"build it with `vaegen data {dataset}{how}` or pass --data-root") from None
    if dm_json.get("train_images") not in (None, n_train):
        raise VaegenError(f"{dm_dir} was trained on {dm_json['train_images']} images but {store} holds {n_train}; "
                          "rebuild the store the DM was trained on or pass the right --data-root")
    return {"dataset": dataset, "subset": subset, "subset_seed": subset_seed if subset is not None else None,
            "n_train": n_train, "channels": spec.channels, "image_size": IMAGE_SIZE}


@dataclass(frozen=True)
class ShardPlan:
    """Samples [0, n_samples) cut into shards of `shard_size`; the last may be short."""

    n_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.n_samples // self.shard_size)

    def span(self, j: int) -> tuple[int, int]:
        first = j * self.shard_size
        return first, min(self.shard_size, self.n_samples - first)


def identity_of(cfg: GenerateConfig, data: dict, dm_sha256: str, sampler: dict, numerics: dict) -> dict:
    """What a run directory's bytes depend on; a run may only be extended with exactly this.

    `numerics` (precision, channels_last, compile) is included because each changes which kernels run, and
    so the last bits of some pixels.
    """
    return {"dm_sha256": dm_sha256, "sampler": sampler, "seed": cfg.seed, "shard_size": cfg.shard_size,
            **numerics, "dataset": data["dataset"], "subset": data["subset"],
            "subset_seed": data["subset_seed"], "n_train": data["n_train"], "channels": data["channels"],
            "image_size": data["image_size"]}


def check_run_dir(out: Path, identity: dict) -> dict | None:
    """The run's existing generation.json (None for a new run); refuse a directory holding another run."""
    gen_path = out / sf.GENERATION_NAME
    if not gen_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise VaegenError(f"--out {out} is not empty and holds no {sf.GENERATION_NAME}; choose a new directory")
        return None
    try:
        previous = read_json(gen_path)
        recorded = previous["identity"]
    except (ValueError, KeyError, TypeError):
        raise VaegenError(f"{gen_path} is unreadable; --out {out} is not a vaegen shard run") from None
    diff = [k for k in identity if recorded.get(k) != identity[k]]
    if diff:
        names = ", ".join(f"{k} ({recorded.get(k)!r} there, {identity[k]!r} now)" for k in diff)
        raise VaegenError(f"--out {out} holds a run with a different {names}; use a new --out directory")
    return previous


def remove_orphans(out: Path) -> int:
    """Delete what an interrupted run left: temporary shards and JSONs, tars without marker, markers without tar."""
    removed = 0
    for p in out.iterdir():
        j = sf.shard_id(p.name)
        orphan = (
            p.name.endswith(sf.TEMP_SUFFIX) or ".tmp-" in p.name
            or (j is not None and p.name == sf.shard_name(j) and not (out / sf.marker_name(j)).exists())
            or (j is not None and p.name == sf.marker_name(j) and not (out / sf.shard_name(j)).exists())
        )
        if orphan and p.is_file():
            p.unlink()
            removed += 1
    return removed


# --- the writer thread: shard files off the sampling critical path ----------------------------------------

class _HashingFile:
    """File wrapper that hashes and counts what tarfile writes, so the shard is never read back."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


class BackgroundShardWriter:
    """Consumes (shard, images) batches in sample order; writes blocks, then each finished shard atomically.

    Sampling never waits on disk unless the bounded queue is full. An error in the thread is re-raised in the
    caller at its next `put` or at `close`.
    """

    def __init__(self, out: Path, plan: ShardPlan, marker_fields: dict, maxsize: int, on_shard_done=None):
        self.out, self.plan, self.marker_fields, self.on_shard_done = out, plan, marker_fields, on_shard_done
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
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error

    def _run(self):
        shard = None  # the shard being written: see `_open`
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the sampler never blocks on a dead writer
            t0 = time.perf_counter()
            try:
                j, images = item
                if shard is None:
                    shard = self._open(j)
                shard["pending"].append(images)
                self._write_blocks(shard, final=False)
                if shard["written"] + sum(len(p) for p in shard["pending"]) == self.plan.span(j)[1]:
                    self._write_blocks(shard, final=True)
                    self._finish(shard)
                    shard = None
            except BaseException as e:  # noqa: BLE001 - handed to the sampling thread
                self.error = e
                if shard is not None:  # close the partial file; the next run's orphan cleanup removes it
                    with contextlib.suppress(Exception):
                        shard["tar"].close()
                    shard["file"].close()
                    shard = None
            self.busy_s += time.perf_counter() - t0

    def _open(self, j: int) -> dict:
        first, _ = self.plan.span(j)
        (self.out / sf.marker_name(j)).unlink(missing_ok=True)  # never a marker describing another tar
        f = open(self.out / sf.temp_name(j), "wb")
        hashing = _HashingFile(f)
        return {"j": j, "file": f, "hashing": hashing, "tar": sf.open_tar_writer(hashing), "pending": [],
                "next": first, "written": 0}

    def _write_blocks(self, shard: dict, final: bool) -> None:
        """Write every full BLOCK_SIZE block (and with `final` the short rest) of the pending images."""
        if not shard["pending"]:
            return
        pending = np.concatenate(shard["pending"]) if len(shard["pending"]) > 1 else shard["pending"][0]
        start = 0
        while len(pending) - start >= sf.BLOCK_SIZE or (final and start < len(pending)):
            block = pending[start:start + sf.BLOCK_SIZE]
            shard["tar"].write(sf.pack_block(block, shard["next"]))
            shard["next"] += len(block)
            shard["written"] += len(block)
            start += len(block)
        shard["pending"] = [pending[start:]] if start < len(pending) else []

    def _finish(self, shard: dict) -> None:
        j = shard["j"]
        shard["tar"].close()
        shard["file"].flush()
        os.fsync(shard["file"].fileno())
        shard["file"].close()
        os.replace(self.out / sf.temp_name(j), self.out / sf.shard_name(j))
        fsync_dir(self.out)
        first, count = self.plan.span(j)
        write_json_atomic(self.out / sf.marker_name(j), {
            "shard": j, "first": first, "count": count, "sha256": shard["hashing"].sha256.hexdigest(),
            "filesize": shard["hashing"].size, **self.marker_fields})
        if self.on_shard_done is not None:
            self.on_shard_done(j)


# --- the loop ---------------------------------------------------------------------------------------------

def generate_run(cfg: GenerateConfig) -> dict:
    """Generate (or complete) the run directory `cfg.out`; returns its generation.json record."""
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from generator.sampling import SamplerConfig, load_dm, sample, sampler_record

    t_start = time.time()
    data = resolve_dataset(cfg)
    state = PartialState(cpu=_cpu_processes())  # accelerate's launch environment, or a single process
    device = state.device
    rank, world = state.process_index, state.num_processes

    use_cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    compile_net = cfg.compile == "on" or (cfg.compile == "auto" and use_cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    chunk = {"chunk": cfg.chunk} if cfg.chunk is not None else {}
    sampler_cfg = SamplerConfig(name=cfg.sampler, steps=cfg.steps, **chunk)
    dm = load_dm(cfg.dm, device)
    if (dm.image_size, dm.channels) != (data["image_size"], data["channels"]):
        raise VaegenError(f"{cfg.dm} makes {dm.channels}x{dm.image_size}x{dm.image_size} images but "
                          f"{data['dataset']} has {data['channels']}x{data['image_size']}x{data['image_size']}")
    numerics = {"precision": "bf16" if bf16 else "fp32", "channels_last": cfg.channels_last, "compile": compile_net}
    identity = identity_of(cfg, data, dm.sha256, dataclasses.asdict(sampler_cfg), numerics)

    out = Path(cfg.out)
    previous = check_run_dir(out, identity)  # every rank checks, so every rank raises on a mismatch
    # K only grows: a smaller SCALE than a completed run's is a no-op (its shards already exist).
    scale = max(cfg.scale, previous.get("scale", 0) if previous else 0)
    plan = ShardPlan(scale * data["n_train"], cfg.shard_size)
    state.wait_for_everyone()  # all ranks have read generation.json before rank 0 rewrites it
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if removed := remove_orphans(out):
            click.echo(f"{out}: removed {removed} file(s) left by an interrupted run", err=True)
        # "scale" stays the last completed K until this run completes (`shards verify` refuses complete=false).
        record = dict(previous or {}, **run_record(cfg), **sampler_record(dm, sampler_cfg, cfg.seed),
                      identity=identity, **data,
                      scale=previous["scale"] if previous else 0, n_samples=plan.n_samples,
                      shard_size=cfg.shard_size, num_shards=plan.num_shards, complete=False)
        write_json_atomic(out / sf.GENERATION_NAME, record)
    state.wait_for_everyone()  # orphans are gone before anyone writes

    marker_fields = {"sampler": identity["sampler"], "dm_sha256": dm.sha256, "seed": cfg.seed, **numerics}
    mine = [j for j in range(plan.num_shards) if j % world == rank]
    todo = [j for j in mine if not shard_is_current(out, j, plan, marker_fields)]

    if cfg.channels_last:
        dm.unet.to(memory_format=torch.channels_last)
    if compile_net:
        dm.unet = torch.compile(dm.unet)

    n_todo = sum(plan.span(j)[1] for j in todo)
    bar = tqdm(total=n_todo, unit="img", disable=not state.is_main_process, dynamic_ncols=True,
               desc=f"rank 0/{world}: {len(mine) - len(todo)}/{len(mine)} shards done")
    shards_done = [len(mine) - len(todo)]

    def on_shard_done(_j):
        shards_done[0] += 1
        bar.set_description(f"rank 0/{world}: {shards_done[0]}/{len(mine)} shards done", refresh=False)

    writer = BackgroundShardWriter(out, plan, marker_fields, cfg.writer_queue, on_shard_done)
    t_loop = time.perf_counter()
    try:
        with torch.inference_mode():
            for j in todo:
                first, count = plan.span(j)
                for lo in range(first, first + count, cfg.batch_size):
                    indices = np.arange(lo, min(lo + cfg.batch_size, first + count))
                    images = sample(dm, indices, cfg.seed, sampler_cfg, device=device, dtype=dtype)
                    writer.put(j, images.numpy())
                    bar.update(len(indices))
    finally:
        writer.close()
        bar.close()
    loop_s = time.perf_counter() - t_loop

    state.wait_for_everyone()
    record = None
    if state.is_main_process:
        # Every rank hashed what it wrote; here only that every shard of the plan is in place.
        problems = [p for j in range(plan.num_shards)
                    for p in sf.shard_problems(out, j, *plan.span(j), check_hash=False, check_blocks=False)]
        if problems:
            raise VaegenError(f"{len(problems)} shard(s) incomplete after generation: {'; '.join(problems[:5])}")
        write_index(out, plan)
        record = read_json(out / sf.GENERATION_NAME)
        run = {"command": record["command"], "created": record["created"], "code_version": record["code_version"],
               "scale": scale, "world_size": world, "device": str(device),
               "batch_size": cfg.batch_size, "shards_generated_rank0": len(todo), "images_generated_rank0": n_todo,
               "wall_s": round(time.time() - t_start, 3), "loop_s_rank0": round(loop_s, 3),
               "images_per_s_rank0": round(n_todo / loop_s, 3) if loop_s > 0 and n_todo else None,
               "writer_busy_s_rank0": round(writer.busy_s, 3),
               "writer_blocked_s_rank0": round(writer.blocked_s, 3)}
        record.update(scale=scale, complete=True, runs=[*record.get("runs", []), run])
        write_json_atomic(out / sf.GENERATION_NAME, record)
    state.wait_for_everyone()
    return record if record is not None else read_json(out / sf.GENERATION_NAME)


def _cpu_processes() -> bool:
    """Whether to run distributed on CPU (gloo): `accelerate launch --cpu`, or a torchrun-style launch
    (`accelerate launch --multi_gpu`, the only CPU multi-process launcher without MPI) on a machine without CUDA.
    """
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or ("LOCAL_RANK" in os.environ and not torch.cuda.is_available())


def shard_is_current(out: Path, j: int, plan: ShardPlan, marker_fields: dict) -> bool:
    """Whether shard j is complete, intact and from this run's configuration (then it is skipped)."""
    marker = sf.read_marker(out, j)
    if marker is None or any(marker.get(k) != v for k, v in marker_fields.items()):
        return False
    return not sf.shard_problems(out, j, *plan.span(j), check_blocks=False)


def write_index(out: Path, plan: ShardPlan) -> None:
    """index.json (wids-style) from the markers of the plan's shards; urls relative to the run directory."""
    shardlist = []
    for j in range(plan.num_shards):
        marker = sf.read_marker(out, j)
        shardlist.append({"url": sf.shard_name(j), "nsamples": -(-marker["count"] // sf.BLOCK_SIZE),
                          "filesize": marker["filesize"], "sha256": marker["sha256"],
                          "first": marker["first"], "count": marker["count"]})
    write_json_atomic(out / sf.INDEX_NAME, {"__kind__": sf.INDEX_KIND, "wids_version": 1,
                                           "n_images": plan.n_samples,
                                           "shardlist": shardlist})


# --- verification -----------------------------------------------------------------------------------------

def verify_run(run_dir: str | os.PathLike) -> dict:
    """Check every shard of a run against its marker and index.json; VaegenError naming each bad shard."""
    run_dir = Path(run_dir)
    if not (run_dir / sf.GENERATION_NAME).is_file():
        raise VaegenError(f"{run_dir} holds no {sf.GENERATION_NAME}; not a vaegen shard run")
    try:
        index = sf.read_index(run_dir)
    except (OSError, ValueError) as e:
        raise VaegenError(f"{run_dir}: no usable {sf.INDEX_NAME} ({e}); rerun the generate command") from None
    problems, expected_first, n_images, n_bytes = [], 0, 0, 0
    for entry in index["shardlist"]:
        j = sf.shard_id(entry["url"])
        if entry.get("first") != expected_first:
            problems.append(f"{entry['url']} starts at sample {entry.get('first')}, expected {expected_first}")
        problems += sf.shard_problems(run_dir, j, entry.get("first"), entry.get("count"), entry)
        expected_first = entry.get("first", 0) + entry.get("count", 0)
        n_images += entry.get("count", 0)
        n_bytes += entry.get("filesize", 0)
    if n_images != index.get("n_images"):
        problems.append(f"index lists {n_images} images, its header says {index.get('n_images')}")
    if not read_json(run_dir / sf.GENERATION_NAME).get("complete"):
        problems.append(f"{sf.GENERATION_NAME} says a generate command is running or was interrupted "
                        "(complete: false); rerun it to finish")
    if problems:
        raise VaegenError(f"{run_dir}: {len(problems)} bad shard(s): {'; '.join(problems)}")
    return {"shards": len(index["shardlist"]), "images": n_images, "bytes": n_bytes}


# --- command line -----------------------------------------------------------------------------------------

class ScaleType(click.ParamType):
    """SCALE is a whole multiple K >= 1 of |D_train|; anything else is a one-line error (exit 2)."""

    name = "K"

    def convert(self, value, param, ctx):
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = 0
        if k < 1 or str(value).strip() != str(k):
            raise VaegenError(f"--scale must be a whole number >= 1 (K in K x |D_train| samples), got {value!r}")
        return k


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--dm", required=True, type=click.Path(), help="Diffusion model directory (runs/dm/NAME).")
@click.option("--scale", required=True, type=ScaleType(), help="K: generate K x |D_train| samples.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory shards/<dataset>/<run>.")
@click.option("--sampler", default="edm-heun", type=click.Choice(["edm-heun", "dpm-solver++", "ddim"]))
@click.option("--steps", default=18, type=click.IntRange(min=1), help="Sampler steps (edm-heun 18 = 35 NFE).")
@click.option("--seed", default=0, type=click.IntRange(min=0), help="Sample i's noise is seeded by (seed, i).")
@click.option("--shard-size", default=DEFAULT_SHARD_SIZE, type=click.IntRange(min=1), help="Samples per shard.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, type=click.IntRange(min=1),
              help="Images per sampling call and process; keep it a multiple of --chunk (no padded chunks).")
@click.option("--chunk", default=None, type=click.IntRange(min=1),
              help="Network batch; the sampler pads to it so images never depend on the batch. Default: the "
                   "sampler's (64). Part of the run's identity: larger is faster on a GPU.")
@click.option("--dataset", default=None, help="Only for a DM without dm.json: the dataset it was trained on.")
@click.option("--subset", default=None, type=click.IntRange(min=1), help="Only for a DM without dm.json.")
@click.option("--subset-seed", default=0, type=int, help="Only for a DM without dm.json.")
@click.option("--data-root", default="data", type=click.Path(file_okay=False), help="Where the zarr stores are.")
@click.option("--precision", default="auto", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 on CUDA with bf16 support, else fp32. Part of the run's identity.")
@click.option("--compile", "compile_", default="auto", type=click.Choice(["auto", "on", "off"]),
              help="torch.compile the UNet (auto: on for CUDA).")
@click.option("--channels-last/--no-channels-last", default=True, help="channels_last memory format for the UNet.")
def generate(dm, scale, out, sampler, steps, seed, shard_size, batch_size, chunk, dataset, subset, subset_seed, data_root,
             precision, compile_, channels_last):
    """Precompute SCALE x |D_train| samples of the DM into WebDataset shards (resumable, any process count)."""
    cfg = GenerateConfig(dm=dm, scale=scale, out=out, sampler=sampler, steps=steps, seed=seed,
                         shard_size=shard_size, batch_size=batch_size, chunk=chunk, dataset=dataset, subset=subset,
                         subset_seed=subset_seed, data_root=data_root, precision=precision, compile=compile_,
                         channels_last=channels_last)
    record = generate_run(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        click.echo(f"{out}: {record['n_samples']} samples (K={record['scale']} x N={record['n_train']}) "
                   f"in {record['num_shards']} shards")


@click.group(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
def shards():
    """Inspect and verify shard runs."""


@shards.command("verify")
@click.argument("run_dir", type=click.Path(file_okay=False))
def verify(run_dir):
    """Check every shard against its marker and index.json; exit 2 naming each bad shard."""
    summary = verify_run(run_dir)
    click.echo(f"OK {run_dir}: {summary['shards']} shards, {summary['images']} images, {summary['bytes']} bytes")
