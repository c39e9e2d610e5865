"""A real two-node Ray cluster loses a node mid-epoch: the job waits for a node, goes on from its last checkpoint,
and the epoch still delivers every training image exactly once.

The cluster is the local stack (infra/local_stack.py: a Ray head with the Jobs API, an MLflow server, an S3
endpoint) plus a second node started with `ray start --address` (1 logical CPU each, a temp dir and process session
of its own). The job is submitted as a user submits it (jobs.submit: the working dir is uploaded and unpacked on
each node), with one worker per node (scaling.placement_strategy=STRICT_SPREAD), shards and checkpoints on S3.
Losing the machine is a SIGKILL of the second node's raylet (its worker dies with it). A fresh node is started
only after the driver has begun its restart, so the new worker group has to wait for it (scaling.placement_wait_s).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time

import boto3
import pytest
from mlflow.tracking import MlflowClient

from infra.local_stack import LocalStack
from pipeline.train import key_audit
from tests.test_train_ray import TINY_MODEL, assert_monotone

# these tests start Ray clusters, a local stack or jobs of their own (tests/conftest.py: make test-unit skips them)
pytestmark = pytest.mark.services

ROOT = pathlib.Path(__file__).resolve().parents[1]
# node loss seen by the GCS in ~3 s (health check every 1 s, 3 misses) instead of ~15-30 s; one placement attempt
# of the Train controller waits 10 s (Ray's default 60 s), so the restart's wait for a node fits in the test
FAST_FAILOVER = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                 "RAY_health_check_timeout_ms": "1000", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    stack = LocalStack(tmp_path_factory.mktemp("two-nodes"), num_cpus=1, ray_env=FAST_FAILOVER).up()
    try:
        stack.add_node(num_cpus=1)
        yield stack
    finally:
        stack.down()


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def _prepare_digits(stack) -> str:
    url = "s3://kpp-data/digits-t4"
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "digits", "--out", url, "--episode-length",
                    "4", "--no-progress"], check=True, cwd=ROOT, env={**os.environ, **stack.client_env},
                   timeout=300, capture_output=True)
    return url


def _complete_checkpoints(stack, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=stack.client_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="kpp-runs", Prefix=prefix)
            for o in page.get("Contents", [])]
    return sorted(k.split("/")[-2] for k in keys if k.endswith("/COMPLETE.json"))


def _audited_steps(audit: pathlib.Path, rank: int) -> int:
    return max((line["step"] for (r, _), lines in key_audit.read(audit).items() if r == rank for line in lines),
               default=0)


@pytest.mark.slow
def test_the_head_and_the_joined_node_listen_on_loopback_only(cluster):
    """`ray start --head` of the local stack and the node that joined it (pipeline.cluster.loopback): auth is off on
    them. Before: the GCS, raylets and core workers listened on every interface."""
    from infra.local_stack import session_pids
    from tests.test_loopback import listening, loopback
    sockets = listening(set(session_pids(cluster.services["ray"].proc.pid))
                        | set(session_pids(cluster.services["node1"].proc.pid)))
    assert len(sockets) >= 8, sockets
    assert [s for s in sockets if not loopback(s[0])] == [], sockets


def test_a_lost_node_mid_epoch_is_waited_for_and_every_image_is_trained_once(cluster, tmp_path, monkeypatch):
    shards = _prepare_digits(cluster)
    audit = tmp_path / "audit"
    name = "two-nodes"
    cmd = [sys.executable, "-m", "jobs.submit", "--", "python", "-m", "jobs.train", *TINY_MODEL, f"name={name}",
           f"data.shards={shards}", "data.batch_episodes=4", "data.valid_episodes=8", "data.test_episodes=8",
           f"data.audit_dir={audit}", "eval.iwae_samples=2", "eval.every_steps=0", "scaling.num_workers=2",
           "scaling.cpus_per_worker=0.49", "scaling.placement_strategy=STRICT_SPREAD",
           "scaling.placement_wait_s=120", "scaling.timeout_s=30", "train.max_steps=60", "train.warmup_steps=5",
           # when_behind=wait: a checkpoint every 5 steps waits for Ray's controller (one report a second), which
           # paces the 43 steps of epoch 0 over several seconds, so the node is lost mid-epoch, not after it
           "train.log_every=5", "checkpoint.every_steps=5", "checkpoint.when_behind=wait", "checkpoint.keep=2",
           "checkpoint.keep_by=recent",
           "checkpoint.max_failures=1", "checkpoint.storage_path=s3://kpp-runs/ray", "tracking.experiment=t-nodes",
           "tracking.registered_model="]
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **cluster.env}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(job.stdout), daemon=True)
    reader.start()
    try:
        # mid-epoch 0 (digits: 43 steps of 2 x 4 episodes x 4 images), after a checkpoint
        _wait_for(lambda: _complete_checkpoints(cluster, f"ray/{name}/") and _audited_steps(audit, 1) >= 8, 240,
                  "the first checkpoint and rank 1 past step 8")
        lost = cluster.services["node1"]
        os.kill(lost.raylet_pid(), 9)
        killed_at = _audited_steps(audit, 1)
        _wait_for(lambda: not lost.node_id(), 60, "the head to see node1 dead")
        # the driver restarts; its new group cannot be placed on one node (STRICT_SPREAD) and waits for one
        _wait_for(lambda: any("restarting from the last checkpoint" in line for line in log), 120,
                  "the driver's restart")
        time.sleep(12)  # longer than one placement attempt (10 s): the group waited, and was retried, for a node
        cluster.add_node(num_cpus=1, timeout_s=240)  # a node's start takes ~10 s, and minutes on a loaded machine
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        reader.join(timeout=10)
    out = "".join(log)
    (tmp_path / "job.log").write_text(out)
    assert job.returncode == 0, out[-4000:]
    assert "finished at step 60" in out, out[-3000:]

    # epoch 0 across the node loss, per (rank, step) the newest record (a replayed step overwrites its first
    # attempt): exactly the batches of an uninterrupted epoch, so every image of the epoch's plan once. The plan
    # (remainder="drop", pipeline.data.train_data.ShardStream) leaves out a tail of fewer than world x B x T + T
    # images, another one each epoch.
    from pipeline.data.shards.manifest import read_card
    from pipeline.data.train_data import ShardStream
    for k, v in cluster.client_env.items():
        monkeypatch.setenv(k, v)  # this process reads the shards on the S3 endpoint through the AWS_* variables
    straight = {}
    for rank in (0, 1):
        stream = ShardStream(shards, 4, 4, 0, rank, 2)
        for step, batch in enumerate(stream.batches(stream.start(0)), 1):
            straight[(rank, step)] = sorted(int(k) for k in batch.keys.reshape(-1) if k >= 0)
            if batch.last:
                break
    kept = {key: sorted(keys) for key, keys in key_audit.trained_keys(audit, epoch=0).items()}
    assert kept == straight
    delivered = sorted(k for keys in kept.values() for k in keys)
    n_train = read_card(shards).num_images["train"]
    assert len(delivered) == len(set(delivered)) and n_train - len(delivered) < 2 * 4 * 4 + 4, (len(delivered), n_train)
    assert killed_at < max(s for _, s in straight), f"the node was lost after epoch 0 ended (step {killed_at})"
    # the replayed steps (after the restored checkpoint) saw the same images as before the loss
    files = key_audit.read(audit)
    assert sum(1 for r, _ in files if r == 1) == 2, sorted(files)  # rank 1: before the loss, after it
    first, second = ({line["step"]: line["keys"] for line in lines} for (r, _), lines in files.items() if r == 1)
    replayed = sorted(set(first) & set(second))
    assert all(first[s] == second[s] for s in replayed), replayed

    # one MLflow run, its log steps monotone and each once, resumed from a checkpoint before the loss
    client = MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("t-nodes")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`kpp.job` = '{name}'")
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resume/from_step")]
    assert len(resumed) == 1 and 5 <= resumed[0] <= killed_at and resumed[0] % 5 == 0, (resumed, killed_at)
    assert assert_monotone(client, run.info.run_id, "train/loss") == list(range(5, 61, 5))
