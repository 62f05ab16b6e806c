"""The shard contract, both ways: how shards are written (the generator), read (the trainer) and verified.

A run directory ``shards/<dataset>/<run>/`` holds:

    shard-000000.tar            WebDataset tar. Shard j holds samples [j*S, (j+1)*S) (the last may be short).
                                Members come in blocks of up to BLOCK_SIZE images, one sample per block:
                                    <key>.npy   uint8 array (n, C, 32, 32), saved with numpy.save
                                    <key>.json  {"first": i0, "count": n}: the block holds samples i0 .. i0+n-1
                                <key> is the first sample index zero-padded to 12 digits (no dots).
    shard-000000.done.json      completion marker, written only after the tar was fsynced and renamed:
                                {"shard", "first", "count", "sha256", "filesize", "sampler", "dm_sha256",
                                 "seed", "noise_stream", "precision" (fp32, tf32 or bf16), "channels_last", "compile"}
    index.json                  wids-style shard index ({"__kind__": "wids-shard-index-v1", "n_images",
                                "shardlist": [{"url", "nsamples", "filesize", "sha256", "first", "count"}, ...]}),
                                urls relative to the run dir. As wids requires, "nsamples" counts WebDataset
                                samples, i.e. BLOCKS (ceil(count / 256)); images are "first" .. "first"+"count"-1.
    generation.json             what produced the run, written and read only through `write_generation` /
                                `read_generation`: "dataset", "subset", "subset_seed", "n_train" (N),
                                "channels", "image_size", "scale" (K, the largest completed), "n_samples"
                                (K*N), "shard_size", "num_shards", "complete" (false while a run is in
                                progress: do not train on it); from `vaegen generate` also "identity" (what
                                the bytes depend on, a run is only ever extended with the same), "dm" (path,
                                weights sha256, kind), "sampler", "seed", "noise_stream", "network_evaluations",
                                "config", "code_version", "command", and "runs" (one per invocation, with timing)
    .shard-000000.tar.partial   a shard being written (removed on the next run if it was interrupted)

The noise stream (how sample i's initial noise follows from (seed, i); `generator.sampling`) is part of a
run's identity and of every marker. Runs that record none were made with the first scheme,
LEGACY_NOISE_STREAM. A run never mixes two: the generator resumes a run with the scheme it was made with and
refuses markers of another, and `verify_run` names any shard whose marker disagrees with the run.

Pixels are uint8 exactly like the real data (never pre-binarized). Packing many images per member keeps the
disk cost within a few percent of the raw pixel bytes; one tar member per 32x32 grey image would cost ~5x.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaegen.errors import VaegenError
from vaegen.provenance import fsync_dir, read_json, sha256_file, write_json_atomic

BLOCK_SIZE = 256
INDEX_NAME = "index.json"
GENERATION_NAME = "generation.json"
INDEX_KIND = "wids-shard-index-v1"
# The noise stream of runs and markers that record none (generator.sampling's per-image generator scheme).
LEGACY_NOISE_STREAM = "vaegen.seeding sample-noise v1"
# What every generation.json holds, whoever wrote it (the trainer and `verify` rely on these).
GENERATION_FIELDS = ("dataset", "subset", "subset_seed", "n_train", "channels", "image_size", "scale",
                     "n_samples", "shard_size", "num_shards", "complete")


def shard_name(j: int) -> str:
    return f"shard-{j:06d}.tar"


def marker_name(j: int) -> str:
    return f"shard-{j:06d}.done.json"


def block_key(first: int) -> str:
    return f"{first:012d}"


def pack_block(images: np.ndarray, first: int) -> dict:
    """A WebDataset sample (for `webdataset.TarWriter`) holding images first .. first+len(images)-1."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"blocks hold uint8 (n, C, H, W) arrays, got {images.dtype} {images.shape}")
    return {"__key__": block_key(first), "npy": np.ascontiguousarray(images),
            "json": {"first": int(first), "count": int(len(images))}}


def unpack_block(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, C, H, W) uint8, sample indices (n,) int64) from a raw or decoded WebDataset sample."""
    images, meta = sample["npy"], sample["json"]
    if isinstance(images, (bytes, bytearray)):
        images = np.load(io.BytesIO(images), allow_pickle=False)
    if isinstance(meta, (bytes, bytearray, str)):
        meta = json.loads(meta)
    if len(images) != meta["count"]:
        raise ValueError(f"block {sample.get('__key__')} holds {len(images)} images, its json says {meta['count']}")
    return images, np.arange(meta["first"], meta["first"] + meta["count"], dtype=np.int64)


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All (images, indices) of one shard, read with the standard library (no webdataset needed)."""
    members: dict[str, dict] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    blocks = [unpack_block(members[k]) for k in sorted(members)]
    if not blocks:
        return np.zeros((0, 0, 0, 0), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def read_index(run_dir: str | Path) -> dict:
    path = Path(run_dir) / INDEX_NAME
    with open(path) as f:
        index = json.load(f)
    if index.get("__kind__") != INDEX_KIND:
        raise ValueError(f"{path} is not a {INDEX_KIND} index")
    return index


# --- the plan: which samples go in which shard -----------------------------------------------------------

@dataclass(frozen=True)
class ShardPlan:
    """Samples [0, n_samples) cut into shards of `shard_size`: shard j holds [j*S, (j+1)*S), the last may be short."""

    n_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.n_samples // self.shard_size)

    def span(self, j: int) -> tuple[int, int]:
        """(first sample, count) of shard j."""
        first = j * self.shard_size
        return first, min(self.shard_size, self.n_samples - first)


# --- writing --------------------------------------------------------------------------------------------

TEMP_SUFFIX = ".partial"  # a shard being written: `.shard-000000.tar.partial`, renamed when complete
# Fixed tar header fields: identical samples give identical shard bytes, whoever writes them and when.
TAR_HEADER = {"user": "vaegen", "group": "vaegen", "mode": 0o444, "mtime": 0}


def temp_name(j: int) -> str:
    return f".{shard_name(j)}{TEMP_SUFFIX}"


def shard_id(name: str) -> int | None:
    """j for 'shard-00000j.tar' / 'shard-00000j.done.json' / '.shard-00000j.tar.partial', else None."""
    stem = name.lstrip(".")
    if not stem.startswith("shard-") or len(stem) < 12 or not stem[6:12].isdigit():
        return None
    return int(stem[6:12])


class _HashingFile:
    """File wrapper that hashes and counts what the tar writer writes, so a shard is never read back."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


class ShardFile:
    """Shard j of a run, written block by block under its temporary name; `commit` makes it a finished shard.

    commit: tar closed, fsynced, renamed to shard-j.tar, and only then the completion marker written. A shard
    that is not committed (`abort`, or a crash) is a temporary file that the next run removes: a reader never
    sees a tar without a marker that describes exactly its bytes.
    """

    def __init__(self, run_dir: str | Path, j: int, first: int):
        import webdataset

        self.run_dir, self.j, self.next, self.count = Path(run_dir), j, first, 0
        self.first = first
        (self.run_dir / marker_name(j)).unlink(missing_ok=True)  # never a marker describing another tar
        self.file = open(self.run_dir / temp_name(j), "wb")
        self.hashing = _HashingFile(self.file)
        self.tar = webdataset.TarWriter(self.hashing, **TAR_HEADER)

    def write_block(self, images: np.ndarray) -> None:
        """Append images next .. next+len-1 as one block (at most BLOCK_SIZE images)."""
        if len(images) > BLOCK_SIZE:
            raise ValueError(f"a block holds at most {BLOCK_SIZE} images, got {len(images)}")
        self.tar.write(pack_block(images, self.next))
        self.next += len(images)
        self.count += len(images)

    def commit(self, marker_fields: dict) -> dict:
        """Finish the shard atomically (see the class docstring); returns its marker."""
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.run_dir / temp_name(self.j), self.run_dir / shard_name(self.j))
        fsync_dir(self.run_dir)
        marker = {"shard": self.j, "first": self.first, "count": self.count,
                  "sha256": self.hashing.sha256.hexdigest(), "filesize": self.hashing.size, **marker_fields}
        write_json_atomic(self.run_dir / marker_name(self.j), marker)
        return marker

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file)."""
        try:
            self.tar.close()
        except Exception:  # noqa: BLE001 - the tar may be half-written; the file goes anyway
            pass
        self.file.close()
        (self.run_dir / temp_name(self.j)).unlink(missing_ok=True)


def write_shard(run_dir: str | Path, j: int, first: int, images: np.ndarray, marker_fields: dict) -> dict:
    """Shard j holding `images` as samples first .. first+len-1, written and committed in one go."""
    shard = ShardFile(run_dir, j, first)
    try:
        for start in range(0, len(images), BLOCK_SIZE):
            shard.write_block(images[start:start + BLOCK_SIZE])
        return shard.commit(marker_fields)
    except BaseException:
        shard.abort()
        raise


def write_index(run_dir: str | Path, plan: ShardPlan) -> None:
    """index.json (wids-style) from the markers of the plan's shards; urls relative to the run directory."""
    run_dir = Path(run_dir)
    shardlist = []
    for j in range(plan.num_shards):
        marker = read_marker(run_dir, j)
        shardlist.append({"url": shard_name(j), "nsamples": -(-marker["count"] // BLOCK_SIZE),
                          "filesize": marker["filesize"], "sha256": marker["sha256"],
                          "first": marker["first"], "count": marker["count"]})
    write_json_atomic(run_dir / INDEX_NAME, {"__kind__": INDEX_KIND, "wids_version": 1,
                                             "n_images": plan.n_samples, "shardlist": shardlist})


def write_generation(run_dir: str | Path, record: dict) -> None:
    """generation.json (atomically): `record` must hold GENERATION_FIELDS; anything else is provenance."""
    missing = [k for k in GENERATION_FIELDS if k not in record]
    if missing:
        raise ValueError(f"a {GENERATION_NAME} record needs {', '.join(missing)}")
    write_json_atomic(Path(run_dir) / GENERATION_NAME, record)


def read_generation(run_dir: str | Path) -> dict:
    """A run's generation.json; a one-line VaegenError when it is missing or unreadable."""
    path = Path(run_dir) / GENERATION_NAME
    if not path.is_file():
        raise VaegenError(f"{run_dir} holds no {GENERATION_NAME}; not a vaegen shard run")
    try:
        record = read_json(path)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or any(k not in record for k in ("dataset", "n_samples", "complete")):
        raise VaegenError(f"{path} is unreadable or incomplete; {run_dir} is not a vaegen shard run")
    return record


def noise_stream_of(record: dict) -> str:
    """The noise stream a marker or a run identity records (LEGACY_NOISE_STREAM when it records none)."""
    return record.get("noise_stream") or LEGACY_NOISE_STREAM


def write_run(run_dir: str | Path, images: np.ndarray, shard_size: int, generation: dict,
              marker_fields: dict | None = None) -> Path:
    """A complete shard run from images already in memory (samples 0..n-1): shards, markers, index.json and
    generation.json (`generation`, e.g. dataset / subset / n_train, over the derived fields). For samples made
    elsewhere, and tests."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = ShardPlan(len(images), shard_size)
    for j in range(plan.num_shards):
        first, count = plan.span(j)
        write_shard(run_dir, j, first, images[first:first + count], marker_fields or {})
    write_index(run_dir, plan)
    n_train = generation.get("n_train")
    write_generation(run_dir, {
        "subset": None, "subset_seed": None, "n_train": None,
        "scale": len(images) // n_train if n_train else None,
        "channels": int(images.shape[1]), "image_size": int(images.shape[2]), "n_samples": len(images),
        "shard_size": shard_size, "num_shards": plan.num_shards, "complete": True, **generation})
    return run_dir


def remove_orphans(run_dir: str | Path) -> int:
    """Delete what an interrupted writer left: temporary shards and JSONs, tars without marker, markers without
    tar. Only safe while holding the run directory's lock (vaegen.runlock): a live writer's files look alike."""
    run_dir = Path(run_dir)
    removed = 0
    for p in run_dir.iterdir():
        j = shard_id(p.name)
        orphan = (
            p.name.endswith(TEMP_SUFFIX) or ".tmp-" in p.name
            or (j is not None and p.name == shard_name(j) and not (run_dir / marker_name(j)).exists())
            or (j is not None and p.name == marker_name(j) and not (run_dir / shard_name(j)).exists())
        )
        if orphan and p.is_file():
            p.unlink()
            removed += 1
    return removed


# --- checking (the generator on resume, `vaegen shards verify`, the trainer) ------------------------------

def read_marker(run_dir: str | Path, j: int) -> dict | None:
    """The completion marker of shard j, or None if it is missing or unreadable."""
    try:
        with open(Path(run_dir) / marker_name(j)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shard_problems(run_dir: str | Path, j: int, first: int, count: int, entry: dict | None = None,
                   check_hash: bool = True, check_blocks: bool = True) -> list[str]:
    """Why shard j is not a complete shard of samples [first, first+count) ([] if it is).

    Checks the tar against its marker (size; sha256 with `check_hash`) and, when given, its index entry; with
    `check_blocks` also reads every block and checks the sample indices. The first problem found is enough.
    """
    run_dir = Path(run_dir)
    path, marker = run_dir / shard_name(j), read_marker(run_dir, j)
    if not path.is_file():
        return [f"{path.name} missing"]
    if marker is None:
        return [f"{path.name} has no completion marker {marker_name(j)} (interrupted write)"]
    if (marker.get("first"), marker.get("count")) != (first, count):
        return [f"{path.name} marker says samples {marker.get('first')}+{marker.get('count')}, "
                f"expected {first}+{count}"]
    size = path.stat().st_size
    if size != marker.get("filesize"):
        return [f"{path.name} truncated or resized ({size} bytes, marker says {marker.get('filesize')})"]
    if entry is not None and (entry.get("filesize"), entry.get("sha256")) != (size, marker.get("sha256")):
        return [f"{path.name} does not match index.json (size or sha256 differ from its marker)"]
    if check_hash:
        if sha256_file(path) != marker.get("sha256"):
            return [f"{path.name} corrupted (sha256 differs from its marker)"]
    if check_blocks:
        try:
            images, indices = read_shard(path)
        except (OSError, ValueError, KeyError, tarfile.TarError) as e:
            return [f"{path.name} unreadable ({e})"]
        if len(indices) != count or not np.array_equal(indices, np.arange(first, first + count)):
            return [f"{path.name} holds samples other than {first}..{first + count - 1}"]
    return []


def shard_is_current(run_dir: str | Path, j: int, plan: ShardPlan, marker_fields: dict) -> bool:
    """Whether shard j is complete, intact and written with `marker_fields` (a resumed run then skips it)."""
    marker = read_marker(run_dir, j)
    if marker is None:
        return False
    marker = {**marker, "noise_stream": noise_stream_of(marker)}
    if any(marker.get(k) != v for k, v in marker_fields.items()):
        return False
    return not shard_problems(run_dir, j, *plan.span(j), check_blocks=False)


def verify_run(run_dir: str | os.PathLike) -> dict:
    """Check every shard of a run against its marker and index.json; VaegenError naming each bad shard."""
    run_dir = Path(run_dir)
    generation = read_generation(run_dir)
    noise = noise_stream_of(generation.get("identity", {}))
    try:
        index = read_index(run_dir)
    except (OSError, ValueError) as e:
        raise VaegenError(f"{run_dir}: no usable {INDEX_NAME} ({e}); rerun the generate command") from None
    problems, expected_first, n_images, n_bytes = [], 0, 0, 0
    for entry in index["shardlist"]:
        j = shard_id(entry["url"])
        if entry.get("first") != expected_first:
            problems.append(f"{entry['url']} starts at sample {entry.get('first')}, expected {expected_first}")
        problems += shard_problems(run_dir, j, entry.get("first"), entry.get("count"), entry)
        marker = read_marker(run_dir, j)
        if marker is not None and noise_stream_of(marker) != noise:
            problems.append(f"{entry['url']} was made with noise stream {noise_stream_of(marker)!r}, the run "
                            f"with {noise!r}")
        expected_first = entry.get("first", 0) + entry.get("count", 0)
        n_images += entry.get("count", 0)
        n_bytes += entry.get("filesize", 0)
    if n_images != index.get("n_images"):
        problems.append(f"index lists {n_images} images, its header says {index.get('n_images')}")
    if not generation.get("complete"):
        problems.append(f"{GENERATION_NAME} says a generate command is running or was interrupted "
                        "(complete: false); rerun it to finish")
    if problems:
        raise VaegenError(f"{run_dir}: {len(problems)} bad shard(s): {'; '.join(problems)}")
    return {"shards": len(index["shardlist"]), "images": n_images, "bytes": n_bytes, "noise_stream": noise}
