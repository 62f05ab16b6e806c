"""The shard contract between the generator (writes) and the trainer (reads).

A run directory ``shards/<dataset>/<run>/`` holds:

    shard-000000.tar            WebDataset tar. Shard j holds samples [j*S, (j+1)*S) (the last may be short).
                                Members come in blocks of up to BLOCK_SIZE images, one sample per block:
                                    <key>.npy   uint8 array (n, C, 32, 32), saved with numpy.save
                                    <key>.json  {"first": i0, "count": n}: the block holds samples i0 .. i0+n-1
                                <key> is the first sample index zero-padded to 12 digits (no dots).
    shard-000000.done.json      completion marker, written only after the tar was fsynced and renamed:
                                {"shard", "first", "count", "sha256", "filesize", "sampler", "dm_sha256",
                                 "seed", "precision", "channels_last", "compile"}
    index.json                  wids-style shard index ({"__kind__": "wids-shard-index-v1", "n_images",
                                "shardlist": [{"url", "nsamples", "filesize", "sha256", "first", "count"}, ...]}),
                                urls relative to the run dir. As wids requires, "nsamples" counts WebDataset
                                samples, i.e. BLOCKS (ceil(count / 256)); images are "first" .. "first"+"count"-1.
    generation.json             what produced the run: "dataset", "subset", "subset_seed", "n_train" (N),
                                "channels", "image_size", "scale" (K, the largest completed), "n_samples"
                                (K*N), "shard_size", "num_shards", "complete" (false while a run is in
                                progress: do not train on it), "identity" (what the bytes depend on), "dm"
                                (path, weights sha256, kind), "sampler", "seed", "network_evaluations",
                                "config", "code_version", "command", and "runs" (one per invocation, with timing)
    .shard-000000.tar.partial   a shard being written (removed on the next run if it was interrupted)

Pixels are uint8 exactly like the real data (never pre-binarized). Packing many images per member keeps the
disk cost within a few percent of the raw pixel bytes; one tar member per 32x32 grey image would cost ~5x.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from vaegen.provenance import sha256_file

BLOCK_SIZE = 256
INDEX_NAME = "index.json"
GENERATION_NAME = "generation.json"
INDEX_KIND = "wids-shard-index-v1"


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


# --- writing (the generator) and checking (the generator's `shards verify` and the trainer) ---------------

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


def open_tar_writer(fileobj):
    """A `webdataset.TarWriter` with deterministic headers (fixed mtime, owner and mode; uid/gid 0)."""
    import webdataset

    return webdataset.TarWriter(fileobj, **TAR_HEADER)


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
