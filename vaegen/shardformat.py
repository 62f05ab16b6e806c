"""The shard contract, both ways: how shards are written (the generator), read (the trainer) and verified.

A run directory ``shards/<dataset>/<run>/`` holds:

    shard-000000.tar            WebDataset tar. Shard j holds samples [j*S, (j+1)*S) (the last may be short).
                                Members come in blocks of up to BLOCK_SIZE images, one sample per block:
                                    <key>.npy   uint8 array (n, C, 32, 32), saved with numpy.save
                                    <key>.json  {"first": i0, "count": n}: the block holds samples i0 .. i0+n-1
                                <key> is the first sample index zero-padded to 12 digits (no dots).
    shard-000000.done.json      completion marker, written only after the tar was in place (fsynced and renamed,
                                or uploaded):
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
    .shard-000000.tar.partial   a local shard being written (removed on the next run if it was interrupted)

The noise stream (how sample i's initial noise follows from (seed, i); `generator.sampling`) is part of a
run's identity and of every marker. Runs that record none were made with the first scheme,
LEGACY_NOISE_STREAM. A run never mixes two: the generator resumes a run with the scheme it was made with and
refuses markers of another, and `verify_run` names any shard whose marker disagrees with the run.

A run lives in a local directory or under any fsspec URL (s3://bucket/prefix, gs://, ...; `run_dir_at`), with
the same files and bytes. Local: a shard is written under its temporary name, fsynced and renamed (`LocalRunDir`).
Object storage: a shard is built in memory and uploaded in one request to its final key, where it appears whole
or not at all (`RemoteRunDir`); no temporary object, no rename. Either way the marker is written only after the
tar is in place, so a marker always describes a finished tar. Credentials and endpoints are fsspec's (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws, FSSPEC_S3_* options), never arguments.

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
from typing import BinaryIO

import numpy as np

from vaegen.errors import VaegenError
from vaegen.rundir import RunDir, run_dir_at

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


def read_shard(shard: str | Path | BinaryIO) -> tuple[np.ndarray, np.ndarray]:
    """All (images, indices) of one shard (a path, or a binary file read front to back), read with the standard
    library (no webdataset needed)."""
    members: dict[str, dict] = {}
    tar = tarfile.open(fileobj=shard, mode="r|") if hasattr(shard, "read") else tarfile.open(shard, "r")
    with tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    blocks = [unpack_block(members[k]) for k in sorted(members)]
    if not blocks:
        return np.zeros((0, 0, 0, 0), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def read_index(run_dir: str | Path | RunDir) -> dict:
    run = run_dir_at(run_dir)
    index = json.loads(run.read_bytes(INDEX_NAME))
    if index.get("__kind__") != INDEX_KIND:
        raise ValueError(f"{run.url(INDEX_NAME)} is not a {INDEX_KIND} index")
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

TEMP_SUFFIX = ".partial"  # a local shard being written: `.shard-000000.tar.partial`, renamed when complete
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
    """Shard j of a run, written block by block where the run keeps unfinished shards (`RunDir.new_file`: a
    temporary file, or memory for object storage); `commit` makes it a finished shard.

    commit: tar closed, published under its final name (fsynced and renamed, or uploaded whole), and only then
    the completion marker written. A shard that is not committed (`abort`, or a crash) is a temporary file that
    the next run removes, or nothing at all: a reader never sees a tar without a marker that describes exactly
    its bytes.
    """

    def __init__(self, run_dir: str | Path | RunDir, j: int, first: int):
        import webdataset

        self.run, self.j, self.next, self.count = run_dir_at(run_dir), j, first, 0
        self.first = first
        self.run.remove(marker_name(j))  # never a marker describing another tar
        self.file = self.run.new_file(temp_name(j))
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
        self.run.publish(temp_name(self.j), shard_name(self.j), self.file)
        marker = {"shard": self.j, "first": self.first, "count": self.count,
                  "sha256": self.hashing.sha256.hexdigest(), "filesize": self.hashing.size, **marker_fields}
        self.run.write_json(marker_name(self.j), marker)
        return marker

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file)."""
        try:
            self.tar.close()
        except Exception:  # noqa: BLE001 - the tar may be half-written; the file goes anyway
            pass
        self.run.discard(temp_name(self.j), self.file)


def write_shard(run_dir: str | Path | RunDir, j: int, first: int, images: np.ndarray, marker_fields: dict) -> dict:
    """Shard j holding `images` as samples first .. first+len-1, written and committed in one go."""
    shard = ShardFile(run_dir, j, first)
    try:
        for start in range(0, len(images), BLOCK_SIZE):
            shard.write_block(images[start:start + BLOCK_SIZE])
        return shard.commit(marker_fields)
    except BaseException:
        shard.abort()
        raise


def write_index(run_dir: str | Path | RunDir, plan: ShardPlan) -> None:
    """index.json (wids-style) from the markers of the plan's shards; urls relative to the run directory."""
    run = run_dir_at(run_dir)
    markers = read_markers(run, range(plan.num_shards))
    shardlist = []
    for j in range(plan.num_shards):
        marker = markers[j]
        shardlist.append({"url": shard_name(j), "nsamples": -(-marker["count"] // BLOCK_SIZE),
                          "filesize": marker["filesize"], "sha256": marker["sha256"],
                          "first": marker["first"], "count": marker["count"]})
    run.write_json(INDEX_NAME, {"__kind__": INDEX_KIND, "wids_version": 1, "n_images": plan.n_samples,
                                "shardlist": shardlist})


def write_generation(run_dir: str | Path | RunDir, record: dict) -> None:
    """generation.json (atomically): `record` must hold GENERATION_FIELDS; anything else is provenance."""
    missing = [k for k in GENERATION_FIELDS if k not in record]
    if missing:
        raise ValueError(f"a {GENERATION_NAME} record needs {', '.join(missing)}")
    run_dir_at(run_dir).write_json(GENERATION_NAME, record)


def read_generation(run_dir: str | Path | RunDir) -> dict:
    """A run's generation.json; a one-line VaegenError when it is missing or unreadable."""
    run = run_dir_at(run_dir)
    try:
        text = run.read_bytes(GENERATION_NAME)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise VaegenError(f"{run} holds no {GENERATION_NAME}; not a vaegen shard run") from None
    except OSError:
        text = None
    try:
        record = json.loads(text) if text is not None else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or any(k not in record for k in ("dataset", "n_samples", "complete")):
        raise VaegenError(f"{run.url(GENERATION_NAME)} is unreadable or incomplete; {run} is not a vaegen shard run")
    return record


def noise_stream_of(record: dict) -> str:
    """The noise stream a marker or a run identity records (LEGACY_NOISE_STREAM when it records none)."""
    return record.get("noise_stream") or LEGACY_NOISE_STREAM


def write_run(run_dir: str | Path | RunDir, images: np.ndarray, shard_size: int, generation: dict,
              marker_fields: dict | None = None) -> Path | RunDir:
    """A complete shard run from images already in memory (samples 0..n-1): shards, markers, index.json and
    generation.json (`generation`, e.g. dataset / subset / n_train, over the derived fields). For samples made
    elsewhere, and tests. Returns the run directory (a Path for a local one)."""
    run = run_dir_at(run_dir)
    run.makedirs()
    plan = ShardPlan(len(images), shard_size)
    for j in range(plan.num_shards):
        first, count = plan.span(j)
        write_shard(run, j, first, images[first:first + count], marker_fields or {})
    write_index(run, plan)
    n_train = generation.get("n_train")
    write_generation(run, {
        "subset": None, "subset_seed": None, "n_train": None,
        "scale": len(images) // n_train if n_train else None,
        "channels": int(images.shape[1]), "image_size": int(images.shape[2]), "n_samples": len(images),
        "shard_size": shard_size, "num_shards": plan.num_shards, "complete": True, **generation})
    return run.path if run.is_local else run


def remove_orphans(run_dir: str | Path | RunDir) -> int:
    """Delete what an interrupted writer left: temporary shards and JSONs, tars without marker, markers without
    tar. Only safe while holding the run's lock (vaegen.runlock, generate's remote lock): a live writer's files
    look alike."""
    run = run_dir_at(run_dir)
    names = set(run.names())
    removed = 0
    for name in sorted(names):
        j = shard_id(name)
        orphan = (
            name.endswith(TEMP_SUFFIX) or ".tmp-" in name
            or (j is not None and name == shard_name(j) and marker_name(j) not in names)
            or (j is not None and name == marker_name(j) and shard_name(j) not in names)
        )
        if orphan and run.size(name) is not None:
            run.remove(name)
            removed += 1
    return removed


# --- checking (the generator on resume, `vaegen shards verify`, the trainer) ------------------------------

def read_marker(run_dir: str | Path | RunDir, j: int) -> dict | None:
    """The completion marker of shard j, or None if it is missing or unreadable."""
    try:
        return json.loads(run_dir_at(run_dir).read_bytes(marker_name(j)))
    except (OSError, ValueError):
        return None


def read_markers(run_dir: str | Path | RunDir, shards) -> dict[int, dict | None]:
    """The completion markers of `shards` (shard ids) by id, None where missing or unreadable; fetched together
    (concurrently from object storage, where one request per marker in turn would take minutes for a large run)."""
    shards = list(shards)
    blobs = run_dir_at(run_dir).read_many([marker_name(j) for j in shards])
    markers = {}
    for j in shards:
        try:
            markers[j] = json.loads(blobs[marker_name(j)])
        except (KeyError, ValueError):
            markers[j] = None
    return markers


def shard_problems(run_dir: str | Path | RunDir, j: int, first: int, count: int, entry: dict | None = None,
                   check_hash: bool = True, check_blocks: bool = True,
                   markers: dict[int, dict | None] | None = None) -> list[str]:
    """Why shard j is not a complete shard of samples [first, first+count) ([] if it is).

    Checks the tar against its marker (size; sha256 with `check_hash`) and, when given, its index entry; with
    `check_blocks` also reads every block and checks the sample indices. The first problem found is enough.
    `markers`: the run's markers already read (`read_markers`); else shard j's is read here.
    """
    run = run_dir_at(run_dir)
    name = shard_name(j)
    marker = markers.get(j) if markers is not None else read_marker(run, j)
    size = run.size(name)
    if size is None:
        return [f"{name} missing"]
    if marker is None:
        return [f"{name} has no completion marker {marker_name(j)} (interrupted write)"]
    if (marker.get("first"), marker.get("count")) != (first, count):
        return [f"{name} marker says samples {marker.get('first')}+{marker.get('count')}, expected {first}+{count}"]
    if size != marker.get("filesize"):
        return [f"{name} truncated or resized ({size} bytes, marker says {marker.get('filesize')})"]
    if entry is not None and (entry.get("filesize"), entry.get("sha256")) != (size, marker.get("sha256")):
        return [f"{name} does not match index.json (size or sha256 differ from its marker)"]
    if not (check_hash or check_blocks):
        return []
    with run.open(name) as f:  # a local file is streamed; an object is downloaded once for both checks
        if check_hash:
            if hashlib.file_digest(f, "sha256").hexdigest() != marker.get("sha256"):
                return [f"{name} corrupted (sha256 differs from its marker)"]
            f.seek(0)
        if check_blocks:
            try:
                images, indices = read_shard(f)
            except (OSError, ValueError, KeyError, tarfile.TarError) as e:
                return [f"{name} unreadable ({e})"]
            if len(indices) != count or not np.array_equal(indices, np.arange(first, first + count)):
                return [f"{name} holds samples other than {first}..{first + count - 1}"]
    return []


def shard_is_current(run_dir: str | Path | RunDir, j: int, plan: ShardPlan, marker_fields: dict,
                     markers: dict[int, dict | None] | None = None) -> bool:
    """Whether shard j is complete, intact and written with `marker_fields` (a resumed run then skips it).

    Locally that includes its sha256. On object storage its size and marker only: the store checked each
    upload end to end, and hashing would download the whole run at every resume (`vaegen shards verify` and
    the trainer hash what they read)."""
    run = run_dir_at(run_dir)
    marker = markers.get(j) if markers is not None else read_marker(run, j)
    if marker is None:
        return False
    marker = {**marker, "noise_stream": noise_stream_of(marker)}
    if any(marker.get(k) != v for k, v in marker_fields.items()):
        return False
    return not shard_problems(run, j, *plan.span(j), check_hash=run.is_local, check_blocks=False,
                              markers={j: marker})


def verify_run(run_dir: str | os.PathLike | RunDir) -> dict:
    """Check every shard of a run against its marker and index.json; VaegenError naming each bad shard."""
    run = run_dir_at(run_dir)
    generation = read_generation(run)
    noise = noise_stream_of(generation.get("identity", {}))
    try:
        index = read_index(run)
    except (OSError, ValueError) as e:
        raise VaegenError(f"{run}: no usable {INDEX_NAME} ({e}); rerun the generate command") from None
    markers = read_markers(run, [shard_id(entry["url"]) for entry in index["shardlist"]])
    problems, expected_first, n_images, n_bytes = [], 0, 0, 0
    for entry in index["shardlist"]:
        j = shard_id(entry["url"])
        if entry.get("first") != expected_first:
            problems.append(f"{entry['url']} starts at sample {entry.get('first')}, expected {expected_first}")
        problems += shard_problems(run, j, entry.get("first"), entry.get("count"), entry, markers=markers)
        marker = markers.get(j)
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
        raise VaegenError(f"{run}: {len(problems)} bad shard(s): {'; '.join(problems)}")
    return {"shards": len(index["shardlist"]), "images": n_images, "bytes": n_bytes, "noise_stream": noise}
