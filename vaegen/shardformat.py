"""The shard contract between the generator (writes) and the trainer (reads).

A run directory ``shards/<dataset>/<run>/`` holds:

    shard-000000.tar            WebDataset tar. Shard j holds samples [j*S, (j+1)*S) (the last may be short).
                                Members come in blocks of up to BLOCK_SIZE images, one sample per block:
                                    <key>.npy   uint8 array (n, C, 32, 32), saved with numpy.save
                                    <key>.json  {"first": i0, "count": n}: the block holds samples i0 .. i0+n-1
                                <key> is the first sample index zero-padded to 12 digits (no dots).
    shard-000000.done.json      completion marker, written only after the tar was fsynced and renamed:
                                {"shard", "first", "count", "sha256", "filesize", "sampler", "dm_sha256"}
    index.json                  wids-style shard index ({"__kind__": "wids-shard-index-v1", "shardlist": [
                                {"url", "nsamples", "filesize", "sha256"}, ...]}), urls relative to the run dir
    generation.json             what produced the run: DM, sampler, seed, K, N, shard size, code version, timing

Pixels are uint8 exactly like the real data (never pre-binarized). Packing many images per member keeps the
disk cost within a few percent of the raw pixel bytes; one tar member per 32x32 grey image would cost ~5x.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

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
