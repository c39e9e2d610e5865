"""Sweeps (jobs.tune): bad sweeps refused before anything starts; a real sweep on the session's Ray cluster and
MLflow server, killed mid-way and resumed with the same command; champion promotion both ways."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import numpy as np
import yaml

from pipeline.train.config import ConfigError
from pipeline.tune import space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = {"train.max_steps": 30, "train.warmup_steps": 2, "train.log_every": 5, "eval.every_steps": 5,
              "checkpoint.every_steps": 10, "data.valid_episodes": 8, "data.test_episodes": 8, "eval.iwae_samples": 4,
              "scaling.num_workers": 1}


def sweep_yaml(tmp_path, **fields) -> str:
    doc = {"name": "s", "train": {"config": "jobs/configs/local.yaml", "overrides": dict(TINY_TRAIN)},
           "search": {"train.lr": {"grid": [3e-3, 1e-7]}, "model.memory.channels": {"grid": [32, 48]}},
           "num_trials": 4, "algorithm": "random", "asha": {"grace_steps": 10, "reduction_factor": 2},
           "max_concurrent_trials": 1}
    for k, v in fields.items():
        doc[k] = v
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# -- bad input: named, before Ray is imported ------------------------------------------------------------------
BAD = [
    ({"search": {"train.nosuch": {"choice": [1]}}}, "search.train.nosuch: the training config has no field"),
    ({"search": {"train.lr": {"choice": []}}}, "search.train.lr.choice: needs a non-empty list"),
    ({"search": {"train.lr": {"uniform": [0.1, 0.01]}}}, "search.train.lr.uniform: low 0.1 > high 0.01"),
    ({"search": {"train.lr": {"loguniform": [0.0, 0.01]}}}, "search.train.lr.loguniform: low must be > 0"),
    ({"search": {"model.memory.channels": {"choice": [32, "many"]}}},
     "search.model.memory.channels: value 'many' is not accepted"),
    ({"search": {"train.lr": {"between": [1, 2]}}}, "search.train.lr: expected one of"),
    ({"metric": "test/neg_elbo"}, "metric: 'test/neg_elbo' is not reported by the training loop; one of "
                                  "valid_chain_neg_elbo, valid_neg_elbo, train/loss"),
    ({"num_trials": 3}, "num_trials: 3 is not a multiple of the grid's 4 points"),
    ({"asha": {"grace_steps": 30}}, "asha.grace_steps: 30 must be < train.max_steps"),
    ({"search": {}}, "search: empty"),
]


def test_a_metric_the_loop_does_not_report_is_refused_listing_the_reported_ones(tmp_path):
    """MLflow's name of the chain bound (valid/chain_neg_elbo) is not what the loop reports to Tune: refused before
    Ray, with every metric that is reported (tests/test_train_loop.py checks the loop reports each of them)."""
    with pytest.raises(ConfigError) as e:
        space.load(sweep_yaml(tmp_path, metric="valid/chain_neg_elbo"), [], root=pathlib.Path(ROOT))
    assert str(e.value).startswith("metric: 'valid/chain_neg_elbo' is not reported by the training loop; one of ")
    assert all(m in str(e.value) for m in space.REPORTED_METRICS), str(e.value)


def test_sweeps_select_by_the_validation_chain_bound_by_default(tmp_path):
    """A sweep that names no metric, ASHA and the searcher included, and every shipped sweep, optimise the chain
    bound (a proper bound): not the memory-conditional one, which a memory that copies each image lowers. The
    shipped search spaces leave the code memory's settings alone (what the memory-conditional bound allows)."""
    from pipeline.tune.sweep import search_algorithm
    doc = yaml.safe_load(pathlib.Path(sweep_yaml(tmp_path, algorithm="optuna",
                                                 search={"train.lr": {"loguniform": [1e-4, 1e-2]}})).read_text())
    assert "metric" not in doc
    sweep = space.load(sweep_yaml(tmp_path, algorithm="optuna", search={"train.lr": {"loguniform": [1e-4, 1e-2]}}),
                       [], root=pathlib.Path(ROOT))
    assert sweep.cfg.metric == space.DEFAULT_METRIC == "valid_chain_neg_elbo" and sweep.cfg.mode == "min"
    assert space.REPORTED_METRICS["valid_chain_neg_elbo"] == "min"
    assert search_algorithm(sweep, 1).metric == "valid_chain_neg_elbo"  # TPE; ASHA gets it from TuneConfig
    for path in sorted(pathlib.Path(ROOT, "jobs/configs").glob("tune_*.yaml")):
        shipped = space.load(str(path), [], root=pathlib.Path(ROOT))
        assert shipped.cfg.metric == "valid_chain_neg_elbo", path.name
        assert not set(shipped.domains) & {"model.memory.content", "model.memory.write_span", "model.keys.layout",
                                           "model.keys.image_shift_gain"}, path.name


def test_a_grace_period_before_the_warm_up_ends_is_warned_about(tmp_path):
    """ASHA judging the map memory's settings before any trial can use its memory (issue 23): said, not refused.
    The code memory (the default) is used from the first steps: no warning."""
    import warnings
    train = {**TINY_TRAIN, "model.objective.kl_warmup_steps": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("error", space.EarlyJudgement)
        space.load(sweep_yaml(tmp_path, train={"config": "jobs/configs/local.yaml", "overrides": train}), [],
                   root=pathlib.Path(ROOT))
    train = {**train, "model.memory.content": "map"}
    with pytest.warns(space.EarlyJudgement, match=r"asha.grace_steps: 10 is before the KL warm-up ends at step 20"):
        space.load(sweep_yaml(tmp_path, train={"config": "jobs/configs/local.yaml", "overrides": train}), [],
                   root=pathlib.Path(ROOT))
    with warnings.catch_warnings():
        warnings.simplefilter("error", space.EarlyJudgement)
        space.load(sweep_yaml(tmp_path, train={"config": "jobs/configs/local.yaml",
                                               "overrides": {**train, "model.objective.kl_warmup_steps": 10}}), [],
                   root=pathlib.Path(ROOT))


@pytest.mark.parametrize("fields,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_sweeps_are_named(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=None) as e:
        space.load(sweep_yaml(tmp_path, **fields), [], root=pathlib.Path(ROOT))
    assert message in str(e.value)


def test_cli_refuses_a_bad_sweep_before_ray(tmp_path):
    code = ("import sys\nfrom jobs import tune\nrc = tune.main(sys.argv[1:])\n"
            "print('ray imported' if 'ray' in sys.modules else 'ray never imported')\nsys.exit(rc)\n")
    bad = sweep_yaml(tmp_path, search={"train.lr": {"loguniform": [-1, 1]}})
    r = subprocess.run([sys.executable, "-c", code, "--config", bad], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "search.train.lr.loguniform: low must be > 0" in r.stderr, r.stderr
    assert "ray never imported" in r.stdout


def test_more_concurrent_trials_than_the_cluster_holds(tmp_path):
    from pipeline.tune.sweep import concurrent_trials
    sweep = space.load(sweep_yaml(tmp_path, max_concurrent_trials=5), [], root=pathlib.Path(ROOT))
    with pytest.raises(ConfigError, match=r"max_concurrent_trials: 5 trials at once .* the cluster holds 2 \(CPU 1, GPU 0\)"):
        concurrent_trials(sweep, {"CPU": 1.0})
    auto = space.load(sweep_yaml(tmp_path, max_concurrent_trials=0), [], root=pathlib.Path(ROOT))
    assert concurrent_trials(auto, {"CPU": 2.0}) == 4  # each trial: 1 worker x 0.49 CPU (+ 0.001)
    gpu = space.load(sweep_yaml(tmp_path), ["train.overrides.scaling.use_gpu=true"], root=pathlib.Path(ROOT))
    with pytest.raises(ConfigError, match=r"one trial needs 1 workers x 0.49 CPUs and 1 GPU each"):
        concurrent_trials(gpu, {"CPU": 16.0, "GPU": 0.0})


def test_a_quarter_gpu_per_trial_packs_four_trials_on_one_gpu():
    from pipeline.tune.sweep import concurrent_trials
    sweep = space.load(os.path.join(ROOT, "jobs/configs/tune_gpu_packed.yaml"), [], root=pathlib.Path(ROOT))
    s = sweep.base.scaling
    assert (s.use_gpu, s.num_workers, s.gpus_per_worker) == (True, 1, 0.25)
    assert concurrent_trials(sweep, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert concurrent_trials(sweep, {"CPU": 64.0, "GPU": 2.0}) == 4  # as asked, though 8 would fit
    # 4 trials of 0.3 GPU do not fit one GPU: refused before any trial starts, naming the field
    tight = space.load(os.path.join(ROOT, "jobs/configs/tune_gpu_packed.yaml"),
                       ["train.overrides.scaling.gpus_per_worker=0.3"], root=pathlib.Path(ROOT))
    with pytest.raises(ConfigError, match=r"max_concurrent_trials: 4 trials at once need .* and 1.2 GPUs; the "
                                          r"cluster holds 3 \(CPU 16, GPU 1\)"):
        concurrent_trials(tight, {"CPU": 16.0, "GPU": 1.0})


GPU_FRACTIONS_BAD = [
    (["scaling.use_gpu=true", "scaling.num_workers=1", "scaling.gpus_per_worker=1.5"],
     "scaling.gpus_per_worker: must be a fraction in (0, 1] or a whole number"),
    (["scaling.use_gpu=true", "scaling.num_workers=1", "scaling.gpus_per_worker=0"],
     "scaling.gpus_per_worker: must be a fraction in (0, 1]"),
    (["scaling.gpus_per_worker=0.5"], "scaling.gpus_per_worker: is set but scaling.use_gpu=false"),
    (["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.5"],
     "scaling.gpus_per_worker: a fraction of a GPU per worker needs scaling.num_workers=1"),
]


@pytest.mark.parametrize("overrides,message", GPU_FRACTIONS_BAD, ids=[m[:60] for _, m in GPU_FRACTIONS_BAD])
def test_gpu_fractions_that_cannot_be_placed_are_named(overrides, message):
    from pipeline.train import config
    with pytest.raises(ConfigError) as e:
        config.load(os.path.join(ROOT, "jobs/configs/local.yaml"), overrides)
    assert message in str(e.value)


def test_a_grid_sweep_runs_no_more_trials_at_once_than_asked(ray_cluster, tmp_path):
    """max_concurrent_trials holds for the random/grid generator: Tune applies the limit only to a Searcher and
    ignored it for the generator passed in, so this 4-point grid asked to run 1 at a time ran all 4 at once."""
    from ray import tune

    from pipeline.tune.sweep import param_space, search_algorithm
    sweep = space.load(sweep_yaml(tmp_path, max_concurrent_trials=1), [], root=pathlib.Path(ROOT))
    assert sweep.grid_size == 4

    def trial(config):
        t0 = time.time()
        time.sleep(1.0)
        tune.report({"t0": t0, "t1": time.time()})

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.001}), param_space=param_space(sweep),
                       tune_config=tune.TuneConfig(search_alg=search_algorithm(sweep, 1), num_samples=1),
                       run_config=tune.RunConfig(name="limit", storage_path=str(tmp_path / "tune"), verbose=0))
    spans = sorted((r.metrics["t0"], r.metrics["t1"]) for r in tuner.fit())
    assert len(spans) == 4
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


@pytest.mark.slow
def test_four_trials_run_at_once_on_fractional_cpus(ray_cluster, mlflow_server, digits_shards, tmp_path):
    """The packing mechanism on CPU: 4 trials of one worker with 0.24 CPUs each on the 2-CPU cluster run side by
    side (their MLflow runs overlap in time), where whole CPUs would allow 2 at most."""
    from mlflow import MlflowClient
    overrides = {**TINY_TRAIN, "data.shards": digits_shards, "checkpoint.storage_path": str(tmp_path / "runs"),
                 "tracking.uri": mlflow_server, "tracking.experiment": "packed", "scaling.cpus_per_worker": 0.24,
                 "train.max_steps": 300, "eval.every_steps": 150, "checkpoint.every_steps": 150}
    # register_best off: the session's MLflow server is shared, and the resume test below owns `kpp-digits`
    path = sweep_yaml(tmp_path, name="packed", max_concurrent_trials=4, asha={"grace_steps": 299},
                      register_best=False, train={"config": "jobs/configs/local.yaml", "overrides": overrides})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "jobs.tune", "--config", path], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name("packed").experiment_id
    trials = client.search_runs([exp_id], filter_string="tags.`kpp.trial_id` != ''")
    assert len(trials) == 4
    # every trial's job started (its MLflow run opened) and trained (its first logged step) before any trial's
    # training ended: the four ran at once. Ray starts worker processes two at a time here, so their first steps
    # come apart: 12 s unloaded, 42 s beside a CPU-bound process and 51 s beside two (measured), where 100 steps
    # took the first trial 34 s and 200 steps 51 s (it failed there by 21 ms); 300 steps leave room for that
    spans = []
    for t in trials:
        steps = client.get_metric_history(t.info.run_id, "train/loss")
        spans.append((t.info.start_time, min(m.timestamp for m in steps), max(m.timestamp for m in steps)))
    first_end = min(end for _, _, end in spans)
    assert max(opened for opened, _, _ in spans) < first_end, spans
    assert max(trained for _, trained, _ in spans) < first_end, spans


def test_asha_rungs_survive_a_restored_sweep(tmp_path):
    """A scheduler rebuilt from the experiment's folder (as after the sweep's driver died) judges the next trial
    against the rung records taken before, where Tune's own ASHA would start with empty rungs and let it go on."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from pipeline.tune.asha import ResumableASHA
    kw = dict(time_attr="step", max_t=31, grace_period=10, reduction_factor=2)

    def feed(scheduler, trial_id, value):
        trial = SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        return scheduler.on_trial_result(None, trial, {"step": 10, "valid_chain_neg_elbo": value})

    first = ResumableASHA(str(tmp_path / "exp"), **kw)
    first.set_search_properties("valid_chain_neg_elbo", "min")
    assert feed(first, "t1", 100.0) == TrialScheduler.CONTINUE
    assert feed(first, "t2", 200.0) == TrialScheduler.STOP
    restored = ResumableASHA(str(tmp_path / "exp"), **kw)
    restored.set_search_properties("valid_chain_neg_elbo", "min")
    assert feed(restored, "t3", 300.0) == TrialScheduler.STOP
    assert restored.rung_records()[0]["10"] == {"t1": -100.0, "t2": -200.0, "t3": -300.0}
    plain = ASHAScheduler(**kw)  # what the restored sweep had before: an empty rung lets t3 go on
    plain.set_search_properties("valid_chain_neg_elbo", "min")
    assert feed(plain, "t3", 300.0) == TrialScheduler.CONTINUE


# -- the real sweep ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "shards"
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--dataset", "digits", "--out", str(out),
                    "--episode-length", "8", "--no-progress"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return str(out)


def _children(client, exp_id: str, parent: str):
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.slow
def test_sweep_killed_midway_resumes_and_registers_the_best(ray_cluster, mlflow_server, digits_shards, tmp_path):
    from mlflow import MlflowClient
    # two trials at once: when the driver is killed after the first one finished, the other is mid-run
    overrides = {**TINY_TRAIN, "data.shards": digits_shards, "checkpoint.storage_path": str(tmp_path / "runs"),
                 "tracking.uri": mlflow_server, "tracking.experiment": "sweeps", "scaling.cpus_per_worker": 0.5}
    path = sweep_yaml(tmp_path, name="resume", max_concurrent_trials=2,
                      train={"config": "jobs/configs/local.yaml", "overrides": overrides})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    client = MlflowClient(mlflow_server)
    cmd = [sys.executable, "-m", "jobs.tune", "--config", path]

    # 1. start, and kill the driver (SIGKILL, no clean-up) once the first trial has finished
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, finished_first = time.monotonic() + 400, None
    while time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("sweeps")
        if exp:
            done = client.search_runs([exp.experiment_id], filter_string="tags.`kpp.trial.outcome` = 'finished'")
            if done:
                finished_first = done[0]
                break
        time.sleep(1)
    assert finished_first is not None, (tmp_path / "first.log").read_text()[-4000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first_id = finished_first.data.tags["kpp.trial_id"]
    steps_before = [m.step for m in client.get_metric_history(finished_first.info.run_id, "train/loss")]

    # 1b. the command with an edited sweep: Tune would restore the stored one and ignore the edit; refused before
    # Ray with the difference, the stored sweep left as it was (step 2 resumes it)
    stored = sorted(p.name for p in (tmp_path / "runs" / "resume").iterdir())
    edited = subprocess.run([*cmd, "num_trials=8"], cwd=ROOT, env={**env, "RAY_ADDRESS": "127.0.0.1:1"},
                            capture_output=True, text=True, timeout=120)  # no Ray there: asking it would fail
    assert edited.returncode == 2, edited.stdout[-3000:] + edited.stderr[-3000:]
    assert "name: sweep 'resume' is stored at" in edited.stderr and "-  num_trials: 4" in edited.stderr \
        and "+  num_trials: 8" in edited.stderr, edited.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "resume").iterdir()) == stored

    # 2. the same command again: the sweep is restored, the finished trial is not run again
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "second.log").write_text(r.stdout + r.stderr)  # kept for a failure's post-mortem
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert "resuming the sweep stored at" in r.stdout
    # Ray forwards worker log lines to the driver's stdout asynchronously: one can land after the JSON line
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith('{"parent_run_id"')][-1])
    assert out["resumed"] is True
    assert [m.step for m in client.get_metric_history(finished_first.info.run_id, "train/loss")] == steps_before

    # 3. one parent run, four tagged children: finished ones FINISHED, ASHA-stopped ones KILLED
    exp_id = client.get_experiment_by_name("sweeps").experiment_id
    parents = client.search_runs([exp_id], filter_string="tags.`kpp.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == out["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    # a trial killed before its first complete checkpoint restarts from step 0 in a fresh run: its first run stays
    # under the parent, KILLED and retired (its trial tag moved aside), so each trial has one run that is its own
    every_child = _children(client, exp_id, out["parent_run_id"])
    children = [c for c in every_child if "kpp.trial_id" in c.data.tags]
    retired = [c for c in every_child if "kpp.trial_id" not in c.data.tags]
    assert len(children) == 4 and len({c.data.tags["kpp.trial_id"] for c in children}) == 4
    assert sum(c.data.tags["kpp.trial_id"] == first_id for c in children) == 1
    assert all(c.info.status == "KILLED" and c.data.tags.get("kpp.trial_id.retired") in
               {t.data.tags["kpp.trial_id"] for t in children} for c in retired), [c.data.tags for c in retired]
    outcomes = {c.data.tags["kpp.trial_id"]: (c.data.tags.get("kpp.trial.outcome"), c.info.status) for c in children}
    assert all(o in {("finished", "FINISHED"), ("stopped_by_asha", "KILLED")} for o in outcomes.values()), outcomes
    # which trials ASHA stops depends on the order they ran in, and that on timing (the kill, the restore); what
    # is guaranteed is that its rungs survived the restart and every decision follows from them: replayed in the
    # order they were recorded, a trial is stopped iff its reward is below the rung's median of the ones before it
    from pipeline.tune.asha import STATE_NAME
    rungs = json.loads((tmp_path / "runs" / "resume" / STATE_NAME).read_text())[0]
    stopped, judged = set(), set()
    for recorded in rungs.values():
        before = []
        for trial_id, reward in recorded.items():  # JSON keeps the order of recording
            if before and reward < np.nanpercentile(before, 50):
                stopped.add(trial_id)
            before.append(reward)
            judged.add(trial_id)
    assert judged == set(outcomes), (rungs, outcomes)  # every trial judged, those before the kill included
    # a stop decided on a result Tune handled after the trial had already ended cannot stop it: stopped trials
    # are a subset of the replayed stops, and every trial the replay lets go on finished
    assert {t for t, (o, _) in outcomes.items() if o == "stopped_by_asha"} <= stopped, (rungs, outcomes)
    assert all(outcomes[t][0] == "finished" for t in set(outcomes) - stopped), (rungs, outcomes)
    # each trial's start-to-first-step clock starts with the trial, not with the sweep's driver
    assert {c.data.tags["perf.first_step_from"] for c in children} == {"trial start"}
    # MLflow's source column names the command the user ran, on the parent and on every trial
    assert parents[0].data.tags["mlflow.source.name"] == "jobs.tune"
    assert {c.data.tags["mlflow.source.name"] for c in children} == {"jobs.tune"}
    assert all(c.data.metrics["perf/start_to_first_step_s"] > 0 for c in children)

    # 4. the parent's table and figures; the best finished trial registered once, under the dataset's name
    arts = {a.path for a in client.list_artifacts(out["parent_run_id"], "sweep")}
    assert {"sweep/results.parquet", "sweep/results.csv", "sweep/hyperparameters_vs_bound.png",
            "sweep/bound_curves.png"} <= arts
    import pandas as pd
    table = pd.read_parquet(client.download_artifacts(out["parent_run_id"], "sweep/results.parquet",
                                                       str(tmp_path)))
    assert len(table) == 4 and set(table["outcome"]) <= {"finished", "stopped_by_asha"}
    # sorted by the sweep's metric, the validation chain bound; the three test bounds side by side
    assert {"valid_chain_neg_elbo", "valid_neg_elbo", "test/chain_neg_elbo", "test/loo_neg_elbo",
            "test/neg_elbo"} <= set(table.columns)
    best = table[table["outcome"] == "finished"].sort_values("valid_chain_neg_elbo").iloc[0]
    assert out["best_trial"] == best["trial_id"] and out["model"] == "kpp-digits"
    versions = client.search_model_versions("name='kpp-digits'")
    assert len(versions) == 1, [(v.version, v.run_id, v.tags.get("sweep.parent_run_id")) for v in versions]
    tags = versions[0].tags
    assert tags["sweep.parent_run_id"] == out["parent_run_id"] and tags["dataset"] == "digits"
    assert f"MLflow run {versions[0].run_id}" in versions[0].description
    for bound in ("chain_neg_elbo", "loo_neg_elbo", "neg_elbo"):
        assert abs(float(tags[f"test.{bound}"]) - float(best[f"test/{bound}"])) < 1e-3, bound
    assert client.get_model_version_by_alias("kpp-digits", "champion").version == versions[0].version

    # 5. the same command once more, on a sweep that has ended: it is restored finished, nothing is trained and
    # the best trial's version is reused, not registered a second time
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    last = json.loads([line for line in again.stdout.splitlines() if line.startswith('{"parent_run_id"')][-1])
    assert last["best_trial"] == out["best_trial"] and last["version"] == versions[0].version
    assert len(client.search_model_versions("name='kpp-digits'")) == 1


def test_champion_moves_only_for_a_better_bound(mlflow_server, tmp_path):
    """Versions with measured bounds as their tags (what a sweep or jobs.train writes); promotion both ways."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.registry import promotion
    client = MlflowClient(mlflow_server)
    name = f"kpp-promotion-{int(time.time() * 1000)}"
    exp = client.get_experiment_by_name("promotion") or client.get_experiment(
        client.create_experiment("promotion"))
    run = client.create_run(exp.experiment_id)
    (tmp_path / "weights.txt").write_text("stand-in artifact: promotion reads tags only")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")
    client.create_registered_model(name)

    def version(bound: float, episodes: str = "fp1") -> str:
        v = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
        for k, val in {promotion.bound_tag("chain_neg_elbo"): f"{bound}", promotion.EPISODES_TAG: episodes,
                       promotion.UNIT_TAG: "nats/image"}.items():
            client.set_model_version_tag(name, v, k, val)
        return v

    v1 = version(100.0)
    d = promotion.promote(mlflow_server, name, v1)
    assert d.promoted and client.get_model_version_by_alias(name, "champion").version == v1
    v2 = version(101.5)  # worse: champion stays, both numbers on v2
    d = promotion.promote(mlflow_server, name, v2)
    assert not d.promoted and d.champion_bound == 100.0 and d.bound == 101.5
    assert client.get_model_version_by_alias(name, "champion").version == v1
    t = client.get_model_version(name, v2).tags
    assert t["champion.decision"] == "kept" and t["champion.bound_at_decision"] == "100.000000"
    assert "101.500 does not beat champion version" in t["champion.reason"]
    v3 = version(99.25)  # better: champion moves
    d = promotion.promote(mlflow_server, name, v3)
    assert d.promoted and client.get_model_version_by_alias(name, "champion").version == v3
    assert client.get_model_version(name, v3).tags["champion.decision"] == "promoted"
    v4 = version(50.0, episodes="fp-other")  # better number, other episodes: not comparable, not moved
    d = promotion.promote(mlflow_server, name, v4)
    assert not d.promoted and "other test episodes" in d.reason
    assert client.get_model_version_by_alias(name, "champion").version == v3
    mlflow.set_tracking_uri(None)


def test_the_champion_is_picked_by_the_chain_bound(mlflow_server, tmp_path, capsys):
    """A version whose memory-conditional bound is worse but whose chain bound is better becomes champion (the
    default rule); ranked by the memory-conditional bound (tracking.champion_metric=neg_elbo) it would not. A champion
    registered before the chain bound was measured has no such tag: not compared, the reason says so. A bound no run
    reports is refused, naming the ones it may be."""
    from mlflow import MlflowClient

    from jobs import promote
    from pipeline.registry import promotion
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("promotion") or client.get_experiment(
        client.create_experiment("promotion"))
    run = client.create_run(exp.experiment_id)
    (tmp_path / "weights.txt").write_text("stand-in artifact: promotion reads tags only")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")

    def registered(suffix: str, *bounds: dict[str, float], samples=("16", "16")) -> tuple[str, list[str]]:
        name = f"kpp-chain-{suffix}-{int(time.time() * 1000)}"
        client.create_registered_model(name)
        versions = []
        for b, s in zip(bounds, samples):
            v = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
            for k, val in {**{promotion.bound_tag(m): f"{x}" for m, x in b.items()}, promotion.EPISODES_TAG: "fp1",
                           promotion.UNIT_TAG: "nats/image", promotion.IWAE_SAMPLES_TAG: s}.items():
                client.set_model_version_tag(name, v, k, val)
            versions.append(str(v))
        return name, versions

    # the copy: a memory-conditional bound of 60 (each image read back from its own write), a chain bound of 140
    copy, honest = {"neg_elbo": 60.0, "chain_neg_elbo": 140.0}, {"neg_elbo": 80.0, "chain_neg_elbo": 95.0}
    name, (v1, v2) = registered("default", copy, honest)
    assert promotion.promote(mlflow_server, name, v1).promoted
    d = promotion.promote(mlflow_server, name, v2)
    assert d.promoted and d.metric == "chain_neg_elbo" and (d.bound, d.champion_bound) == (95.0, 140.0)
    assert "chain_neg_elbo 95.000 beats champion version" in d.reason
    assert client.get_model_version(name, v2).tags["champion.metric"] == "chain_neg_elbo"
    # the paper's bound, asked for: the copy stays champion
    name, (c1, c2) = registered("conditional", copy, honest)
    promotion.promote(mlflow_server, name, c1, metric="neg_elbo")
    d = promotion.promote(mlflow_server, name, c2, metric="neg_elbo")
    assert not d.promoted and (d.bound, d.champion_bound) == (80.0, 60.0)
    # a champion without the chain tag (registered before it was measured): not comparable, not promoted over
    name, (o1, o2) = registered("old", {"neg_elbo": 90.0}, honest)
    assert promotion.promote(mlflow_server, name, o1, metric="neg_elbo").promoted
    d = promotion.promote(mlflow_server, name, o2)
    assert not d.promoted and d.champion_bound is None
    assert f"champion (version {o1}) has no test.chain_neg_elbo tag (registered before the chain -ELBO" in d.reason
    assert "the bounds are not comparable; champion stays" in d.reason
    assert client.get_model_version_by_alias(name, "champion").version == o1
    # IWAE bounds of other sample counts: not comparable (a larger S alone gives a lower bound)
    name, (i1, i2) = registered("iwae", {"chain_iwae": 100.0}, {"chain_iwae": 90.0}, samples=("8", "32"))
    promotion.promote(mlflow_server, name, i1, metric="chain_iwae")
    d = promotion.promote(mlflow_server, name, i2, metric="chain_iwae")
    assert not d.promoted and "measured chain_iwae with S=8 importance samples, this version with S=32" in d.reason
    # a metric no run reports: refused, naming the bounds (jobs.promote: exit 2; jobs.train: tests/test_config.py)
    with pytest.raises(ValueError, match=r"tracking.champion_metric: 'swap_gap' is not a test bound a run reports; "
                                         r"one of chain_neg_elbo, chain_iwae, loo_neg_elbo, loo_iwae, neg_elbo, iwae"):
        promotion.promote(mlflow_server, name, o2, metric="swap_gap")
    assert promote.main(["--model", name, "--version", o2, "--metric", "swap_gap",
                         "--tracking-uri", mlflow_server]) == 2
    assert "--metric: 'swap_gap' is not a test bound a run reports; one of chain_neg_elbo" in capsys.readouterr().err


def test_trials_log_to_the_sweeps_store(tmp_path):
    """A trial runs in a working dir of its own: a relative or empty tracking URI must be fixed on the driver."""
    overrides = {**TINY_TRAIN, "tracking.uri": "sqlite:///outputs/sweeps.db"}
    sweep = space.load(sweep_yaml(tmp_path, train={"config": "jobs/configs/local.yaml", "overrides": overrides}), [],
                       root=pathlib.Path(ROOT))
    assert sweep.base.tracking.uri == f"sqlite:///{pathlib.Path(ROOT) / 'outputs' / 'sweeps.db'}"
    sweep.pin_tracking_uri("http://127.0.0.1:5000")
    trial = sweep.trial_config({"train.lr": 1e-3, "model.memory.channels": 48})
    assert trial.tracking.uri == "http://127.0.0.1:5000" and trial.model.memory.channels == 48
