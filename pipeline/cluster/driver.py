"""The driver of a training job: check everything that can be checked, then run Ray Train and register the model.

Order matters: the config is validated, storage, data and the tracking server are probed, and the cluster's
resources are compared with the request *before* a worker group is asked for; on a 2-core machine an unmeetable
request does not fail in Ray, it hangs (stack notes §3).

Resume: Ray Train V2 has no Trainer.restore; a TorchTrainer with the same RunConfig(name, storage_path) picks up
the run's latest checkpoint, which each worker reads through ray.train.get_checkpoint() (pipeline.cluster.session.RaySession).
"""
from __future__ import annotations

import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

from pipeline.data.shards.manifest import DataCard
from pipeline.net import free_port
from pipeline.job_env import job_start, submitted_job_runtime_env
from pipeline.train import checkpointing
from pipeline.registry import tracking
from pipeline.train.config import ConfigError, JobConfig
from pipeline.train.resolve import resolved  # noqa: F401 - jobs call driver.resolved


@dataclass
class Outcome:
    run_id: str
    resumed: bool
    step: int
    finished: bool  # False when the job halted early (train.halt_at_step)
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    model_name: str = ""  # the registry name: <tracking.registered_model>-<dataset> (pipeline.registry.naming)
    champion: Any = None  # pipeline.registry.promotion.Decision: whether the new version became champion
    checkpoint: str = ""  # storage path of the last checkpoint
    grid: str = ""  # local copy of the final sample grid


# -- storage ---------------------------------------------------------------------------------------------------
def storage(cfg: JobConfig):
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig. s3:// with a custom endpoint goes through an
    explicit pyarrow S3FileSystem: some pyarrow versions ignore endpoint settings in the URL or env (Ray #55458)."""
    path = cfg.checkpoint.storage_path
    if not path.startswith("s3://"):
        return str(pathlib.Path(path).expanduser().resolve()), None
    import pyarrow.fs
    endpoint = (cfg.checkpoint.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or "")
    kw: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                          "connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        u = urlparse(endpoint)
        kw.update(endpoint_override=u.netloc, scheme=u.scheme)
    return path[len("s3://"):].rstrip("/"), pyarrow.fs.S3FileSystem(**kw)


def preflight(cfg: JobConfig) -> None:
    """Storage reachable and writable, data present: ConfigError naming the field otherwise."""
    path, fs = storage(cfg)
    if fs is None:
        try:
            pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"checkpoint.storage_path: cannot create {path} ({e})") from None
    else:
        import pyarrow.fs
        bucket = path.split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as e:
            raise ConfigError(f"checkpoint.storage_path: s3://{bucket} is unreachable ({e})") from None
        except ValueError as e:  # pyarrow.lib.ArrowInvalid: not a bucket name (e.g. user:password@ in the URL)
            raise ConfigError(f"checkpoint.storage_path: s3://{bucket} is not an S3 bucket path ({e}); "
                              f"credentials go in the AWS_* variables, not the URL") from None
        if info.type == pyarrow.fs.FileType.NotFound:
            raise ConfigError(f"checkpoint.storage_path: bucket s3://{bucket} does not exist")
    if cfg.data.shards:
        from pipeline.data.shards.manifest import read_card, read_manifest
        try:
            records = read_manifest(cfg.data.shards)
            card = read_card(cfg.data.shards)
        except Exception as e:  # noqa: BLE001 - missing, unreachable or unreadable: the same answer for the user
            raise ConfigError(f"data.shards: no usable prepared dataset at {cfg.data.shards} ({e})") from None
        missing = {"train", "valid", "test"} - {r.split for r in records}
        if missing:
            raise ConfigError(f"data.shards: {cfg.data.shards} has no shards of split(s) {sorted(missing)}")
        mcfg = cfg.model
        if card.image_shape != mcfg.image_shape or card.bit_depth != mcfg.bit_depth:
            raise ConfigError(f"model.image_*/bit_depth: the model expects {mcfg.image_shape} at bit depth "
                              f"{mcfg.bit_depth}, {cfg.data.shards} holds {card.image_shape} at {card.bit_depth}")
        if card.episode_length != mcfg.episode_length:
            raise ConfigError(f"model.episode_length: {mcfg.episode_length}, but {cfg.data.shards} stores its fixed "
                              f"evaluation episodes with episode_length {card.episode_length} "
                              f"(jobs.prepare --episode-length)")
        check_data_plan(cfg, card)
    else:
        check_in_memory_plan(cfg)


def check_in_memory_plan(cfg: JobConfig) -> None:
    """The in-memory path (data.source, small data): the splits are read here once, as every worker will read
    them, and checked like prepared data (a card built from what was read)."""
    from collections import Counter

    from pipeline.data import preflight
    from pipeline.data.sources import load_split
    d = cfg.data
    if not d.source and d.dataset != "digits":
        raise ConfigError(f"data.source: dataset {d.dataset!r} needs a source (a directory or fsspec URL of its "
                          "files) or data.shards (a dataset prepared by jobs.prepare)")
    try:
        sets = {split: load_split(d.dataset, d.source or None, split) for split in ("train", "valid", "test")}
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.source: cannot read {d.dataset} from {d.source or 'its bundled copy'} ({e})") from None
    first = sets["train"]
    card = DataCard(dataset=d.dataset, image_shape=tuple(first.image_shape), bit_depth=first.bit_depth,
                    has_labels=all(s.labels is not None for s in sets.values()),
                    num_images={split: len(s) for split, s in sets.items()})
    sizes = ({split: Counter(s.labels.tolist()) for split, s in sets.items()}
             if d.episodes == "class" and card.has_labels else None)
    request = preflight.DataRequest(d.source or d.dataset, d.episodes, cfg.model.episode_length, d.batch_episodes,
                                    cfg.scaling.num_workers, d.valid_episodes, d.test_episodes)
    try:
        preflight.check(request, card, sizes)
    except preflight.DataPlanError as e:
        raise ConfigError(str(e)) from None


def check_data_plan(cfg: JobConfig, card: DataCard) -> None:
    """What the workers would find out about the data (class episodes possible, enough evaluation episodes, one
    batch per rank), from the card and label index: ConfigError naming the field and the split (pipeline.data.preflight)."""
    from pipeline.data import preflight
    from pipeline.data.shards.manifest import ManifestError, read_label_index
    d = cfg.data
    sizes = None
    if d.episodes == "class" and card.has_labels:
        try:
            index = read_label_index(d.shards)
            sizes = {split: preflight.class_sizes_of(index.get(split, {})) for split in ("train", "valid", "test")}
        except ManifestError as e:
            raise ConfigError(f"data.episodes: {e}") from None
    request = preflight.DataRequest(d.shards, d.episodes, cfg.model.episode_length, d.batch_episodes,
                                    cfg.scaling.num_workers, d.valid_episodes, d.test_episodes)
    try:
        preflight.check(request, card, sizes)
    except preflight.DataPlanError as e:
        raise ConfigError(str(e)) from None


# -- the data a run was trained on --------------------------------------------------------------------------------
DATA_IDENTITY = "kpp_data.json"  # in the run folder, beside the checkpoints


def data_identity(cfg: JobConfig) -> dict[str, str]:
    """What makes two runs' data the same: the dataset the data says it holds (the card of prepared data) and its
    content (the manifest's hash, which changes with every re-prepare), or for a raw source, its name and URL."""
    if cfg.data.shards:
        from pipeline.registry.tracking import file_hash
        return {"dataset": cfg.data.dataset, "shards": cfg.data.shards.rstrip("/"),
                "manifest_hash": file_hash(cfg.data.shards.rstrip("/") + "/manifest.parquet")}
    return {"dataset": cfg.data.dataset, "source": cfg.data.source or "bundled"}


def check_data_identity(cfg: JobConfig) -> None:
    """A re-run of a job name resumes its checkpoints only on the data they were trained on: the run folder
    records the data's identity at the first start; a re-run on other data (another dataset, a re-prepared one)
    is refused before Ray, naming both. Without checkpoints the record is (re)written."""
    import json

    import pyarrow.fs

    from pipeline.urls import redact_text
    path, fs = storage(cfg)
    fs = fs or pyarrow.fs.LocalFileSystem()
    record = f"{path}/{cfg.name}/{DATA_IDENTITY}"
    now = data_identity(cfg)
    if has_checkpoint(cfg):
        try:
            with fs.open_input_stream(record) as f:
                before = json.loads(f.read())
        except FileNotFoundError:
            before = None  # a run folder from before the record existed: it starts now
        if before is not None and {k: before.get(k) for k in ("dataset", "manifest_hash", "source")} != \
                {k: now.get(k) for k in ("dataset", "manifest_hash", "source")}:
            def say(d):
                return ", ".join(f"{k} {redact_text(str(v))}" for k, v in sorted(d.items()))
            field_name = ("data.shards" if cfg.data.shards
                          else "data.dataset" if before.get("dataset") != now.get("dataset") else "data.source")
            raise ConfigError(f"{field_name}: job {cfg.name!r} has checkpoints trained on {say(before)}; this run "
                              f"asks for {say(now)}. Resuming would continue that model on other data (and "
                              f"register it under this data's name): use another name=, or remove "
                              f"{redact_text(path)}/{cfg.name} to start over")
        if before is not None:
            return
    fs.create_dir(f"{path}/{cfg.name}", recursive=True)
    with fs.open_output_stream(record) as f:
        f.write(json.dumps(now, sort_keys=True).encode())


def checkpoint_folders(cfg: JobConfig) -> tuple[list[str], Any]:
    """(the job's checkpoint folders, newest first; the filesystem they are on): complete or not."""
    import pyarrow.fs

    from pipeline.train.checkpointing import PREFIX
    path, fs = storage(cfg)
    fs = fs or pyarrow.fs.LocalFileSystem()
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{cfg.name}", allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith(PREFIX)), reverse=True), fs


def has_checkpoint(cfg: JobConfig) -> bool:
    """Whether the job's storage folder holds any checkpoint folder (complete or not), i.e. a re-run resumes."""
    return bool(checkpoint_folders(cfg)[0])


def has_complete_checkpoint(cfg: JobConfig) -> bool:
    """Whether a re-run of the job resumes rather than trains from step 0: some checkpoint folder holds its
    completion marker and a state file of the size the marker names (a job killed during its first upload left
    only a partial folder, and its re-run starts over). Sizes only: the sha256 is checked where it is restored."""
    import json

    from pipeline.train.checkpointing import MARKER, STATE
    folders, fs = checkpoint_folders(cfg)
    for folder in folders:
        try:
            with fs.open_input_stream(f"{folder}/{MARKER}") as f:
                marker = json.loads(f.read())
            if fs.get_file_info(f"{folder}/{STATE}").size == marker["bytes"]:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


# -- the cluster -----------------------------------------------------------------------------------------------
# Environment of the job's Ray processes. The Train controller drains each worker's one-slot report queue once per
# health-check interval (2 s by default), so a report sooner than that after the last one blocks the step loop
# (measured at 2 s with a report every step: 230 -> 20 episodes/s). Metrics-only reports are spaced by the interval
# (pipeline.cluster.session.RaySession), so only a checkpoint report can wait, for at most one interval: 1 s bounds that wait.
# Polls are not free: with the workers on every core, polling every 0.2 s made the step loop ~3% slower than 2 s.
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 sends a worker's print() to its logger and, when sys.stdout is not
# sys.__stdout__, to stdout as well; Ray's own workers wrap sys.stdout (ray._private.utils.Unbuffered), so every
# line a worker printed reached the driver twice (Ray 2.60). Unpatched, print goes to the worker's stdout once.
# RAY_worker_niceness=0: the raylet starts every worker process (the training workers too) at niceness 15 by
# default, so any process of normal priority on the node (the data loader's workers, a tracking or storage server,
# Ray's own daemons) pre-empts training. Measured (research.benchmark_loop, 2 cores, a ~30 ms step): the full loop over
# the bare step 1.42 (paired runs 1.83 and 1.01) at niceness 15, 1.06 at 0. It is read by the raylet, so it has to
# be in the environment of `ray start` (the local cluster inherits the driver's; the deployment files set it).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_worker_niceness": "0"}


def connect(cfg: JobConfig) -> None:
    """RAY_ADDRESS (a cluster, or the one a submitted job runs on), else a local cluster sized to hold the request."""
    import ray

    from pipeline.cluster.loopback import loopback_node, node_context
    from pipeline.job_env import driver_env_vars
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # a submitted job's runtime env may already set these: repeating a key fails ray.init (job_env)
        env_vars = driver_env_vars(RAY_ENV)
        with node_context(os.environ["RAY_ADDRESS"]):
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env_vars} if env_vars else None)
        return
    for k, v in RAY_ENV.items():  # the local raylet and every process it starts inherit the driver's env
        os.environ.setdefault(k, v)
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    env = {"env_vars": dict(RAY_ENV),
           "worker_process_setup_hook": "pipeline.cluster.ray_logging.setup_worker"}
    # address="local": a new cluster, never one that happens to run on this machine already. With the dashboard
    # (ray[default]) on 127.0.0.1: Train V2's placement-group cleaner asks the State API, which the dashboard
    # serves; without it each ask blocks until its timeout and the job's tear-down fails to stop the cleaner.
    # The State API inside the cluster (Train's placement-group cleaner) finds the dashboard through Ray's "auto"
    # address, which fails when other Ray clusters run on the machine ("Found multiple active Ray instances") or
    # a dead one is recorded; RAY_API_SERVER_ADDRESS, inherited by the cluster's processes, names ours.
    dashboard_port = free_port()
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    try:
        with loopback_node():  # auth is off: listen on 127.0.0.1 only
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                     include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                     runtime_env=env)
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def check_resources(cfg: JobConfig) -> None:
    from pipeline.cluster.resources import await_worker_resources
    await_worker_resources(cfg.scaling)


def build_trainer(cfg: JobConfig, loop_config: dict[str, Any], options: "RunOptions | None" = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from pipeline.cluster.failures import placement_retries
    from pipeline.cluster.progress import ProgressPrinter
    from pipeline.cluster.retrying_fs import retrying
    from pipeline.cluster.session import train_worker
    from ray.train.torch import TorchTrainer
    s, c = cfg.scaling, cfg.checkpoint
    path, fs = storage(cfg)
    from pipeline.cluster.resources import worker_resources
    resources = worker_resources(s)
    return TorchTrainer(
        options.worker if options is not None and options.worker is not None else train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo", timeout_s=s.timeout_s),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(
            # the controller's writes to run storage (its checkpoint snapshot, deletions) ride out an outage
            name=cfg.name, storage_path=path, storage_filesystem=retrying(fs) if fs is not None else None,
            # Ray's own retries off: the driver retries what a retry can mend (fit, pipeline.cluster.failures);
            # a group that cannot be placed is retried by Ray's controller, bounded by scaling.placement_wait_s
            failure_config=FailureConfig(max_failures=0,
                                         controller_failure_limit=placement_retries(s.placement_wait_s)),
            checkpoint_config=CheckpointConfig(
                num_to_keep=c.keep,
                # kept by the validation chain bound: the memory-conditional one favours a memory that copies
                checkpoint_score_attribute="valid_chain_neg_elbo" if c.keep_by == "valid" else None,
                checkpoint_score_order="min"),
            callbacks=[*([ProgressPrinter()] if options is None or options.progress else []),
                       *(options.callbacks if options is not None else ())]))


# -- the job ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOptions:
    """How a caller other than jobs.train (a Tune trial) runs a job: more Train callbacks (Tune's report
    callback), tags and a parent MLflow run for its run, and no registration (a trial never touches the registry)."""
    callbacks: tuple = ()
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str = ""
    register: bool = True
    progress: bool = True  # the driver's progress line (a sweep prints its own)
    # a Tune trial's run is closed by the sweep's driver (pipeline.tune.sweep): a trial ASHA stops is ended from
    # outside and could not set its own status; one owner of the status avoids a race between the two
    close_run: bool = True
    # (unix time, what it is) the submit-to-first-step clock starts from; None: jobs.submit's stamp, else now
    started: tuple[float, str] | None = None
    # the function each Ray Train worker runs; None: pipeline.cluster.session.train_worker (a benchmark passes an
    # instrumented one: research.loop_probe)
    worker: Callable[[dict[str, Any]], None] | None = None


def run(cfg: JobConfig, options: RunOptions = RunOptions()) -> Outcome:
    started_unix, started_from = options.started or job_start(fallback=(time.time(), "driver.run call"))
    cfg = resolved(cfg.validate())
    preflight(cfg)
    check_data_identity(cfg)
    uri = tracking.resolve_uri(cfg.tracking.uri) if cfg.tracking.enabled else ""
    if uri:
        tracking.check_reachable(uri)
    connect(cfg)
    check_resources(cfg)
    run_id = ""
    if cfg.tracking.enabled:
        manifest = cfg.data.shards.rstrip("/") + "/manifest.parquet" if cfg.data.shards else ""
        tags = {**tracking.run_tags(cfg.hash(), manifest), "perf.first_step_from": started_from, **options.tags}
        if options.parent_run_id:
            tags["mlflow.parentRunId"] = options.parent_run_id  # MLflow's own nesting: the UI shows it under the parent
        run_id, _ = tracking.open_job_run(uri, cfg.tracking.experiment, cfg.name, cfg.flat(), tags,
                                          tracking.config_yaml(cfg.to_dict()), fresh=not has_complete_checkpoint(cfg))
    ok = False
    try:
        path, fs = storage(cfg)
        import pyarrow.fs
        run_folder = (fs or pyarrow.fs.LocalFileSystem(), f"{path}/{cfg.name}")
        result = fit(cfg, {"job": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id, "storage": run_folder,
                           "started_unix": started_unix}, options)
        _prune_unregistered(run_folder, result)
        metrics = dict(result.metrics or {})
        out = Outcome(run_id=run_id, resumed=metrics.get("resumed_from_step", -1) >= 0,
                      step=int(metrics.get("step", 0)), finished="test/neg_elbo" in metrics, metrics=metrics,
                      checkpoint=_url(cfg, result.checkpoint.path) if result.checkpoint else "")
        if out.finished and cfg.tracking.enabled:
            # a submitted job's working dir is a temporary copy: the grid stays in MLflow, named by its URI
            out.grid = (f"runs:/{run_id}/samples/final.png" if submitted_job_runtime_env() is not None
                        else _download_grid(uri, run_id))
            if options.register and cfg.tracking.registered_model and result.checkpoint is not None:
                out.model_name, out.model_version, out.champion = _register(cfg, uri, run_id, result.checkpoint,
                                                                            metrics)
        ok = True
        return out
    finally:
        if run_id and options.close_run:
            if ok and not out.finished:
                tracking.MlflowClient(uri).set_terminated(run_id, "KILLED")  # halted: a re-run resumes it
            else:
                tracking.finish_run(uri, run_id, ok)


def fit(cfg: JobConfig, loop_config: dict[str, Any], options: RunOptions):
    """Ray Train's fit, retried here from the run's last checkpoint (a new trainer of the same name and storage
    resumes it) up to checkpoint.max_failures times (-1: always), unless the workers failed deterministically:
    that error ends the job at once (pipeline.cluster.failures). A group that finds no place within
    scaling.placement_wait_s (a lost node not back) ends it with PlacementTimeout."""
    import ray
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from pipeline.cluster.failures import deterministic, placement_timeout
    limit, failures = cfg.checkpoint.max_failures, 0
    while True:
        try:
            result = build_trainer(cfg, loop_config, options).fit()
        except ControllerError as e:
            if isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
                raise placement_timeout(cfg.scaling, ray.nodes()) from e
            raise
        except WorkerGroupError as e:
            fatal = deterministic(e.worker_failures)
            if fatal is not None:
                raise fatal from e
            failures += 1
            if limit != -1 and failures > limit:
                raise
            summary = "; ".join(f"rank {r}: {type(x).__name__}: {str(x).splitlines()[0] if str(x) else ''}"[:300]
                                for r, x in sorted(e.worker_failures.items()))
            print(f"[train] attempt {failures + 1}{'' if limit == -1 else f' of {limit + 1}'}: restarting from the "
                  f"last checkpoint after a failure a retry can mend ({summary})", flush=True)
            continue
        if result.error is not None:
            raise result.error
        return result


def _prune_unregistered(run_folder, result) -> None:
    """After a finished fit, only the checkpoints Ray's keep policy holds stay in the run folder."""
    kept = {pathlib.PurePosixPath(c.path).name for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(pathlib.PurePosixPath(result.checkpoint.path).name)
    if not kept:  # nothing registered (e.g. no checkpoint reached): leave storage as it is
        return
    removed = checkpointing.prune(*run_folder, kept)
    if removed:
        print(f"[train] removed {len(removed)} checkpoint(s) outside checkpoint.keep that Ray never registered: "
              f"{', '.join(removed)}", flush=True)


def _url(cfg: JobConfig, path: str) -> str:
    return f"s3://{path}" if cfg.checkpoint.storage_path.startswith("s3://") else path


def _register(cfg: JobConfig, uri: str, run_id: str, checkpoint, metrics: dict[str, Any]):
    """The final checkpoint registered and offered champion (pipeline.registry.registration)."""
    from pipeline.registry.registration import register_checkpoint
    with checkpoint.as_directory() as d:
        return register_checkpoint(cfg, uri, run_id, d, metrics)


def _download_grid(uri: str, run_id: str) -> str:
    import mlflow
    dst = pathlib.Path("outputs") / "samples" / run_id
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/final.png",
                                                   dst_path=str(dst), tracking_uri=uri)
    except Exception:  # noqa: BLE001 - a missing picture must not fail a finished job
        return ""
