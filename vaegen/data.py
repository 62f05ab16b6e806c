"""Real datasets: official files -> checksummed, padded uint8 arrays -> ``data/<name>.zarr``.

The store is the contract every stage reads D_train and D_test from:

    <name>.zarr/                 zarr v3 group; attrs = provenance (see `build_store`)
        train/images  (N, C, 32, 32) uint8      train/labels (N,) uint8
        test/images   (M, C, 32, 32) uint8      test/labels  (M,) uint8

A seeded, class-balanced ``--subset N`` of the training split gets its own store (``<name>-n<N>-s<seed>.zarr``)
whose test split is the full official one, so small-data studies compare against the same D_test.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vaegen.errors import VaegenError
from vaegen.provenance import code_version, sha256_file
from vaegen.runlock import run_lock
from vaegen.seeding import numpy_rng

IMAGE_SIZE = 32
DEBIAN_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class SourceFile:
    name: str
    # Accepted digests. md5 of the file as published; sha256 of the decompressed payload also accepts a
    # copy that was re-gzipped by a distribution (Debian's fashion-mnist package is one).
    md5: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    likelihood: str  # the paper's VAE likelihood for this dataset; the trainer's default
    base_url: str
    files: dict[str, SourceFile]  # role -> file; roles: train-images, train-labels, ... or archive
    format: str  # "idx" or "cifar-pickle"
    search_dirs: tuple[str, ...] = ()
    hint: str = ""
    num_classes: int = 10
    train_size: int = 60_000  # images in the official training split
    extra_attrs: dict = field(default_factory=dict)


_FMNIST_FILES = {
    "train-images": SourceFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                               "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels": SourceFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                               "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test-images": SourceFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                              "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test-labels": SourceFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                              "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
_MNIST_FILES = {
    "train-images": SourceFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels": SourceFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test-images": SourceFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test-labels": SourceFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

DATASETS: dict[str, DatasetSpec] = {
    "fmnist": DatasetSpec(
        "fmnist", 1, "gaussian", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _FMNIST_FILES,
        "idx", search_dirs=(DEBIAN_FMNIST_DIR,),
        hint="on Debian/Ubuntu: apt-get install dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec("mnist", 1, "gaussian", _MNIST_URL, _MNIST_FILES, "idx"),
    # Same pixels as mnist; the flag tells the trainer to binarize grey levels at train time (Bernoulli).
    "binary-mnist": DatasetSpec("binary-mnist", 1, "bernoulli", _MNIST_URL, _MNIST_FILES, "idx",
                                extra_attrs={"binarize": "bernoulli-resample-at-train-time"}),
    "cifar10": DatasetSpec(
        "cifar10", 3, "dmol", "https://www.cs.toronto.edu/~kriz/",
        {"archive": SourceFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")}, "cifar-pickle",
        train_size=50_000,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise VaegenError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vaegen"


def candidate_dirs(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where source files are looked for, in order: --data-dir, $VAEGEN_DATA, the user cache, system copies."""
    dirs = [Path(d) for d in (data_dir, os.environ.get("VAEGEN_DATA")) if d]
    dirs.append(cache_dir() / spec.name)
    dirs.extend(Path(d) for d in spec.search_dirs)
    return dirs


# --- reading the official formats -------------------------------------------------------------------------

def verify_file(path: Path, expected: SourceFile) -> None:
    """Checksum a source file; a mismatch or a truncated gzip is a one-line error naming the file."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    if md5 == expected.md5:
        return
    if expected.content_sha256 is not None:
        try:
            content = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as e:
            raise VaegenError(f"{path} is truncated or not gzip ({e}); delete it and fetch it again") from None
        if hashlib.sha256(content).hexdigest() == expected.content_sha256:
            return
    raise VaegenError(f"checksum mismatch for {path} (md5 {md5}, expected {expected.md5}); "
                      "delete it and fetch it again")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file (the MNIST-family format: big-endian header, uint8 payload)."""
    try:
        with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise VaegenError(f"{path} is truncated or not gzip ({e}); delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise VaegenError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise VaegenError(f"{path} is truncated: header says {shape}, payload has {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_cifar_archive(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the CIFAR-10 python tarball: data_batch_1..5 -> train, test_batch -> test."""
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if base.startswith("data_batch_") or base == "test_batch":
                    batches[base] = pickle.load(tar.extractfile(member), encoding="bytes")
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError) as e:
        raise VaegenError(f"{path} is truncated or not a CIFAR-10 python archive ({e})") from None
    train_names = sorted(n for n in batches if n.startswith("data_batch_"))
    if not train_names or "test_batch" not in batches:
        raise VaegenError(f"{path} lacks data_batch_* or test_batch members")

    def unpack(names):
        images = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.uint8) for n in names])
        return images.reshape(-1, 3, 32, 32), labels

    return {"train": unpack(train_names), "test": unpack(["test_batch"])}


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) uint8 -> (N, C, 32, 32), zero-padded symmetrically (28 -> 2 px each side)."""
    if images.ndim == 3:
        images = images[:, None]
    _, _, h, w = images.shape
    if h > IMAGE_SIZE or w > IMAGE_SIZE:
        raise VaegenError(f"images are {h}x{w}, larger than {IMAGE_SIZE}x{IMAGE_SIZE}")
    top, left = (IMAGE_SIZE - h) // 2, (IMAGE_SIZE - w) // 2
    return np.pad(images, ((0, 0), (0, 0), (top, IMAGE_SIZE - h - top), (left, IMAGE_SIZE - w - left)))


# --- locating / downloading -------------------------------------------------------------------------------

def locate_sources(spec: DatasetSpec, data_dir=None, download: bool = True) -> dict[str, Path]:
    """Find every source file (verifying it), downloading into the user cache when missing and online."""
    dirs = candidate_dirs(spec, data_dir)
    found: dict[str, Path] = {}
    missing = []
    for role, src in spec.files.items():
        path = next((d / src.name for d in dirs if (d / src.name).is_file()), None)
        if path is None and download:
            path = _download(spec, src)
        if path is None:
            missing.append(src.name)
            continue
        verify_file(path, src)
        found[role] = path
    if missing:
        where = ", ".join(str(d) for d in dirs)
        hint = f"; or {spec.hint}" if spec.hint else ""
        raise VaegenError(f"{spec.name}: missing {', '.join(missing)} (looked in {where}); offline? put them in "
                          f"--data-dir or $VAEGEN_DATA from {spec.base_url}{hint}")
    return found


def _download(spec: DatasetSpec, src: SourceFile) -> Path | None:
    target = cache_dir() / spec.name / src.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(spec.base_url + src.name, timeout=20) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError, TimeoutError):
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, target)
    return target


def load_official(spec: DatasetSpec, sources: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official files -> {split: (images (N, C, 32, 32) uint8, labels (N,) uint8)}."""
    if spec.format == "cifar-pickle":
        raw = read_cifar_archive(sources["archive"])
    else:
        raw = {split: (read_idx(sources[f"{split}-images"]), read_idx(sources[f"{split}-labels"]))
               for split in ("train", "test")}
    splits = {}
    for split, (images, labels) in raw.items():
        if len(images) != len(labels):
            raise VaegenError(f"{spec.name} {split}: {len(images)} images but {len(labels)} labels")
        splits[split] = (pad_to_32(images), np.ascontiguousarray(labels, dtype=np.uint8))
    return splits


# --- subsets and stores -----------------------------------------------------------------------------------

def balanced_subset(labels: np.ndarray, n: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """Sorted indices of a class-balanced subset of size n, seeded.

    Each class is permuted once by the seed and the first n // C (+1 for the first n % C classes) are kept,
    so for a fixed seed a smaller subset is contained in every larger one.
    """
    if not 0 < n <= len(labels):
        raise VaegenError(f"--subset must be in 1..{len(labels)}, got {n}")
    per_class = [numpy_rng(seed, "data-subset", c).permutation(np.flatnonzero(labels == c))
                 for c in range(num_classes)]
    counts = [n // num_classes + (c < n % num_classes) for c in range(num_classes)]
    for c, (members, k) in enumerate(zip(per_class, counts)):
        if k > len(members):
            raise VaegenError(f"--subset {n} needs {k} images of class {c}, only {len(members)} exist")
    return np.sort(np.concatenate([m[:k] for m, k in zip(per_class, counts)]))


def store_name(dataset: str, subset: int | None = None, seed: int = 0) -> str:
    return f"{dataset}.zarr" if subset is None else f"{dataset}-n{subset}-s{seed}.zarr"


def store_path(dataset: str, subset: int | None = None, seed: int = 0, root: str | os.PathLike = "data") -> Path:
    return Path(root) / store_name(dataset, subset, seed)


def build_store(dataset: str, data_root="data", subset: int | None = None, subset_seed: int = 0, data_dir=None,
                download: bool = True) -> Path:
    """`vaegen data`: build (or confirm) the zarr store for a dataset; returns its path.

    An existing store built from the same source files is kept as is; one built from different sources is
    refused rather than silently replaced. The store is written under a temporary name and renamed, so an
    interrupted build never leaves something a later stage could take for a complete store.
    """
    import zarr

    spec = get_spec(dataset)
    sources = locate_sources(spec, data_dir, download)
    source_attrs = {p.name: sha256_file(p) for p in sources.values()}
    path = store_path(dataset, subset, subset_seed, data_root)
    with run_lock(path):
        if path.exists():
            try:
                existing = dict(zarr.open_group(str(path), mode="r").attrs).get("sources")
            except Exception:
                existing = None
            if existing != source_attrs:
                raise VaegenError(f"{path} exists but was built from different source files; "
                                  "move it away (or pass another --data-root) to rebuild")
            return path

        splits = load_official(spec, sources)
        attrs = store_attrs(dataset, sources=source_attrs)
        train_extra = {}
        if subset is not None:
            keep = balanced_subset(splits["train"][1], subset, subset_seed, spec.num_classes)
            splits["train"] = (splits["train"][0][keep], splits["train"][1][keep])
            attrs["subset"] = {"n": subset, "seed": subset_seed, "balanced": True,
                               "indices_sha256": hashlib.sha256(keep.astype("<i8").tobytes()).hexdigest()}
            train_extra["source_indices"] = keep.astype(np.int64)
        return write_store(path, splits, attrs, train_extra)


def write_store(path: str | os.PathLike, splits: dict[str, tuple[np.ndarray, np.ndarray]], attrs: dict,
                train_extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write a dataset store: {split: (images (N, C, 32, 32) uint8, labels (N,) uint8)} plus provenance attrs.

    The one writer of the store layout in the module docstring (`build_store` uses it; so do tests and benches
    that need a store of their own). It is built under a temporary name and renamed, so an interrupted write
    never leaves something a later stage could take for a complete store.
    """
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for split, (images, labels) in splits.items():
            images = np.ascontiguousarray(images, dtype=np.uint8)
            group = root.create_group(split)
            group.create_array("images", data=images, chunks=(max(1, min(len(images), 4096)), *images.shape[1:]))
            group.create_array("labels", data=np.asarray(labels, dtype=np.uint8),
                               chunks=(max(1, min(len(labels), 65536)),))
            for name, values in (train_extra or {}).items() if split == "train" else ():
                group.create_array(name, data=values)
        root.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def store_attrs(dataset: str, subset: dict | None = None, sources: dict | None = None) -> dict:
    """The provenance attrs of a store of `dataset` (what `build_store` records; tests use it for tiny stores)."""
    spec = get_spec(dataset)
    return {"dataset": spec.name, "channels": spec.channels, "likelihood": spec.likelihood,
            "image_size": IMAGE_SIZE, "sources": sources or {},
            "padding": "zero-pad symmetric to 32x32" if spec.format == "idx" else "none (already 32x32)",
            "subset": subset, "code_version": code_version(), **spec.extra_attrs}


@dataclass(frozen=True)
class RealData:
    """One split of a dataset store, in memory (the largest, CIFAR-10 train, is 150 MB)."""

    images: np.ndarray  # (N, C, 32, 32) uint8
    labels: np.ndarray  # (N,) uint8
    attrs: dict


def load_split(path: str | os.PathLike, split: str) -> RealData:
    """Read one split of a store written by `build_store`; a missing or foreign store is a one-line error."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise VaegenError(f"no dataset store at {path}; build it with `vaegen data` (make data)")
    try:
        root = zarr.open_group(str(path), mode="r")
        images, labels = root[f"{split}/images"][...], root[f"{split}/labels"][...]
    except Exception as e:  # zarr raises several types for foreign/partial stores
        raise VaegenError(f"{path} is not a vaegen dataset store with a {split!r} split ({e})") from None
    return RealData(np.asarray(images), np.asarray(labels), dict(root.attrs))


def open_dataset(dataset: str, split: str, subset: int | None = None, seed: int = 0, root="data") -> RealData:
    """The stores every stage reads D_train / D_test from: `--dataset/--subset/--seed` -> RealData."""
    get_spec(dataset)
    path = store_path(dataset, subset, seed, root)
    if not path.exists():
        build = f"vaegen data {dataset}" + (f" --subset {subset} --subset-seed {seed}" if subset else "")
        raise VaegenError(f"no dataset store at {path}; build it with `{build} --data-root {root}`")
    return load_split(path, split)
