"""Real-dataset readers and the zarr store contract, on tiny files written in the official formats."""

import dataclasses
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import vaegen.data as data
from studies.cli import main
from vaegen.errors import VaegenError

FMNIST_DIR = Path(data.DEBIAN_FMNIST_DIR)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No test looks at (or downloads into) the user's real cache or $VAEGEN_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEGEN_DATA", raising=False)


def write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def fake_idx_dataset(root: Path, n_train=40, n_test=10, seed=0):
    """Tiny MNIST-family files with the official names; returns (arrays, spec patched to their checksums)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test-labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    spec = data.DATASETS["fmnist"]
    files = {}
    for role, src in spec.files.items():
        write_idx(root / src.name, arrays[role])
        files[role] = data.SourceFile(src.name, md5(root / src.name))
    return arrays, dataclasses.replace(spec, files=files, search_dirs=())


@pytest.fixture
def tiny_fmnist(tmp_path, monkeypatch):
    arrays, spec = fake_idx_dataset(tmp_path / "src")
    monkeypatch.setitem(data.DATASETS, "fmnist", spec)
    return arrays, tmp_path / "src"


def test_idx_reader_roundtrips_and_pads_centre(tiny_fmnist, tmp_path):
    arrays, src = tiny_fmnist
    path = data.build_store("fmnist", tmp_path / "out", data_dir=src, download=False)
    root = zarr.open_group(str(path), mode="r")
    images = root["train/images"][...]
    assert images.shape == (40, 1, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0, 2:30, 2:30], arrays["train-images"])
    assert images[:, :, :2].max() == 0 and images[:, :, 30:].max() == 0
    assert images[:, :, :, :2].max() == 0 and images[:, :, :, 30:].max() == 0
    np.testing.assert_array_equal(root["test/labels"][...], arrays["test-labels"])
    assert root["test/images"].shape == (10, 1, 32, 32)


def test_store_attrs_record_provenance(tiny_fmnist, tmp_path):
    _, src = tiny_fmnist
    path = data.build_store("fmnist", tmp_path / "out", data_dir=src, download=False)
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    assert attrs["dataset"] == "fmnist" and attrs["likelihood"] == "gaussian" and attrs["channels"] == 1
    assert set(attrs["sources"]) == {s.name for s in data.DATASETS["fmnist"].files.values()}
    assert attrs["sources"]["train-images-idx3-ubyte.gz"] == hashlib.sha256(
        (src / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert "32x32" in attrs["padding"] and attrs["subset"] is None and attrs["code_version"]


def test_rebuilding_from_same_sources_keeps_store(tiny_fmnist, tmp_path):
    _, src = tiny_fmnist
    first = data.build_store("fmnist", tmp_path / "out", data_dir=src, download=False)
    mtime = (first / "zarr.json").stat().st_mtime_ns
    assert data.build_store("fmnist", tmp_path / "out", data_dir=src, download=False) == first
    assert (first / "zarr.json").stat().st_mtime_ns == mtime


def test_existing_store_from_different_sources_is_refused(tiny_fmnist, tmp_path, monkeypatch):
    _, src = tiny_fmnist
    data.build_store("fmnist", tmp_path / "out", data_dir=src, download=False)
    _, other_spec = fake_idx_dataset(tmp_path / "other", seed=1)
    monkeypatch.setitem(data.DATASETS, "fmnist", other_spec)
    result = CliRunner().invoke(main, ["data", "fmnist", "--data-root", str(tmp_path / "out"),
                                       "--data-dir", str(tmp_path / "other"), "--no-download"])
    assert result.exit_code == 2
    assert "different source files" in result.output and len(result.output.strip().splitlines()) == 1


def test_balanced_subset_is_seeded_balanced_and_nested():
    labels = np.repeat(np.arange(10), 50)
    a = data.balanced_subset(labels, 100, seed=3)
    assert np.array_equal(a, data.balanced_subset(labels, 100, seed=3))
    assert not np.array_equal(a, data.balanced_subset(labels, 100, seed=4))
    assert np.bincount(labels[a], minlength=10).tolist() == [10] * 10
    assert np.all(np.diff(a) > 0)
    assert set(data.balanced_subset(labels, 50, seed=3)) <= set(a)  # smaller subsets are prefixes
    odd = data.balanced_subset(labels, 13, seed=0)
    assert sorted(np.bincount(labels[odd], minlength=10).tolist()) == [1] * 7 + [2] * 3


def test_subset_store_is_named_by_size_and_seed_and_keeps_full_test(tiny_fmnist, tmp_path):
    arrays, src = tiny_fmnist
    path = data.build_store("fmnist", tmp_path / "out", subset=20, subset_seed=7, data_dir=src, download=False)
    assert path.name == "fmnist-n20-s7.zarr"
    train = data.load_split(path, "train")
    keep = data.balanced_subset(arrays["train-labels"], 20, 7)
    np.testing.assert_array_equal(train.images[:, 0, 2:30, 2:30], arrays["train-images"][keep])
    assert train.attrs["subset"]["n"] == 20 and train.attrs["subset"]["seed"] == 7
    assert len(data.load_split(path, "test").labels) == 10
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["train/source_indices"][...], keep)


def test_subset_larger_than_train_split_is_an_error(tiny_fmnist, tmp_path):
    _, src = tiny_fmnist
    with pytest.raises(VaegenError, match="--subset"):
        data.build_store("fmnist", tmp_path / "out", subset=1000, data_dir=src, download=False)


def test_cifar_pickle_reader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (6, 3072), dtype=np.uint8) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    archive = tmp_path / "src" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, pixels in batches.items():
            raw = pickle.dumps({b"data": pixels, b"labels": list(range(len(pixels)))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    spec = dataclasses.replace(data.DATASETS["cifar10"],
                               files={"archive": data.SourceFile(archive.name, md5(archive))})
    monkeypatch.setitem(data.DATASETS, "cifar10", spec)
    path = data.build_store("cifar10", tmp_path / "out", data_dir=archive.parent, download=False)
    train, test = data.load_split(path, "train"), data.load_split(path, "test")
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(train.images[6:12].reshape(6, -1), batches["data_batch_2"])
    assert train.attrs["likelihood"] == "dmol"


def test_unknown_dataset_is_a_one_line_error():
    result = CliRunner().invoke(main, ["data", "svhn"])
    assert result.exit_code == 2 and "unknown dataset 'svhn'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_files_offline_names_files_url_and_debian_package(tmp_path, monkeypatch):
    spec = dataclasses.replace(data.DATASETS["fmnist"], search_dirs=(str(tmp_path / "nowhere"),))
    monkeypatch.setitem(data.DATASETS, "fmnist", spec)
    result = CliRunner().invoke(main, ["data", "fmnist", "--data-root", str(tmp_path / "out"), "--no-download"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert "train-images-idx3-ubyte.gz" in line and "amazonaws.com" in line and "dataset-fashion-mnist" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checksum_mismatch_is_refused_without_a_store(tmp_path):
    # Official checksums, wrong content.
    fake_idx_dataset(tmp_path / "src")
    result = CliRunner().invoke(main, ["data", "fmnist", "--data-root", str(tmp_path / "out"),
                                       "--data-dir", str(tmp_path / "src"), "--no-download"])
    assert result.exit_code == 2 and "checksum mismatch" in result.output
    assert not (tmp_path / "out" / "fmnist.zarr").exists()


def test_truncated_file_is_refused_without_a_store(tiny_fmnist, tmp_path, monkeypatch):
    _, src = tiny_fmnist
    raw = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])  # valid gzip, short payload (what an interrupted copy of the raw file gives)
    spec = data.DATASETS["fmnist"]
    files = dict(spec.files)
    files["train-images"] = data.SourceFile("train-images-idx3-ubyte.gz", md5(src / "train-images-idx3-ubyte.gz"))
    monkeypatch.setitem(data.DATASETS, "fmnist", dataclasses.replace(spec, files=files))
    with pytest.raises(VaegenError, match="truncated"):
        data.build_store("fmnist", tmp_path / "out", data_dir=src, download=False)
    assert not (tmp_path / "out" / "fmnist.zarr").exists()
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((5, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(VaegenError, match="truncated"):
        data.read_idx(path)
    with pytest.raises(VaegenError, match="truncated"):
        data.verify_file(path, data.DATASETS["fmnist"].files["train-images"])


def test_missing_store_is_a_one_line_error(tmp_path):
    with pytest.raises(VaegenError, match="vaegen data"):
        data.open_dataset("fmnist", "train", root=tmp_path)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_store_matches_official_files(tmp_path):
    path = data.build_store("fmnist", tmp_path, download=False)
    root = zarr.open_group(str(path), mode="r")  # plain zarr reads it
    train, test = root["train/images"], root["test/images"]
    assert train.shape == (60000, 1, 32, 32) and test.shape == (10000, 1, 32, 32)
    assert train.dtype == np.uint8
    official = data.read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    assert np.array_equal(train[...][:, 0, 2:30, 2:30], official)
    assert np.array_equal(test[...][:, 0, 2:30, 2:30], data.read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz"))
    assert np.array_equal(root["train/labels"][...], data.read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz"))


def test_packages_are_imported_from_this_repository():
    import evaluator
    import generator
    import studies
    import trainer
    import vaegen

    repo = Path(__file__).resolve().parent.parent
    for module in (vaegen, generator, trainer, evaluator, studies):
        assert Path(module.__file__).resolve().parent.parent == repo, module.__file__
