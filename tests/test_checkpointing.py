"""Checkpoint folders: complete-only, exact round trip, corrupt or partial ones rejected by name."""
import json
import pathlib

import pytest
import torch

from pipeline.train import checkpointing as ck
from pipeline.retry import RetryPolicy


def _trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _continue(model, opt, sched, steps=3):
    out = []
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()  # draws from the global RNG: restored too
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        out.append(loss.item())
    return out


def test_round_trip_continues_identically(tmp_path):
    model, opt, sched = _trained()
    ck.save(tmp_path / ck.folder_name(3), model=model, optimizer=opt, scheduler=sched, step=3,
            cursor={"epoch": 0, "batch": 3}, extra={"best_valid": 1.5})
    straight = _continue(model, opt, sched)

    model2, opt2, sched2 = _trained(seed=1, steps=1)  # different weights, moments, schedule and RNG
    payload = ck.load(tmp_path / ck.folder_name(3))
    ck.restore(payload, model=model2, optimizer=opt2, scheduler=sched2)
    assert payload["step"] == 3 and payload["cursor"] == {"epoch": 0, "batch": 3}
    assert payload["extra"] == {"best_valid": 1.5}
    assert _continue(model2, opt2, sched2) == straight  # bit-identical


def test_incomplete_and_corrupt_folders_are_named_and_skipped(tmp_path):
    model, opt, sched = _trained()
    for step in (10, 20, 30):
        ck.save(tmp_path / ck.folder_name(step), model=model, optimizer=opt, scheduler=sched, step=step,
                cursor={"epoch": 0, "batch": step})
    # step 30: killed before the marker was written; step 20: state truncated after the marker
    (tmp_path / ck.folder_name(30) / ck.MARKER).unlink()
    state20 = tmp_path / ck.folder_name(20) / ck.STATE
    state20.write_bytes(state20.read_bytes()[:-100])
    with pytest.raises(ck.IncompleteCheckpoint, match=ck.folder_name(30) + ".*never finished"):
        ck.load(tmp_path / ck.folder_name(30))
    with pytest.raises(ck.IncompleteCheckpoint, match=ck.folder_name(20) + ".*bytes"):
        ck.load(tmp_path / ck.folder_name(20))
    assert ck.latest_complete(tmp_path) == tmp_path / ck.folder_name(10)
    # same size, different bytes: caught by the checksum
    state10 = tmp_path / ck.folder_name(10) / ck.STATE
    data = bytearray(state10.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state10.write_bytes(bytes(data))
    with pytest.raises(ck.IncompleteCheckpoint, match="sha256"):
        ck.load(tmp_path / ck.folder_name(10))
    assert ck.latest_complete(tmp_path) is None


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model, opt, sched = _trained()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ck.NonFiniteState, match="step 7"):
        ck.save(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=7, cursor={})
    assert not (tmp_path / "c" / ck.MARKER).exists()


def test_marker_records_the_step(tmp_path):
    model, opt, sched = _trained()
    folder = ck.save(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=5, cursor={})
    assert json.loads((folder / ck.MARKER).read_text())["step"] == 5


def test_prune_removes_only_checkpoint_folders_outside_the_kept_set(tmp_path):
    import pyarrow.fs
    for name in ["checkpoint_000000010", "checkpoint_000000020", "checkpoint_000000030", "checkpoint_tmp",
                 "other"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_000000040").write_text("a file, not a folder")
    removed = ck.prune(pyarrow.fs.LocalFileSystem(), str(tmp_path), {"checkpoint_000000020", "checkpoint_000000030"})
    assert removed == ["checkpoint_000000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_000000020", "checkpoint_000000030", "checkpoint_000000040", "checkpoint_tmp", "other"]
    assert ck.prune(pyarrow.fs.LocalFileSystem(), str(tmp_path / "missing"), set()) == []


# -- on a real S3 endpoint that goes down and comes back ------------------------------------------------------------
FAST = RetryPolicy(max_attempts=3, backoff_s=0.2, backoff_max_s=0.2)


def _s3_fs(endpoint):
    import boto3
    import pyarrow.fs
    bucket = f"ckpt-{endpoint.endpoint_url.rsplit(':', 1)[1]}"
    boto3.client("s3", endpoint_url=endpoint.endpoint_url, aws_access_key_id=endpoint.key,
                 aws_secret_access_key=endpoint.secret, region_name=endpoint.region).create_bucket(Bucket=bucket)
    fs = pyarrow.fs.S3FileSystem(access_key=endpoint.key, secret_key=endpoint.secret, region=endpoint.region,
                                 endpoint_override=endpoint.endpoint_url.removeprefix("http://"), scheme="http",
                                 connect_timeout=1, request_timeout=2)
    return fs, f"{bucket}/run"


def _upload_two(tmp_path, fs, root):
    model, opt, sched = _trained()
    for step in (10, 20):
        folder = ck.save(tmp_path / f"local{step}", model=model, optimizer=opt, scheduler=sched, step=step,
                         cursor={"epoch": 0, "batches_seen": step})
        ck.upload(folder, fs, root, ck.folder_name(step))


def test_restore_during_an_s3_outage_fails_loudly_and_rides_out_a_short_one(restartable_s3, tmp_path):
    endpoint, server = restartable_s3
    fs, root = _s3_fs(endpoint)
    _upload_two(tmp_path, fs, root)
    assert ck.fetch_latest_complete(fs, root, tmp_path / "a").name == ck.folder_name(20)
    server.stop()  # the store is down for longer than the retries: an error, never "no checkpoint" or an older one
    with pytest.raises(ck.CheckpointStoreError, match="unreachable"):
        ck.fetch_latest_complete(fs, root, tmp_path / "b", policy=FAST)
    server.start()
    # down for 3 s, inside the default policy's ~30 s: waited out, the newest checkpoint comes back
    server.outage(seconds=3.0).join(timeout=0.1)
    assert ck.fetch_latest_complete(fs, root, tmp_path / "c").name == ck.folder_name(20)


def test_a_kill_during_a_save_on_s3_leaves_a_folder_that_restore_skips(restartable_s3, tmp_path):
    endpoint, _ = restartable_s3
    fs, root = _s3_fs(endpoint)
    _upload_two(tmp_path, fs, root)
    # what a kill mid-upload leaves: the state file (upload order: marker last), part of it, and no marker
    model, opt, sched = _trained()
    folder = ck.save(tmp_path / "local30", model=model, optimizer=opt, scheduler=sched, step=30, cursor={})
    data = (folder / ck.STATE).read_bytes()
    with fs.open_output_stream(f"{root}/{ck.folder_name(30)}/{ck.STATE}") as out:
        out.write(data[: len(data) // 2])
    assert ck.fetch_latest_complete(fs, root, tmp_path / "d").name == ck.folder_name(20)
    # and a marker that arrived over a truncated state file (another store's upload order) is refused too
    with fs.open_output_stream(f"{root}/{ck.folder_name(30)}/{ck.MARKER}") as out:
        out.write((folder / ck.MARKER).read_bytes())
    assert ck.fetch_latest_complete(fs, root, tmp_path / "e").name == ck.folder_name(20)


def test_an_upload_rides_out_an_outage(restartable_s3, tmp_path):
    endpoint, server = restartable_s3
    fs, root = _s3_fs(endpoint)
    model, opt, sched = _trained()
    folder = ck.save(tmp_path / "local", model=model, optimizer=opt, scheduler=sched, step=5, cursor={})
    server.outage(seconds=3.0)
    import time
    time.sleep(0.5)  # inside the outage
    ck.upload(folder, fs, root, ck.folder_name(5))
    assert ck.fetch_latest_complete(fs, root, tmp_path / "f").name == ck.folder_name(5)


def test_the_run_storage_filesystem_keeps_its_retries_when_pickled_to_the_ray_controller(restartable_s3, tmp_path):
    """Ray's controller writes its checkpoint snapshot through the RunConfig filesystem, which Ray pickles; pyarrow's
    own retry_strategy does not survive that, ours does (pipeline/cluster/retrying_fs.py)."""
    import pickle
    import time

    from pipeline.cluster.retrying_fs import retrying
    endpoint, server = restartable_s3
    fs, root = _s3_fs(endpoint)
    remote = pickle.loads(pickle.dumps(retrying(fs)))
    server.outage(seconds=3.0)
    time.sleep(0.3)  # inside the outage
    with remote.open_output_stream(f"{root}/snapshot.json") as out:
        out.write(b'{"checkpoints": []}')
    with remote.open_input_stream(f"{root}/snapshot.json") as f:
        assert f.read() == b'{"checkpoints": []}'
    server.outage(seconds=2.0)
    time.sleep(0.3)
    remote.delete_file(f"{root}/snapshot.json")
    assert fs.get_file_info(f"{root}/snapshot.json").type.name == "NotFound"


_UPLOADER = """
import sys, pyarrow.fs
from pipeline.train import checkpointing as ck
endpoint, key, secret, local, root, name = sys.argv[1:]
fs = pyarrow.fs.S3FileSystem(access_key=key, secret_key=secret, region="us-east-1",
                             endpoint_override=endpoint.removeprefix("http://"), scheme="http")
print("uploading", flush=True)
ck.upload(local, fs, root, name)
"""


def test_a_process_killed_during_an_s3_checkpoint_upload_leaves_nothing_restore_takes(restartable_s3, tmp_path):
    """A real kill (SIGKILL of the uploading process) mid-upload: restore takes the previous checkpoint."""
    import signal
    import subprocess
    import sys
    import time
    endpoint, _ = restartable_s3
    fs, root = _s3_fs(endpoint)
    _upload_two(tmp_path, fs, root)
    model, opt, sched = _trained()
    # a state file large enough that the upload takes a while (the real ones are MBs to GBs)
    big = torch.nn.Linear(4096, 4096)
    folder = ck.save(tmp_path / "big", model=big, optimizer=torch.optim.SGD(big.parameters(), lr=0.1),
                     scheduler=None, step=30, cursor={})
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, endpoint.endpoint_url, endpoint.key, endpoint.secret,
                             str(folder), root, ck.folder_name(30)], stdout=subprocess.PIPE, text=True,
                            cwd=pathlib.Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == "uploading"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill once the upload has begun on the store, before it has finished
        if fs.get_file_info(f"{root}/{ck.folder_name(30)}").type.name != "NotFound":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert fs.get_file_info(f"{root}/{ck.folder_name(30)}/{ck.MARKER}").type.name == "NotFound", \
        "the upload finished before the kill: the test did not test anything"
    assert ck.fetch_latest_complete(fs, root, tmp_path / "g").name == ck.folder_name(20)
