"""Shard generation: exact, index-addressed bytes; resume after kills, signals and a full disk; one writer per
run; index and generation records; noise streams (old runs resume with theirs, never mixed); verify; bad input;
and (slow) the same bytes from 2 processes and 2 machine ranks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from generator.generate import GenerateConfig, generate_run
from generator.sampling import NOISE_PER_IMAGE_GENERATOR, NOISE_PHILOX
from studies.cli import main
from vaegen import shardformat as sf
from vaegen.errors import VaegenError

REPO = Path(__file__).resolve().parent.parent

N_TRAIN = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory, support):
    root = tmp_path_factory.mktemp("gen")
    support.dm(root / "dm")
    support.store(root / "data", n_train=N_TRAIN, n_test=4)  # only N matters to the generator
    return root


def gen_args(env: Path, out: Path, scale: int = 2, *extra: str) -> list[str]:
    """A tiny run: 1 Heun step, 4-image network chunks, 4-image shards."""
    return ["generate", "--dm", str(env / "dm"), "--dataset", "fmnist", "--data-root", str(env / "data"),
            "--scale", str(scale), "--out", str(out), "--steps", "1", "--chunk", "4", "--shard-size", "4",
            "--batch-size", "4", *extra]


def gen_config(env: Path, out: Path, scale: int = 2, **changes) -> GenerateConfig:
    """`gen_args` as a GenerateConfig, for what the CLI does not offer (the noise stream)."""
    return GenerateConfig(dm=str(env / "dm"), dataset="fmnist", data_root=str(env / "data"), scale=scale,
                          out=str(out), steps=1, chunk=4, shard_size=4, batch_size=4, **changes)


def with_option(args: list[str], flag: str, value: str) -> list[str]:
    """args with `flag`'s value replaced (or the flag appended)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def shard_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted K=4 run (32 samples, 8 shards) the other tests compare bytes against."""
    out = env / "reference"
    result = run_cli(gen_args(env, out, 4))
    assert result.exit_code == 0, result.output
    return out


def test_run_has_shards_markers_index_and_generation_record(reference):
    shards = shard_bytes(reference)
    assert list(shards) == [sf.shard_name(j) for j in range(8)]
    index = sf.read_index(reference)
    assert [e["url"] for e in index["shardlist"]] == list(shards)
    assert index["n_images"] == 32 and all(e["count"] == 4 and e["nsamples"] == 1 for e in index["shardlist"])
    gen = json.loads((reference / sf.GENERATION_NAME).read_text())
    assert (gen["dataset"], gen["subset"], gen["n_train"], gen["channels"], gen["image_size"]) == \
        ("fmnist", None, N_TRAIN, 1, 32)
    assert (gen["scale"], gen["n_samples"], gen["shard_size"], gen["complete"]) == (4, 32, 4, True)
    assert gen["identity"]["sampler"]["name"] == "edm-heun" and gen["command"] and gen["runs"][0]["wall_s"] > 0
    assert gen["identity"]["noise_stream"] == gen["noise_stream"] == NOISE_PHILOX  # new runs: counter-based noise
    marker = sf.read_marker(reference, 3)
    assert marker["noise_stream"] == NOISE_PHILOX
    assert (marker["first"], marker["count"], marker["filesize"]) == (12, 4, len(shards["shard-000003.tar"]))
    images, indices = sf.read_shard(reference / "shard-000003.tar")
    assert images.dtype == np.uint8 and images.shape == (4, 1, 32, 32)
    assert indices.tolist() == [12, 13, 14, 15]


def test_shard_images_are_the_sampling_core_images_of_their_indices(env, reference):
    from generator.sampling import SamplerConfig, load_dm, sample

    dm = load_dm(str(env / "dm"))
    dm.unet.to(memory_format=torch.channels_last)  # as generate does by default
    expected = sample(dm, [13, 14], 0, SamplerConfig(steps=1, chunk=4)).numpy()
    images, _ = sf.read_shard(reference / "shard-000003.tar")
    assert np.array_equal(images[1:3], expected)


def test_batch_size_1_and_64_give_identical_bytes(env, reference, tmp_path):
    for batch in ("1", "64"):
        out = tmp_path / f"b{batch}"
        args = with_option(gen_args(env, out, 4), "--batch-size", batch)
        assert run_cli(args).exit_code == 0
        assert shard_bytes(out) == shard_bytes(reference)
        assert (out / sf.INDEX_NAME).read_bytes() == (reference / sf.INDEX_NAME).read_bytes()


def test_scale_2_is_the_first_shards_of_scale_4_and_raising_scale_adds_only_missing_shards(env, reference, tmp_path):
    out = tmp_path / "k2"
    assert run_cli(gen_args(env, out, 2)).exit_code == 0
    first = shard_bytes(out)
    assert first == {k: v for k, v in shard_bytes(reference).items() if k in first} and len(first) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}

    assert run_cli(gen_args(env, out, 4)).exit_code == 0
    assert shard_bytes(out) == shard_bytes(reference)
    assert all((out / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not rewritten
    gen = json.loads((out / sf.GENERATION_NAME).read_text())
    assert gen["scale"] == 4 and [r["shards_generated_rank0"] for r in gen["runs"]] == [4, 4]
    assert (out / sf.INDEX_NAME).read_bytes() == (reference / sf.INDEX_NAME).read_bytes()

    assert run_cli(gen_args(env, out, 3)).exit_code == 0  # a smaller K keeps the larger run: K is a max
    assert json.loads((out / sf.GENERATION_NAME).read_text())["scale"] == 4
    assert len(sf.read_index(out)["shardlist"]) == 8


def test_short_last_shard_is_regenerated_when_scale_grows(env, tmp_path):
    """N*K not a multiple of S: the short tail shard of K=1 becomes a full shard of the K=2 plan."""
    out, ref = tmp_path / "grow", tmp_path / "fresh"
    def args(o, k):
        return with_option(gen_args(env, o, k), "--shard-size", "6")

    assert run_cli(args(out, 1)).exit_code == 0
    assert [e["count"] for e in sf.read_index(out)["shardlist"]] == [6, 2]
    assert run_cli(args(out, 2)).exit_code == 0
    assert run_cli(args(ref, 2)).exit_code == 0
    assert [e["count"] for e in sf.read_index(out)["shardlist"]] == [6, 6, 4]
    assert shard_bytes(out) == shard_bytes(ref)


def test_resume_removes_orphans_and_redoes_unfinished_shards(env, reference, tmp_path):
    out = tmp_path / "crashed"
    shutil.copytree(reference, out)
    (out / sf.temp_name(8)).write_bytes(b"half a shard")             # killed while writing
    (out / sf.marker_name(2)).unlink()                                 # killed between rename and marker
    (out / sf.shard_name(5)).write_bytes(b"garbage")                   # damaged after its marker was written
    (out / sf.shard_name(6)).unlink()                                  # marker without a tar
    result = run_cli(gen_args(env, out, 4))
    assert result.exit_code == 0, result.output
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob(".*"))
    assert json.loads((out / sf.GENERATION_NAME).read_text())["runs"][-1]["shards_generated_rank0"] == 3


@pytest.mark.slow
def test_resume_after_sigkill_at_a_random_point_gives_identical_bytes(env, reference, tmp_path):
    out = tmp_path / "killed"
    args = with_option(gen_args(env, out, 16), "--steps", "3")  # 32 shards, slow enough to kill mid-run
    ref = tmp_path / "ref3"
    assert run_cli(with_option(args, "--out", str(ref))).exit_code == 0
    cmd = [sys.executable, "-m", "generator", *args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_seed = int(os.environ.get("VAEGEN_KILL_SEED", random.SystemRandom().randrange(2**32)))
    target = random.Random(kill_seed).randint(1, 16)  # kill once this many of the 32 shards are done
    print(f"SIGKILL after {target} shards (VAEGEN_KILL_SEED={kill_seed} repeats this point)")
    deadline = time.time() + 120
    while len(list(out.glob("*.done.json"))) < target and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.done.json")))
    point = f"VAEGEN_KILL_SEED={kill_seed}: killed after {done} shards (target {target})"
    assert proc.returncode == -signal.SIGKILL and 0 < done < 32 and not (out / sf.INDEX_NAME).exists(), point

    result = run_cli(args)
    assert result.exit_code == 0, (point, result.output)
    assert shard_bytes(out) == shard_bytes(ref), point
    assert (out / sf.INDEX_NAME).read_bytes() == (ref / sf.INDEX_NAME).read_bytes(), point


def test_verify_names_each_missing_truncated_or_corrupted_shard(reference, tmp_path):
    ok = run_cli(["shards", "verify", str(reference)])
    assert ok.exit_code == 0 and ok.output.startswith("OK") and "8 shards, 32 images" in ok.output

    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    (bad / sf.shard_name(1)).unlink()
    with open(bad / sf.shard_name(3), "r+b") as f:
        f.truncate(1000)
    flipped = bytearray((bad / sf.shard_name(6)).read_bytes())
    flipped[700] ^= 0x01  # inside the first block's pixels
    (bad / sf.shard_name(6)).write_bytes(bytes(flipped))
    result = CliRunner().invoke(main, ["shards", "verify", str(bad)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "3 bad shard(s)" in message
    assert "shard-000001.tar missing" in message
    assert "shard-000003.tar truncated" in message
    assert "shard-000006.tar corrupted" in message

    unfinished = tmp_path / "unfinished"
    shutil.copytree(reference, unfinished)
    gen = json.loads((unfinished / sf.GENERATION_NAME).read_text())
    (unfinished / sf.GENERATION_NAME).write_text(json.dumps({**gen, "complete": False}))
    result = CliRunner().invoke(main, ["shards", "verify", str(unfinished)])
    assert result.exit_code == 2 and "complete: false" in result.output


def test_stock_webdataset_and_the_tar_tool_read_the_shards(reference, tmp_path):
    import webdataset as wds

    urls = str(reference / "shard-{000000..000007}.tar")
    blocks = list(wds.WebDataset(urls, shardshuffle=False).decode())
    got = [sf.unpack_block(b) for b in blocks]
    assert np.concatenate([i for _, i in got]).tolist() == list(range(32))
    assert all(b["npy"].dtype == np.uint8 and "." not in b["__key__"] for b in blocks)

    listing = subprocess.run(["tar", "tvf", str(reference / "shard-000002.tar")], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    assert "000000000008.json" in listing[0] and "000000000008.npy" in listing[1]
    assert "1970-01-01" in listing[0] and "vaegen/vaegen" in listing[0]  # fixed mtime and owner
    subprocess.run(["tar", "xf", str(reference / "shard-000002.tar"), "-C", str(tmp_path)], check=True)
    assert np.array_equal(np.load(tmp_path / "000000000008.npy"), sf.read_shard(reference / "shard-000002.tar")[0])


def test_packed_blocks_cost_at_most_1_1x_the_raw_pixel_bytes(tmp_path):
    from generator.generate import BackgroundShardWriter

    plan = sf.ShardPlan(4096, 4096)  # the default shard size
    writer = BackgroundShardWriter(tmp_path, plan, {}, maxsize=2)
    rng = np.random.default_rng(0)
    for _ in range(16):
        writer.put(0, rng.integers(0, 256, (256, 1, 32, 32), dtype=np.uint8))
    writer.close()
    size = (tmp_path / sf.shard_name(0)).stat().st_size
    assert size <= 1.1 * 4096 * 32 * 32
    assert not sf.shard_problems(tmp_path, 0, 0, 4096)


def test_run_dir_refuses_another_seed_sampler_shard_size_or_dm(env, reference, tmp_path, support):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    other_dm = support.dm(tmp_path / "other-dm", seed=1)
    for change, key in ((["--seed", "1"], "seed"), (["--steps", "2"], "sampler"),
                        (["--shard-size", "8"], "shard_size"), (["--dm", str(other_dm)], "dm_sha256")):
        args = with_option(gen_args(env, out, 4), *change)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (change, result.output)
        assert key in result.output and "use a new --out directory" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert shard_bytes(out) == shard_bytes(reference)


@pytest.fixture(scope="module")
def legacy_runs(env):
    """Runs made with the per-image generator noise: K=2 (to extend), K=4 (what extending must give)."""
    k2, k4 = env / "legacy-k2", env / "legacy-k4"
    generate_run(gen_config(env, k2, 2, noise=NOISE_PER_IMAGE_GENERATOR))
    generate_run(gen_config(env, k4, 4, noise=NOISE_PER_IMAGE_GENERATOR))
    return k2, k4


def drop_noise_records(run: Path) -> None:
    """Make `run` look like one from before the noise stream was recorded at all."""
    gen = json.loads((run / sf.GENERATION_NAME).read_text())
    gen["identity"].pop("noise_stream")
    gen.pop("noise_stream")
    (run / sf.GENERATION_NAME).write_text(json.dumps(gen))
    for marker in run.glob("*.done.json"):
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "noise_stream"}))


@pytest.mark.parametrize("recorded", ["recorded", "unrecorded"])
def test_a_run_made_with_the_old_noise_resumes_with_it_and_verifies(env, reference, legacy_runs, tmp_path, recorded):
    from generator.sampling import SamplerConfig, load_dm, sample

    k2, k4 = legacy_runs
    out = tmp_path / "old"
    shutil.copytree(k2, out)
    if recorded == "unrecorded":
        drop_noise_records(out)
    dm = load_dm(str(env / "dm"))
    dm.unet.to(memory_format=torch.channels_last)
    old_images = sample(dm, [5, 6], 0, SamplerConfig(steps=1, chunk=4), noise=NOISE_PER_IMAGE_GENERATOR).numpy()
    assert np.array_equal(sf.read_shard(out / sf.shard_name(1))[0][1:3], old_images)

    result = run_cli(gen_args(env, out, 4))  # the same command as for any run: the run says which noise
    assert result.exit_code == 0, result.output
    assert shard_bytes(out) == shard_bytes(k4) and shard_bytes(out) != shard_bytes(reference)
    gen = json.loads((out / sf.GENERATION_NAME).read_text())
    assert sf.noise_stream_of(gen["identity"]) == NOISE_PER_IMAGE_GENERATOR and gen["runs"][-1]["shards_generated_rank0"] == 4
    verified = run_cli(["shards", "verify", str(out)])
    assert verified.exit_code == 0 and "8 shards, 32 images" in verified.output


def test_noise_streams_are_never_mixed_in_one_run(env, reference, legacy_runs, tmp_path):
    k2, _ = legacy_runs
    with pytest.raises(VaegenError) as refused:  # asking for the new noise on an old run
        generate_run(gen_config(env, k2, 4, noise=NOISE_PHILOX))
    assert "noise_stream" in str(refused.value) and "\n" not in str(refused.value)
    assert not (k2 / sf.shard_name(4)).exists()

    mixed = tmp_path / "mixed"  # a run holding a shard of the other noise (copied in from elsewhere)
    shutil.copytree(reference, mixed)
    marker = json.loads((mixed / sf.marker_name(2)).read_text())
    (mixed / sf.marker_name(2)).write_text(json.dumps({**marker, "noise_stream": NOISE_PER_IMAGE_GENERATOR}))
    before = shard_bytes(mixed)
    result = CliRunner().invoke(main, gen_args(env, mixed, 6))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "shard-000002.done.json was made with noise stream" in result.output and "never mixes" in result.output
    assert shard_bytes(mixed) == before
    verified = CliRunner().invoke(main, ["shards", "verify", str(mixed)])
    assert verified.exit_code == 2 and "shard-000002.tar was made with noise stream" in verified.output


@pytest.mark.parametrize("change,needle", [
    (("--scale", "0"), "--scale must be a whole number >= 1"),
    (("--scale", "2.5"), "--scale must be a whole number >= 1"),
    (("--scale", "ten"), "--scale must be a whole number >= 1"),
    (("--dm", "/nonexistent/dm"), "no diffusion model directory"),
])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, change, needle):
    args = with_option(gen_args(env, tmp_path / "out", 2), *change)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and needle in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_out_holding_something_else_is_refused(env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, gen_args(env, out, 2))
    assert result.exit_code == 2 and "not empty" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dm_json_supplies_the_dataset_and_n(env, tmp_path):
    dm = tmp_path / "dm"
    shutil.copytree(env / "dm", dm)
    (dm / "dm.json").write_text(json.dumps({"dataset": "fmnist", "subset": None}))
    args = with_option([a for a in gen_args(env, tmp_path / "out", 1) if a not in ("--dataset", "fmnist")],
                       "--dm", str(dm))
    assert run_cli(args).exit_code == 0
    assert json.loads((tmp_path / "out" / sf.GENERATION_NAME).read_text())["n_samples"] == N_TRAIN

    result = CliRunner().invoke(main, with_option(with_option(args, "--out", str(tmp_path / "o2")),
                                                  "--dataset", "cifar10"))
    assert result.exit_code == 2 and "dm.json says" in result.output


def test_shards_are_tar_archives_with_deterministic_headers(reference):
    with tarfile.open(reference / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "vaegen", 0o444)}


def test_a_failing_writer_stops_the_sampling_loop_with_its_error(tmp_path):
    from generator.generate import BackgroundShardWriter

    writer = BackgroundShardWriter(tmp_path / "gone", sf.ShardPlan(8, 4), {}, maxsize=1)  # directory missing
    with pytest.raises(FileNotFoundError):
        for _ in range(50):  # never blocks: the dead writer keeps draining its queue
            writer.put(0, np.zeros((1, 1, 32, 32), np.uint8))
        writer.close()


def test_a_second_writer_on_the_same_run_exits_2_naming_the_first_and_touches_nothing(env, reference, tmp_path):
    from vaegen.runlock import run_lock

    out = tmp_path / "busy"
    shutil.copytree(reference, out)
    (out / sf.temp_name(3)).write_bytes(b"the first writer's partial shard")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vaegen.runlock import run_lock\n"
                               f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result = CliRunner().invoke(main, gen_args(env, out, 4))
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert f"pid {holder.pid}" in result.output and "is being written by" in result.output
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not even the orphan was removed
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out):  # a killed holder leaves no lock behind
        pass
    assert run_cli(gen_args(env, out, 4)).exit_code == 0 and shard_bytes(out) == shard_bytes(reference)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 160 KiB tmpfs (root only): a real full disk. Skips where mounting is not allowed."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_exit_2_and_a_rerun_with_space_resumes(env, reference, tiny_tmpfs, tmp_path):
    out = tiny_tmpfs / "run"
    args = gen_args(env, out, 4)
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(b"x" * 70_000)  # leaves room for generation.json and a few shards, not for all eight
    import generator.generate as generate_module

    real_check = generate_module.check_free_space
    generate_module.check_free_space = lambda *a: None  # let it run into the wall (the pre-check would refuse)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        generate_module.check_free_space = real_check
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"Error: no space left on device writing {out}"), result.output
    assert len([line for line in lines if "Error" in line]) == 1 and "Traceback" not in result.output
    assert "nothing half-written was kept" in lines[-1]
    done = [j for j in range(8) if sf.read_marker(out, j)]
    assert 0 < len(done) < 8 and not (out / sf.INDEX_NAME).exists()
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*tmp*"))  # nothing half-written kept
    for j in done:
        assert not sf.shard_problems(out, j, 4 * j, 4)  # what is there is whole
    assert json.loads((out / sf.GENERATION_NAME).read_text())["complete"] is False

    filler.unlink()
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert shard_bytes(out) == shard_bytes(reference)


def test_not_enough_space_for_the_remaining_shards_is_refused_up_front(env, tmp_path, monkeypatch):
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: SimpleNamespace(total=10, used=9, free=1))
    result = CliRunner().invoke(main, gen_args(env, tmp_path / "out", 4))
    assert result.exit_code == 2 and "need about" in result.output and "MiB are free" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_generation_with_one_line_and_the_rerun_gives_identical_bytes(env, tmp_path, signum, code):
    out = tmp_path / "signalled"
    args = with_option(gen_args(env, out, 16), "--steps", "3")
    ref = tmp_path / "ref3"
    assert run_cli(with_option(args, "--out", str(ref))).exit_code == 0
    # SIGINT as a terminal delivers it: a shell starts background jobs with SIGINT ignored, and the child would
    # inherit that (a test run from `make test-slow &` saw no signal at all)
    proc = subprocess.Popen([sys.executable, "-m", "generator", *args[1:]], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(list(out.glob("*.done.json"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].endswith("rerun the same command to resume: finished shards are kept")
    assert "Traceback" not in err
    assert not list(out.glob(".*.partial"))
    assert run_cli(args).exit_code == 0
    assert shard_bytes(out) == shard_bytes(ref)


# --- several processes: `accelerate launch` (torchrun, gloo on CPU) writes the bytes one process writes ------

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK"))}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def one_process(env):
    one = env / "one"
    assert run_cli(gen_args(env, one, 3)).exit_code == 0  # 24 samples, 6 shards, one process
    return one


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(env, one_process):
    out = env / "two"
    cmd = [*LAUNCH, "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
           "-m", "generator", *gen_args(env, out, 3)[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / sf.GENERATION_NAME).read_text())["runs"][-1]["world_size"] == 2
    assert shard_bytes(out) == shard_bytes(one_process) and len(shard_bytes(out)) == 6
    assert (out / sf.INDEX_NAME).read_bytes() == (one_process / sf.INDEX_NAME).read_bytes()


@pytest.mark.slow
def test_two_machine_ranks_on_loopback_write_the_same_bytes_as_one_process(env, one_process):
    out, port = env / "nodes", free_port()
    procs = [subprocess.Popen([*LAUNCH, "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                               "-m", "generator", *gen_args(env, out, 3)[1:]],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert json.loads((out / sf.GENERATION_NAME).read_text())["runs"][-1]["world_size"] == 2
    assert shard_bytes(out) == shard_bytes(one_process)
    assert (out / sf.INDEX_NAME).read_bytes() == (one_process / sf.INDEX_NAME).read_bytes()


# --- a run on object storage: any fsspec URL (fsspec's in-process memory:// here; a real S3 server in test_s3.py) --


def stored_files(url: str) -> dict[str, bytes]:
    """Every object under `url` (the run's files), by name."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(root, detail=False)} if fs.exists(root) else {}


def lock_object(url: str) -> str:
    """The path of a remote run's lock object (next to the run, as a directory's lock file)."""
    import fsspec

    parent, _, name = fsspec.core.url_to_fs(url)[1].rpartition("/")
    return f"{parent}/.{name}.lock"


def verify_ok(run: str | Path) -> bool:
    result = CliRunner().invoke(main, ["shards", "verify", str(run)])
    assert result.exit_code == 0, result.output
    return result.output.startswith("OK")


def test_a_run_on_object_storage_has_the_local_bytes_and_resumes_from_what_a_kill_leaves(env, reference, memory_url):
    import socket

    import fsspec

    assert run_cli(gen_args(env, memory_url, 4)).exit_code == 0
    local = {p.name: p.read_bytes() for p in reference.iterdir()}
    stored = stored_files(memory_url)
    assert stored.keys() == local.keys()
    assert {k: v for k, v in stored.items() if k != sf.GENERATION_NAME} == \
        {k: v for k, v in local.items() if k != sf.GENERATION_NAME}  # shards, markers and index.json
    assert verify_ok(memory_url)

    # What a kill leaves there: a tar uploaded before its marker, shards never uploaded, complete: false, and the
    # dead writer's lock object (it ran on this machine, so it is gone: this process holds the machine's lock).
    fs, root = fsspec.core.url_to_fs(memory_url)
    for name in (sf.marker_name(2), sf.shard_name(6), sf.marker_name(6), sf.shard_name(7), sf.marker_name(7)):
        fs.rm_file(f"{root}/{name}")
    gen = json.loads(stored[sf.GENERATION_NAME])
    fs.pipe_file(f"{root}/{sf.GENERATION_NAME}", json.dumps({**gen, "complete": False}).encode())
    fs.pipe_file(lock_object(memory_url), json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1,
                                                      "command": "vaegen-generate", "since": "x"}).encode())
    result = CliRunner().invoke(main, gen_args(env, memory_url, 4))
    assert result.exit_code == 0, result.output
    assert "taking over the lock of vaegen-generate" in result.output
    assert {k: v for k, v in stored_files(memory_url).items() if k != sf.GENERATION_NAME} == \
        {k: v for k, v in local.items() if k != sf.GENERATION_NAME}
    assert json.loads(stored_files(memory_url)[sf.GENERATION_NAME])["runs"][-1]["shards_generated_rank0"] == 3
    assert not fs.exists(lock_object(memory_url)) and verify_ok(memory_url)


def test_a_remote_run_held_by_a_live_writer_elsewhere_is_refused_and_an_expired_lock_taken_over(env, memory_url,
                                                                                               monkeypatch):
    import datetime

    import fsspec

    import vaegen.runlock as runlock_module

    fs = fsspec.filesystem("memory")
    now = datetime.datetime.now(datetime.timezone.utc)
    holder = {"host": "node-7", "pid": 4242, "command": "vaegen-generate --scale 1", "since": "2026-01-01T00:00:00",
              "renewed": now.isoformat()}
    fs.pipe_file(lock_object(memory_url), json.dumps(holder).encode())
    result = CliRunner().invoke(main, gen_args(env, memory_url, 1))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "is being written by vaegen-generate --scale 1 (pid 4242 on node-7" in result.output
    assert stored_files(memory_url) == {}  # nothing touched

    expired = now - datetime.timedelta(seconds=runlock_module.LOCK_EXPIRES_S + 60)
    fs.pipe_file(lock_object(memory_url), json.dumps({**holder, "renewed": expired.isoformat()}).encode())
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: SimpleNamespace(total=10, used=9, free=1))
    result = CliRunner().invoke(main, gen_args(env, memory_url, 1))  # object storage: no free-space check
    assert result.exit_code == 0 and "taking over the lock" in result.output, result.output
    assert not fs.exists(lock_object(memory_url)) and verify_ok(memory_url)

    result = CliRunner().invoke(main, gen_args(env, "memory://just-a-bucket", 1))
    assert result.exit_code == 2 and "a prefix inside the bucket" in result.output
