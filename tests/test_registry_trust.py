"""What the registry says must be true: "the same test episodes" means the same images, and a champion is never
chosen on a race. Real prepared data (the bundled digits), a real MLflow server (tests/fixtures/mlflow_server.py).
"""
from __future__ import annotations

import subprocess
import sys
import pathlib

import pytest
import torch

from pipeline.registry import promotion
from pipeline.train import config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "prepared"
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "digits", "--out", str(out),
                    "--episode-length", "4", "--no-progress"], check=True, cwd=REPO, capture_output=True, timeout=300)
    return str(out)


def _fingerprint(*overrides: str) -> str:
    cfg = config.load(None, ["model.episode_length=4", "data.test_episodes=8", *overrides])
    return promotion.episodes_fingerprint(cfg, "manifest-hash-of-the-data")


def test_class_test_episodes_of_two_seeds_are_other_images_and_fingerprint_apart(digits_shards):
    from pipeline.data.train_data import shard_eval_episodes
    # the images themselves: class episodes are drawn from the label index with the job's seed
    a, b = (shard_eval_episodes(digits_shards, "test", 4, 8, "class", seed) for seed in (0, 1))
    assert not torch.equal(a, b)
    shards = f"data.shards={digits_shards}"
    assert _fingerprint(shards, "data.episodes=class", "seed=0") != _fingerprint(shards, "data.episodes=class", "seed=1")
    # i.i.d. test episodes of prepared data are stored by jobs.prepare: the same images whatever the job's seed
    r0, r1 = (shard_eval_episodes(digits_shards, "test", 4, 8, "random", seed) for seed in (0, 1))
    assert torch.equal(r0, r1)
    assert _fingerprint(shards, "seed=0") == _fingerprint(shards, "seed=1")
    # a raw source's episodes depend on the seed in both modes
    assert _fingerprint("seed=0") != _fingerprint("seed=1")


def _versions(client, name: str, bounds: dict[str, float]) -> dict[str, str]:
    """A registered model with one version per entry, tagged with its test bound (the chain bound, which the
    champion rule compares by default) on the same episodes."""
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"{name}-runs")).info.run_id
    out = {}
    for label, bound in bounds.items():
        v = client.create_model_version(name, f"runs:/{run}/model", run).version
        for k, val in {promotion.bound_tag(promotion.DEFAULT_METRIC): f"{bound:.6f}",
                       promotion.EPISODES_TAG: "same-episodes", promotion.UNIT_TAG: "nats/image"}.items():
            client.set_model_version_tag(name, v, k, val)
        out[label] = str(v)
    return out


def test_two_promotions_at_once_leave_the_better_version_champion(mlflow_uri):
    """Both candidates beat the champion C, and both read C before either moves the alias (their bounds are
    recomputed at the same time: jobs.promote --data); the worse one finishes last. Without the lock, each compares
    with C and the last writer, the worse, holds the alias."""
    import threading

    from mlflow import MlflowClient
    client = MlflowClient(mlflow_uri)
    bounds = {"C": 3.0, "better": 1.0, "worse": 2.0}
    v = _versions(client, "kpp-race", bounds)
    assert promotion.promote(mlflow_uri, "kpp-race", v["C"]).promoted
    label_of = {ver: label for label, ver in v.items()}
    both_read = threading.Barrier(2)
    better_done = threading.Event()

    def measurer(label):
        calls = []

        def measure(champion_version):
            calls.append(champion_version)
            if len(calls) == 1:
                both_read.wait(timeout=30)  # both have read the same champion
                if label == "worse":
                    better_done.wait(timeout=30)  # and the worse one moves the alias last
            return bounds[label], bounds[label_of[champion_version]], "the same episodes"
        return measure, calls

    results, measures = {}, {label: measurer(label) for label in ("better", "worse")}

    def run(label):
        results[label] = promotion.promote(mlflow_uri, "kpp-race", v[label], measure=measures[label][0])
        if label == "better":
            better_done.set()

    threads = [threading.Thread(target=run, args=(label,)) for label in ("better", "worse")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert client.get_model_version_by_alias("kpp-race", "champion").version == v["better"]
    assert results["better"].promoted and not results["worse"].promoted
    # the worse one was measured again, against the version that had become champion meanwhile
    assert measures["worse"][1] == [v["C"], v["better"]]
    assert "does not beat champion version " + v["better"] in results["worse"].reason
    assert "kpp-race" + promotion.LOCK_SUFFIX not in {m.name for m in client.search_registered_models()}


def test_many_promotions_at_once_end_with_the_best_champion(mlflow_uri):
    """Six registered versions promoted from six threads at once (tag bounds): whatever the order, the best holds
    the alias, and the lock is gone."""
    import concurrent.futures

    from mlflow import MlflowClient
    client = MlflowClient(mlflow_uri)
    bounds = {f"v{i}": b for i, b in enumerate([5.0, 4.0, 6.0, 1.5, 3.0, 2.0])}
    v = _versions(client, "kpp-crowd", bounds)
    with concurrent.futures.ThreadPoolExecutor(len(v)) as pool:
        decisions = list(pool.map(lambda ver: promotion.promote(mlflow_uri, "kpp-crowd", ver), v.values()))
    assert client.get_model_version_by_alias("kpp-crowd", "champion").version == v["v3"], decisions
    assert sum(d.promoted for d in decisions) >= 1
    assert "kpp-crowd" + promotion.LOCK_SUFFIX not in {m.name for m in client.search_registered_models()}


def test_a_crashed_holders_lock_is_taken_over_after_its_ttl(mlflow_uri):
    from mlflow import MlflowClient
    client = MlflowClient(mlflow_uri)
    import time
    v = _versions(client, "kpp-stale", {"a": 1.0})
    # the lock's age is the registry's creation time (its tags are written after it: not to be trusted)
    client.create_registered_model("kpp-stale" + promotion.LOCK_SUFFIX, tags={"holder": "gone:1"})
    time.sleep(1.5)
    with promotion.promotion_lock(client, "kpp-stale", ttl_s=1.0):  # a holder dead for longer than the TTL
        assert client.get_registered_model("kpp-stale" + promotion.LOCK_SUFFIX).tags["holder"] != "gone:1"
    assert promotion.promote(mlflow_uri, "kpp-stale", v["a"]).promoted
    client.create_registered_model("kpp-stale" + promotion.LOCK_SUFFIX, tags={"holder": "alive:2"})
    with pytest.raises(TimeoutError, match="held by alive:2"):
        with promotion.promotion_lock(client, "kpp-stale", wait_s=1):
            pass


def test_a_job_resumed_on_other_data_is_refused_before_ray(ray_cluster, shared_data, tmp_path):
    """Trained on MNIST, halted with a checkpoint; the same job name on Fashion-MNIST (same image counts and shape:
    the data plan alone cannot tell them apart) exits 2 naming both, before Ray is asked for anything."""
    import os
    import time

    from pipeline.cluster import driver
    from tests.fixtures.ray_cluster import AUTH_OFF
    from tests.test_train_ray import SMALL_RUN, TINY_MODEL
    common = [*TINY_MODEL, *SMALL_RUN, "name=other-data", "train.max_steps=20", "train.halt_at_step=2",
              "checkpoint.every_steps=2", f"checkpoint.storage_path={tmp_path}", "tracking.enabled=false"]
    out = driver.run(config.load(None, [*common, "data.dataset=mnist", f"data.source={shared_data / 'mnist'}"]))
    assert out.step == 2 and driver.has_checkpoint(config.load(None, common))
    before = sorted(p.name for p in (tmp_path / "other-data").iterdir())
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "jobs.train", *common, "data.dataset=fashion_mnist",
                        f"data.source={shared_data / 'fashion_mnist'}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1", **AUTH_OFF})  # no Ray there
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.dataset: job 'other-data' has checkpoints trained on dataset mnist" in r.stderr, r.stderr
    assert "this run asks for dataset fashion_mnist" in r.stderr and time.monotonic() - t0 < 60
    assert sorted(p.name for p in (tmp_path / "other-data").iterdir()) == before  # nothing written or removed


def test_a_claim_whose_clock_runs_behind_is_still_refused(mlflow_uri, monkeypatch):
    """The race seen under load, made deterministic: MLflow's client stamps a run's start_time before its request
    reaches the server, so a driver that claims second can carry the earlier stamp. Deciding by start_time, both
    drivers won (two runs, two trainings); under the claim lock the second finds the first's run and is refused."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import client as tracking_client

    from pipeline.registry import tracking
    first, _ = tracking.open_job_run(mlflow_uri, "t-skew", "skewed", {"seed": 0}, {}, "")
    monkeypatch.setattr(tracking_client, "get_current_time_millis", lambda: 1_000)  # an hour-old stamp
    client = MlflowClient(mlflow_uri)
    exp_id = client.get_experiment_by_name("t-skew").experiment_id
    with pytest.raises(tracking.TrackingError, match=f"claimed a moment ago by another driver \\(MLflow run {first}"):
        tracking._claim(client, exp_id, "t-skew", "skewed")  # what the second of two simultaneous drivers calls
    (run,) = client.search_runs([exp_id], filter_string="tags.`kpp.job` = 'skewed'")
    assert run.info.run_id == first


def test_a_double_submit_leaves_one_run_and_refuses_the_second_driver(mlflow_uri):
    """Four drivers of one job name open its run at the same moment (a double, here quadruple, submit): one run
    is left, one driver goes on, the others are refused naming the run that holds the name."""
    import threading

    from mlflow import MlflowClient

    from pipeline.registry import tracking
    start = threading.Barrier(4)
    outcomes: list = []

    def driver():
        start.wait(timeout=30)
        try:
            outcomes.append(tracking.open_job_run(mlflow_uri, "t-double", "twice", {"seed": 0}, {}, "seed: 0\n"))
        except Exception as e:  # noqa: BLE001 - every outcome is asserted below
            outcomes.append(e)

    threads = [threading.Thread(target=driver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("t-double")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`kpp.job` = 'twice'")
    started = [o for o in outcomes if isinstance(o, tuple)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    # one driver created the run; any driver that looked after it reopens it, as a re-run does
    assert len(started) + len(refused) == 4 and {rid for rid, _ in started} == {run.info.run_id}, outcomes
    assert sum(not resumed for _, resumed in started) == 1, outcomes
    assert all(f"name: job 'twice' was claimed a moment ago by another driver (MLflow run {run.info.run_id}"
               in str(e) for e in refused), [str(e) for e in refused]
    # the claim lock is gone once the claims are decided
    assert not [m.name for m in client.search_registered_models() if m.name.startswith("kpp-job-claim.")]
    # a later re-run of the job reopens that run, and its provenance is kept per attempt
    again, resumed = tracking.open_job_run(mlflow_uri, "t-double", "twice", {"seed": 0}, {"git.commit": "abc"}, "")
    assert again == run.info.run_id and resumed
    tags = client.get_run(again).data.tags
    attempts = {k.split(".")[2]: v for k, v in tags.items() if k.startswith("kpp.attempt.") and k.endswith(".git.commit")}
    assert attempts[max(attempts, key=int)] == "abc" and "kpp.attempt.1.started_unix" in tags, tags


def test_a_job_killed_during_its_first_upload_restarts_in_a_fresh_run(tmp_path):
    """A checkpoint folder without its marker (or with a state file cut short) is not a resume point: the re-run
    trains from step 0, so it must get a fresh run; the old run's metric floor would drop its first steps."""
    import json

    from pipeline.cluster import driver
    from pipeline.train.checkpointing import MARKER, STATE
    cfg = config.load(None, ["name=cut", f"checkpoint.storage_path={tmp_path}", "tracking.enabled=false"])
    folder = tmp_path / "cut" / "checkpoint_000000010"
    folder.mkdir(parents=True)
    (folder / STATE).write_bytes(b"x" * 100)
    assert driver.has_checkpoint(cfg) and not driver.has_complete_checkpoint(cfg)  # the upload stopped before the marker
    (folder / MARKER).write_text(json.dumps({"bytes": 1000, "sha256": "0" * 64}))
    assert not driver.has_complete_checkpoint(cfg)  # the state file is cut short
    (folder / MARKER).write_text(json.dumps({"bytes": 100, "sha256": "0" * 64}))
    assert driver.has_complete_checkpoint(cfg)
