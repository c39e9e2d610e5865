"""The training job's run config: one typed section per concern, composed into `JobConfig`.

Loaded from YAML (`jobs/configs/*.yaml`) with `section.field=value` overrides from the command line and parsed by
pydantic (strict types: `model.read.window=true` is not an integer; floats also accept YAML 1.1's "1e-3"
strings), then validated as a whole before anything touches a cluster: every error is a `ConfigError` whose
message starts with the dotted name of the offending field. `describe()` renders every field with its type,
default and help; it is what `python -m jobs.train --help` prints, so a field without help is a test failure.

The model section is kpp's own typed config (`kpp.config.KanervaConfig`, with its help text), parsed once by
kpp and carried as that object; `JobConfig.model_set` keeps which model fields the config set, so fields the
data decides (image shape, bit depth, likelihood: pipeline.train.resolve.with_data_card) fill only the rest.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import pathlib
import re
import types
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from kpp.config import ConfigError as ModelConfigError
from kpp.bounds import BOUNDS, SELECTING
from kpp.config import KanervaConfig
from pipeline.train import affinity


class ConfigError(ModelConfigError):
    """An invalid run config; the message starts with the dotted field name. The same concept as kpp's
    ConfigError (a handler of that catches both), built from one message "field.path: what is wrong"."""

    def __init__(self, message: str):
        field_path, _, what = message.partition(": ")
        super().__init__(field_path, what)

    def __reduce__(self):
        return (ConfigError, (str(self),))


def _f(default: Any, help: str) -> Any:
    """A field with its help text."""
    return Field(default=default, description=help)


# YAML 1.1 (PyYAML) reads "1e-3" as a string: float fields take numeric strings, nothing else is coerced.
Float = Annotated[float, Field(strict=False)]
# a CPU list: `scaling.training_cores=15` reads as the integer 15 from the command line or YAML
CpuList = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class Section(BaseModel):
    """Strict types, unknown fields refused."""
    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(Section):
    dataset: str = _f("digits", "dataset name understood by pipeline.data.sources (digits, mnist, "
                                 "binarized_mnist, ...); with data.shards, the prepared data's card decides it")
    source: str = _f("", "path or fsspec URL of the raw dataset; '' = the dataset's bundled default")
    shards: str = _f("", "URL of a prepared dataset (the --out of jobs.prepare: manifest.parquet + shards); when "
                         "set, every worker streams its share of the shards instead of reading `source`")
    episodes: Literal["random", "class"] = _f("random", "how episodes are drawn: 'random' = T images of the "
                                               "shuffled split (the paper); 'class' = T images of one class, for "
                                               "the leave-one-out bound (needs a dataset with labels)")
    batch_episodes: int = _f(8, "episodes per batch on each worker (global batch = this x scaling.num_workers)")
    valid_episodes: int = _f(32, "fixed (seeded) validation episodes, evaluated every eval.every_steps")
    test_episodes: int = _f(64, "fixed (seeded) test episodes for the final bound")
    loader_workers: int = _f(0, "DataLoader worker processes per training worker for the shard stream")
    audit_dir: str = _f("", "a folder where every rank appends the split index of each image it trains on, one "
                            "JSON line per step (rank<r>-<start>.jsonl, a file per worker group): the record that "
                            "an epoch delivered every image once across restarts and lost nodes; a path every "
                            "node can write (shared storage); '' = off")


class TrainConfig(Section):
    max_steps: int = _f(200, "total optimiser steps of the job; also the horizon of the lr schedule")
    halt_at_step: int = _f(0, "stop cleanly after this step with a checkpoint, as if preempted (0 = never); "
                              "re-running the same job resumes from there")
    optimizer: Literal["adamw", "adam", "sgd"] = _f("adamw", "optimiser")
    lr: Float = _f(1e-3, "peak learning rate")
    weight_decay: Float = _f(0.0, "decoupled weight decay (adamw) or L2 (adam, sgd)")
    warmup_steps: int = _f(20, "linear lr warm-up from 0 over this many steps")
    schedule: Literal["cosine", "constant"] = _f("cosine", "lr after warm-up: cosine decay to min_lr_ratio x lr "
                                                            "at max_steps, or constant")
    min_lr_ratio: Float = _f(0.1, "final lr of the cosine schedule as a fraction of lr")
    grad_clip: Float = _f(1.0, "clip the global gradient norm to this value (0 = no clipping; norm still logged)")
    precision: Literal["fp32", "bf16"] = _f("fp32", "bf16 = autocast the forward pass to bfloat16 (GPU only)")
    nonfinite: Literal["skip", "stop"] = _f("skip", "on a NaN/inf loss or gradient: skip the update and count "
                                                    "it, or stop naming the step and batch keys")
    max_nonfinite: int = _f(10, "stop anyway after this many skipped steps in a row")
    log_every: int = _f(10, "log step metrics every this many steps")
    gc_every: int = _f(50, "steps between the loop's collections of Python's young garbage: automatic collection "
                           "is off in the step loop and what was alive at its start frozen, so no 0.2-0.6 s full "
                           "collection lands inside a step (pipeline/train/gc_schedule.py); 0: Python's automatic "
                           "collection")


class ScalingConfig(Section):
    num_workers: int = _f(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = _f(False, "GPUs for the workers (scaling.gpus_per_worker each) and the nccl backend (gloo on "
                              "CPU)")
    gpus_per_worker: Float = _f(1.0, "GPUs per worker with use_gpu: a whole number, or a fraction so that several "
                                     "jobs share a GPU (0.25: 4 sweep trials on one GPU; a trial of the paper's "
                                     "model uses ~1 GB); a fraction needs num_workers=1 (nccl refuses two ranks "
                                     "on one GPU)")
    pin_training_thread: bool = _f(False, "give each worker's training thread a core of its own and keep every "
                                          "other thread of the worker (and its DataLoader workers) off it: fewer "
                                          "preemptions of the step on a node whose cores are busy (Linux; needs "
                                          "whole cpus_per_worker, and more usable cores than workers on a node)")
    training_cores: CpuList = _f("", "with pin_training_thread: the cores the training threads claim, one each, as a "
                                 "CPU list ('15', '12-15'); start Ray outside them (taskset -c 0-11 ray start "
                                 "...) and nothing else on the node runs there. Empty: the highest free core of "
                                 "each worker's own CPU mask")
    cpus_per_worker: Float = _f(1.0, "logical CPUs per worker; fractional values let 2 workers and the Ray "
                                     "controller share a 2-core machine")
    timeout_s: int = _f(300, "collective-op timeout: a hung peer fails the group after this long instead of "
                             "stalling recovery")
    resource_wait_s: int = _f(900, "on an autoscaling cluster, how long the driver waits for the requested GPUs "
                                   "and CPUs to join before it gives up (a cluster without an autoscaler fails "
                                   "at once)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = _f(
        "PACK", "how Ray places the workers: PACK (on as few nodes as fit them), SPREAD (over the nodes, best "
                "effort), STRICT_SPREAD (each worker on a node of its own: the group needs num_workers nodes)")
    placement_wait_s: int = _f(600, "how long a worker group may wait to be placed, at the start and after a "
                                    "restart (a lost node coming back) before the job fails naming what is "
                                    "missing; Ray's own wait is endless; its checkpoints stay for a re-run")
    autoscaling: Literal["auto"] | bool = _f(
        "auto", "whether the cluster adds nodes on demand: auto (detect it from what `ray status` reads; Ray has no "
                "public call for it), or say so: true (wait up to resource_wait_s), false (fail at once)")


class CheckpointConfig(Section):
    storage_path: str = _f("outputs/ray", "where Ray keeps run state and checkpoints: a local path or "
                                          "s3://bucket/prefix; the run lives under <storage_path>/<name>")
    s3_endpoint_url: str = _f("", "S3-compatible endpoint for s3:// storage ('' = AWS_ENDPOINT_URL or AWS)")
    every_steps: int = _f(100, "checkpoint every this many steps and at the last step (0 = only at the last)")
    keep: int = _f(2, "checkpoints to keep (the latest is always kept besides)")
    keep_by: Literal["recent", "valid"] = _f("valid", "which to keep: the most recent, or the best validation "
                                                       "chain bound (valid_chain_neg_elbo)")
    max_failures: int = _f(3, "worker-group restarts after a crash before the job fails (-1 = unlimited); each "
                              "resumes from the latest complete checkpoint")
    when_behind: Literal["skip", "wait"] = _f("skip", "a checkpoint due while earlier ones are still being "
                                                      "reported (the store or Ray's controller, one report per "
                                                      "health-check interval, slower than every_steps): skip it and "
                                                      "train on, or wait for them; the last step's is never skipped")


class TrackingConfig(Section):
    enabled: bool = _f(True, "log to MLflow (from rank 0)")
    uri: str = _f("", "MLflow tracking URI ('' = MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)")
    experiment: str = _f("kpp", "MLflow experiment name")
    registered_model: str = _f("kpp", "prefix of the registry name: the final model is registered as "
                                      "<prefix>-<dataset>, e.g. kpp-binarized_mnist ('' = don't register); it "
                                      "becomes `champion` only if its test bound (tracking.champion_metric) beats "
                                      "the champion's")
    champion_metric: str = _f(SELECTING, "the test bound the champion rule compares, one of the bounds a run "
                                                "reports (kpp/bounds.py): chain_neg_elbo, "
                                                "chain_iwae (x_t from a memory of the images before it: a proper "
                                                "bound on -ln p(X)/T, the default), loo_neg_elbo, loo_iwae (from the "
                                                "other images), neg_elbo, iwae (memory-conditional, the paper's: a "
                                                "memory that copies each image to its own prior lowers it while "
                                                "predicting nothing)")
    alias: str = _f("candidate", "alias set on the new model version")
    images_every_steps: int = _f(0, "log the labelled sample grid and the memory/keys figure (mlflow.log_image, "
                                    "one point per step in the UI) every this many steps (0 = only the final ones)")


class EvalConfig(Section):
    every_steps: int = _f(100, "validate every this many steps and at the last step (0 = only at the last); a "
                               "checkpoint kept by its bound (checkpoint.keep_by=valid) is always validated")
    iwae_samples: int = _f(16, "importance samples of the final IWAE bound")
    seed: int = _f(1234, "seed of the evaluation draws (same draws every evaluation)")


class JobConfig(Section):
    name: str = _f("kpp", "job name: the storage folder and the MLflow run key; re-running a name resumes it")
    seed: int = _f(0, "seed of model init, episode order and sampling")
    model: KanervaConfig = Field(default_factory=KanervaConfig, description="the model (kpp.config.KanervaConfig, "
                                 "fields below)")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    _model_set: dict = PrivateAttr(default_factory=dict)

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    @property
    def model_set(self) -> dict[str, Any]:
        """The model fields this config set explicitly (nested mapping); the rest are kpp's defaults."""
        return copy.deepcopy(self._model_set)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def __eq__(self, other: object) -> bool:  # the values, not the record of which model fields were explicit
        return isinstance(other, JobConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like the dataclass it replaced; hash() below is the stable content hash

    @classmethod
    def from_dict(cls, d: Any) -> "JobConfig":
        """Parse a nested mapping; ConfigError naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"<root>: expected a mapping, got {d!r}")
        d = dict(d)
        raw_model = d.pop("model", None)
        raw_model = {} if raw_model is None else raw_model
        if isinstance(raw_model, KanervaConfig):
            model, raw_model = raw_model, raw_model.to_dict()
        elif not isinstance(raw_model, dict):
            raise ConfigError(f"model: expected a mapping, got {raw_model!r}")
        else:
            try:
                model = KanervaConfig.from_dict(raw_model)
            except (ModelConfigError, ValueError, TypeError, KeyError) as e:
                raise _model_error(e) from None
        try:
            job = cls.model_validate({**d, "model": model})
        except ValidationError as e:
            raise _config_error(e) from None
        job._model_set = copy.deepcopy(raw_model)
        return job

    def replace(self, **sections: Any) -> "JobConfig":
        """A copy with some fields replaced (validated again); the record of explicit model fields is kept."""
        job = JobConfig.from_dict({**self.to_dict(), **{k: (v.to_dict() if isinstance(v, KanervaConfig) else
                                                            v.model_dump() if isinstance(v, BaseModel) else v)
                                                        for k, v in sections.items()}})
        job._model_set = copy.deepcopy(self._model_set)
        return job

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form logged as MLflow params."""
        return _flatten(self.to_dict())

    def hash(self) -> str:
        """Stable short hash of the resolved config (tags runs; equal configs hash equal)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> "JobConfig":
        """Raise ConfigError naming the first invalid field; return self so calls chain."""
        # the run folder is <storage_path>/<name>, and pruning deletes checkpoint_* folders in it: one path
        # component that stays below storage_path ('..' would put the run at or above it)
        _need(bool(_SAFE_NAME.fullmatch(self.name)) and self.name not in (".", ".."), "name",
              "must be one path component of letters, digits, '.', '_' and '-', starting with a letter or digit",
              self.name)
        _need(self.seed >= 0, "seed", "must be >= 0 (numpy's seed sequences refuse negative seeds)", self.seed)
        d, t, s, c, k = self.data, self.train, self.scaling, self.checkpoint, self.tracking
        for path, v in [("data.batch_episodes", d.batch_episodes), ("data.valid_episodes", d.valid_episodes),
                        ("data.test_episodes", d.test_episodes), ("train.max_steps", t.max_steps),
                        ("train.log_every", t.log_every), ("train.max_nonfinite", t.max_nonfinite),
                        ("scaling.num_workers", s.num_workers), ("scaling.timeout_s", s.timeout_s),
                        ("scaling.placement_wait_s", s.placement_wait_s),
                        ("checkpoint.keep", c.keep), ("eval.iwae_samples", self.eval.iwae_samples)]:
            _need(v >= 1, path, "must be >= 1", v)
        for path, v in [("data.loader_workers", d.loader_workers), ("train.halt_at_step", t.halt_at_step),
                        ("train.gc_every", t.gc_every),
                        ("checkpoint.every_steps", c.every_steps), ("eval.every_steps", self.eval.every_steps),
                        ("tracking.images_every_steps", k.images_every_steps),
                        ("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay),
                        ("train.grad_clip", t.grad_clip)]:
            _need(v >= 0, path, "must be >= 0", v)
        _need(t.halt_at_step <= t.max_steps, "train.halt_at_step", f"must be <= train.max_steps ({t.max_steps})",
              t.halt_at_step)
        _need(math.isfinite(t.lr) and t.lr > 0, "train.lr", "must be a finite number > 0", t.lr)
        _need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]", t.min_lr_ratio)
        _need(t.warmup_steps < t.max_steps, "train.warmup_steps", f"must be < train.max_steps ({t.max_steps})",
              t.warmup_steps)
        _need(t.precision == "fp32" or s.use_gpu, "train.precision",
              "bf16 autocast needs scaling.use_gpu=true (on CPU it is slower than fp32 here)", t.precision)
        _need(0 < s.cpus_per_worker <= 256, "scaling.cpus_per_worker", "must be in (0, 256]", s.cpus_per_worker)
        _need(not s.pin_training_thread or float(s.cpus_per_worker).is_integer(), "scaling.pin_training_thread",
              f"needs a whole scaling.cpus_per_worker ({s.cpus_per_worker}): fractional workers share cores "
              "(packed sweep trials), and each would pin its training thread to the same one", True)
        if s.training_cores:
            try:
                affinity.parse_cpu_list(s.training_cores)
            except ValueError as e:
                _need(False, "scaling.training_cores", str(e), s.training_cores)
            _need(s.pin_training_thread, "scaling.training_cores", "needs scaling.pin_training_thread=true",
                  s.training_cores)
        g = s.gpus_per_worker
        _need(math.isfinite(g) and g > 0 and (g <= 1 or float(g).is_integer()), "scaling.gpus_per_worker",
              "must be a fraction in (0, 1] or a whole number of GPUs (Ray places no fraction above 1)", g)
        _need(g == 1.0 or s.use_gpu, "scaling.gpus_per_worker", "is set but scaling.use_gpu=false", g)
        _need(g >= 1 or s.num_workers == 1, "scaling.gpus_per_worker",
              f"a fraction of a GPU per worker needs scaling.num_workers=1: {s.num_workers} DDP ranks could land "
              "on one GPU, which nccl refuses", g)
        _need(c.max_failures >= -1, "checkpoint.max_failures", "must be >= -1", c.max_failures)
        _need(bool(c.storage_path.strip()), "checkpoint.storage_path", "must be set", c.storage_path)
        _need("://" not in d.audit_dir or d.audit_dir.startswith("file://"), "data.audit_dir",
              "must be a path of a file system every node mounts (lines are appended; object stores cannot)",
              d.audit_dir)
        from pipeline.data.sources import DATASETS  # numpy only: cheap, and names the datasets in the message
        _need(d.dataset in DATASETS, "data.dataset", f"must be one of {', '.join(DATASETS)}", d.dataset)
        _need(_tracking_uri_ok(k.uri), "tracking.uri", "must be '', a path, file://, sqlite:///<file>, http(s)://"
              "<host> or a database URI (postgresql://, mysql://, mssql://, databricks)", k.uri)
        _need(not c.s3_endpoint_url or c.s3_endpoint_url.startswith(("http://", "https://")),
              "checkpoint.s3_endpoint_url", "must be an http(s):// URL", c.s3_endpoint_url)
        _need(k.champion_metric in BOUNDS, "tracking.champion_metric",
              f"must be a test bound a run reports: one of {', '.join(BOUNDS)}", k.champion_metric)
        if k.enabled:
            _need(bool(k.experiment.strip()), "tracking.experiment", "must be set", k.experiment)
            _need(not k.registered_model or bool(k.alias.strip()), "tracking.alias",
                  "must be set when tracking.registered_model is", k.alias)
            _need(k.alias.strip() != "champion", "tracking.alias",
                  "'champion' moves only through the promotion gate (a lower test bound on the same test "
                  "episodes), which runs after registration; set another alias, e.g. candidate", k.alias)
        try:
            self.model.validate()
        except (ModelConfigError, ValueError) as e:
            raise _model_error(e) from None
        return self


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _tracking_uri_ok(uri: str) -> bool:
    """What MLflow's tracking and registry stores accept, checked before anything starts (MLflow itself fails
    only at the first call, after Ray is up)."""
    from urllib.parse import urlsplit
    if not uri or "://" not in uri:
        return not uri or (":" not in uri.split("/", 1)[0] and not uri.startswith("databricks"))
    try:
        u = urlsplit(uri)
    except ValueError:
        return False
    if u.scheme in ("http", "https"):
        return bool(u.hostname)
    if u.scheme == "sqlite":
        return uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")
    if u.scheme == "file":
        return bool(u.path)
    return u.scheme.split("+")[0] in ("postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


# ---- loading and overrides ---------------------------------------------------------------------------------------
def load(path: str | pathlib.Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """YAML file (or defaults) + `a.b=value` overrides -> a validated JobConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = pathlib.Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"--config: {p}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {p} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return JobConfig.from_dict(raw).validate()


def split_override(item: str) -> tuple[str, Any]:
    """`a.b.c=value` as (key, value); the value is parsed as YAML (so 3, 1e-3, true, [1, 2] work). The one parser
    of overrides: jobs.train, jobs.tune (pipeline.tune.space) and the research scripts all read theirs here."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
    return key, parse_scalar(text)


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key `a.b.c`, creating the mappings on the way."""
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict (split_override, set_path)."""
    set_path(raw, *split_override(item))


def parse_scalar(text: str) -> Any:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; a float field still accepts it through _coerce below.
    return text if v is None and text.strip() not in ("null", "~") else v


def _config_error(e: ValidationError) -> ConfigError:
    """pydantic's first error as a ConfigError that starts with the dotted field name."""
    errors = e.errors()
    err = errors[0]
    loc = err["loc"]
    if _union_member(loc):  # a union field (auto|bool): pydantic reports each member; say them as one
        loc = loc[:-1]
        members = [x for x in errors if x["loc"][:-1] == loc and _union_member(x["loc"])]
        what = "must be " + " or ".join(x["msg"].replace("Input should be ", "") for x in members)
    else:
        what = err["msg"].replace("Input should be", "must be")
    path = ".".join(str(part) for part in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{path}: unknown field")
    return ConfigError(f"{path}: {what}, got {err['input']!r}")


def _union_member(loc: tuple) -> bool:
    """pydantic names the member a union error belongs to as the last part of its location: literal['auto'], bool."""
    return len(loc) > 1 and isinstance(loc[-1], str) and ("[" in loc[-1] or loc[-1] in ("bool", "int", "float", "str"))


def _model_error(e: Exception) -> ConfigError:
    """kpp names the field relative to the model; the job's path starts with model."""
    msg = str(e).strip("'\"")
    return ConfigError(msg if msg.startswith("model.") else f"model.{msg}")


def _need(ok: bool, path: str, what: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{path}: {what}, got {got!r}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- help --------------------------------------------------------------------------------------------------------
def describe() -> str:
    """Every field, one per line: dotted name, type, default and help (the body of `--help`)."""
    lines: list[str] = []
    _describe_section(JobConfig, "", lines)
    return "\n".join(lines)


def _describe_section(cls: type[BaseModel], prefix: str, lines: list[str]) -> None:
    for name, info in cls.model_fields.items():
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            lines.append("")
            _describe_section(tp, f"{prefix}{name}.", lines)
        elif tp is KanervaConfig:
            lines.append("")
            lines.append(f"{prefix}{name}.* ({info.description}):")
            _describe_model(KanervaConfig, f"{prefix}{name}.", lines)
        else:
            default = info.get_default(call_default_factory=True)
            lines.append(f"  {prefix}{name} ({_type_name(tp)}, default {default!r}): {info.description}")


def _describe_model(cls: type, prefix: str, lines: list[str]) -> None:
    """kpp's dataclasses carry their help in each field's metadata (kpp.config._f)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            _describe_model(tp, f"{prefix}{f.name}.", lines)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join(map(_type_name, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))
