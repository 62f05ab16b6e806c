"""Data sources: shard validation, the pool/epoch semantics, splitting across processes, real and mixed data."""

import numpy as np
import pytest
import torch

from trainer.data import (
    MixedSource,
    RealSource,
    ResidentPool,
    ShardSource,
    assign_pieces,
    epoch_range,
    keep_pool_on_device,
    open_shard_pool,
    pieces_in_range,
)
from vaegen.errors import VaegenError


def epoch_ids(source, epoch, support):
    return np.concatenate([support.image_ids(b) for b in source.batches(epoch)])


def test_pool_of_two_epochs_is_fresh_for_two_epochs_then_repeats(tmp_path, support):
    n = 300
    pool = open_shard_pool(support.shard_run(tmp_path, 1000, shard_size=256), "fmnist", (1, 32, 32), n, scale=2)
    assert pool.size == 600
    source = ShardSource(pool, n, batch_size=64, seed=0)
    e0, e1, e2, e3 = (epoch_ids(source, e, support) for e in range(4))
    assert len(e0) == len(e1) == len(e2) == n and len(set(e0)) == n
    assert set(e0) == set(range(300)) and set(e1) == set(range(300, 600))  # disjoint, within the K*N prefix
    assert set(e2) == set(e0) and set(e3) == set(e1)  # epoch 3 repeats epoch 1's set ...
    assert not np.array_equal(e2, e0)  # ... in a different order
    assert [len(b) for b in source.batches(0)] == [64, 64, 64, 64, 44]
    source.close()


def test_same_seed_same_batches_and_other_seed_other_order(tmp_path, support):
    pool = open_shard_pool(support.shard_run(tmp_path, 512, 128), "fmnist", (1, 32, 32), 256, scale=2)
    a, b, c = (ShardSource(pool, 256, 32, seed=s) for s in (0, 0, 1))
    assert np.array_equal(epoch_ids(a, 1, support), epoch_ids(b, 1, support))
    assert not np.array_equal(epoch_ids(a, 1, support), epoch_ids(c, 1, support))


def test_default_scale_uses_every_whole_epoch_in_the_run(tmp_path, support):
    pool = open_shard_pool(support.shard_run(tmp_path, 1000, 256), "fmnist", (1, 32, 32), 300)
    assert pool.size == 900 and len(pool.shards) == 4
    assert epoch_range(3, 300, pool.size) == (0, 300)


def test_two_ranks_see_disjoint_shards_and_equal_batch_counts(tmp_path, support):
    # 7 shards of 100 (the last 50): the epoch range [0, 650) cuts through them unevenly.
    pool = open_shard_pool(support.shard_run(tmp_path, 650, 100), "fmnist", (1, 32, 32), 650, scale=1)
    pieces = pieces_in_range(pool, *epoch_range(0, 650, pool.size))
    for epoch in range(3):
        shares = assign_pieces(pieces, 2, seed=0, epoch=epoch)
        paths = [{p.shard.url for p in share} for share in shares]
        assert not paths[0] & paths[1] and len(paths[0] | paths[1]) == 7
    ranks = [ShardSource(pool, 650, 64, seed=0, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        ids = [epoch_ids(s, epoch, support) for s in ranks]
        assert len(ids[0]) == len(ids[1]) == 350  # the larger share; the smaller one pads with repeats
        assert ranks[0].batches_in_epoch(epoch) == ranks[1].batches_in_epoch(epoch) == 6
        seen = [set(s.epoch_positions(epoch)) for s in ranks]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(650))
        assert {i // 100 for i in seen[0]}.isdisjoint({i // 100 for i in seen[1]})


def test_more_processes_than_shards_in_an_epoch_is_refused(tmp_path, support):
    pool = open_shard_pool(support.shard_run(tmp_path, 200, 200), "fmnist", (1, 32, 32), 200)
    with pytest.raises(VaegenError, match="each process needs its own shards"):
        ShardSource(pool, 200, 64, seed=0, rank=0, world_size=2)


def test_brace_pattern_selects_a_prefix_of_the_shards(tmp_path, support):
    run = support.shard_run(tmp_path, 1000, 256)
    pool = open_shard_pool(str(run / "shard-{000000..000001}.tar"), "fmnist", (1, 32, 32), 256)
    assert pool.size == 512 and len(pool.shards) == 2


@pytest.mark.parametrize("problem, message", [
    ("dataset", "are 'cifar10' samples"), ("channels", r"hold \(3, 32, 32\) images"),
    ("marker", "missing or unfinished"), ("corrupt", "corrupted"),
    ("truncated", "truncated or resized"), ("small", "the pool needs"), ("noindex", "has no index.json"),
    ("nowhere", "no shard run directory or shard file"),
])
def test_bad_shard_runs_are_refused_before_training(tmp_path, problem, message, support):
    run = tmp_path / "run"
    if problem == "dataset":
        support.shard_run(run, 300, 100, dataset="cifar10")
    elif problem == "channels":
        support.shard_run(run, 300, 100, channels=3)
    elif problem == "marker":
        support.shard_run(run, 300, 100)
        (run / "shard-000001.done.json").unlink()
    elif problem in ("corrupt", "truncated"):
        support.shard_run(run, 300, 100)
        data = bytearray((run / "shard-000002.tar").read_bytes())
        if problem == "corrupt":
            data[1000] ^= 0xFF
        else:
            data = data[:-1024]
        (run / "shard-000002.tar").write_bytes(bytes(data))
    elif problem == "small":
        support.shard_run(run, 300, 100)
    elif problem == "noindex":
        run.mkdir()
    n_train = 400 if problem == "small" else 100
    with pytest.raises(VaegenError, match=message) as info:
        open_shard_pool(run, "fmnist", (1, 32, 32), n_train)
    assert "\n" not in str(info.value)


def test_real_source_reshuffles_every_epoch_and_covers_the_training_set(support):
    images = support.numbered_images(500)
    source = RealSource(images, 128, seed=3)
    e0, e1 = epoch_ids(source, 0, support), epoch_ids(source, 1, support)
    assert sorted(e0) == sorted(e1) == list(range(500))
    assert not np.array_equal(e0, e1)
    ranks = [RealSource(images, 64, seed=3, rank=r, world_size=3) for r in range(3)]
    shares = [epoch_ids(s, 0, support) for s in ranks]
    assert {len(s) for s in shares} == {167} and len({b for s in ranks for b in [s.batches_in_epoch(0)]}) == 1
    assert set(np.concatenate(shares)) == set(range(500))


def test_mixed_source_takes_the_stated_fraction_of_each_epoch_from_real_data(tmp_path, support):
    n = 400
    real = support.numbered_images(n, start=10_000)  # ids >= 10000 are real, < 10000 synthetic
    pool = open_shard_pool(support.shard_run(tmp_path, 800, 200), "fmnist", (1, 32, 32), n, scale=2)
    source = MixedSource(real, pool, 0.25, 50, seed=0)
    for epoch in range(3):
        ids = epoch_ids(source, epoch, support)
        assert len(ids) == n and (ids >= 10_000).sum() == 100
        synthetic = ids[ids < 10_000]
        assert set(synthetic) == set(range((epoch % 2) * n, (epoch % 2) * n + 300))
    assert set(epoch_ids(source, 0, support)[epoch_ids(source, 0, support) >= 10_000]) != set(
        epoch_ids(source, 1, support)[epoch_ids(source, 1, support) >= 10_000])  # fresh real images each epoch
    source.close()


def batches_of(source, epochs):
    return [batch.clone() for epoch in epochs for batch in source.batches(epoch)]


def test_a_device_resident_pool_gives_the_streamed_batches_byte_for_byte_across_epochs_and_ranks(tmp_path, support):
    # 7 shards of 100 (the last 50) cut unevenly by the epoch ranges; scale 2, so epochs 2-3 repeat 0-1's sets.
    pool = open_shard_pool(support.shard_run(tmp_path, 650, 100), "fmnist", (1, 32, 32), 300, scale=2)
    resident = ResidentPool(pool, (1, 32, 32), "cpu")
    assert resident.images.shape == (600, 1, 32, 32)
    for world in (1, 2):
        for rank in range(world):
            streamed = ShardSource(pool, 300, 64, seed=3, rank=rank, world_size=world)
            kept = ShardSource(pool, 300, 64, seed=3, rank=rank, world_size=world, resident=resident)
            a, b = batches_of(streamed, range(4)), batches_of(kept, range(4))
            assert len(a) == len(b) == 4 * streamed.batches_in_epoch(0)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (world, rank)
            assert not kept.prefetches and kept._prefetch is None  # no loader thread
            streamed.close()
    real = support.numbered_images(300, start=10_000)
    mixed = [MixedSource(real, pool, 0.25, 50, seed=1, resident=r) for r in (None, resident)]
    assert all(torch.equal(x, y) for x, y in zip(*(batches_of(m, range(3)) for m in mixed), strict=True))
    mixed[0].close()


def test_auto_keeps_the_pool_on_the_device_only_when_it_fits_and_is_read_in_full(tmp_path, support, monkeypatch):
    import psutil

    pool = open_shard_pool(support.shard_run(tmp_path, 600, 100), "fmnist", (1, 32, 32), 300, scale=2)
    shape = (1, 32, 32)
    assert keep_pool_on_device("auto", pool, shape, "cpu", images_streamed=600)
    assert not keep_pool_on_device("auto", pool, shape, "cpu", images_streamed=300)  # one epoch reads half of it
    assert not keep_pool_on_device("off", pool, shape, "cpu", images_streamed=600)

    class TightMemory:
        available = 600 * 1024 + 1  # the pool fits, but not in half of what is free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: TightMemory)
    assert not keep_pool_on_device("auto", pool, shape, "cpu", images_streamed=600)
    assert keep_pool_on_device("on", pool, shape, "cpu", images_streamed=300)
    TightMemory.available = 1000
    with pytest.raises(VaegenError, match="does not fit"):
        keep_pool_on_device("on", pool, shape, "cpu", images_streamed=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_pool_resident_on_the_gpu_gives_the_streamed_batches(tmp_path, support):
    pool = open_shard_pool(support.shard_run(tmp_path, 650, 100), "fmnist", (1, 32, 32), 300, scale=2)
    streamed = ShardSource(pool, 300, 64, seed=3)
    kept = ShardSource(pool, 300, 64, seed=3, resident=ResidentPool(pool, (1, 32, 32), "cuda"))
    a, b = batches_of(streamed, range(3)), batches_of(kept, range(3))
    assert all(y.is_cuda and torch.equal(x, y.cpu()) for x, y in zip(a, b, strict=True))
    streamed.close()


# --- shards on object storage: any fsspec URL (memory:// here; a real S3 server in test_s3.py) -----------------


def copy_to(run, url: str):
    """Upload a local shard run's files to `url`; the object store's filesystem and path."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(run.iterdir()):
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    return fs, root


@pytest.fixture
def fetches(monkeypatch):
    """How often each object was downloaded whole (`RemoteRunDir.read_bytes`), by name."""
    import collections

    from vaegen.rundir import RemoteRunDir

    counts, read = collections.Counter(), RemoteRunDir.read_bytes

    def counted(self, name):
        counts[name] += 1
        return read(self, name)

    monkeypatch.setattr(RemoteRunDir, "read_bytes", counted)
    return counts


def test_a_pool_on_object_storage_gives_the_local_batches_and_opening_it_downloads_one_shard(
        tmp_path, support, memory_url, fetches):
    local = support.shard_run(tmp_path, 650, 100)  # 7 shards; the pool (K=2, N=300) uses the first 6
    copy_to(local, memory_url)
    pools = [open_shard_pool(run, "fmnist", (1, 32, 32), 300, scale=2) for run in (local, memory_url)]
    # Opening the pool downloads its first shard only (the image shape), besides index.json and generation.json.
    assert {name: n for name, n in fetches.items() if name.endswith(".tar")} == {"shard-000000.tar": 1}
    assert pools[1].run_dir == memory_url and [s.url for s in pools[1].shards][0] == f"{memory_url}/shard-000000.tar"
    for world in (1, 2):
        for rank in range(world):
            sources = [ShardSource(pool, 300, 64, seed=3, rank=rank, world_size=world) for pool in pools]
            a, b = (batches_of(source, range(4)) for source in sources)
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (world, rank)
            for source in sources:
                source.close()

    fetches.clear()
    resident = ResidentPool(pools[1], (1, 32, 32), "cpu")  # loads the pool once: each shard downloaded once
    assert fetches == {f"shard-{j:06d}.tar": 1 for j in range(6)}
    streamed = ShardSource(pools[0], 300, 64, seed=3)
    kept = ShardSource(pools[1], 300, 64, seed=3, resident=resident)
    assert all(torch.equal(x, y) for x, y in zip(batches_of(streamed, range(4)), batches_of(kept, range(4)),
                                                 strict=True))
    streamed.close()


def test_a_bad_shard_on_object_storage_is_refused_at_open_or_before_its_images_are_used(tmp_path, support,
                                                                                       memory_url):
    fs, root = copy_to(support.shard_run(tmp_path, 300, 100), memory_url)
    tar = bytearray(fs.cat_file(f"{root}/shard-000001.tar"))
    tar[1000] ^= 0xFF  # same size: only its sha256 tells, checked when an epoch downloads it
    fs.pipe_file(f"{root}/shard-000001.tar", bytes(tar))
    source = ShardSource(open_shard_pool(memory_url, "fmnist", (1, 32, 32), 100), 100, 50, seed=0)
    list(source.batches(0))
    with pytest.raises(VaegenError, match="shard-000001.tar corrupted") as info:
        list(source.batches(1))
    assert "\n" not in str(info.value)
    source.close()

    fs.pipe_file(f"{root}/shard-000001.tar", bytes(tar[:-1024]))
    with pytest.raises(VaegenError, match="shard-000001.tar truncated or resized"):
        open_shard_pool(memory_url, "fmnist", (1, 32, 32), 100)
    fs.rm_file(f"{root}/shard-000002.done.json")
    with pytest.raises(VaegenError, match="shard-000002.tar is missing or unfinished"):
        open_shard_pool(memory_url, "fmnist", (1, 32, 32), 100)
    with pytest.raises(VaegenError, match="has no index.json"):
        open_shard_pool(f"{memory_url}-nowhere", "fmnist", (1, 32, 32), 100)
