"""Object storage against a real S3 server: `rclone serve s3` on 127.0.0.1 (scripts/local-services.sh), with s3fs
(fsspec) as the client, configured only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL). The groundwork for shards on object storage: bytes survive the round trip, and stock webdataset
reads shards from the bucket."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from services import local_service

from vaegen.shardformat import unpack_block

pytestmark = [pytest.mark.s3, pytest.mark.slow]

# What `pipe:` runs to stream one object to stdout: fsspec, so the environment configures it like everything else
# (`aws s3 cp URL -` or `rclone cat` would do the same).
CAT = (f"{shlex.quote(sys.executable)} -c 'import fsspec, shutil, sys; "
       "shutil.copyfileobj(fsspec.open(sys.argv[1]).open(), sys.stdout.buffer)'")


@pytest.fixture(scope="module", autouse=True)
def server():
    with local_service("s3"):
        yield


def s3(**options):
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, **options)


@pytest.fixture
def prefix(request):
    """s3://BUCKET/<a fresh prefix>, removed afterwards."""
    url = f"s3://{os.environ['VAEGEN_TEST_S3_BUCKET']}/{request.node.name}-{uuid.uuid4().hex[:8]}"
    yield url
    fs = s3()
    if fs.exists(url):
        fs.rm(url, recursive=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blocks(samples) -> list[tuple]:
    """The raw content of every block (the shard format's samples) in order."""
    return [(s["__key__"], sha256(s["npy"]), s["json"]) for s in samples]


def test_s3fs_writes_and_reads_an_object_configured_from_the_environment_only(prefix):
    import fsspec

    data = np.random.default_rng(0).bytes(12 * 2**20)
    url = f"{prefix}/blob.bin"
    with s3().open(url, "wb", block_size=5 * 2**20) as f:  # 5 MiB parts: a multipart upload
        f.write(data)
    with fsspec.open(url, "rb") as f:
        assert sha256(f.read()) == sha256(data)
    assert s3().info(url)["size"] == len(data)
    with pytest.raises(PermissionError):  # the server checks the credentials
        s3(key=os.environ["AWS_ACCESS_KEY_ID"], secret="not-the-secret").cat(url)


def test_stock_webdataset_reads_shards_from_the_bucket_as_from_a_directory(prefix, support, tmp_path):
    import fsspec
    import webdataset as wds

    run = support.shard_run(tmp_path / "run", 40, 8)
    fs = s3()
    fs.put(f"{run}/", f"{prefix}/run", recursive=True)
    files = sorted(p.name for p in run.iterdir())
    assert sorted(Path(p).name for p in fs.ls(f"{prefix}/run")) == files
    assert {name: sha256(fs.cat(f"{prefix}/run/{name}")) for name in files} == \
        {name: sha256((run / name).read_bytes()) for name in files}

    tars = sorted(name for name in files if name.endswith(".tar"))
    local = blocks(wds.WebDataset([str(run / t) for t in tars], shardshuffle=False))
    assert len(local) == 5

    # Stock webdataset, a URL per shard: `pipe:` streams each object (brace expansion as for local shards).
    piped = wds.WebDataset(f"pipe:{CAT} {prefix}/run/shard-{{000000..{len(tars) - 1:06d}}}.tar", shardshuffle=False)
    # In-process: fsspec opens the objects, webdataset's own tar expander reads them (no subprocess per shard).
    streamed = wds.DataPipeline(
        wds.SimpleShardList([f"{prefix}/run/{t}" for t in tars]),
        wds.filters.map(lambda shard: {**shard, "stream": fsspec.open(shard["url"], "rb").open()}),
        wds.tariterators.tar_file_expander, wds.tariterators.group_by_keys)
    assert blocks(piped) == local
    assert blocks(streamed) == local
    images, indices = unpack_block(next(iter(streamed)))
    assert list(support.image_ids(images)) == list(indices) == list(range(8))


def test_a_shard_written_straight_into_the_bucket_has_the_bytes_of_a_local_one(prefix, support, tmp_path):
    import webdataset as wds

    from vaegen.shardformat import TAR_HEADER, pack_block

    images = support.numbered_images(16)

    def write_shard(stream):
        with wds.TarWriter(stream, **TAR_HEADER) as tar:
            for first in (0, 8):
                tar.write(pack_block(images[first:first + 8], first))

    with open(tmp_path / "shard.tar", "wb") as f:
        write_shard(f)
    with s3().open(f"{prefix}/shard.tar", "wb") as f:
        write_shard(f)
    assert sha256(s3().cat(f"{prefix}/shard.tar")) == sha256((tmp_path / "shard.tar").read_bytes())
