"""A sweep: Ray Tune over trials that are each a Ray Train run of the training driver, tracked in MLflow.

The pattern is the one Ray 2.60 documents for Tune + Train V2: the Tuner's trainable is a function that builds
and fits a TorchTrainer (pipeline.cluster.driver.run) with Tune's TuneReportCallback, under a run name derived
from the trial. The trial function itself holds almost nothing (0.001 CPU); its worker group asks for its own
resources, so the number of trials at once is what the cluster holds of worker groups (max_concurrent_trials).

- ASHA stops trials on the metric the loop reports (time axis: the optimiser step): by default the validation
  chain bound, which a memory that copies each image to its own prior cannot lower (pipeline.tune.space).
- Optuna's TPE proposes the values (random search where asked, or where the space has a grid).
- MLflow: the sweep has one parent run; each trial's run is its child (mlflow.parentRunId). A trial never
  registers a model; the sweep registers its best finished trial and promotes it only if it beats the champion.
- A sweep whose driver died resumes with the same command: Tuner.restore from its storage path, finished trials
  are kept, unfinished ones continue from their last Train checkpoint.
"""
from __future__ import annotations

import json
import math
import pathlib
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pipeline.train.config import ConfigError
from pipeline.tune.space import Sweep

SWEEP_TAG = "kpp.sweep"
TRIAL_TAG = "kpp.trial_id"  # also one of tracking.NAMING_TAGS (a run retired at a restart from step 0 gives it up)
OUTCOME_TAG = "kpp.trial.outcome"


def trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


# -- one trial (runs inside Ray, in the trial's actor) ---------------------------------------------------------
def run_trial(values: dict[str, Any], *, base_raw: dict[str, Any], sweep_name: str, parent_run_id: str,
              source: str = "") -> None:
    """The Tune trainable: one training job with these values, reporting to Tune through TuneReportCallback.
    source: the sweep driver's entry point (mlflow.source.name); in the trial's actor __main__ is Ray's worker."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.cluster import driver
    from pipeline.tune.space import with_values
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(base_raw, {**values, "name": trial_name(sweep_name, trial_id)})
    tags = {SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id,
            "kpp.trial.values": json.dumps(values, sort_keys=True, default=str)}
    if source:
        tags["mlflow.source.name"] = source
    driver.run(cfg, driver.RunOptions(callbacks=(TuneReportCallback(),), tags=tags, parent_run_id=parent_run_id,
                                      register=False, progress=False, close_run=False,
                                      started=(time.time(), "trial start")))


# -- capacity --------------------------------------------------------------------------------------------------
def concurrent_trials(sweep: Sweep, resources: dict[str, float]) -> int:
    """How many trials run at once: as asked, or as many worker groups as the cluster holds; ConfigError naming
    the number when the cluster cannot hold what is asked (Ray would wait forever)."""
    s = sweep.base.scaling
    per_trial_cpu = s.num_workers * s.cpus_per_worker + 0.001  # + the trial function's own reservation
    per_trial_gpu = s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0
    fits = math.floor(resources.get("CPU", 0) / per_trial_cpu + 1e-9)
    if s.use_gpu:  # fractional GPUs pack several trials on one GPU (scaling.gpus_per_worker)
        fits = min(fits, math.floor(resources.get("GPU", 0) / per_trial_gpu + 1e-9))
    if fits < 1:
        raise ConfigError(f"scaling: one trial needs {s.num_workers} workers x {s.cpus_per_worker} CPUs"
                          f"{f' and {s.gpus_per_worker:g} GPU each' if s.use_gpu else ''}; the cluster has "
                          f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs")
    asked = sweep.cfg.max_concurrent_trials
    if asked > fits:
        raise ConfigError(f"max_concurrent_trials: {asked} trials at once need {asked} x {per_trial_cpu:g} CPUs"
                          f"{f' and {asked * per_trial_gpu:g} GPUs' if s.use_gpu else ''}; the cluster holds "
                          f"{fits} (CPU {resources.get('CPU', 0):g}, GPU {resources.get('GPU', 0):g})")
    return min(asked or fits, sweep.cfg.num_trials)


# -- the Tuner -------------------------------------------------------------------------------------------------
def param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune
    make = {"choice": tune.choice, "grid": tune.grid_search,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1]))}
    return {field: make[kind](arg) for field, (kind, arg) in sweep.domains.items()}


def search_algorithm(sweep: Sweep, max_concurrent: int):
    """Optuna TPE, or Tune's random/grid generator (also for a space with a grid, which TPE cannot take).

    The generator is given the trial limit itself: Tune applies TuneConfig.max_concurrent_trials only to a Searcher
    (it wraps TPE in a ConcurrencyLimiter) and ignores it, with a log warning, for a generator passed in, so a grid
    sweep asked to run one trial at a time ran all of them at once."""
    if sweep.cfg.algorithm == "optuna" and not sweep.has_grid:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
        # TPE samples at random until n_startup_trials have finished (Optuna's default 10): in a small sweep that
        # would be all of it, so half the trials explore and the rest follow the model
        startup = max(2, min(10, sweep.cfg.num_trials // 2))
        return OptunaSearch(metric=sweep.cfg.metric, mode=sweep.cfg.mode,
                            sampler=optuna.samplers.TPESampler(seed=sweep.cfg.seed, n_startup_trials=startup))
    from ray.tune.search import BasicVariantGenerator
    return BasicVariantGenerator(random_state=sweep.cfg.seed, max_concurrent=max_concurrent)


def scheduler(sweep: Sweep, setup: "TunerSetup"):
    """ASHA on the optimiser step, its rung records kept in the experiment's folder (pipeline.tune.asha)."""
    from pipeline.tune.asha import ResumableASHA
    # max_t one past the last step: a trial that reaches its last step ends by itself (its final test bounds are
    # reported with it) instead of being stopped by ASHA at the same moment
    return ResumableASHA(setup.path, setup.filesystem, time_attr="step", max_t=sweep.base.train.max_steps + 1,
                         grace_period=sweep.cfg.asha.grace_steps, reduction_factor=sweep.cfg.asha.reduction_factor)


def make_close_trial_runs_callback(uri: str):
    """A Tune callback on the sweep's driver that closes each trial's MLflow run when Tune is done with it.

    A trial ASHA stops is ended by Tune from outside, so the run its driver opened would stay RUNNING (stack notes
    §3); here it is marked KILLED with the reason, a finished trial FINISHED, a failed one FAILED."""
    from ray.tune import Callback

    class CloseTrialRuns(Callback):
        def _close(self, trial, outcome: str, status: str) -> None:
            from mlflow import MlflowClient
            try:
                client = MlflowClient(uri)
                for run in client.search_runs(
                        [e.experiment_id for e in client.search_experiments()],
                        filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}'"):
                    client.set_tag(run.info.run_id, OUTCOME_TAG, outcome)
                    client.set_terminated(run.info.run_id, status)
            except Exception as e:  # noqa: BLE001 - bookkeeping must not fail the sweep; the report names it
                print(f"[tune] could not close the MLflow run of trial {trial.trial_id}: {e}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            finished = "test/neg_elbo" in (trial.last_result or {})
            self._close(trial, "finished" if finished else "stopped_by_asha", "FINISHED" if finished else "KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "failed", "FAILED")

    return CloseTrialRuns()


@dataclass
class TunerSetup:
    root: str  # the storage path the Tuner writes under (RunConfig.storage_path)
    path: str  # the experiment's folder in it (Tuner.restore takes it)
    filesystem: Any  # retried pyarrow filesystem, or None for local paths

    def can_restore(self) -> bool:
        from ray import tune
        return tune.Tuner.can_restore(self.path, storage_filesystem=self.filesystem)


def tuner_storage(sweep: Sweep) -> TunerSetup:
    from pipeline.cluster.driver import storage
    from pipeline.cluster.retrying_fs import retrying
    path, fs = storage(sweep.base)
    return TunerSetup(root=path, path=f"{path}/{sweep.cfg.name}", filesystem=retrying(fs) if fs is not None else None)


SETTINGS_FILE = "kpp_sweep_settings.yaml"


def settings_text(sweep: Sweep) -> str:
    """The sweep as it runs: its own settings and the base training config, credentials masked (it is stored)."""
    import yaml

    from pipeline.urls import redact_tree
    own = {k: v for k, v in sweep.cfg.model_dump().items() if k != "train"}  # the train source: see "train"
    return yaml.safe_dump(redact_tree({"sweep": own, "train": sweep.base.to_dict()}), sort_keys=True)


def check_settings(sweep: Sweep, setup: TunerSetup, restoring: bool) -> None:
    """A new sweep stores its settings beside Tune's state; a sweep restored from that state must have the same
    ones: Tuner.restore takes the stored search, scheduler and trial count, so an edited YAML would otherwise be
    printed and ignored. ConfigError with the difference when they differ."""
    import difflib

    import pyarrow.fs
    fs = setup.filesystem or pyarrow.fs.LocalFileSystem()
    record, now = f"{setup.path}/{SETTINGS_FILE}", settings_text(sweep)
    stored = None
    if restoring:
        try:
            with fs.open_input_stream(record) as f:
                stored = f.read().decode()
        except FileNotFoundError:
            print(f"[tune] the sweep stored at {setup.path} has no record of its settings (it predates them): "
                  f"resuming it as stored, with these settings recorded", flush=True)
    if stored is not None:
        if stored != now:
            diff = list(difflib.unified_diff(stored.splitlines(), now.splitlines(), "stored sweep", "this run",
                                             lineterm="", n=1))
            raise ConfigError(
                f"name: sweep {sweep.cfg.name!r} is stored at {setup.path} with other settings, and Ray Tune resumes "
                f"a stored sweep as it was stored (its search, scheduler and trial count): use another name= for "
                f"the new settings, remove the folder to start over, or run it as stored. The difference:\n"
                + "\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else ""))
        return
    fs.create_dir(setup.path, recursive=True)
    with fs.open_output_stream(record) as f:
        f.write(now.encode())


def build_tuner(sweep: Sweep, setup: TunerSetup, restoring: bool, parent_run_id: str, uri: str, max_concurrent: int):
    """A new Tuner, or the one in storage restored when the sweep ran before (its driver died)."""
    from ray import tune

    from pipeline.registry import tracking
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=sweep.base_raw, sweep_name=sweep.cfg.name,
                             parent_run_id=parent_run_id, source=tracking.source_tags()["mlflow.source.name"]),
        {"cpu": 0.001})  # the function only drives a TorchTrainer; a whole CPU each would starve the workers
    if restoring:
        print(f"[tune] resuming the sweep stored at {setup.path}: finished trials are kept", flush=True)
        return tune.Tuner.restore(setup.path, trainable=trainable, param_space=param_space(sweep),
                                  resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=setup.filesystem), True
    samples = sweep.cfg.num_trials // sweep.grid_size if sweep.has_grid else sweep.cfg.num_trials
    from ray.tune.search import Searcher
    search = search_algorithm(sweep, max_concurrent)
    tuner = tune.Tuner(
        trainable, param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.cfg.metric, mode=sweep.cfg.mode, search_alg=search,
                                    scheduler=scheduler(sweep, setup), num_samples=samples,
                                    # the generator holds the limit itself (search_algorithm)
                                    max_concurrent_trials=max_concurrent if isinstance(search, Searcher) else None),
        run_config=tune.RunConfig(name=sweep.cfg.name, storage_path=setup.root, storage_filesystem=setup.filesystem,
                                  callbacks=[make_close_trial_runs_callback(uri)] if uri else [],
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1))
    return tuner, False


# -- the best trial's checkpoint -------------------------------------------------------------------------------
def best_checkpoint(sweep: Sweep, trial_id: str, dst: pathlib.Path) -> pathlib.Path:
    import pyarrow.fs

    from pipeline.cluster.driver import storage
    from pipeline.train import checkpointing
    path, fs = storage(sweep.base)
    folder = checkpointing.fetch_latest_complete(fs or pyarrow.fs.LocalFileSystem(),
                                                 f"{path}/{trial_name(sweep.cfg.name, trial_id)}", dst)
    if folder is None:
        raise RuntimeError(f"trial {trial_id}: no complete checkpoint in storage")
    return folder


def new_tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="kpp-sweep-")


# -- the whole sweep -------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    parent_run_id: str
    rows: list[dict[str, Any]]
    table: str  # Markdown
    best_trial: str = ""
    model_name: str = ""
    model_version: str = ""
    decision: Any = None  # pipeline.registry.promotion.Decision
    resumed: bool = False


def run(sweep: Sweep, sweep_yaml: str) -> SweepOutcome:
    import ray

    from pipeline.cluster import driver
    from pipeline.registry import tracking
    from pipeline.tune import report
    base = driver.resolved(sweep.base)
    driver.preflight(base)
    setup = tuner_storage(sweep)
    restoring = setup.can_restore()
    check_settings(sweep, setup, restoring)  # before Ray: an edited sweep must not restore the old Tuner quietly
    uri = tracking.resolve_uri(base.tracking.uri) if base.tracking.enabled else ""
    if uri:
        tracking.check_reachable(uri)
        # every trial logs to this store: resolved here, since a trial runs in a working directory of its own and
        # would resolve '' (or a relative sqlite path) to a store of its own
        sweep.pin_tracking_uri(uri)
    driver.connect(base)
    max_concurrent = concurrent_trials(sweep, ray.cluster_resources())
    parent = ""
    if uri:
        params = {"sweep.name": sweep.cfg.name, "sweep.metric": sweep.cfg.metric, "sweep.mode": sweep.cfg.mode,
                  "sweep.num_trials": sweep.cfg.num_trials, "sweep.algorithm": sweep.cfg.algorithm,
                  "sweep.asha.grace_steps": sweep.cfg.asha.grace_steps,
                  "sweep.asha.reduction_factor": sweep.cfg.asha.reduction_factor,
                  "sweep.max_concurrent_trials": max_concurrent,
                  **{f"search.{k}": json.dumps(v) for k, v in sweep.cfg.search.items()}}
        parent, _ = tracking.open_job_run(uri, base.tracking.experiment, f"sweep:{sweep.cfg.name}", params,
                                          {SWEEP_TAG: sweep.cfg.name, "kpp.kind": "sweep", **tracking.source_tags()},
                                          sweep_yaml,
                                          fresh=not restoring)
    print(f"[tune] sweep {sweep.cfg.name}: {sweep.cfg.num_trials} trials, {max_concurrent} at once, "
          f"{'TPE (Optuna)' if sweep.cfg.algorithm == 'optuna' and not sweep.has_grid else 'random/grid'} search, "
          f"ASHA on {sweep.cfg.metric} from step {sweep.cfg.asha.grace_steps}", flush=True)
    ok = False
    try:
        tuner, resumed = build_tuner(sweep, setup, restoring, parent, uri, max_concurrent)
        results = tuner.fit()
        rows = report.results_rows(sweep, results)
        out = SweepOutcome(parent_run_id=parent, rows=rows,
                           table=report.markdown_table(rows, list(sweep.domains), sweep.cfg.metric), resumed=resumed)
        if uri:
            _log_report(sweep, results, rows, out.table, uri, parent)
        finished = [r for r in rows if r["outcome"] == "finished"]
        if finished:
            out.best_trial = finished[0]["trial_id"]  # rows are sorted: the best by the sweep's metric first
            if uri:
                client = tracking.MlflowClient(uri)
                client.set_tag(parent, "kpp.sweep.best_trial", out.best_trial)
                if sweep.cfg.register_best and base.tracking.registered_model:
                    _register_best(sweep, results, finished[0], uri, parent, out)
        ok = True
        return out
    finally:
        if parent:
            tracking.finish_run(uri, parent, ok)


def _log_report(sweep: Sweep, results, rows, table: str, uri: str, parent: str) -> None:
    from pipeline.registry import tracking
    from pipeline.tune import report
    client = tracking.MlflowClient(uri)
    with new_tmp() as d:
        d = pathlib.Path(d)
        files = report.write_table(rows, d)
        (d / "results.md").write_text(table + "\n")
        files += [d / "results.md", report.plot_hyperparameters(sweep, rows, d / "hyperparameters_vs_bound.png"),
                  report.plot_curves(sweep, results, d / "bound_curves.png")]
        for f in files:
            client.log_artifact(parent, str(f), "sweep")


def _register_best(sweep: Sweep, results, best_row: dict[str, Any], uri: str, parent: str,
                   out: SweepOutcome) -> None:
    from pipeline.cluster import driver
    from pipeline.registry import naming, promotion, tracking
    from pipeline.registry.registration import register_checkpoint
    from pipeline.tune.space import with_values
    client = tracking.MlflowClient(uri)
    trial_id = best_row["trial_id"]
    runs = client.search_runs([client.get_experiment_by_name(sweep.base.tracking.experiment).experiment_id],
                              filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    if not runs:
        raise RuntimeError(f"trial {trial_id}: its MLflow run is missing")
    child = runs[0]
    values = {k: best_row[k] for k in sweep.domains}
    cfg = driver.resolved(with_values(sweep.base_raw, {**values, "name": trial_name(sweep.cfg.name, trial_id)}))
    name = naming.registered_name(cfg)  # the name jobs.train registers under: one registered model per dataset
    done = [v for v in client.search_model_versions(f"name='{name}'")
            if v.tags.get("sweep.parent_run_id") == parent and v.tags.get("sweep.trial_id") == trial_id]
    if done:  # the sweep ran to the end before (a re-run restores it finished): its version, not a duplicate
        out.model_name, out.model_version = name, str(done[0].version)
        out.decision = promotion.promote(uri, name, out.model_version, metric=cfg.tracking.champion_metric)
        print(f"[tune] trial {trial_id} is registered already as {name} version {out.model_version}", flush=True)
        return
    metrics = {k: v for k, v in best_row.items() if k.startswith("test/")}
    with new_tmp() as d:
        out.model_name, out.model_version, out.decision = register_checkpoint(
            cfg, uri, child.info.run_id, best_checkpoint(sweep, trial_id, pathlib.Path(d) / "ckpt"), metrics,
            {"sweep.parent_run_id": parent, "sweep.name": sweep.cfg.name, "sweep.trial_id": trial_id})
    client.set_tag(parent, "kpp.sweep.registered", f"{out.model_name}/{out.model_version}")
