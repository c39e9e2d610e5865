"""What the driver does differently as a submitted job's entrypoint (pipeline.job_env). The Jobs API end
to end is in test_submit.py; here each rule on its own, with the job environment Ray's job supervisor sets."""
from __future__ import annotations

import json
import os

import pytest

from pipeline import job_env
from pipeline.train import config


def as_job(monkeypatch, runtime_env: dict) -> None:
    """The variable Ray's job supervisor gives a submitted entrypoint (job_supervisor._get_driver_env_vars)."""
    monkeypatch.setenv(job_env.JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_outside_a_job_every_wanted_variable_is_set(monkeypatch):
    monkeypatch.delenv(job_env.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert job_env.driver_env_vars({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}) == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # an operator's value wins over the default
    assert job_env.driver_env_vars({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}) == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def test_a_job_keeps_what_its_runtime_env_set(monkeypatch):
    as_job(monkeypatch, {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}, "working_dir": "x"})
    assert job_env.driver_env_vars({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "OTHER": "1"}) == {"OTHER": "1"}


def test_the_merge_ray_does_accepts_what_the_driver_asks_for(monkeypatch):
    """Ray's own merge of the job's and the driver's runtime env (what failed before): no conflict now."""
    from ray.runtime_env.runtime_env import _merge_runtime_env
    job = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}}
    as_job(monkeypatch, job)
    ours = {"env_vars": job_env.driver_env_vars({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"})}
    assert _merge_runtime_env(job, ours) is not None
    assert _merge_runtime_env(job, {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}}) is None  # the bug


def cfg(**fields) -> config.JobConfig:
    return config.load(None, [f"{k}={v}" for k, v in fields.items()])


def test_durable_storage_is_checked_only_in_a_job(monkeypatch, tmp_path):
    monkeypatch.delenv(job_env.JOB_CONFIG_ENV, raising=False)
    job_env.check_durable_storage(cfg(**{"checkpoint.storage_path": "outputs/ray"}))  # a laptop run: fine
    as_job(monkeypatch, {"working_dir": "gcs://_ray_pkg_x.zip"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(config.ConfigError, match="checkpoint.storage_path: 'outputs/ray' is not durable"):
        job_env.check_durable_storage(cfg(**{"checkpoint.storage_path": "outputs/ray"}))
    with pytest.raises(config.ConfigError, match="data.shards: 'shards' is not durable"):
        job_env.check_durable_storage(cfg(**{"checkpoint.storage_path": "s3://b/r", "data.shards": "shards"}))
    job_env.check_durable_storage(cfg(**{"checkpoint.storage_path": "s3://b/r", "data.shards": str(tmp_path)}))


def test_the_tracking_store_must_outlive_the_job(monkeypatch, tmp_path):
    as_job(monkeypatch, {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good = {"checkpoint.storage_path": "s3://b/r"}
    with pytest.raises(config.ConfigError, match="tracking.uri: a submitted job has no MLFLOW_TRACKING_URI"):
        job_env.check_durable_storage(cfg(**good))
    with pytest.raises(config.ConfigError, match="tracking.uri: 'mlflow.db' is not durable"):
        job_env.check_durable_storage(cfg(**good, **{"tracking.uri": "sqlite:///mlflow.db"}))
    job_env.check_durable_storage(cfg(**good, **{"tracking.uri": f"sqlite:///{tmp_path}/m.db"}))
    job_env.check_durable_storage(cfg(**good, **{"tracking.enabled": "false"}))


def test_an_absolute_path_inside_the_temporary_copy_is_refused(monkeypatch, tmp_path):
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    as_job(monkeypatch, {"working_dir": "gcs://_ray_pkg_1.zip"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(config.ConfigError, match="the job runs in its temporary copy"):
        job_env.check_durable_storage(cfg(**{"checkpoint.storage_path": str(copy / "ray")}))
    job_env.check_durable_storage(cfg(**{"checkpoint.storage_path": str(tmp_path / "shared")}))
    assert os.getcwd() == str(copy)


def test_the_job_clock_starts_at_submission_when_jobs_submit_stamped_it(monkeypatch):
    import time

    monkeypatch.delenv(job_env.JOB_CONFIG_ENV, raising=False)
    start, origin = job_env.job_start()
    assert origin == "driver process start" and time.time() - 3600 < start <= time.time()
    monkeypatch.setenv(job_env.JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {
        job_env.SUBMITTED_AT_KEY: "1700000000.5", "job_submission_id": "raysubmit_x"}}))
    assert job_env.job_start() == (1700000000.5, "submit")
    # a plain `ray job submit` (no stamp) or a stamp that is not a number: the driver's own start
    monkeypatch.setenv(job_env.JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {
        job_env.SUBMITTED_AT_KEY: "yesterday"}}))
    assert job_env.job_start() == (start, "driver process start")
