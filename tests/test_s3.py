"""Object storage against a real S3 server: `rclone serve s3` on 127.0.0.1 (scripts/local-services.sh), with s3fs
(fsspec) as the client, configured only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, or fsspec's FSSPEC_S3_*). Bytes survive the round trip and stock webdataset reads shards from the
bucket; `vaegen generate --out s3://...` writes a local run's bytes and resumes after a SIGKILL, `shards verify`
names a bad shard there, and `vaegen train --shards s3://...` ends with the weights of training from a local copy."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from services import local_service

from studies.cli import main
from vaegen import shardformat as sf
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


# --- shard runs in the bucket: generate, resume, verify, train ------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
N_TRAIN = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory, support):
    """A tiny DM and a store of N=8 training images (all the generator needs)."""
    root = tmp_path_factory.mktemp("s3-gen")
    support.dm(root / "dm")
    support.store(root / "data", n_train=N_TRAIN, n_test=4)
    return root


def gen_args(env: Path, out: str, steps: int = 1, batch_size: int = 4) -> list[str]:
    """K=4: 32 samples in 8 shards of 4 (the batch size never changes the bytes)."""
    return ["generate", "--dm", str(env / "dm"), "--dataset", "fmnist", "--data-root", str(env / "data"),
            "--scale", "4", "--out", str(out), "--steps", str(steps), "--chunk", "4", "--shard-size", "4",
            "--batch-size", str(batch_size)]


def invoke(*args) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def run_files(url_or_dir) -> dict[str, bytes]:
    """Every file of a run (a local directory or a URL), by name."""
    if isinstance(url_or_dir, Path):
        return {p.name: p.read_bytes() for p in url_or_dir.iterdir()}
    fs = s3()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(url_or_dir, refresh=True)}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha256(data) for name, data in files.items() if name != sf.GENERATION_NAME}


def test_generate_to_the_bucket_writes_the_local_runs_bytes_indexes_and_markers(env, prefix, tmp_path):
    local, remote = tmp_path / "run", f"{prefix}/run"
    invoke(*gen_args(env, local))
    invoke(*gen_args(env, remote))
    stored = run_files(remote)
    assert stored.keys() == run_files(local).keys()
    # Every shard, marker and index.json, byte for byte (so stock webdataset reads them as in the test above).
    assert digests(stored) == digests(run_files(local))
    generated = [json.loads(files[sf.GENERATION_NAME]) for files in (stored, run_files(local))]
    fields = (*sf.GENERATION_FIELDS, "identity")
    assert {k: generated[0][k] for k in fields} == {k: generated[1][k] for k in fields}
    assert generated[0]["config"]["out"] == remote
    assert [Path(p).name for p in s3().ls(prefix, refresh=True)] == ["run"]  # the lock object is gone again
    assert "OK s3://" in invoke("shards", "verify", remote).output


def test_a_generate_sigkilled_mid_run_resumes_to_the_local_bytes_and_verifies(env, prefix, tmp_path):
    local, remote = tmp_path / "run", f"{prefix}/run"
    invoke(*gen_args(env, local, steps=3))
    # Batches of one image (padded to the 4-image chunk) make the killed run slow enough to stop mid-way.
    proc = subprocess.Popen([sys.executable, "-m", "generator", *gen_args(env, remote, 3, batch_size=1)[1:]],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_seed = int(os.environ.get("VAEGEN_KILL_SEED", random.SystemRandom().randrange(2**32)))
    target = random.Random(kill_seed).randint(1, 6)  # kill once this many of the 8 shards are in the bucket
    fs, done = s3(), []
    deadline = time.time() + 120
    while len(done) < target and time.time() < deadline and proc.poll() is None:
        done = [p for p in fs.ls(prefix + "/run", refresh=True) if p.endswith(".done.json")] \
            if fs.exists(remote) else []
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = run_files(remote)
    point = f"VAEGEN_KILL_SEED={kill_seed}: killed after {len(done)} shards (target {target})"
    assert proc.returncode == -signal.SIGKILL and 0 < len(done) < 8 and sf.INDEX_NAME not in stored, point
    assert fs.exists(f"{prefix}/.run.lock"), point  # the killed writer's lock object stays behind ...

    resumed = invoke(*gen_args(env, remote, steps=3))
    assert "taking over the lock" in resumed.output, point  # ... and this machine's next writer takes it over
    assert digests(run_files(remote)) == digests(run_files(local)), point
    assert "OK s3://" in invoke("shards", "verify", remote).output
    assert not fs.exists(f"{prefix}/.run.lock")


def test_shards_verify_on_a_bucket_names_a_corrupted_and_a_missing_shard_in_one_line(prefix, support):
    remote = f"{prefix}/run"
    support.shard_run(remote, 40, 8)  # the shard contract's own writer, straight into the bucket
    assert "OK s3://" in invoke("shards", "verify", remote).output
    fs = s3()
    tar = bytearray(fs.cat_file(f"{remote}/{sf.shard_name(1)}"))
    tar[700] ^= 0x01  # a pixel of the first block: same size, another sha256
    fs.pipe_file(f"{remote}/{sf.shard_name(1)}", bytes(tar))
    fs.rm_file(f"{remote}/{sf.shard_name(3)}")
    # Configured through fsspec's own variables this time, no AWS_* at all.
    only_fsspec = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    only_fsspec.update(FSSPEC_S3_KEY=os.environ["AWS_ACCESS_KEY_ID"], FSSPEC_S3_SECRET=os.environ["AWS_SECRET_ACCESS_KEY"],
                       FSSPEC_S3_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
    proc = subprocess.run([sys.executable, "-m", "vaegen", "shards", "verify", remote], cwd=REPO, env=only_fsspec,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{remote}: 2 bad shard(s)" in proc.stderr
    assert "shard-000001.tar corrupted" in proc.stderr and "shard-000003.tar missing" in proc.stderr


def test_a_store_that_refuses_the_credentials_is_one_line_and_exit_2(prefix, support, monkeypatch):
    from s3fs import S3FileSystem

    support.shard_run(f"{prefix}/run", 8, 8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    S3FileSystem.clear_instance_cache()  # a new client, reading the environment again
    try:
        result = CliRunner().invoke(main, ["shards", "verify", f"{prefix}/run"])
    finally:
        S3FileSystem.clear_instance_cache()
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"{prefix}/run: listing refused" in result.output and "AWS_SECRET_ACCESS_KEY" in result.output


def test_training_from_the_bucket_ends_with_the_weights_of_training_from_the_local_copy(prefix, support, tmp_path,
                                                                                       monkeypatch):
    from vaegen.rundir import RemoteRunDir

    support.store(tmp_path / "data")
    local = support.shard_run(tmp_path / "shards", 48 * 3, 40, n_train=48)  # 4 shards, the last of 24
    s3().put(f"{local}/", f"{prefix}/shards", recursive=True)
    fetched, read = [], RemoteRunDir.read_bytes
    monkeypatch.setattr(RemoteRunDir, "read_bytes", lambda self, name: fetched.append(name) or read(self, name))

    def train(shards, out: str, pool_on_device: str):
        invoke("train", "--dataset", "fmnist", "--data-root", tmp_path / "data", "--shards", shards, "--epochs", 3,
               "--eval-every", 1, "--batch-size", 16, "--pool-on-device", pool_on_device, "--out", tmp_path / out)
        points = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return (tmp_path / out / "model.safetensors").read_bytes(), [{k: v for k, v in m.items() if k != "seconds"}
                                                                     for m in points]

    reference = train(local, "local", "off")
    assert not fetched
    assert train(f"{prefix}/shards", "streamed", "off") == reference  # each epoch's shards fetched as it loads
    fetched.clear()
    assert train(f"{prefix}/shards", "resident", "on") == reference  # the pool loaded once: each shard read once,
    assert sorted(name for name in fetched if name.endswith(".tar")) == \
        [sf.shard_name(j) for j in (0, 0, 1, 2, 3)]  # the first also when the pool was opened (its image shape)
