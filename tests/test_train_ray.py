"""The training job on a real local Ray cluster (2 CPU workers, gloo), real binarized-MNIST shards on a real S3
endpoint (moto server), a real MLflow server: learning, checkpoints, a killed worker, stop + re-run, exact resume.

Runs are a few dozen steps of a small model; the figures asserted are stated where they are checked.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.fs
import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from pipeline.train import checkpointing
from pipeline.train import config
from pipeline.cluster import driver
from tests.fixtures.ray_cluster import AUTH_OFF
from tests.model_helpers import tiny_model_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = tiny_model_overrides()
SMALL_RUN = ["data.batch_episodes=4", "data.valid_episodes=16", "data.test_episodes=16", "eval.iwae_samples=4",
             "scaling.num_workers=2", "scaling.cpus_per_worker=0.49", "train.warmup_steps=5", "train.log_every=5"]


@pytest.fixture(scope="module")
def mnist_shards(s3, shared_data):
    """Real binarized MNIST (50k/10k/10k) prepared as shards into a fresh bucket (T=4 fixed eval episodes)."""
    url = s3.new_bucket("bmnist") + "/prepared"
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "binarized_mnist", "--source",
                    str(shared_data / "binarized_mnist"), "--out", url, "--episode-length", "4", "--no-progress"],
                   check=True, cwd=REPO, env={**os.environ, **s3.env}, timeout=300)
    return url


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The driver (this process) reads the manifest and checkpoints through the AWS_* variables."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def job(*overrides):
    return config.load(None, [*TINY_MODEL, *SMALL_RUN, *overrides])


def runs_of(uri, experiment, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`kpp.job` = '{name}'") if exp else []


def assert_monotone(client, run_id, key):
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), f"{key} steps {steps}"
    return steps


def test_short_run_learns_checkpoints_on_s3_and_registers(ray_cluster, mlflow_uri, mnist_shards, s3_env):
    bucket = s3_env.new_bucket("runs")
    cfg = job("name=short", f"data.shards={mnist_shards}", "train.max_steps=30", "checkpoint.every_steps=10",
              "checkpoint.keep=1", "checkpoint.keep_by=recent", f"checkpoint.storage_path={bucket}/ray",
              f"checkpoint.s3_endpoint_url={s3_env.endpoint_url}", f"tracking.uri={mlflow_uri}",
              "tracking.experiment=t-train", "tracking.registered_model=kpp-t", "tracking.alias=candidate")
    out = driver.run(cfg)
    assert out.finished and out.step == 30 and not out.resumed

    # checkpoints on S3: complete (marker + matching state), the latest kept; keep=1 removed the older ones
    path, fs = driver.storage(cfg)
    names = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/short"))
                   if i.base_name.startswith("checkpoint_0"))
    assert names == ["checkpoint_000000030"], names
    with tempfile.TemporaryDirectory() as d:
        pyarrow.fs.copy_files(f"{path}/short/{names[0]}", d, source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        payload = checkpointing.load(d)
    cursor = payload["cursor"]
    assert payload["step"] == 30 and (cursor["epoch"], cursor["batches_seen"], cursor["world_size"]) == (0, 30, 2)

    # one MLflow run with the metrics, artifacts and the registered model
    (run,) = runs_of(mlflow_uri, "t-train", "short")
    client = MlflowClient(mlflow_uri)
    valid = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "valid/neg_elbo")}
    # measured: 539.5 nats at step 0 -> 365.7 at step 30 on this tiny model; require a clear drop
    assert valid[30] < valid[0] - 50, valid
    assert assert_monotone(client, run.info.run_id, "train/loss") == [5, 10, 15, 20, 25, 30]
    for key in ("train/recon", "train/kl_z", "train/kl_y", "train/lr", "train/grad_norm", "perf/episodes_per_s",
                "valid/chain_neg_elbo", "test/chain_neg_elbo", "test/chain_iwae", "test/neg_elbo", "test/iwae",
                "test/loo_neg_elbo", "test/swap_gap"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert out.metrics["test/iwae"] <= out.metrics["test/neg_elbo"] + 1e-3
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    tags = run.data.tags
    assert tags["config.hash"] == driver.resolved(cfg).hash() and len(tags["git.commit"]) == 40
    # MLflow's own source tags, which the UI shows as Source and Version
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"]
    assert tags["data.manifest_hash"] != "none" and tags["version.torch"] == torch.__version__
    # called as a library: the start-to-first-step clock starts at the driver.run call
    assert tags["perf.first_step_from"] == "driver.run call" and run.data.metrics["perf/start_to_first_step_s"] > 0
    assert run.data.params["train.max_steps"] == "30"
    assert run.data.params["model.latent.dim"] == "8"  # overridden
    from kpp.config import KanervaConfig  # kpp's default, resolved before logging
    assert run.data.params["model.keys.num_reads"] == str(KanervaConfig().keys.num_reads)
    arts = {a.path for folder in ("samples", "config", "curves")
            for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"samples/final.png", "config/resolved.yaml", "curves/loss.png", "curves/chain_curve.json",
            "curves/chain_curve.png"} <= arts
    assert pathlib.Path(out.grid).is_file()
    # registered under the prefix and the dataset, tagged with its test bound, champion as the name's first version
    assert out.model_name == "kpp-t-binarized_mnist"
    mv = client.get_model_version_by_alias("kpp-t-binarized_mnist", "candidate")
    assert mv.version == out.model_version and mv.run_id == run.info.run_id
    for bound in ("chain_neg_elbo", "loo_neg_elbo", "neg_elbo"):
        assert float(mv.tags[f"test.{bound}"]) == pytest.approx(out.metrics[f"test/{bound}"], abs=1e-5), bound
    assert mv.tags["dataset"] == "binarized_mnist" and out.champion.promoted


def _descends_from_me(pid):
    """True when this test process is an ancestor of pid (Ray's raylet, and so its workers, are our children):
    the machine may run other sessions' Ray workers, which must never be touched."""
    me = os.getpid()
    while pid > 1:
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state is the parent pid
        if pid == me:
            return True
    return False


def _worker_pids():
    pids = []
    for p in pathlib.Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"RayTrainWorker" in (p / "cmdline").read_bytes() and _descends_from_me(int(p.name)):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def test_killed_worker_restores_from_last_complete_checkpoint(ray_cluster, mlflow_uri, mnist_shards, s3_env, tmp_path):
    # when_behind=wait: every checkpoint is kept (10 steps here come faster than Ray's controller takes reports,
    # and skipping would leave an older one than step 70 beside the last), so the kept set is known
    cfg = job("name=kill", f"data.shards={mnist_shards}", "train.max_steps=80", "checkpoint.every_steps=10",
              f"checkpoint.storage_path={tmp_path}", "checkpoint.max_failures=1", "checkpoint.keep=2",
              "checkpoint.keep_by=recent", "checkpoint.when_behind=wait", f"tracking.uri={mlflow_uri}",
              "tracking.experiment=t-kill", "tracking.registered_model=")
    thread, result = _run_in_background(cfg)
    _wait_for(lambda: checkpointing.latest_complete(tmp_path / "kill"), 120, "the first checkpoint")
    pids = _wait_for(_worker_pids, 10, "training worker processes")
    assert len(pids) == 2, pids  # exactly this job's two workers
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "out" in result, repr(result.get("error"))
    out = result["out"]
    assert out.finished and out.step == 80
    # storage holds exactly what the keep policy holds (the 2 most recent), also the checkpoint that was complete
    # on storage when the worker died but that Ray's controller had not registered yet (measured: step 10)
    left = sorted(p.name for p in (tmp_path / "kill").glob("checkpoint_0*"))
    assert left == ["checkpoint_000000070", "checkpoint_000000080"], left

    (run,) = runs_of(mlflow_uri, "t-kill", "kill")
    client = MlflowClient(mlflow_uri)
    resumed = client.get_metric_history(run.info.run_id, "resume/from_step")
    assert len(resumed) == 1 and 10 <= resumed[0].value < 80 and resumed[0].value % 10 == 0
    steps = assert_monotone(client, run.info.run_id, "train/loss")
    assert steps == list(range(5, 81, 5))  # every log step once, none replayed twice
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def _run_in_background(cfg):
    """driver.run(cfg) in a thread; the result dict gets "out" (the Outcome) or "error"."""
    result = {}

    def target():
        try:
            result["out"] = driver.run(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the caller's assertion
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _final_weights(storage, name):
    folder = checkpointing.latest_complete(storage / name)
    return checkpointing.load(folder)


class RecordReports(ray.train.UserCallback):
    """Appends rank 0's metrics of every report to a file (the callback runs in the Train controller actor)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0], default=str) + "\n")


def test_halt_and_resume_equals_straight_run(ray_cluster, tmp_path):
    # digits: 43 batches per epoch, so the resumed half crosses an epoch boundary (new order, cursor roll-over)
    common = ["data.dataset=digits", "train.max_steps=60", "checkpoint.every_steps=10",
              f"checkpoint.storage_path={tmp_path}", "tracking.enabled=false"]
    straight = driver.run(job("name=straight", *common))
    half = driver.run(job("name=split", *common, "train.halt_at_step=30"))
    assert not half.finished and half.step == 30
    rest = driver.run(job("name=split", *common))
    assert rest.finished and rest.step == 60 and rest.resumed
    a, b = _final_weights(tmp_path, "straight"), _final_weights(tmp_path, "split")
    assert a["step"] == b["step"] == 60 and a["cursor"] == b["cursor"]
    assert (a["cursor"]["epoch"], a["cursor"]["batches_seen"]) == (1, 17)
    # seeded CPU gloo: measured bit-identical; allow float round-off all the same
    assert rest.metrics["train/loss"] == pytest.approx(straight.metrics["train/loss"], rel=1e-6, abs=1e-6)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7)
    # the same command once more, on a run already at its last checkpoint (as a sweep trial whose driver was killed
    # between that checkpoint and its report): nothing is trained, the last step's result comes back with its bounds
    # (Tune's TuneReportCallback sees it the same way: as the reports reaching a Train callback on the controller)
    seen = tmp_path / "reports.jsonl"
    again = driver.run(job("name=split", *common), driver.RunOptions(callbacks=(RecordReports(str(seen)),)))
    assert again.finished and again.step == 60
    (report,) = [json.loads(line) for line in seen.read_text().splitlines()]
    assert report["step"] == 60 and report["resumed_from_step"] == 60
    assert report["test/neg_elbo"] == rest.metrics["test/neg_elbo"]


def test_stopped_job_rerun_with_the_same_command_resumes(ray_cluster, mlflow_uri, tmp_path):
    cmd = [sys.executable, "-m", "jobs.train", *TINY_MODEL, *SMALL_RUN, "name=rerun", "data.dataset=digits",
           "train.max_steps=100", "checkpoint.every_steps=10", f"checkpoint.storage_path={tmp_path}",
           f"tracking.uri={mlflow_uri}", "tracking.experiment=t-rerun", "tracking.registered_model="]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, **AUTH_OFF}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: checkpointing.latest_complete(tmp_path / "rerun"), 120, "the first checkpoint")
    finally:
        first.kill()  # the job is stopped hard: the driver dies, Ray tears its workers down
        first.wait(timeout=30)
    stopped_at = checkpointing.verify(checkpointing.latest_complete(tmp_path / "rerun"))["step"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished at step 100 (resumed)" in done.stdout, done.stdout[-2000:]
    (run,) = runs_of(mlflow_uri, "t-rerun", "rerun")  # still one run
    client = MlflowClient(mlflow_uri)
    resumed = client.get_metric_history(run.info.run_id, "resume/from_step")
    assert [m.value for m in resumed] and resumed[-1].value >= stopped_at > 0
    assert_monotone(client, run.info.run_id, "train/loss")


# -- bad input: a clear error before training starts --------------------------------------------------------------
def test_bad_storage_data_and_tracking_fail_before_training(s3_env, mnist_shards, tmp_path):
    from pipeline.registry.tracking import TrackingError
    from tests.fixtures.mlflow_server import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["checkpoint.storage_path=s3://kpp-nowhere/ray", f"checkpoint.s3_endpoint_url={dead}"],
         config.ConfigError, "checkpoint.storage_path: s3://kpp-nowhere is unreachable"),
        (["checkpoint.storage_path=s3://kpp-no-such-bucket/ray", f"checkpoint.s3_endpoint_url={s3_env.endpoint_url}"],
         config.ConfigError, "checkpoint.storage_path: bucket s3://kpp-no-such-bucket does not exist"),
        ([f"data.shards={tmp_path}/not-prepared"], config.ConfigError, "data.shards: no usable prepared dataset"),
        ([f"data.shards={mnist_shards}", "model.episode_length=8"], config.ConfigError, "model.episode_length: 8"),
        ([f"tracking.uri={dead}"], TrackingError, "tracking.uri: MLflow server at .* is unreachable"),
    ]
    for overrides, error, message in cases:
        cfg = job("name=bad", f"checkpoint.storage_path={tmp_path}/ray", *overrides)
        t0 = time.monotonic()
        with pytest.raises(error, match=message):
            driver.run(cfg)
        assert time.monotonic() - t0 < 60, overrides


def test_more_gpus_than_the_cluster_has(ray_cluster, mlflow_uri, tmp_path):
    cfg = job("name=gpus", "data.dataset=digits", "scaling.use_gpu=true", f"checkpoint.storage_path={tmp_path}",
              f"tracking.uri={mlflow_uri}", "tracking.experiment=t-gpus")
    with pytest.raises(config.ConfigError,
                       match="scaling.num_workers: 2 workers with scaling.use_gpu=true need 2 GPUs, the cluster has 0"):
        driver.run(cfg)
    assert runs_of(mlflow_uri, "t-gpus", "gpus") == []  # nothing was started, not even the MLflow run


def test_a_group_with_no_place_is_refused_before_training_or_fails_after_placement_wait_s(ray_cluster, tmp_path,
                                                                                         monkeypatch):
    from pipeline.cluster.failures import PlacementTimeout
    cfg = job("name=noplace", "data.dataset=digits", "scaling.placement_strategy=STRICT_SPREAD",
              "scaling.placement_wait_s=6", f"checkpoint.storage_path={tmp_path}", "tracking.enabled=false")
    # one node, two workers that each need a node of their own: refused before a worker group is asked for
    with pytest.raises(config.ConfigError, match="STRICT_SPREAD puts each of the 2 workers on a node of its own, "
                                                 "and 1 of the cluster's 1 live node"):
        driver.run(cfg)
    # the same group asked for after a restart (a node lost since): Ray's controller would retry its placement
    # forever; bounded by placement_wait_s, in attempts of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    loop_config = {"job": cfg.to_dict(), "tracking_uri": "", "run_id": "", "started_unix": time.time(),
                   "storage": (pyarrow.fs.LocalFileSystem(), f"{tmp_path}/noplace")}
    t0 = time.monotonic()
    with pytest.raises(PlacementTimeout, match=r"scaling.placement_wait_s: the worker group \(2 x \{'CPU': 0.49\}, "
                                               r"scaling.placement_strategy=STRICT_SPREAD\) found no place in 2 "
                                               r"attempt\(s\) of 3 s"):
        driver.fit(cfg, loop_config, driver.RunOptions(progress=False))
    assert time.monotonic() - t0 < 60


def test_cli_rejects_bad_input_without_starting_ray(tmp_path):
    for args, field in [(["train.lr=0"], "train.lr"), ([f"data.shards={tmp_path}/none"], "data.shards")]:
        p = subprocess.run([sys.executable, "-m", "jobs.train", *args, f"checkpoint.storage_path={tmp_path}/ray",
                            "tracking.enabled=false"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert p.returncode == 2 and f"jobs.train: invalid config: {field}" in p.stderr or \
            (p.returncode == 2 and f"jobs.train: {field}" in p.stderr), p.stderr[-2000:]
        assert "Started a local Ray instance" not in p.stderr + p.stdout


def test_training_rides_out_a_10s_s3_outage_and_a_10s_mlflow_outage(ray_cluster, restartable_s3, restartable_mlflow,
                                                                     monkeypatch):
    """Both real services are stopped and started again mid-run: the job finishes, unresumed, no metric lost."""
    import threading

    import boto3
    endpoint, s3_server = restartable_s3
    for k, v in endpoint.env.items():
        monkeypatch.setenv(k, v)
    bucket = endpoint.new_bucket("outage")
    cfg = job("name=outage", "data.dataset=digits", "train.max_steps=160", "checkpoint.every_steps=20",
              "checkpoint.keep=2", "checkpoint.keep_by=recent", f"checkpoint.storage_path={bucket}/ray",
              f"checkpoint.s3_endpoint_url={endpoint.endpoint_url}", f"tracking.uri={restartable_mlflow.url}",
              "tracking.experiment=t-outage", "tracking.registered_model=")
    events: list[str] = []

    def outages() -> None:
        s3 = boto3.client("s3", endpoint_url=endpoint.endpoint_url, aws_access_key_id=endpoint.key,
                          aws_secret_access_key=endpoint.secret, region_name=endpoint.region)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # training is under way once its first checkpoint is on S3
            if s3.list_objects_v2(Bucket=bucket[5:], Prefix="ray/outage/checkpoint_").get("KeyCount"):
                break
            time.sleep(0.2)
        s3_server.stop(); events.append("s3 down"); time.sleep(10)
        s3_server.start(); events.append("s3 up")
        restartable_mlflow.stop(); events.append("mlflow down"); time.sleep(10)
        restartable_mlflow.start(); events.append("mlflow up")

    thread = threading.Thread(target=outages, daemon=True)
    thread.start()
    try:
        out = driver.run(cfg)
    finally:  # a failed run must not leave the thread to restart the servers after the fixtures stopped them
        thread.join(timeout=120)
    assert events == ["s3 down", "s3 up", "mlflow down", "mlflow up"]
    assert out.finished and out.step == 160 and not out.resumed
    client = MlflowClient(restartable_mlflow.url)
    steps = sorted({m.step for m in client.get_metric_history(out.run_id, "train/loss")})
    assert steps == list(range(5, 161, 5)), steps  # every log_every step, none lost to the outages
    assert client.get_run(out.run_id).info.status == "FINISHED"
    path, fs = driver.storage(cfg)
    assert checkpointing.fetch_latest_complete(fs, f"{path}/outage", "/tmp/kpp-outage-check").name.endswith("160")


@pytest.mark.slow
def test_two_workers_train_through_a_tracking_outage_longer_than_the_collective_timeout(ray_cluster,
                                                                                        restartable_mlflow, tmp_path):
    """The tracking server is down for 45 s, over twice scaling.timeout_s (20 s; 300 s by default against the
    minutes a restarting server or a partition takes): both ranks keep training through it (steps are logged
    while it is down), the job neither fails nor restarts, and every metric reaches the server afterwards."""
    cfg = job("name=long-outage", "data.dataset=digits", "train.max_steps=600", "checkpoint.every_steps=20",
              "checkpoint.keep=2", "checkpoint.keep_by=recent", f"checkpoint.storage_path={tmp_path}",
              "scaling.timeout_s=20", "checkpoint.max_failures=0", f"tracking.uri={restartable_mlflow.url}",
              "tracking.experiment=t-long-outage", "tracking.registered_model=", "tracking.images_every_steps=100")
    window: dict[str, float] = {}

    def outage() -> None:
        _wait_for(lambda: checkpointing.latest_complete(tmp_path / "long-outage"), 300, "the first checkpoint")
        restartable_mlflow.stop()
        window["down"] = time.time()
        time.sleep(45)
        window["up"] = time.time()
        restartable_mlflow.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        out = driver.run(cfg)
    finally:  # a failed run must not leave the thread to restart the server after the fixture stopped it
        thread.join(timeout=120)
    assert set(window) == {"down", "up"}, "the outage never happened: training ended before its first checkpoint"
    assert out.finished and out.step == 600 and not out.resumed
    client = MlflowClient(restartable_mlflow.url)
    history = client.get_metric_history(out.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(5, 601, 5))  # none lost, none twice
    during = [m.step for m in history if window["down"] * 1000 < m.timestamp < window["up"] * 1000]
    assert len(during) >= 5, (during, window)  # logged (on the workers' clock) while the server was down
    assert client.get_run(out.run_id).info.status == "FINISHED"
    assert len(runs_of(restartable_mlflow.url, "t-long-outage", "long-outage")) == 1


def test_a_hung_worker_fails_the_group_after_the_collective_timeout_and_the_job_recovers(ray_cluster, tmp_path):
    """A peer that stops answering (SIGSTOP: alive, silent, like a wedged GPU or a paused VM) must not stall the
    job forever: the others' collective times out after scaling.timeout_s, Ray restarts the group from the last
    complete checkpoint, and the job finishes."""
    cfg = job("name=hung", "data.dataset=digits", "train.max_steps=80", "checkpoint.every_steps=10",
              f"checkpoint.storage_path={tmp_path}", "checkpoint.max_failures=2", "checkpoint.keep_by=recent",
              "scaling.timeout_s=15", "tracking.enabled=false")
    thread, result = _run_in_background(cfg)
    _wait_for(lambda: checkpointing.latest_complete(tmp_path / "hung"), 120, "the first checkpoint")
    pids = _wait_for(_worker_pids, 10, "training worker processes")
    assert len(pids) == 2, pids
    stopped = time.monotonic()
    os.kill(pids[-1], signal.SIGSTOP)
    try:
        thread.join(timeout=240)
    finally:
        try:
            os.kill(pids[-1], signal.SIGCONT)  # let Ray reap it if it has not
        except ProcessLookupError:
            pass
    assert not thread.is_alive(), "the job hung on a stopped peer"
    assert "out" in result, repr(result.get("error"))
    out = result["out"]
    assert out.finished and out.step == 80 and out.resumed
    assert time.monotonic() - stopped < 240
