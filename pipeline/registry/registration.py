"""Registering a trained model: the one path jobs.train (pipeline.cluster.driver) and jobs.tune (the sweep's best
trial) share.

A version of `<tracking.registered_model>-<dataset>` is created from a checkpoint folder (its weights as a plain
state_dict, so it loads with weights_only=True), tagged with what it was trained on and its test bounds
(pipeline.registry.naming.version_tags), described in words (naming.version_description), given `tracking.alias`, and then offered `champion` through the promotion
gate (pipeline.registry.promotion: a lower test bound, tracking.champion_metric, on the same test episodes)."""
from __future__ import annotations

import pathlib
import tempfile
from typing import Any, Mapping


def register_checkpoint(cfg, uri: str, run_id: str, folder: str | pathlib.Path, metrics: Mapping[str, Any],
                        extra_tags: Mapping[str, str] | None = None):
    """(registered name, version, promotion decision) for the checkpoint in `folder` of job `cfg` (resolved),
    trained in MLflow run `run_id` with final `metrics` (test/chain_neg_elbo, test/neg_elbo, ...)."""
    import torch

    from pipeline.registry import naming, promotion, tracking
    from pipeline.train import checkpointing
    name = naming.registered_name(cfg)
    with tempfile.TemporaryDirectory(prefix="kpp-register-") as tmp:
        weights = pathlib.Path(tmp) / "weights.pt"
        torch.save(checkpointing.load(folder)["model"], weights)
        version = tracking.register_model(uri, run_id, weights, cfg.model.to_dict(), name, cfg.tracking.alias)
    run_tags = tracking.MlflowClient(uri).get_run(run_id).data.tags
    naming.tag_version(uri, name, version, {**naming.version_tags(cfg, metrics, run_id, run_tags),
                                            **(extra_tags or {})})
    naming.describe(uri, name, version, naming.model_description(cfg),
                    naming.version_description(cfg, metrics, run_id, run_tags))
    return name, version, promotion.promote(uri, name, version, metric=cfg.tracking.champion_metric)
