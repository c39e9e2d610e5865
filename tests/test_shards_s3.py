"""The reader against a real S3 endpoint (moto server on 127.0.0.1): separate rank processes with different
PYTHONHASHSEED, forked and spawned DataLoader workers, and a connection outage mid-epoch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.retry import RetryPolicy
from pipeline.data.shards.prepare import PrepareConfig, prepare
from pipeline.data.shards.reader import Cursor, StreamConfig, make_loader
from pipeline.retry import with_retries

QUICK = RetryPolicy(max_attempts=3, backoff_s=0.01, backoff_max_s=0.01)
QUICKER = RetryPolicy(max_attempts=2, backoff_s=0.01, backoff_max_s=0.01)

RANK_TIMEOUT_S = 120  # a forked s3fs hang would sit here forever; the timeout turns it into a failure


def read_epoch_main() -> None:
    """Child process: read one rank's epoch and write its keys and batch count to the given .npz."""
    args = json.loads(sys.argv[1])
    config = StreamConfig(root=args["root"], episode_length=args["T"], batch_size=args["B"], seed=args["seed"],
                          split=args.get("split", "train"))
    loader = make_loader(config, rank=args["rank"], world_size=args["world"], cursor=Cursor(args["epoch"]),
                         num_workers=args["workers"], multiprocessing_context=args["context"])
    keys, indices = [], []
    for batch in loader:
        keys.append(batch.keys.numpy())
        indices.append(batch.index)
    np.savez(args["out"], keys=np.stack(keys), indices=np.array(indices), length=len(loader),
             string_hash=hash("kanerva"))  # shows which hash seed this process really ran with


def run_ranks(jobs: list[dict], env_extra: dict[str, str]) -> list[dict]:
    """Start every rank as its own process at once, wait for all, return what each wrote."""
    processes = []
    for job in jobs:
        env = {**os.environ, **env_extra, "PYTHONHASHSEED": str(job.pop("hash_seed"))}
        code = "from tests.test_shards_s3 import read_epoch_main; read_epoch_main()"
        processes.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for job, process in zip(jobs, processes):
        try:
            output, _ = process.communicate(timeout=RANK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"rank {job['rank']} ({job['context']} workers) did not finish in {RANK_TIMEOUT_S}s")
        assert process.returncode == 0, output
        with np.load(job["out"]) as data:
            results.append({k: data[k] for k in data.files})
    return results


@pytest.fixture(scope="module")
def s3_dataset(s3, shared_data):
    """Real binarized MNIST prepared onto S3: train in 3 uneven shards (20k, 20k, 10k)."""
    root = s3.new_bucket("bmnist") + "/binarized_mnist"
    prepare(PrepareConfig(dataset="binarized_mnist", source=str(shared_data / "binarized_mnist"), out=root,
                          shard_size=20_000, storage_options=s3.storage_options, progress=False))
    return root


def test_two_ranks_two_workers_read_every_image_once(s3, s3_dataset, tmp_path):
    """Separate processes, different PYTHONHASHSEED, one rank with forked and one with spawned workers;
    3 shards < 2 ranks x 2 workers, of unequal sizes."""
    common = {"root": s3_dataset, "T": 16, "B": 8, "seed": 11, "epoch": 4, "world": 2, "workers": 2}
    jobs = [{**common, "rank": 0, "context": "fork", "hash_seed": 1, "out": str(tmp_path / "r0.npz")},
            {**common, "rank": 1, "context": "spawn", "hash_seed": 987654, "out": str(tmp_path / "r1.npz")}]
    ranks = run_ranks(jobs, s3.env)
    assert int(ranks[0]["string_hash"]) != int(ranks[1]["string_hash"])  # the ranks really hash differently
    counts = [len(r["indices"]) for r in ranks]
    assert counts[0] == counts[1] == int(ranks[0]["length"]) == int(ranks[1]["length"]) == 196
    assert all(r["indices"].tolist() == list(range(196)) for r in ranks)
    keys = np.concatenate([r["keys"].ravel() for r in ranks])
    real = keys[keys >= 0]
    assert len(real) == len(np.unique(real)) == 50_000 and real.min() == 0 and real.max() == 49_999


@pytest.mark.parametrize("context, workers", [("fork", 4), ("spawn", 2)])  # a spawned worker re-imports torch: ~3 s
def test_fork_and_spawn_workers_finish_against_s3(s3, s3_dataset, tmp_path, context, workers):
    """The parent has already used s3fs (manifest, card) before the workers start: the fork trap of s3fs #914."""
    job = {"root": s3_dataset, "T": 8, "B": 4, "seed": 0, "epoch": 0, "world": 1, "workers": workers, "split": "valid",
           "rank": 0, "context": context, "hash_seed": 3, "out": str(tmp_path / f"{context}.npz")}
    (result,) = run_ranks([job], s3.env)
    keys = result["keys"].ravel()
    assert sorted(keys[keys >= 0]) == list(range(10_000))


def test_an_outage_mid_epoch_is_survived_exactly_once(s3, s3_proxy, s3_dataset, shared_data, caplog):
    """All connections cut and new ones refused for 3 s after 20 batches; the reader's retry with backoff (the
    only retry layer: botocore's and s3fs's are switched off) carries the epoch through."""
    # Smaller shards so that several are fetched after the cut, through the proxy.
    root = s3_dataset.rsplit("/", 1)[0] + "/small_shards"
    prepare(PrepareConfig(dataset="binarized_mnist", source=str(shared_data / "binarized_mnist"), out=root,
                          shard_size=2_000, splits=("valid",), storage_options=s3.storage_options, progress=False))
    through_proxy = {**s3.storage_options, "endpoint_url": s3_proxy.url}
    config = StreamConfig(root=root, split="valid", episode_length=10, batch_size=10, storage_options=through_proxy,
                          retry=RetryPolicy(max_attempts=12, backoff_s=0.2, backoff_max_s=1.0))
    keys = []
    for batch in make_loader(config, rank=0, world_size=1, cursor=Cursor(0)):
        keys.append(batch.keys[batch.mask])
        if batch.index == 20:
            s3_proxy.cut(seconds=3.0)
    assert s3_proxy.refused > 0, "the outage never hit a request: the test did not test anything"
    assert any("retrying in" in r.getMessage() for r in caplog.records), "the reader's own retry never ran"
    keys = torch.cat(keys).numpy()
    assert len(keys) == len(np.unique(keys)) == 10_000


def test_manifest_and_card_hold_no_credentials(s3, s3_dataset):
    import fsspec

    fs = fsspec.filesystem("s3", **s3.storage_options)
    for name in ("manifest.parquet", "dataset.json"):
        data = fs.cat_file(f"{s3_dataset.removeprefix('s3://')}/{name}")
        assert s3.secret.encode() not in data and s3.key.encode() not in data


def test_retries_transient_errors_with_backoff_but_not_missing_objects():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("peer reset")
        return "ok"

    assert with_retries("shard x", flaky, QUICK) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match=r"shard x: failed after 2 attempts: ConnectionResetError"):
        with_retries("shard x", flaky, QUICKER)

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries("shard y", missing, QUICK)
    assert len(calls) == 1

    # what waiting cannot mend is raised at the first attempt: bytes that do not parse, credentials refused or
    # missing (botocore's type, or the code in the message of pyarrow's S3 client)
    class NoCredentialsError(Exception):  # botocore's name: recognised without importing botocore
        pass

    for error in (ValueError("not a Parquet file"), NoCredentialsError("Unable to locate credentials"),
                  OSError("AWS Error ACCESS_DENIED during HeadObject operation"),
                  OSError("An error occurred (InvalidAccessKeyId) when calling the GetObject operation")):
        calls.clear()

        def refused(error=error):
            calls.append(1)
            raise error

        with pytest.raises(PermissionError if isinstance(error, NoCredentialsError) else type(error)):
            with_retries("card z", refused, QUICK)
        assert len(calls) == 1, error
    calls.clear()

    def timed_out():
        calls.append(1)
        raise TimeoutError("read timed out")  # an OSError and transient, though a subclass of nothing permanent

    with pytest.raises(OSError, match="failed after 2 attempts: TimeoutError"):
        with_retries("card z", timed_out, QUICKER)
    assert len(calls) == 2


def test_truncated_or_grown_shard_on_s3_is_named(s3, s3_dataset):
    import fsspec

    from pipeline.data.shards.fetch import ShardIntegrityError

    fs = fsspec.filesystem("s3", **s3.storage_options)
    source = s3_dataset.removeprefix("s3://")
    copy = source.rsplit("/", 1)[0] + "/damaged"
    for name in ("manifest.parquet", "dataset.json", "valid/valid-00000.tar"):
        fs.copy(f"{source}/{name}", f"{copy}/{name}")
    shard = f"{copy}/valid/valid-00000.tar"
    good = fs.cat_file(shard)
    config = StreamConfig(root=f"s3://{copy}", split="valid", verify="size", storage_options=s3.storage_options,
                          retry=RetryPolicy(max_attempts=1))
    fs.pipe_file(shard, good[:-512])
    with pytest.raises(ShardIntegrityError, match=r"damaged/valid/valid-00000.tar: \d+ bytes, .* \(truncated\)"):
        list(make_loader(config, rank=0, world_size=1, cursor=Cursor(0)))
    fs.pipe_file(shard, good + bytes(512))
    with pytest.raises(ShardIntegrityError, match=r"damaged/valid/valid-00000.tar: \d+\+ bytes, .* \(replaced\)"):
        list(make_loader(config, rank=0, world_size=1, cursor=Cursor(0)))


def test_a_process_pointed_at_another_endpoint_reads_from_it(s3, s3_dataset, monkeypatch):
    """The per-process filesystem is keyed by the AWS_* environment: a driver whose AWS_ENDPOINT_URL changed (a
    test, a notebook switching stores) reads from the new endpoint, not a cached client of the old one."""
    from pipeline import storage
    from pipeline.data.shards.manifest import read_manifest
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    for k, v in s3.env.items():
        if k != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(k, v)
    stale, _ = storage.filesystem(s3_dataset)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    fresh, _ = storage.filesystem(s3_dataset)
    assert fresh is not stale
    assert len(read_manifest(s3_dataset)) > 0
