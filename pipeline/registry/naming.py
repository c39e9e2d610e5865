"""Registry names and version tags: one registered model per dataset, and what every version records about itself.

A registered model's name is `<prefix>-<dataset>` (`tracking.registered_model` is the prefix): a digits model and
an Omniglot model never share a name, so `models:/kpp-digits@champion` cannot silently start meaning a model of
other data. jobs.train (pipeline.cluster.driver) and the sweep (pipeline.tune.sweep) both name and tag versions
here.

Every version carries the tags a consumer needs to check its input and to reproduce its test bounds
(`version_tags`): the dataset, image shape, bit depth and likelihood; the three test bounds (chain, leave-one-out,
memory-conditional: promotion.BOUNDS) with the fingerprint of the test episodes they were measured on, the swap
gap and the unit; how the fixed test episodes are drawn (count, mode, seeds); the git commit and the training run.
pipeline.registry.loading refuses data that disagrees with them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from pipeline.registry import promotion

# version tags (names shared with pipeline.registry.promotion for the bounds and the episodes)
DATASET = "dataset"
IMAGE_SHAPE = "image_shape"
BIT_DEPTH = "bit_depth"
LIKELIHOOD = "likelihood"
EPISODE_LENGTH = "episode_length"
TEST_EPISODES = "data.test_episodes"
EPISODES_MODE = "data.episodes"
DATA_SEED = "data.seed"
EVAL_SEED = "eval.seed"
IWAE_SAMPLES = promotion.IWAE_SAMPLES_TAG
MANIFEST_HASH = "data.manifest_hash"
DATA_URL = "data.shards"
SWAP_GAP = "test.swap_gap"  # the bounds' tags: promotion.bound_tag(b) for b in promotion.BOUNDS
GIT_COMMIT = "git.commit"
TRAINING_RUN = "training_run_id"

_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")


def model_name(prefix: str, dataset: str) -> str:
    """`<prefix>-<dataset>`, e.g. kpp-binarized_mnist. Both parts must be set: a name without its dataset is
    exactly what let two datasets share one registered model."""
    prefix, dataset = prefix.strip(), _NAME_OK.sub("_", dataset.strip())
    if not prefix:
        raise ValueError("tracking.registered_model: the registry name's prefix is empty")
    if not dataset:
        raise ValueError("data.dataset: a registered model's name needs the dataset")
    return f"{prefix}-{dataset}"


def registered_name(cfg) -> str:
    """The registry name of a job's model ('' when the job does not register). `cfg` is resolved: for prepared
    data its data.dataset is the card's (pipeline.train.resolve.with_data_card)."""
    if not cfg.tracking.registered_model:
        return ""
    return model_name(cfg.tracking.registered_model, cfg.data.dataset)


def image_shape_tag(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def version_tags(cfg, metrics: Mapping[str, Any], run_id: str, run_tags: Mapping[str, str]) -> dict[str, str]:
    """The tags of a version trained by job `cfg` (resolved) in MLflow run `run_id`, whose final metrics are
    `metrics` (test/chain_neg_elbo, test/neg_elbo, ...) and whose run carries `run_tags` (git.commit,
    data.manifest_hash)."""
    m = cfg.model
    manifest = run_tags.get(MANIFEST_HASH, "none")
    tags = {
        DATASET: cfg.data.dataset, IMAGE_SHAPE: image_shape_tag(m.image_shape), BIT_DEPTH: str(m.bit_depth),
        LIKELIHOOD: m.likelihood.kind, EPISODE_LENGTH: str(m.episode_length),
        TEST_EPISODES: str(cfg.data.test_episodes), EPISODES_MODE: cfg.data.episodes, DATA_SEED: str(cfg.seed),
        EVAL_SEED: str(cfg.eval.seed), IWAE_SAMPLES: str(cfg.eval.iwae_samples), MANIFEST_HASH: manifest,
        promotion.EPISODES_TAG: promotion.episodes_fingerprint(cfg, manifest if manifest != "none" else ""),
        promotion.UNIT_TAG: m.unit, GIT_COMMIT: run_tags.get(GIT_COMMIT, "unknown"), TRAINING_RUN: run_id,
    }
    if cfg.data.shards:
        from pipeline.urls import redact
        tags[DATA_URL] = redact(cfg.data.shards)
    for tag, key in [(promotion.bound_tag(b), f"test/{b}") for b in promotion.BOUNDS] + [(SWAP_GAP, "test/swap_gap")]:
        if metrics.get(key) is not None:
            tags[tag] = f"{float(metrics[key]):.6f}"
    return tags


def model_description(cfg) -> str:
    """The registered model's description (set once, when its first version is registered)."""
    return (f"Kanerva++ models trained on {cfg.data.dataset} by the kpp pipeline (jobs.train, jobs.tune). Versions are "
            f"compared by their test {promotion.BOUNDS[cfg.tracking.champion_metric]} (tracking.champion_metric="
            f"{cfg.tracking.champion_metric}; {cfg.model.unit}, lower is better) on the same fixed test episodes; "
            f"the `champion` alias is the best so far, `{cfg.tracking.alias}` the newest. Each version's tags "
            f"name its data, test episodes, commit and training run.")


def model_label(cfg) -> str:
    """What the model is, in words: Kanerva++ with its writer and reads, or which baseline."""
    m = cfg.model
    k = m.keys.num_reads
    content = f", {m.memory.content} memory" if m.memory.writer == "key" else ""
    return {"kpp": f"Kanerva++ (writer={m.memory.writer}{content}, {k} read{'s' * (k != 1)})", "dkm": "DKM baseline",
            "km": "Kanerva Machine baseline", "vae": "VAE baseline"}[m.kind]


# (label, metric) of the scores a description names, the chain bound first: the one that cannot be gamed
DESCRIBED = (("chain bound", "test/chain_neg_elbo"), ("chain IWAE", "test/chain_iwae"),
             ("leave-one-out bound", "test/loo_neg_elbo"), ("memory-conditional bound", "test/neg_elbo"),
             ("memory-conditional IWAE", "test/iwae"), ("swap gap", "test/swap_gap"))


def version_description(cfg, metrics: Mapping[str, Any], run_id: str, run_tags: Mapping[str, str]) -> str:
    """One paragraph on a version: what was trained on what, how, and what it scored (the tags hold the same in
    machine-readable form)."""
    m, t = cfg.model, cfg.train
    scores = []
    for label, key in DESCRIBED:
        if metrics.get(key) is not None:
            scores.append(f"{label} {float(metrics[key]):+.2f}" if key == "test/swap_gap"
                          else f"{label} {float(metrics[key]):.2f}")
    scored = (", ".join(scores) + f" {m.unit} on {cfg.data.test_episodes} test episodes (seed {cfg.eval.seed})"
              if scores else "No test bound recorded")
    commit = run_tags.get(GIT_COMMIT, "unknown")
    return (f"{model_label(cfg)} on {cfg.data.dataset} {image_shape_tag(m.image_shape)}, {m.episode_length}-image "
            f"episodes; {t.max_steps} steps x {cfg.scaling.num_workers} worker(s) x {cfg.data.batch_episodes} "
            f"episodes, {t.optimizer} lr {t.lr:g}, seed {cfg.seed}. {scored}. Job {cfg.name!r}, MLflow run {run_id}, "
            f"commit {commit[:12]}.")


def describe(uri: str, name: str, version: str, model_text: str, version_text: str) -> None:
    """Set the version's description, and the registered model's when it has none (a user's own text stays)."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    client.update_model_version(name, version, description=version_text)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_text)


def tag_version(uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
