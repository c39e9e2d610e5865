"""MLflow tracking of a training job: one run per job across restarts, logged from world rank 0.

Who does what:
- the driver opens the job's run *before* training (`open_job_run`): it finds the run tagged with the job name or
  creates it, logs the resolved config once as params plus tags and the config file, so a tracking server that is
  down fails the job before any cluster resources are requested (`check_reachable`);
- rank 0 of the worker group logs metrics and artifacts into that run by id (`RankZeroLogger`); a worker group
  restarted from an older checkpoint replays steps that were already logged, and those are dropped per metric so
  each metric's step axis stays strictly increasing (Ray #48664: retried runs logged extra epochs);
- the driver registers the final model (`register_model`) as a pyfunc "model from code" (pipeline/registry/pyfunc_model.py)
  whose artifacts are a state_dict file and the model config JSON: loading it never unpickles, and it does not
  freeze the batch size as mlflow.pytorch's default torch.export format does.
"""
from __future__ import annotations

import hashlib
import logging
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import mlflow
import yaml
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.urls import redact, redact_tree
from pipeline.registry.run_logger import RankZeroLogger, TrackingError  # noqa: F401 - one import for callers

log = logging.getLogger(__name__)
JOB_TAG = "kpp.job"
# tags that name the run a job writes to (the job; a sweep trial's id, by which the sweep closes its trials'
# runs): a retired run gives them up (to `<tag>.retired`) so no lookup finds it
NAMING_TAGS = (JOB_TAG, "kpp.trial_id")
DEFAULT_URI_PATH = "outputs/mlflow.db"
PYFUNC_CODE = pathlib.Path(__file__).with_name("pyfunc_model.py")
KPP_DIR = pathlib.Path(__file__).resolve().parents[2] / "kpp"


def resolve_uri(uri: str) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else a sqlite file under ./outputs, made absolute so Ray workers
    (which run in another working directory) write to the same store as the driver."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        path = pathlib.Path(DEFAULT_URI_PATH).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when the tracking server is down or the local store is unusable."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
                if r.status == 200:
                    return
                raise TrackingError(f"tracking.uri: MLflow server at {uri} answered /health with {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"tracking.uri: MLflow server at {uri} is unreachable ({e})") from None
    if uri.startswith("sqlite:///"):
        parent = pathlib.Path(uri[len("sqlite:///"):]).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking.uri: cannot create the sqlite store's folder {parent} ({e})") from None


def run_tags(config_hash: str, manifest: str = "") -> dict[str, str]:
    """Provenance tags: code version, config, data and library versions, and MLflow's own source tags (so the
    UI's Source and Version columns show the entry point and the commit)."""
    import ray
    import torch
    commit, dirty = git_state()
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower(), "config.hash": config_hash,
            "data.manifest_hash": file_hash(manifest) if manifest else "none",
            "version.torch": torch.__version__, "version.ray": ray.__version__,
            "version.mlflow": mlflow.__version__, "version.python": platform.python_version(), **source_tags(commit)}


def git_state() -> tuple[str, str]:
    """(HEAD's commit or "unknown", `git status --porcelain` of tracked files: empty when clean)."""
    here = pathlib.Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=here).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", ""
    return commit, dirty


def source_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags (mlflow.utils.mlflow_tags), which only the fluent start_run sets by itself:
    the entry point (`python -m jobs.train` gives "jobs.train"), the source type and the git commit."""
    import sys
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None and spec.name else pathlib.Path(sys.argv[0] or "python").name
    tags = {"mlflow.source.name": name, "mlflow.source.type": "JOB"}
    commit = commit if commit is not None else git_state()[0]
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def file_hash(url: str) -> str:
    """sha256 of a (possibly remote) file, e.g. the shard manifest: ties a run to the exact data."""
    from pipeline.storage import filesystem
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def open_job_run(uri: str, experiment: str, job: str, params: dict[str, Any], tags: dict[str, str],
                 config_yaml: str, fresh: bool = False) -> tuple[str, bool]:
    """The one run of this job: (run_id, resumed). Params are logged once; a re-run that changes a param (e.g. a
    larger train.max_steps to extend a job) keeps the first value and records the change as a tag, since MLflow
    refuses to change a logged param (#20473).
    fresh=True (the job has no checkpoint, so training starts at step 0): an existing run of the same job name is
    retired (its job tag moved to `kpp.job.retired`) and a new run is created; continuing it would mix two
    trainings on one step axis."""
    check_reachable(uri)
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'", max_results=20)
    # one run holds the name (_claim creates it under the claim lock); the earliest, should older trees have left two
    found = sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))[:1]
    if found and fresh:
        old = found[0].info.run_id
        for tag in NAMING_TAGS:
            if tag in found[0].data.tags:
                client.set_tag(old, f"{tag}.retired", found[0].data.tags[tag])
                client.delete_tag(old, tag)
        if found[0].info.status == "RUNNING":
            client.set_terminated(old, "KILLED")
        found = []
    if found:
        run = found[0]
        run_id, logged = run.info.run_id, run.data.params
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = _claim(client, exp_id, experiment, job)
        logged = {}
    values = {k: redact(_param_str(v)) for k, v in params.items()}  # no credentials in params
    new = [Param(k, v) for k, v in values.items() if k not in logged]
    changed = {k: {"logged": logged[k], "now": v} for k, v in values.items() if k in logged and logged[k] != v}
    tag_list = [RunTag(k, redact(v)) for k, v in tags.items()]
    # the run-level tags say how the latest attempt ran; each attempt's own are kept beside them
    attempt = 1 + sum(1 for k in (found[0].data.tags if found else {}) if k.startswith("kpp.attempt.")
                      and k.endswith(".started_unix"))
    tag_list += [RunTag(f"kpp.attempt.{attempt}.{k}", redact(v)) for k, v in tags.items() if k in PROVENANCE]
    tag_list.append(RunTag(f"kpp.attempt.{attempt}.started_unix", f"{time.time():.0f}"))
    if changed:
        tag_list.append(RunTag(f"kpp.rerun.{int(time.time())}.changed_params", json.dumps(changed)[:5000]))
    for i in range(0, len(new), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=new[i:i + 100], tags=tag_list if i == 0 else [])
    if not new:
        client.log_batch(run_id, tags=tag_list)
    client.log_text(run_id, config_yaml, "config/resolved.yaml")
    return run_id, bool(found)


# provenance tags of run_tags() that differ between attempts of one job (re-runs after a code or data change)
PROVENANCE = ("git.commit", "git.dirty", "config.hash", "data.manifest_hash", "version.torch", "version.ray",
              "version.mlflow", "version.python")


def _experiment_id(client, experiment: str) -> str:
    """The experiment's id, creating it; two drivers creating it at once both get the one that exists."""
    from mlflow.exceptions import MlflowException
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(experiment).experiment_id


def _claim(client, exp_id: str, experiment: str, job: str) -> str:
    """A new run for job `job`, unless another driver claimed the name at the same moment (a double submit).
    MLflow has no unique constraint on tags, so the look and the create run under a registry lock (the claim
    lock, promotion.registry_lock): the first driver creates the run, every later one finds it and is refused
    (TrackingError), so two drivers never train one job into one storage folder. (Create-then-look, kept before,
    let two drivers both win under load: a run's start_time is stamped by the client before its request reaches
    the server, so the run created second could sort first.)"""
    from pipeline.registry.promotion import registry_lock
    with registry_lock(client, claim_lock_name(exp_id, job), f"held while a driver claims job {job!r} in "
                       f"{experiment!r} (kpp)", wait_s=120.0, ttl_s=60.0):
        runs = client.search_runs([exp_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'", max_results=20)
        if runs:
            first = min(runs, key=lambda r: (r.info.start_time, r.info.run_id))
            raise TrackingError(f"name: job {job!r} was claimed a moment ago by another driver (MLflow run "
                                f"{first.info.run_id} in {experiment!r}, started {first.info.start_time} ms): two "
                                "drivers would train one job into one storage folder; this one did not start")
        return client.create_run(exp_id, run_name=job, tags={JOB_TAG: job}).info.run_id


def claim_lock_name(exp_id: str, job: str) -> str:
    """The claim lock's registered-model name: registry names may not hold '/' or ':' (a sweep's job is
    `sweep:NAME`), so the job is spelled safely and its hash keeps two jobs apart."""
    import re
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", job)[:80]
    return f"kpp-job-claim.{exp_id}.{safe}.{hashlib.sha1(job.encode()).hexdigest()[:8]}"


def _param_str(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def finish_run(uri: str, run_id: str, ok: bool) -> None:
    MlflowClient(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def register_model(uri: str, run_id: str, weights: str | pathlib.Path, model_config: dict[str, Any],
                   name: str, alias: str, force_new: bool = False) -> str:
    """Log the model to the run as a pyfunc from code (pipeline/registry/pyfunc_model.py + the kpp package), register it
    under `name` and point `alias` at the new version. Returns the version. Idempotent per run: re-running a
    finished job returns the version this run already registered instead of adding another."""
    import numpy
    import torch
    client = MlflowClient(uri)
    existing = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    if existing and not force_new:
        version = max(existing, key=lambda v: int(v.version)).version
        client.set_registered_model_alias(name, alias, version)
        return str(version)
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as d:
        cfg_path = pathlib.Path(d) / "model_config.json"
        cfg_path.write_text(json.dumps(model_config, indent=1, sort_keys=True))
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), code_paths=[str(KPP_DIR)],
                artifacts={"weights": str(weights), "config": str(cfg_path)}, signature=_signature(model_config),
                # one blank episode: MLflow loads the logged model and predicts on it before registering, so a
                # model that cannot load from its own artifacts never gets a version (and serving has an example)
                input_example=_input_example(model_config),
                # explicit requirements: inferring them takes 5-6 s and may pull the whole venv
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}",
                                  f"mlflow=={mlflow.__version__}"],
                registered_model_name=name)
    version = str(info.registered_model_version)
    MlflowClient(uri).set_registered_model_alias(name, alias, version)
    return version


def _input_example(model_config: dict[str, Any]):
    import numpy as np
    from kpp.config import KanervaConfig
    cfg = KanervaConfig.from_dict(model_config)
    return np.zeros((1, cfg.episode_length, *cfg.image_shape), dtype=np.float32)


def _signature(model_config: dict[str, Any]):
    """Episodes [E, T, C, H, W] -> per-image negative ELBO [E, T], with a `seed` param (a params schema is what
    lets pyfunc pass params through at all). E and T stay free."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
    from kpp.config import KanervaConfig
    c, h, w = KanervaConfig.from_dict(model_config).image_shape
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, c, h, w))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
                          params=ParamSchema([ParamSpec("seed", "long", 0)]))


def config_yaml(d: dict[str, Any]) -> str:
    """The config as stored with the run: URLs redacted (pipeline/urls.py)."""
    return yaml.safe_dump(redact_tree(d), sort_keys=False)
