"""The config as a job runs it: local paths made absolute, the model's image fields taken from the prepared data.

No Ray and no MLflow here: the Ray driver (pipeline.cluster.driver) and the plain torchrun entry
(jobs.torchrun_train) resolve a config the same way.
"""
from __future__ import annotations

import pathlib

from pipeline.train.config import ConfigError, JobConfig


def resolved(cfg: JobConfig) -> JobConfig:
    """The config as the job runs it: the image shape, bit depth and likelihood taken from the prepared data's card
    where the config leaves them unset, every other model field filled in from kpp's defaults (logged as params,
    hashed, saved as config/resolved.yaml), and local paths made absolute (Ray workers run in another directory).
    Under a submitted job storage must be durable first (pipeline.job_env): a relative path made absolute
    would point into the job's temporary working-dir copy."""
    from pipeline.job_env import check_durable_storage
    check_durable_storage(cfg)
    return with_data_card(absolute_paths(cfg)).validate()


def with_data_card(cfg: JobConfig) -> JobConfig:
    """What the data decides, from data.shards' card, read here once for the driver: data.dataset (the prepared
    data knows what it holds, whatever the config says: the registry name, tags and data identity follow it), and
    unless the config sets them, the model's image_channels, image_height, image_width, bit_depth and
    likelihood.kind (bernoulli for binarized data, the discretized logistic mixture for 8-bit). A card that
    cannot be read changes nothing: preflight then names the problem."""
    if not cfg.data.shards:
        return cfg
    from pipeline.data.shards.manifest import read_card
    try:
        card = read_card(cfg.data.shards)
    except Exception:  # noqa: BLE001 - reported by preflight with the field name
        return cfg
    explicit = cfg.model_set
    model = cfg.model.to_dict()
    (c, h, w), bits = card.image_shape, card.bit_depth
    for name, value in (("image_channels", c), ("image_height", h), ("image_width", w), ("bit_depth", bits)):
        if name not in explicit:
            model[name] = int(value)
    if "kind" not in (explicit.get("likelihood") or {}):
        model["likelihood"]["kind"] = "bernoulli" if int(model["bit_depth"]) == 1 else "logistic_mixture"
    try:
        return cfg.replace(model=model, data=cfg.data.model_copy(update={"dataset": card.dataset}))
    except ConfigError:
        return cfg  # what the config set contradicts the data: preflight names the fields


def absolute_paths(cfg: JobConfig) -> JobConfig:
    def fix(p: str) -> str:
        return p if not p or "://" in p else str(pathlib.Path(p).expanduser().resolve())
    data = cfg.data.model_copy(update={"shards": fix(cfg.data.shards), "source": fix(cfg.data.source)})
    ck = cfg.checkpoint.model_copy(update={"storage_path": fix(cfg.checkpoint.storage_path)})
    return cfg.replace(data=data, checkpoint=ck)
