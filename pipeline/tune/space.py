"""The sweep config: a training config, a search space over its fields, and how to search.

    name: sweep-cpu
    train: {config: jobs/configs/local.yaml, overrides: {train.max_steps: 60}}   # or the fields inline
    search:
      model.memory.channels: {choice: [4, 8]}
      train.lr: {loguniform: [5.0e-4, 5.0e-3]}
    metric: valid_chain_neg_elbo   # what the loop reports (REPORTED_METRICS); mode min
    num_trials: 4
    algorithm: optuna           # optuna (TPE) | random; a grid forces random (grid x num_trials / grid size)
    asha: {grace_steps: 20, reduction_factor: 2}
    max_concurrent_trials: 0    # 0: as many as the cluster holds

Everything is validated before Ray is asked for anything: each searched field must exist in the training config
and accept every value of its domain, domains must be well formed, the metric must be one the loop reports.
"""
from __future__ import annotations

import copy
import math
import pathlib
import warnings
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from pipeline.train.config import ConfigError, JobConfig, Section, set_path, split_override

# What the loop reports to Ray Train (and so to Tune) at every report: the metric must be one of these.
# valid_chain_neg_elbo is the default: each validation image scored under a memory of the images before it, a
# proper bound on -ln p(X)/T. valid_neg_elbo is the memory-conditional bound (the image in its own memory: the
# paper's), which a memory that copies each image to its own prior lowers while predicting nothing: a sweep on it
# selects for the copy.
REPORTED_METRICS = {"valid_chain_neg_elbo": "min", "valid_neg_elbo": "min", "train/loss": "min", "train/total": "min",
                    "train/recon": "min", "train/kl_z": "min", "train/kl_y": "min"}
DEFAULT_METRIC = "valid_chain_neg_elbo"
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


class AshaConfig(Section):
    grace_steps: int = Field(20, description="steps every trial runs before ASHA may stop it")
    reduction_factor: int = Field(2, description="ASHA keeps the best 1/this of trials at each rung")


class TrainSource(Section):
    config: str = Field("", description="a training YAML (jobs/configs/*.yaml); '' = defaults")
    overrides: dict[str, Any] = Field(default_factory=dict, description="section.field: value on top of it")


class SweepConfig(Section):
    name: str = Field("sweep", description="sweep name: Tune's experiment folder, the parent MLflow run's key")
    seed: int = Field(0, description="seed of the search algorithm")
    train: TrainSource = Field(default_factory=TrainSource)
    search: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric: str = Field(DEFAULT_METRIC, description="reported metric ASHA and the search optimise (REPORTED_METRICS): "
                                                     "the validation chain bound by default, a proper bound that a "
                                                     "memory copying each image cannot game")
    mode: Literal["min", "max"] = "min"
    num_trials: int = Field(4, description="trials in all")
    algorithm: Literal["optuna", "random"] = "optuna"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_concurrent_trials: int = Field(0, description="0: as many as the cluster's CPUs and GPUs hold")
    register_best: bool = Field(True, description="register the best trial's model (champion only if it is better)")


def _domain(field: str, spec: Any) -> tuple[str, Any]:
    where = f"search.{field}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{d}: ...' for d in DOMAINS)}}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}.{kind}: needs a non-empty list of values, got {arg!r}")
        return kind, arg
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in arg)):
        raise ConfigError(f"{where}.{kind}: needs [low, high], got {arg!r}")
    low, high = arg
    if low > high:
        raise ConfigError(f"{where}.{kind}: low {low} > high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0 for a log range, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}.randint: integer bounds needed, got {arg!r}")
    return kind, (low, high)


def _samples(kind: str, arg: Any) -> list[Any]:
    """Values that stand for the domain when checking that the training config accepts it."""
    if kind in ("choice", "grid"):
        return list(arg)
    low, high = arg
    if kind == "randint":
        return [int(low), int(high) - 1 if high > low else int(low)]  # Tune's randint excludes high
    return [low, high]


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> JobConfig:
    """The training config from its raw mapping (as written: fields it leaves unset stay unset, so the data's card
    still decides the image fields) with dotted `values` set on top."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return JobConfig.from_dict(raw).validate()


class Sweep:
    """A validated sweep: its config, the base training config (raw and parsed), and the parsed search domains."""

    def __init__(self, cfg: SweepConfig, base_raw: dict[str, Any], domains: dict[str, tuple[str, Any]],
                 root: pathlib.Path):
        self.cfg, self.base_raw, self.domains, self.root = cfg, base_raw, domains, root
        self.base = with_values(base_raw, {})

    @property
    def grid_size(self) -> int:
        return math.prod(len(a) for k, a in self.domains.values() if k == "grid") if self.has_grid else 1

    @property
    def has_grid(self) -> bool:
        return any(k == "grid" for k, _ in self.domains.values())

    def pin_tracking_uri(self, uri: str) -> None:
        self.base_raw = _set(self.base_raw, "tracking.uri", uri)
        self.base = with_values(self.base_raw, {})

    def trial_config(self, values: dict[str, Any]) -> JobConfig:
        return with_values(self.base_raw, values)


def load(path: str | None, overrides: list[str], root: pathlib.Path | None = None,
         resolve_paths: bool = True) -> Sweep:
    """Read and validate a sweep YAML plus `field=value` overrides of the sweep (e.g. num_trials=8). Local paths
    of the training config are made absolute against `root` unless resolve_paths is False (jobs.submit checks
    them as written)."""
    root = root or pathlib.Path.cwd()
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(pathlib.Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path} ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path}: {e}") from None
    for item in overrides:
        key, value = split_override(item)
        if key.startswith("train.overrides."):  # one training field, itself dotted: train.overrides.train.lr=...
            raw.setdefault("train", {}).setdefault("overrides", {})[key[len("train.overrides."):]] = value
            continue
        set_path(raw, key, value)
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if not cfg.search:
        raise ConfigError("search: empty; name at least one training field to search over")
    if cfg.num_trials < 1:
        raise ConfigError(f"num_trials: must be >= 1, got {cfg.num_trials}")
    if cfg.metric not in REPORTED_METRICS:
        raise ConfigError(f"metric: {cfg.metric!r} is not reported by the training loop; one of "
                          f"{', '.join(REPORTED_METRICS)}")
    if cfg.max_concurrent_trials < 0:
        raise ConfigError(f"max_concurrent_trials: must be >= 0, got {cfg.max_concurrent_trials}")
    base_raw: dict[str, Any] = {}
    if cfg.train.config:
        base_path = root / cfg.train.config
        try:
            base_raw = yaml.safe_load(base_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"train.config: cannot read {base_path} ({e})") from None
    for key, value in cfg.train.overrides.items():
        base_raw = _set(base_raw, key, value)
    # trials run in Tune's own working directories: local paths are fixed here, against the sweep's directory
    for key in ("data.shards", "data.source", "checkpoint.storage_path") if resolve_paths else ():
        section, leaf = key.split(".")
        value = (base_raw.get(section) or {}).get(leaf)
        if isinstance(value, str) and value and "://" not in value and not pathlib.Path(value).is_absolute():
            base_raw = _set(base_raw, key, str((root / value).resolve()))
    uri = (base_raw.get("tracking") or {}).get("uri")
    if resolve_paths and isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        base_raw = _set(base_raw, "tracking.uri", f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}")
    base = with_values(base_raw, {})
    known = set(base.flat())
    domains = {}
    for field, spec in cfg.search.items():
        if field not in known:
            raise ConfigError(f"search.{field}: the training config has no field {field!r}")
        domains[field] = _domain(field, spec)
        for value in _samples(*domains[field]):
            try:
                with_values(base_raw, {field: value})
            except ConfigError as e:
                raise ConfigError(f"search.{field}: value {value!r} is not accepted: {e}") from None
    sweep = Sweep(cfg, base_raw, domains, root)
    if sweep.has_grid and cfg.num_trials % sweep.grid_size:
        raise ConfigError(f"num_trials: {cfg.num_trials} is not a multiple of the grid's {sweep.grid_size} points")
    if cfg.asha.grace_steps >= base.train.max_steps:
        raise ConfigError(f"asha.grace_steps: {cfg.asha.grace_steps} must be < train.max_steps "
                          f"({base.train.max_steps}), or ASHA never stops a trial")
    if cfg.asha.reduction_factor < 2:
        raise ConfigError(f"asha.reduction_factor: must be >= 2, got {cfg.asha.reduction_factor}")
    warmup = base.model.objective.kl_warmup_steps
    m = base.model.memory
    if base.model.kind == "kpp" and m.writer == "key" and m.content == "map" and cfg.asha.grace_steps < warmup:
        # Not an error (a quick sweep of the mechanism is legitimate), but ASHA then ranks memory and key settings
        # before any trial can use its memory: the map memory's pick-up follows the end of the warm-up. (The code
        # memory, the default, is used from the first steps: swap gap +36 to +82 at step 50, +241 to +626 at step
        # 100 of the 1,000-step runs in docs/memory-experiments.md, so any grace period sees it at work.)
        warnings.warn(EarlyJudgement(
            f"asha.grace_steps: {cfg.asha.grace_steps} is before the KL warm-up ends at step {warmup} "
            f"(model.objective.kl_warmup_steps): ASHA will stop trials before their memory is picked up, which "
            f"comes after the warm-up (docs/memory-experiments.md), so memory and key settings are judged as if "
            f"there were no memory"), stacklevel=2)
    return sweep


class EarlyJudgement(UserWarning):
    """A sweep of the map memory whose ASHA grace period ends before its trials can have picked their memory up."""


def _set(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of raw with `key` (dotted) set: the base config is shared by every trial."""
    raw = copy.deepcopy(raw)
    set_path(raw, key, value)
    return raw
