"""The one place that knows how training data becomes batches of uint8 images.

Every source yields, per effective epoch, this process's share of the epoch as uint8 batches (B, C, H, W);
one effective epoch is N = |D_train| images summed over all processes.

    ShardSource      DMaaPx: samples of the diffusion model, streamed from WebDataset shards. The pool is the
                     first K*N samples (K = --scale); epoch e uses pool samples [(e mod K)*N, (e mod K + 1)*N),
                     so K epochs see fresh samples and epoch K repeats epoch 0's set (in a new order).
    RealSource       the zarr training split (optionally a subset store), reshuffled every epoch.
    MixedSource      a fraction f of each epoch's N images real (a fresh random f*N of D_train), the rest the
                     first (1 - f)*N samples of the epoch's pool range.
With an augmenter (trainer.augment, ADA-style), a source augments each batch on the training device (a GPU
batch stays on the GPU): all of it, or for MixedSource its real images only.

Multi-process (Accelerate): shards are split between processes whole (disjoint shards per process), by a
seeded per-epoch assignment that balances image counts; real images by a seeded per-epoch permutation.
Processes pad their share by repeating some of their own images to the largest share, so every process runs
the same number of equally sized batches (like torch's DistributedSampler). We assign shards ourselves rather
than with webdataset's `split_by_node` because that splits round-robin without balancing or equalizing counts.

An epoch's share (at most N images: 60 MB for FashionMNIST, 150 MB for CIFAR-10) is decoded once, block by
block, into one array while the previous epoch trains (`EpochPrefetch`, a background thread), then shuffled and
cut into batches: the loader never waits on per-image decoding and the shuffle is a true permutation of the epoch.
Everything random is a function of (seed, epoch, process), so an epoch can be replayed exactly on resume.

Shards may live on object storage (--shards s3://bucket/prefix/run, any fsspec URL): the same metadata, the same
pieces in the same order, so the same batches as from a local copy. Opening the pool there checks each shard's
size and marker (one listing, the markers fetched together) and reads only the first shard (its image shape);
each shard is then fetched whole when an epoch reads it (a few MiB; READ_AHEAD shards in flight) and checked
against its marker's sha256 before any of its images is used. A device-resident pool reads each shard once
(after the pool's opening read of the first).
"""

from __future__ import annotations

import abc
import collections
import hashlib
import io
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import webdataset as wds
from tqdm import tqdm

from vaegen.errors import VaegenError
from vaegen.rundir import RunDir, is_url, run_dir_at
from vaegen.seeding import derive, numpy_rng
from vaegen.shardformat import (
    INDEX_NAME,
    read_generation,
    read_index,
    read_markers,
    shard_id,
    shard_problems,
    unpack_block,
)

READ_AHEAD = 4  # shards fetched concurrently from object storage while the current one is decoded


# --- the shard pool ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    url: str  # what a reader opens: a local path, or an fsspec URL
    first: int  # sample index of its first image (from the completion marker)
    count: int
    offset: int  # pool position of its first image
    run: RunDir = field(compare=False, repr=False)  # the run holding it
    sha256: str | None = None  # from its marker: checked whenever a remote shard is fetched

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def read(self) -> io.BytesIO:
        """The bytes of a remote shard, checked against its marker's sha256 (a local shard is opened by path)."""
        data = self.run.read_bytes(self.name)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise VaegenError(f"{self.url} corrupted (sha256 differs from its marker); regenerate it (see "
                              "`vaegen shards verify`)")
        return io.BytesIO(data)


@dataclass(frozen=True)
class ShardPool:
    """A verified prefix of a shard run: pool positions 0 .. size-1 are the run's first `size` samples."""

    run: RunDir
    shards: tuple[Shard, ...]
    size: int
    generation: dict

    @property
    def run_dir(self) -> str:
        """Where the run lives, as given (a directory or a URL)."""
        return str(self.run)


@dataclass(frozen=True)
class Piece:
    """The part [lo, hi) (pool positions) of one shard that an epoch uses."""

    shard: Shard
    lo: int
    hi: int

    @property
    def count(self) -> int:
        return self.hi - self.lo


def expand_shard_spec(spec: str | Path) -> tuple[RunDir, list[str]]:
    """A run directory or URL (its index.json lists the shards), or a brace pattern of shard paths or URLs in one
    run: (the run, the shards' urls)."""
    remote = is_url(str(spec))
    names_shards = str(spec).endswith(".tar") or "{" in str(spec)
    if remote and not names_shards or not remote and Path(spec).is_dir():
        run = run_dir_at(str(spec) if remote else Path(spec))
        try:
            index = read_index(run)
        except FileNotFoundError:
            raise VaegenError(f"{run} has no {INDEX_NAME}; is it a shard run directory (vaegen generate)?") from None
        except ValueError as e:
            raise VaegenError(str(e)) from None
        return run, [run.url(entry["url"]) for entry in index["shardlist"]]
    if not remote and not Path(spec).exists() and "{" not in str(spec):
        raise VaegenError(f"no shard run directory or shard file at {spec}")
    urls = wds.shardlists.expand_urls(str(spec))
    parents = {url.rsplit("/", 1)[0] if remote else Path(url).parent for url in urls}
    if len(parents) != 1:
        raise VaegenError(f"--shards {spec} names shards in several directories; give one run's shards")
    run = run_dir_at(parents.pop())
    return run, [run.url(url.rsplit("/", 1)[-1]) if remote else str(Path(url)) for url in urls]


def open_shard_pool(spec: str | Path, dataset: str, image_shape: tuple[int, int, int], n_train: int,
                    scale: int | None = None) -> ShardPool:
    """Check a shard run against the dataset and return its pool of K*N samples (K = scale, default: as many
    whole epochs as the run holds). Refuses, with a one-line VaegenError, a run of another dataset or image
    shape, shards without completion markers, shards whose sha256 differs from their marker, and a pool of
    fewer than N samples."""
    run, urls = expand_shard_spec(spec)
    generation = read_generation(run)
    if generation.get("dataset") != dataset:
        raise VaegenError(f"shards in {run} are {generation.get('dataset')!r} samples, not {dataset!r}")
    shard_shape = (generation.get("channels"), generation.get("image_size"), generation.get("image_size"))
    if shard_shape != tuple(image_shape):
        raise VaegenError(f"shards in {run} hold {shard_shape} images, {dataset} needs {tuple(image_shape)}")
    if not urls:
        raise VaegenError(f"{spec} names no shards: the pool is empty")

    names = [url.rsplit("/", 1)[-1] for url in urls]
    markers = read_markers(run, [shard_id(name) for name in names])
    shards, offset = [], 0
    for url, name in zip(urls, names):
        info = markers[shard_id(name)] if run.size(name) is not None else None
        if info is None:
            raise VaegenError(f"{url} is missing or unfinished (no completion marker); finish generation or "
                              "check with `vaegen shards verify`")
        if shards and info["first"] != shards[-1].first + shards[-1].count:
            raise VaegenError(f"{url} starts at sample {info['first']}, not right after the previous shard; "
                              "give a contiguous range of shards")
        shards.append(Shard(url, int(info["first"]), int(info["count"]), offset, run, info.get("sha256")))
        offset += int(info["count"])
    total = offset
    if scale is None:
        scale = total // n_train
    size = scale * n_train
    if size == 0 or size > total:
        raise VaegenError(f"the pool needs K*N = {max(scale, 1)}*{n_train} samples but {spec} holds {total}; "
                          "generate more samples or lower --scale")
    used = tuple(s for s in shards if s.offset < size)
    check_shards(run, used, markers, desc=f"verify {run.name}")
    pool = ShardPool(run, used, size, generation)
    check_block_shape(pool, image_shape)
    return pool


def check_shards(run: RunDir, shards: tuple[Shard, ...], markers: dict, desc: str = "verify shards") -> None:
    """Every shard against its completion marker, a corrupt or truncated one refused: size and sha256 of a local
    shard; the size of a remote one (its sha256 is checked whenever it is fetched: checking downloads nothing)."""
    for shard in tqdm(shards, desc=desc, unit="shard", disable=len(shards) < 8, leave=False):
        problems = shard_problems(run, shard_id(shard.name), shard.first, shard.count, check_hash=run.is_local,
                                  check_blocks=False, markers=markers)
        if problems:
            raise VaegenError(f"{run}: {problems[0]}; regenerate it (see `vaegen shards verify`)")


def shard_samples(shards: list[Shard]):
    """WebDataset samples (raw blocks, with "__url__") of `shards` in order: webdataset opens a local shard by
    path; a remote one is fetched and checked (`Shard.read`), READ_AHEAD at a time, and handed to webdataset's
    own tar expander as a stream."""
    if all(shard.run.is_local for shard in shards):
        return wds.DataPipeline(wds.SimpleShardList([shard.url for shard in shards]), wds.tarfile_to_samples())
    streams = ({"url": shard.url, "stream": stream} for shard, stream in fetched(shards))
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams))


def fetched(shards: list[Shard]):
    """(shard, its checked bytes) in order, with up to READ_AHEAD fetches in flight (object storage answers a
    request with latency; several at once keep the link busy)."""
    with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="shard-fetch") as executor:
        pending = collections.deque()
        for shard in shards:
            pending.append((shard, executor.submit(shard.read)))
            if len(pending) >= READ_AHEAD:
                shard_done, future = pending.popleft()
                yield shard_done, future.result()
        while pending:
            shard_done, future = pending.popleft()
            yield shard_done, future.result()


def check_block_shape(pool: ShardPool, image_shape: tuple[int, int, int]) -> None:
    """Read the first block of the pool to confirm the image shape and dtype the metadata promises."""
    # A remote shard is fetched whole, as everywhere: a ranged read (its first block only) fails botocore's
    # response checksum on S3 servers that send the whole object's checksum with a part (rclone does).
    first = pool.shards[0]
    block = next(iter(shard_samples([first])), None)
    if block is None:
        raise VaegenError(f"{first.url} holds no images")
    images, _ = unpack_block(block)
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(image_shape):
        raise VaegenError(f"{first.url} holds {images.dtype} {images.shape[1:]} images, "
                          f"expected uint8 {tuple(image_shape)}")


def epoch_range(epoch: int, n: int, pool_size: int) -> tuple[int, int]:
    """Pool positions [lo, lo + n) of effective epoch `epoch` (0-based): fresh for K = pool_size / n epochs."""
    scale = pool_size // n
    lo = (epoch % scale) * n
    return lo, lo + n


def pieces_in_range(pool: ShardPool, lo: int, hi: int) -> list[Piece]:
    return [Piece(s, max(lo, s.offset), min(hi, s.offset + s.count))
            for s in pool.shards if s.offset < hi and s.offset + s.count > lo]


def assign_pieces(pieces: list[Piece], world_size: int, seed: int, epoch: int) -> list[list[Piece]]:
    """Whole shard pieces -> one list per process, disjoint, counts balanced greedily (largest first, in a
    seeded per-epoch order so which process reads which shard changes every epoch)."""
    if len(pieces) < world_size:
        raise VaegenError(f"an epoch spans {len(pieces)} shard(s) but {world_size} processes train: each process "
                          "needs its own shards; write smaller shards or use fewer processes")
    order = numpy_rng(seed, "shard-assignment", epoch).permutation(len(pieces))
    order = sorted(order, key=lambda i: -pieces[i].count)  # stable: ties keep the seeded order
    shares: list[list[Piece]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for i in order:
        r = totals.index(min(totals))
        shares[r].append(pieces[i])
        totals[r] += pieces[i].count
    return shares


def stream_blocks(pieces: list[Piece], image_shape: tuple[int, int, int]):
    """Stream the shards of `pieces` with webdataset, block by block, in the order streaming always reads them;
    yields (piece, images (k, C, H, W) uint8, pool positions (k,)) for the images in each piece's range."""
    by_url = {p.shard.url: p for p in pieces}
    try:
        for sample in shard_samples([p.shard for p in pieces]):
            piece = by_url[sample["__url__"]]
            block, indices = unpack_block(sample)
            if block.dtype != np.uint8 or tuple(block.shape[1:]) != tuple(image_shape):
                raise VaegenError(f"{sample['__url__']} holds {block.dtype} {block.shape[1:]} images, "
                                  f"expected uint8 {tuple(image_shape)}")
            pos = indices - piece.shard.first + piece.shard.offset
            keep = (pos >= piece.lo) & (pos < piece.hi)
            if keep.any():
                yield piece, block[keep], pos[keep]
    except (OSError, ValueError, KeyError) as e:  # a tar or npy that went bad after verification
        raise VaegenError(f"cannot read shards ({type(e).__name__}: {e}); run `vaegen shards verify`") from None


def check_count(pieces: list[Piece], got: int) -> None:
    expected = sum(p.count for p in pieces)
    if got != expected:
        raise VaegenError(f"shards {', '.join(p.shard.url for p in pieces)} yielded {got} of the {expected} "
                          "images their markers promise; run `vaegen shards verify`")


def read_pieces(pieces: list[Piece], image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The images of `pieces`, in streaming order: (images (n, C, H, W) uint8, pool positions (n,))."""
    if not pieces:
        return np.zeros((0, *image_shape), np.uint8), np.zeros(0, np.int64)
    blocks = [(images, positions) for _, images, positions in stream_blocks(pieces, image_shape)]
    if not blocks:
        check_count(pieces, 0)
    images, positions = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
    check_count(pieces, len(images))
    return images, positions


class ResidentPool:
    """A whole shard pool decoded once into one uint8 tensor on a device (row = pool position), plus the order
    in which streaming reads each shard, so an epoch drawn from it holds the streamed epoch's images in the
    streamed order: the same batches, byte for byte, with no loader."""

    def __init__(self, pool: ShardPool, image_shape: tuple[int, int, int], device="cpu"):
        self.device = torch.device(device)
        pieces = [Piece(s, s.offset, min(s.offset + s.count, pool.size)) for s in pool.shards]
        self.images = torch.empty((pool.size, *image_shape), dtype=torch.uint8, device=self.device)
        order: dict[str, list[np.ndarray]] = {piece.shard.url: [] for piece in pieces}
        for piece, images, positions in tqdm(stream_blocks(pieces, image_shape), desc="pool to device",
                                             unit="block", leave=False, disable=len(pieces) < 8):
            self.images[torch.from_numpy(positions).to(self.device)] = torch.from_numpy(images).to(self.device)
            order[piece.shard.url].append(positions)
        self.stream_order = {path: np.concatenate(parts) if parts else np.zeros(0, np.int64)
                             for path, parts in order.items()}
        check_count(pieces, sum(len(o) for o in self.stream_order.values()))

    def share(self, pieces: list[Piece], size: int) -> torch.Tensor:
        """The images streaming would read for `pieces`, padded to `size` rows like `pad_to`."""
        ranges = [(order := self.stream_order[p.shard.url])[(order >= p.lo) & (order < p.hi)] for p in pieces]
        positions = pad_to(np.concatenate(ranges) if ranges else np.zeros(0, np.int64), size)
        return self.images.index_select(0, torch.from_numpy(positions).to(self.device))


POOL_ON_DEVICE = ("auto", "on", "off")
POOL_MEMORY_FRACTION = 0.5  # auto: the pool may take this much of the device's free memory


def keep_pool_on_device(mode: str, pool: ShardPool, image_shape: tuple[int, int, int], device,
                        images_streamed: int) -> bool:
    """--pool-on-device: `on`, `off`, or `auto`: on when the pool takes at most POOL_MEMORY_FRACTION of the
    device's free memory (host memory for the CPU) and loading it once reads no more images than streaming
    would (`images_streamed`: the synthetic images of all the run's epochs). On the CPU too: gathering batches
    from memory is ~2x the streaming rate and leaves the core the decoding thread would use (README)."""
    if mode not in POOL_ON_DEVICE:
        raise VaegenError(f"--pool-on-device must be one of {', '.join(POOL_ON_DEVICE)}, got {mode!r}")
    if mode == "off":
        return False
    device = torch.device(device)
    needed = pool.size * math.prod(image_shape)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = psutil.virtual_memory().available
    else:
        free = 0  # no free-memory figure: auto streams
    if mode == "on":
        if needed > free:
            raise VaegenError(f"--pool-on-device on: the pool ({needed / 2**30:.2f} GiB) does not fit in the free "
                              f"memory of {device} ({free / 2**30:.2f} GiB); use auto or off")
        return True
    return needed <= POOL_MEMORY_FRACTION * free and pool.size <= images_streamed


def pad_to(images: np.ndarray, target: int) -> np.ndarray:
    """Repeat images (or positions) cyclically to `target` rows (equal shares on every process)."""
    if len(images) == target:
        return images
    if len(images) == 0:
        raise VaegenError("a process got no images for this epoch; use fewer processes")
    return images[np.arange(target) % len(images)]


# --- sources ----------------------------------------------------------------------------------------------

class EpochPrefetch:
    """Loads epoch e+1's share in a background thread while epoch e trains (one thread per training source)."""

    def __init__(self, load):
        self.load = load
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-prefetch")
        self._next: tuple[int, Future] | None = None

    def share(self, epoch: int):
        ready = self._next is not None and self._next[0] == epoch
        share = self._next[1].result() if ready else self.load(epoch)
        self._next = (epoch + 1, self._executor.submit(self.load, epoch + 1))
        return share

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class BatchSource(abc.ABC):
    """Per-epoch batches for one process. Subclasses say which images form the epoch's share; this base
    shuffles the share into batches and, with an augmenter, augments the rows `augmented_rows` picks (all of
    them by default) on `device`. Batches are uint8, or with a float-output augmenter float32 model inputs in
    [0, 1] units (the rows not augmented exactly u8 / 255)."""

    prefetches = True  # load the next epoch's share in the background (not for a device-resident pool)

    def __init__(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, augmenter=None,
                 device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.augmenter, self.device = augmenter, torch.device(device)
        self._prefetch: EpochPrefetch | None = None  # started by the first `batches`: parts of a source never start one

    @abc.abstractmethod
    def share_size(self, epoch: int) -> int:
        """Images per process in this epoch (the same on every process)."""

    @abc.abstractmethod
    def epoch_share(self, epoch: int) -> np.ndarray | torch.Tensor:
        """This process's images of the epoch, uint8 (share_size, C, H, W), in any order: an array, or a tensor
        where they are already on a device."""

    def augmented_rows(self, rows: np.ndarray) -> np.ndarray:
        """Which of these rows of the epoch share the augmenter sees (bool)."""
        return np.ones(len(rows), dtype=bool)

    def batches_in_epoch(self, epoch: int) -> int:
        return math.ceil(self.share_size(epoch) / self.batch_size)

    def batches(self, epoch: int):
        """Yield the epoch's batches (tensors; on `device` when augmented) in a seeded per-epoch order."""
        if self._prefetch is None and self.prefetches:
            self._prefetch = EpochPrefetch(self.epoch_share)
        share = self._prefetch.share(epoch) if self._prefetch else self.epoch_share(epoch)
        order = numpy_rng(self.seed, "batch-order", epoch, self.rank).permutation(len(share))
        for b in range(self.batches_in_epoch(epoch)):
            rows = np.sort(order[b * self.batch_size:(b + 1) * self.batch_size])
            if isinstance(share, torch.Tensor):
                batch = share.index_select(0, torch.from_numpy(rows).to(share.device))
            else:
                batch = torch.from_numpy(share[rows])
            if self.augmenter is not None:
                batch = self._augmented(batch.to(self.device), rows, derive(self.seed, "augment", epoch, self.rank, b))
            yield batch

    def _augmented(self, batch: torch.Tensor, rows: np.ndarray, seed: int) -> torch.Tensor:
        chosen = torch.from_numpy(self.augmented_rows(rows)).to(self.device)
        out = batch.float() / 255 if self.augmenter.output == "float" else batch
        if chosen.any():
            out[chosen] = self.augmenter(batch[chosen], seed)
        return out

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()


class RealSource(BatchSource):
    """Real images. By default an epoch is all of them, reshuffled. With `epoch_size` n smaller than the pool
    (a pool of k*n real images trained at the compute of n: `--epoch-size`), epochs walk through seeded
    permutations of the pool n images at a time, so k consecutive epochs see every image once, like a pool of
    k*n DM samples."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch_size: int | None = None, augmenter=None, device="cpu"):
        super().__init__(batch_size, seed, rank, world_size, augmenter, device)
        if len(images) == 0:
            raise VaegenError("the real training split is empty")
        if epoch_size is not None and not 0 < epoch_size <= len(images):
            raise VaegenError(f"--epoch-size must be in 1..{len(images)} (|D_train|), got {epoch_size}")
        self.images = images
        self.epoch_size = epoch_size or len(images)

    def share_size(self, epoch: int) -> int:
        return math.ceil(self.epoch_size / self.world_size)

    def real_share(self, epoch: int, count: int) -> np.ndarray:
        """This process's part of a fresh random `count` of D_train (sorted indices: contiguous reads)."""
        perm = numpy_rng(self.seed, "real-epoch-sample", epoch).permutation(len(self.images))[:count]
        return self._share_of(perm)

    def _share_of(self, chosen: np.ndarray) -> np.ndarray:
        count = len(chosen)
        chosen = chosen[np.arange(math.ceil(count / self.world_size) * self.world_size) % count]
        return self.images[np.sort(chosen[self.rank::self.world_size])]

    def epoch_share(self, epoch: int) -> np.ndarray:
        if self.epoch_size == len(self.images):
            return self.real_share(epoch, len(self.images))
        # Positions [e*n, (e+1)*n) of an endless stream of pool permutations, one permutation per pass.
        positions = np.arange(epoch * self.epoch_size, (epoch + 1) * self.epoch_size)
        passes = positions // len(self.images)
        chosen = np.empty(self.epoch_size, dtype=np.int64)
        for p in np.unique(passes):
            mask = passes == p
            perm = numpy_rng(self.seed, "real-pool-pass", int(p)).permutation(len(self.images))
            chosen[mask] = perm[positions[mask] % len(self.images)]
        return self._share_of(chosen)


class ShardSource(BatchSource):
    """Streams each epoch's shards, or with `resident` (the pool loaded once on a device) gathers the same
    images in the same order from it."""

    def __init__(self, pool: ShardPool, n_train: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, image_shape: tuple[int, int, int] = (1, 32, 32), synthetic_per_epoch=None,
                 resident: ResidentPool | None = None):
        super().__init__(batch_size, seed, rank, world_size)
        self.pool, self.n_train, self.image_shape = pool, n_train, tuple(image_shape)
        self.resident, self.prefetches = resident, resident is None
        self.synthetic_per_epoch = n_train if synthetic_per_epoch is None else synthetic_per_epoch
        self.epoch_shares(0)  # an impossible split (fewer shards than processes) fails before training

    def epoch_shares(self, epoch: int) -> list[list[Piece]]:
        lo, _ = epoch_range(epoch, self.n_train, self.pool.size)
        pieces = pieces_in_range(self.pool, lo, lo + self.synthetic_per_epoch)
        return assign_pieces(pieces, self.world_size, self.seed, epoch)

    def share_size(self, epoch: int) -> int:
        return max(sum(p.count for p in share) for share in self.epoch_shares(epoch))

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """Pool positions this process trains on in `epoch` (before padding); for tests and diagnostics."""
        return read_pieces(self.epoch_shares(epoch)[self.rank], self.image_shape)[1]

    def epoch_share(self, epoch: int) -> np.ndarray | torch.Tensor:
        if self.resident is not None:
            return self.resident.share(self.epoch_shares(epoch)[self.rank], self.share_size(epoch))
        images, _ = read_pieces(self.epoch_shares(epoch)[self.rank], self.image_shape)
        return pad_to(images, self.share_size(epoch))


class MixedSource(BatchSource):
    """A fraction of every epoch real (fresh random real images each epoch), the rest synthetic. With an
    augmenter, the real images of every batch are augmented (on `device`) and the synthetic ones are not."""

    def __init__(self, real_images: np.ndarray, pool: ShardPool, real_fraction: float, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, image_shape: tuple[int, int, int] = (1, 32, 32),
                 augmenter=None, device="cpu", resident: ResidentPool | None = None):
        super().__init__(batch_size, seed, rank, world_size, augmenter, device)
        n = len(real_images)
        self.n_real = round(real_fraction * n)
        if not 0 < self.n_real < n:
            raise VaegenError(f"--mix-real {real_fraction} of N={n} leaves no real or no synthetic images; "
                              "use --source real or --mix-real 0 instead")
        self.real = RealSource(real_images, batch_size, seed, rank, world_size)
        self.synthetic = ShardSource(pool, n, batch_size, seed, rank, world_size, image_shape,
                                     synthetic_per_epoch=n - self.n_real, resident=resident)
        self.prefetches = resident is None

    def real_share_size(self) -> int:
        return math.ceil(self.n_real / self.world_size)

    def share_size(self, epoch: int) -> int:
        return self.real_share_size() + self.synthetic.share_size(epoch)

    def epoch_share(self, epoch: int) -> np.ndarray | torch.Tensor:
        """Real images first (rows < real_share_size), then synthetic ones."""
        real, synthetic = self.real.real_share(epoch, self.n_real), self.synthetic.epoch_share(epoch)
        if isinstance(synthetic, torch.Tensor):
            return torch.cat([torch.from_numpy(real).to(synthetic.device), synthetic])
        return np.concatenate([real, synthetic])

    def augmented_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows < self.real_share_size()
