"""Submitting jobs through the real Ray Jobs API of the local stack (infra/local_stack.py): a Ray head with the
dashboard, an MLflow server and an S3 endpoint, each a real process on 127.0.0.1, started and stopped here.

The stack's head is a second Ray cluster beside the test session's own (every port picked free), with 2 logical
CPUs; the training job asks for fractional CPUs per worker as on this 2-core machine everywhere (stack notes §3).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from infra.local_stack import LocalStack

# these tests start Ray clusters, a local stack or jobs of their own (tests/conftest.py: make test-unit skips them)
pytestmark = pytest.mark.services

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "jobs/configs/local.yaml", "train.max_steps=20", "train.warmup_steps=2", "eval.every_steps=10",
        "checkpoint.every_steps=10", "train.log_every=10", "data.valid_episodes=8", "data.test_episodes=8",
        "eval.iwae_samples=4"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    st = LocalStack(tmp_path_factory.mktemp("stack"), num_cpus=2).up()
    yield st
    st.down()


def submit(stack: LocalStack, *entrypoint: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m jobs.submit -- <entrypoint>` as a user runs it after `source outputs/stack/env`."""
    env = {**os.environ, **stack.env}
    return subprocess.run([sys.executable, "-m", "jobs.submit", "--", *entrypoint], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- bad input: refused on the submitting machine, before anything is uploaded -----------------------------------
def test_relative_storage_refused_before_upload(stack):
    r = submit(stack, "python", "-m", "jobs.train", *TINY, "data.shards=s3://kpp-data/digits",
               "checkpoint.storage_path=outputs/ray")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "checkpoint.storage_path: 'outputs/ray' is not durable storage" in r.stderr
    assert "submitted" not in r.stdout  # nothing reached the Jobs API
    r = submit(stack, "python", "-m", "jobs.prepare", "--dataset", "digits", "--out", "outputs/shards/x")
    assert r.returncode == 2 and "--out: 'outputs/shards/x' is not durable storage" in r.stderr


def test_unreachable_address_is_named(stack, tmp_path):
    from pipeline.net import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--address", dead, "--", "python", "-m", "jobs.train",
                        *TINY, "checkpoint.storage_path=s3://kpp-runs/ray"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and f"no Ray Jobs API answers at {dead}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--address", "127.0.0.1:6379", "--", "python", "-m",
                        "jobs.train"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'127.0.0.1:6379' is not the Jobs API" in r.stderr


def test_gpus_a_fixed_cluster_lacks_are_refused(stack):
    r = submit(stack, "python", "-m", "jobs.train", *TINY, "scaling.use_gpu=true", "scaling.num_workers=2",
               "checkpoint.storage_path=s3://kpp-runs/ray")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "need 2 GPUs, the cluster has 0" in r.stderr and "no autoscaler" in r.stderr


def test_bad_config_refused_before_upload(stack):
    r = submit(stack, "python", "-m", "jobs.train", *TINY, "train.lr=fast", "checkpoint.storage_path=s3://kpp-runs/r")
    assert r.returncode == 2 and "train.lr" in r.stderr, r.stderr


def test_driver_refuses_relative_storage_inside_a_job(stack):
    """Submitted around jobs.submit (plain Jobs API): the driver itself refuses, naming the field and the copy."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    import pathlib

    from pipeline.cluster.submission import RUNTIME_ENV, runtime_env
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    job = client.submit_job(entrypoint="python -m jobs.train " + " ".join(TINY) + " checkpoint.storage_path=runs",
                            runtime_env=runtime_env(pathlib.Path(ROOT), RUNTIME_ENV))
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.FAILED
    assert "checkpoint.storage_path: 'runs' is not durable storage" in logs
    assert "runtime_resources" in logs  # it names the temporary copy the path would have landed in


def test_a_sweep_with_local_storage_is_refused_before_upload(stack):
    r = submit(stack, "python", "-m", "jobs.tune", "--config", "jobs/configs/tune_cpu.yaml")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "checkpoint.storage_path: 'outputs/ray' is not durable storage" in r.stderr \
        or "data.shards: 'outputs/shards/digits' is not durable storage" in r.stderr, r.stderr
    r = submit(stack, "python", "-m", "jobs.tune", "--config", "jobs/configs/tune_cpu.yaml", "num_trials=0")
    assert r.returncode == 2 and "num_trials: must be >= 1" in r.stderr


# -- the real thing: prepare, then train, through the Jobs API; then the stack goes away completely --------------
def test_prepare_then_train_through_the_jobs_api(stack):
    import boto3
    from mlflow import MlflowClient

    r = submit(stack, "python", "-m", "jobs.prepare", "--dataset", "digits", "--out", "s3://kpp-data/digits",
               "--episode-length", "8", "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    # the project's runtime env sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, which the driver also wants: no conflict
    submitted_at = time.time()
    r = submit(stack, "python", "-m", "jobs.train", *TINY, "name=submitted", "data.shards=s3://kpp-data/digits",
               "checkpoint.storage_path=s3://kpp-runs/ray")
    followed_s = time.time() - submitted_at
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "Failed to merge the Job's runtime env" not in r.stdout
    assert "finished at step 20" in r.stdout and "SUCCEEDED (exit 0)" in r.stdout
    assert r.stdout.count("first step done") == 1, r.stdout[-3000:]  # a worker's line once (RAY_ENV's print patch)

    env = stack.env
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("kpp").experiment_id],
                              filter_string="attributes.run_name = 'submitted'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.metrics["test/neg_elbo"] > 0
    # submit -> first step, from jobs.submit's stamp in the job's metadata: the upload, the driver's start, the
    # worker group, data and model set-up, one step; within the time this test followed the job
    assert run.data.tags["perf.first_step_from"] == "submit"
    assert 0 < run.data.metrics["perf/start_to_first_step_s"] < followed_s
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kpp-runs", Prefix="ray/submitted/").get("Contents", [])]
    assert any(k.startswith("ray/submitted/checkpoint_000000020/") for k in keys), keys
    # nothing of the run is left in the job's temporary working-dir copy: the grid is named by its MLflow URI
    assert f"sample grid runs:/{run.info.run_id}/samples/final.png" in r.stdout

    started = stack.pids()
    assert started
    stack.down()
    time.sleep(0.5)
    alive = [p for p in started if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]
    assert not alive, f"processes of the stack left after down: {alive}"
