"""jobs.prepare on real data: the manifest and card describe exactly what was written, re-runs skip valid
shards, parallel writing gives the same bytes, bad input commits nothing, and a prepare killed midway and
re-run yields a complete, valid dataset."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.shards.prepare import PrepareConfig, prepare
from pipeline.data.shards.reader import Cursor, StreamConfig, make_loader
from pipeline.data.sources import SourceFormatError, SourceNotFoundError


@pytest.fixture(scope="module")
def mnist_out(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    report = prepare(PrepareConfig(dataset="mnist", source=str(shared_data / "mnist"), out=str(out),
                                   shard_size=15_000, block_size=1000, episode_length=20, seed=3, progress=False))
    return out, report


def test_manifest_lists_every_shard_with_true_size_and_sha256(mnist_out):
    out, report = mnist_out
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(r["split"], r["shard_index"], r["num_samples"]) for r in table] == [
        ("train", 0, 15_000), ("train", 1, 15_000), ("train", 2, 15_000), ("train", 3, 5_000),
        ("valid", 0, 10_000), ("test", 0, 10_000)]
    for row in table:
        data = (out / row["path"]).read_bytes()
        assert row["num_bytes"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["url"] == str(out / row["path"])
    assert report.written == 6 and report.skipped == 0
    assert not list(out.rglob("*.partial-*"))


def test_dataset_card_describes_the_data(mnist_out, shared_data):
    card = json.loads((mnist_out[0] / "dataset.json").read_text())
    assert card["image_shape"] == [1, 28, 28] and card["dtype"] == "uint8" and card["bit_depth"] == 8
    assert {s: v["num_images"] for s, v in card["splits"].items()} == {"train": 50_000, "valid": 10_000, "test": 10_000}
    assert card["source_checksums"]["train-images-idx3-ubyte.gz"] == (
        "12bacf187eba4f770a04d97be5dbaad9289fe5d89a89729b6af3255c8bbfa9e1")  # the value in shared/data/README.md
    assert card["episodes"]["seed"] == 3 and card["episodes"]["episode_length"] == 20
    assert "none" in card["binarization"] and card["has_labels"] is True


def test_rerun_skips_every_valid_shard_and_rewrites_a_damaged_one(mnist_out, shared_data):
    out, _ = mnist_out
    before = (out / "manifest.parquet").read_bytes()
    damaged = out / "train" / "train-00002.tar"
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    config = PrepareConfig(dataset="mnist", source=str(shared_data / "mnist"), out=str(out), shard_size=15_000,
                           block_size=1000, episode_length=20, seed=3, progress=False)
    report = prepare(config)
    assert (report.written, report.skipped) == (1, 5)
    assert damaged.read_bytes() == good and (out / "manifest.parquet").read_bytes() == before


def test_labels_survive_and_train_is_stored_shuffled(mnist_out, shared_data):
    out, _ = mnist_out
    config = StreamConfig(root=str(out), split="train", episode_length=10, batch_size=5000, shuffle=False)
    batch = next(iter(make_loader(config, rank=0, world_size=1, cursor=Cursor(0))))
    from pipeline.data.sources import load_split

    source = load_split("mnist", shared_data / "mnist", "train")
    keys = batch.keys.ravel().numpy()
    np.testing.assert_array_equal(batch.labels.ravel().numpy(), source.labels[keys])
    assert not np.array_equal(keys[:100], np.arange(100))  # storage order is a seeded shuffle, not file order


def test_parallel_writers_produce_identical_shards(shared_data, tmp_path):
    common = dict(dataset="binarized_mnist", source=str(shared_data / "binarized_mnist"), shard_size=7_000,
                  splits=("valid", "test"), progress=False)
    serial = prepare(PrepareConfig(out=str(tmp_path / "serial"), workers=1, **common))
    parallel = prepare(PrepareConfig(out=str(tmp_path / "parallel"), workers=2, **common))
    assert [r.sha256 for r in serial.records] == [r.sha256 for r in parallel.records]
    assert len(serial.records) == 4


def test_missing_source_commits_nothing(tmp_path):
    with pytest.raises(SourceNotFoundError, match="nowhere"):
        prepare(PrepareConfig(dataset="fashion_mnist", source=str(tmp_path / "nowhere"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_bad_test_file_commits_no_shard_of_any_split(shared_data, tmp_path):
    source = tmp_path / "mnist"
    source.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (source / name).symlink_to(shared_data / "mnist" / name)
    (source / "t10k-images-idx3-ubyte").write_bytes((0x803).to_bytes(4, "big") + (10_000).to_bytes(4, "big")
                                                    + (28).to_bytes(4, "big") * 2 + bytes(1000))
    with pytest.raises(SourceFormatError, match=r"t10k-images-idx3-ubyte: 1000 data bytes .*truncated"):
        prepare(PrepareConfig(dataset="mnist", source=str(source), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_an_empty_split_commits_nothing(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", x_train=np.zeros((5, 784), np.uint8),
             x_valid=np.zeros((5, 784), np.uint8), x_test=np.zeros((0, 784), np.uint8))
    with pytest.raises(SourceFormatError, match=r"binarized_mnist.npz\[x_test\].*N > 0"):
        prepare(PrepareConfig(dataset="binarized_mnist", source=str(tmp_path), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_by_name_and_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "mnist", "--source",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "missing: source directory not found" in result.stderr
    for flags, message in [(["--splits", "bogus"], "prepare: --splits must be a non-empty subset of"),
                           (["--shard-size", "0"], "argument --shard-size: must be >= 1, got 0")]:
        result = subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "digits", "--out",
                                 str(tmp_path / "out"), *flags], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()


def s3_keys(s3, bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.key,
                          aws_secret_access_key=s3.secret, region_name=s3.region)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_prepare_killed_midway_then_rerun_gives_a_complete_valid_dataset(s3, shared_data):
    import fsspec

    root = s3.new_bucket("killed") + "/fashion"
    bucket = root.removeprefix("s3://").split("/")[0]
    command = [sys.executable, "-m", "jobs.prepare", "--dataset", "fashion_mnist", "--source",
               str(shared_data / "fashion_mnist"), "--out", root, "--shard-size", "500", "--no-progress"]
    env = {**os.environ, **s3.env}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len([k for k in s3_keys(s3, bucket, "fashion/train/") if k.endswith(".tar")]) < 5:
        assert process.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = [k for k in s3_keys(s3, bucket, "fashion/") if k.endswith(".tar")]
    assert "fashion/manifest.parquet" not in s3_keys(s3, bucket, "fashion/")
    assert 5 <= len(committed) < 140, "the kill did not land midway"

    # Make the leftovers worse: a half-written shard under its final name, and a stray partial upload.
    fs = fsspec.filesystem("s3", **s3.storage_options)
    half = f"{bucket}/{committed[0]}"
    fs.pipe_file(half, fs.cat_file(half)[:1234])
    fs.pipe_file(f"{bucket}/fashion/train/train-00099.tar.partial-0123456789abcdef", b"junk")

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["shards"] == 100 + 20 + 20 and summary["images"] == 70_000
    assert summary["skipped"] >= len(committed) - 1 and summary["written"] == 140 - summary["skipped"]
    assert not [k for k in s3_keys(s3, bucket, "fashion/") if ".partial-" in k]
    for split, size in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        config = StreamConfig(root=root, split=split, episode_length=50, batch_size=100,
                              storage_options=s3.storage_options)
        keys = torch.cat([b.keys[b.mask] for b in make_loader(config, rank=0, world_size=1, cursor=Cursor(0))])
        assert sorted(keys.tolist()) == list(range(size))  # every shard present and matching its sha256


def test_colour_dataset_round_trips_through_shards(tmp_path):
    from tests.test_sources_more import write_cifar

    written = write_cifar(tmp_path / "cifar")
    prepare(PrepareConfig(dataset="cifar10", source=str(tmp_path / "cifar"), out=str(tmp_path / "out"), shard_size=30,
                          episode_length=4, progress=False))
    config = StreamConfig(root=str(tmp_path / "out"), split="valid", episode_length=4, batch_size=5, shuffle=False)
    (batch,) = list(make_loader(config, rank=0, world_size=1, cursor=Cursor(0)))
    assert batch.images.shape == (5, 4, 3, 32, 32) and bool(batch.mask.all())
    labels, pixels = written["data_batch_5.bin"]
    first = int(batch.keys[0, 0])
    assert int(batch.labels[0, 0]) == labels[first]
    np.testing.assert_array_equal(batch.images[0, 0].numpy().reshape(-1), pixels[first])


def test_cli_prepares_the_offline_digits_to_a_file_url(tmp_path):
    out = (tmp_path / "digits").as_uri()
    result = subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "digits", "--out", out,
                             "--shard-size", "400", "--episode-length", "8", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"out": out, "shards": 4 + 1 + 1, "written": 6, "skipped": 0, "images": 1797}
    config = StreamConfig(root=out, split="test", episode_length=8, batch_size=25, shuffle=False, as_float=True)
    (batch,) = list(make_loader(config, rank=0, world_size=1, cursor=Cursor(0)))
    assert batch.images.shape == (25, 8, 1, 28, 28) and batch.labels is not None and bool(batch.mask.all())


def test_configs_never_show_storage_credentials():
    secret = {"key": "AKIAEXAMPLE", "secret": "wJalrXUtnFEMI-very-secret"}
    text = repr(PrepareConfig(dataset="digits", source=None, out="s3://b/x", storage_options=secret))
    text += repr(StreamConfig(root="s3://b/x", storage_options=secret))
    assert "very-secret" not in text and "AKIAEXAMPLE" not in text


def test_the_job_takes_its_dataset_image_shape_bit_depth_and_likelihood_from_the_data_card(tmp_path):
    """make demo DATA=fashion_mnist failed: the model kept its binarized defaults for 8-bit data."""
    from pipeline.train import config
    from pipeline.cluster import driver
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "grey.npz", **{f"x_{s}": rng.integers(0, 256, (64, 3, 16, 16), dtype=np.uint8)
                                       for s in ("train", "valid", "test")})
    prepare(PrepareConfig(dataset="npz", source=str(tmp_path / "grey.npz"), out=str(tmp_path / "p"),
                          episode_length=4, progress=False))
    cfg = config.load(None, [f"data.shards={tmp_path / 'p'}", "model.episode_length=4", "data.valid_episodes=16",
                             "data.test_episodes=16", f"checkpoint.storage_path={tmp_path / 'ray'}"])
    resolved = driver.resolved(cfg)
    model = resolved.model
    # the card's dataset, not the config's default 'digits': registry name, tags and data identity read it here
    assert resolved.data.dataset == "npz" and cfg.data.dataset == "digits"
    assert (model.image_channels, model.image_height, model.image_width, model.bit_depth) == (3, 16, 16, 8)
    assert model.likelihood.kind == "logistic_mixture"
    driver.preflight(driver.resolved(cfg))  # consistent: no error
    # what the config sets stays, and a contradiction is named before anything starts
    explicit = config.load(None, [f"data.shards={tmp_path / 'p'}", "model.episode_length=4", "model.bit_depth=1",
                                  f"checkpoint.storage_path={tmp_path / 'ray'}"])
    assert driver.resolved(explicit).model.bit_depth == 1
    with pytest.raises(config.ConfigError, match=r"^model.image_\*/bit_depth: .* at bit depth 1, .* at 8"):
        driver.preflight(driver.resolved(explicit))


@pytest.mark.parametrize("argv, flag", [(["--shard-size", "0"], "--shard-size"), (["--episode-length", "-1"], "--episode-length")])
def test_prepare_refuses_a_bad_count_with_exit_2_naming_the_flag(tmp_path, capsys, argv, flag):
    from jobs import prepare as prepare_job
    with pytest.raises(SystemExit) as e:
        prepare_job.main(["--dataset", "digits", "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and f"argument {flag}: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_prepare_to_an_unreachable_store_exits_2_naming_out(tmp_path, capsys):
    from jobs import prepare as prepare_job
    from tests.fixtures.mlflow_server import free_port
    rc = prepare_job.main(["--dataset", "digits", "--out", "s3://nowhere/x", "--no-progress",
                           "--endpoint-url", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("prepare: --out s3://nowhere/x"), err


def test_a_job_reading_a_dataset_while_it_is_re_prepared_finishes_its_epoch(tmp_path):
    """A training stream is half-way through its epoch when the dataset is prepared again into the same path
    with another seed (every shard's bytes differ). The stream goes on with the images of the manifest it
    started from; a stream started after the new manifest reads the new shards. Before versioned shard names the
    old stream failed with ShardIntegrityError (the files it listed had been replaced)."""
    from pipeline.data.shards.manifest import read_manifest
    from pipeline.data.train_data import ShardStream
    out = str(tmp_path / "digits")
    common = dict(dataset="digits", source=None, out=out, shard_size=200, block_size=100, episode_length=4,
                  progress=False)
    prepare(PrepareConfig(seed=0, **common))
    old_records = read_manifest(out)

    def epoch_keys(stream, batches=None):
        keys = []
        for batch in batches if batches is not None else stream.batches(stream.start(0)):
            keys.append(np.array(batch.keys))
            if batch.last:
                break
        return keys

    straight = epoch_keys(ShardStream(out, 4, 4, 0, 0, 1))
    live = ShardStream(out, 4, 4, 0, 0, 1)
    batches = live.batches(live.start(0))
    head = epoch_keys(live, [next(batches) for _ in range(3)])
    report = prepare(PrepareConfig(seed=1, **common))
    assert report.written == len(report.records)  # nothing identical: every shard is new
    rest = epoch_keys(live, batches)
    assert len(head + rest) == len(straight) and all(np.array_equal(a, b) for a, b in zip(head + rest, straight))
    # the new manifest names new files beside the old ones, which are still there, untouched
    new_records = read_manifest(out)
    assert {r.path for r in new_records}.isdisjoint({r.path for r in old_records if r.split == "train"})
    for r in old_records:
        assert hashlib.sha256((tmp_path / "digits" / r.path).read_bytes()).hexdigest() == r.sha256
    after = epoch_keys(ShardStream(out, 4, 4, 0, 0, 1))
    assert not all(np.array_equal(a, b) for a, b in zip(after, straight))
    # preparing the first version once more finds its shards and writes nothing
    again = prepare(PrepareConfig(seed=0, **common))
    assert again.written == 0 and {r.path for r in again.records} == {r.path for r in old_records}
