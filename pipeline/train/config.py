"""The training job's run config: one typed dataclass per concern, composed into `JobConfig`.

Loaded from YAML (`jobs/configs/*.yaml`) with `section.field=value` overrides from the command line, then
validated as a whole before anything touches a cluster: every error is a `ConfigError` whose message starts with
the dotted name of the offending field. `describe()` renders every field with its type, default and help; it is
what `python -m jobs.train --help` prints, so a field without help text is a test failure, not a doc gap.

The model section is owned by kpp (`kpp.config.KanervaConfig`); here it stays a plain mapping that kpp parses
and validates, so this module never has to mirror the model's fields.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import pathlib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """An invalid run config; the message starts with the dotted field name."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with help text (mutable defaults go through a factory)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = _f("digits", "dataset name understood by pipeline.data.sources (digits, mnist, binarized_mnist, ...)")
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


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = _f(200, "total optimiser steps of the job; also the horizon of the lr schedule")
    halt_at_step: int = _f(0, "stop cleanly after this step with a checkpoint, as if preempted (0 = never); "
                              "re-running the same job resumes from there")
    optimizer: Literal["adamw", "adam", "sgd"] = _f("adamw", "optimiser")
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay (adamw) or L2 (adam, sgd)")
    warmup_steps: int = _f(20, "linear lr warm-up from 0 over this many steps")
    schedule: Literal["cosine", "constant"] = _f("cosine", "lr after warm-up: cosine decay to min_lr_ratio x lr "
                                                            "at max_steps, or constant")
    min_lr_ratio: float = _f(0.1, "final lr of the cosine schedule as a fraction of lr")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = no clipping; norm still logged)")
    precision: Literal["fp32", "bf16"] = _f("fp32", "bf16 = autocast the forward pass to bfloat16 (GPU only)")
    nonfinite: Literal["skip", "stop"] = _f("skip", "on a NaN/inf loss or gradient: skip the update and count "
                                                    "it, or stop naming the step and batch keys")
    max_nonfinite: int = _f(10, "stop anyway after this many skipped steps in a row")
    log_every: int = _f(10, "log step metrics every this many steps")


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = _f(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = _f(False, "one GPU per worker and the nccl backend (gloo on CPU)")
    cpus_per_worker: float = _f(1.0, "logical CPUs per worker; fractional values let 2 workers and the Ray "
                                     "controller share a 2-core machine")
    timeout_s: int = _f(300, "collective-op timeout: a hung peer fails the group after this long instead of "
                             "stalling recovery")


@dataclass(kw_only=True)
class CheckpointConfig:
    storage_path: str = _f("outputs/ray", "where Ray keeps run state and checkpoints: a local path or "
                                          "s3://bucket/prefix; the run lives under <storage_path>/<name>")
    s3_endpoint_url: str = _f("", "S3-compatible endpoint for s3:// storage ('' = AWS_ENDPOINT_URL or AWS)")
    every_steps: int = _f(100, "checkpoint every this many steps and at the last step (0 = only at the last)")
    keep: int = _f(2, "checkpoints to keep (the latest is always kept besides)")
    keep_by: Literal["recent", "valid"] = _f("valid", "which to keep: the most recent, or the best validation "
                                                       "bound")
    max_failures: int = _f(3, "worker-group restarts after a crash before the job fails (-1 = unlimited); each "
                              "resumes from the latest complete checkpoint")


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow (from rank 0)")
    uri: str = _f("", "MLflow tracking URI ('' = MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)")
    experiment: str = _f("kpp", "MLflow experiment name")
    registered_model: str = _f("kpp", "registry name the final model is registered under ('' = don't register)")
    alias: str = _f("candidate", "alias set on the new model version")
    images_every_steps: int = _f(0, "log a labelled sample grid PNG every this many steps (0 = only the final one)")


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = _f(100, "validate every this many steps and at the last step (0 = only at the last); a "
                               "checkpoint kept by its bound (checkpoint.keep_by=valid) is always validated")
    iwae_samples: int = _f(16, "importance samples of the final IWAE bound")
    seed: int = _f(1234, "seed of the evaluation draws (same draws every evaluation)")


@dataclass(kw_only=True)
class JobConfig:
    name: str = _f("kpp", "job name: the storage folder and the MLflow run key; re-running a name resumes it")
    seed: int = _f(0, "seed of model init, episode order and sampling")
    model: dict = _f({}, "the model config, passed to kpp.config.KanervaConfig.from_dict (fields below)")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobConfig":
        return _build(cls, d, "")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form logged as MLflow params."""
        return _flatten(self.to_dict())

    def hash(self) -> str:
        """Stable short hash of the resolved config (tags runs; equal configs hash equal)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> "JobConfig":
        """Raise ConfigError naming the first invalid field; return self so calls chain."""
        _need(bool(self.name.strip()) and "/" not in self.name, "name", "must be non-empty without '/'", self.name)
        d, t, s, c, k = self.data, self.train, self.scaling, self.checkpoint, self.tracking
        for path, v in [("data.batch_episodes", d.batch_episodes), ("data.valid_episodes", d.valid_episodes),
                        ("data.test_episodes", d.test_episodes), ("train.max_steps", t.max_steps),
                        ("train.log_every", t.log_every), ("train.max_nonfinite", t.max_nonfinite),
                        ("scaling.num_workers", s.num_workers), ("scaling.timeout_s", s.timeout_s),
                        ("checkpoint.keep", c.keep), ("eval.iwae_samples", self.eval.iwae_samples)]:
            _need(v >= 1, path, "must be >= 1", v)
        for path, v in [("data.loader_workers", d.loader_workers), ("train.halt_at_step", t.halt_at_step),
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
        _need(c.max_failures >= -1, "checkpoint.max_failures", "must be >= -1", c.max_failures)
        _need(bool(c.storage_path.strip()), "checkpoint.storage_path", "must be set", c.storage_path)
        from pipeline.data.sources import DATASETS  # numpy only: cheap, and names the datasets in the message
        _need(d.dataset in DATASETS, "data.dataset", f"must be one of {', '.join(DATASETS)}", d.dataset)
        _need(_tracking_uri_ok(k.uri), "tracking.uri", "must be '', a path, file://, sqlite:///<file>, http(s)://"
              "<host> or a database URI (postgresql://, mysql://, mssql://, databricks)", k.uri)
        _need(not c.s3_endpoint_url or c.s3_endpoint_url.startswith(("http://", "https://")),
              "checkpoint.s3_endpoint_url", "must be an http(s):// URL", c.s3_endpoint_url)
        if k.enabled:
            _need(bool(k.experiment.strip()), "tracking.experiment", "must be set", k.experiment)
            _need(not k.registered_model or bool(k.alias.strip()), "tracking.alias",
                  "must be set when tracking.registered_model is", k.alias)
        _validate_model(self.model)
        return self


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


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, 1e-3, true, [1, 2] work)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
        node = nxt
    node[parts[-1]] = _parse_scalar(text)


def _parse_scalar(text: str) -> Any:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; a float field still accepts it through _coerce below.
    return text if v is None and text.strip() not in ("null", "~") else v


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _need(v in choices, path, f"must be one of {list(choices)}", v)
        return v
    if tp is bool:
        _need(isinstance(v, bool), path, "must be true or false", v)
        return v
    if tp is int:
        _need(isinstance(v, int) and not isinstance(v, bool), path, "must be an integer", v)
        return v
    if tp is float:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        _need(isinstance(v, (int, float)) and not isinstance(v, bool), path, "must be a number", v)
        return float(v)
    if tp is str:
        _need(isinstance(v, str), path, "must be a string", v)
        return v
    if tp is dict or origin is dict:
        _need(isinstance(v, dict), path, "must be a mapping", v)
        return v
    raise ConfigError(f"{path}: unsupported field type {tp}")  # a programming error, named all the same


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


# ---- the model section (kpp) -------------------------------------------------------------------------------------
def _kpp_config():
    try:
        from kpp import config as kc
    except ImportError:  # kpp not installed yet: the model section is validated when the model is built
        return None
    return kc


def _validate_model(model: dict[str, Any]) -> None:
    kc = _kpp_config()
    if kc is None:
        return
    try:
        kc.KanervaConfig.from_dict(model).validate()
    except (ValueError, TypeError, KeyError) as e:
        # kpp names the field relative to its own config; prefix the section so the path is absolute.
        msg = str(e).strip("'\"")
        raise ConfigError(msg if msg.startswith("model.") else f"model.{msg}") from e


def model_config(cfg: JobConfig):
    """The validated kpp.config.KanervaConfig of a job."""
    kc = _kpp_config()
    if kc is None:
        raise ConfigError("model: kpp is not importable, cannot build the model config")
    return kc.KanervaConfig.from_dict(cfg.model)


# ---- help --------------------------------------------------------------------------------------------------------
def describe() -> str:
    """Every field, one per line: dotted name, type, default and help (the body of `--help`)."""
    lines: list[str] = []
    _describe(JobConfig, "", lines)
    kc = _kpp_config()
    if kc is not None:
        lines.append("")
        lines.append("model.* (kpp.config.KanervaConfig):")
        _describe(kc.KanervaConfig, "model.", lines)
    return "\n".join(lines)


def _describe(cls: type, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if prefix == "":
                lines.append("")
            _describe(tp, f"{prefix}{f.name}.", lines)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        help_text = f.metadata.get("help") or _comment_help(cls).get(f.name, "")
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): {help_text}".rstrip(": "))


@functools.lru_cache(maxsize=None)  # parsed once per class, not once per field
def _comment_help(cls: type) -> dict[str, str]:
    """kpp documents its fields with comments: trailing (`width: int = 32  # why`) or a block of `#` lines right
    above the field. Read them as help text (trailing first, then the block above)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in src.splitlines():
        comment = re.match(r"^\s+#\s?(.*)$", line)
        if comment:
            above.append(comment.group(1).strip())
            continue
        m = re.match(r"^\s+(\w+)\s*:[^#\n=]*(?:=[^#\n]*)?(?:#\s*(.+))?$", line)
        if m and not line.lstrip().startswith(("def ", "return", "@")):
            text = " ".join(t for t in [(m.group(2) or "").strip(), " ".join(above)] if t)
            if text:
                out[m.group(1)] = text
        above = []
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if isinstance(tp, (type, types.GenericAlias)):
        return getattr(tp, "__name__", str(tp))
    return str(tp).replace("typing.", "")
