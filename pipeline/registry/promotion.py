"""Who is `champion`: a registered version takes the alias only if its test bound beats the current champion's on
the same fixed test episodes. Both numbers go on the version, with the decision and why.

The bound and the fingerprint of the test episodes it was measured on are version tags (test.neg_elbo,
test.episodes), written when the version is registered. Bounds measured on different episodes are not compared:
the version is not promoted and the reason says so.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.train.config import JobConfig

CHAMPION = "champion"
BOUND_TAG = "test.neg_elbo"
EPISODES_TAG = "test.episodes"
UNIT_TAG = "test.unit"


def episodes_fingerprint(cfg: JobConfig, manifest_hash: str) -> str:
    """What decides the fixed test episodes: the prepared data (its manifest's hash, or the source), how many
    episodes and of what length, how they are drawn, and the evaluation's seed."""
    d = cfg.data
    return fingerprint(manifest_hash if d.shards else f"{d.dataset}:{d.source}", d.test_episodes,
                       cfg.model.episode_length, d.episodes, cfg.eval.seed, cfg.seed if not d.shards else None)


def fingerprint(data: str, test_episodes: int, episode_length: int, episodes: str, eval_seed: int,
                seed: int | None) -> str:
    """The fingerprint itself: `data` is the prepared data's manifest hash (or "dataset:source" for a raw source,
    whose episodes also depend on the job's `seed`). pipeline.registry.evaluation computes it for a data URL."""
    key = {"data": data, "test_episodes": int(test_episodes), "episode_length": int(episode_length),
           "episodes": episodes, "eval_seed": int(eval_seed), "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Decision:
    promoted: bool
    bound: float
    champion_bound: float | None
    champion_version: str | None
    reason: str


def promote(uri: str, name: str, version: str, alias: str = CHAMPION, measure=None) -> Decision:
    """Move `alias` to `version` if its bound is lower than the alias holder's on the same episodes.

    measure: optional `measure(champion_version) -> (bound, champion_bound, what)`, both bounds recomputed now on
    the same test episodes (jobs.promote --data); then the tags' numbers are not compared and `what` (the episodes
    used) goes into the reason."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client = MlflowClient(uri)
    mv = client.get_model_version(name, version)
    if BOUND_TAG not in mv.tags or EPISODES_TAG not in mv.tags:
        raise ValueError(f"{name} version {version}: no {BOUND_TAG}/{EPISODES_TAG} tags; it cannot be compared")
    bound = float(mv.tags[BOUND_TAG])
    try:
        champ = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        champ = None

    def decide(promoted: bool, champ_bound: float | None, reason: str) -> Decision:
        client.set_model_version_tag(name, version, f"{alias}.decision", "promoted" if promoted else "kept")
        client.set_model_version_tag(name, version, f"{alias}.reason", reason)
        client.set_model_version_tag(name, version, f"{alias}.bound_at_decision",
                                     "none" if champ_bound is None else f"{champ_bound:.6f}")
        if promoted:
            client.set_registered_model_alias(name, alias, version)
        return Decision(promoted, bound, champ_bound, champ.version if champ else None, reason)

    if champ is None:
        return decide(True, None, f"no {alias} yet: version {version} ({bound:.3f}) becomes {alias}")
    if str(champ.version) == str(version):
        return Decision(True, bound, bound, str(version), f"version {version} already is {alias}")
    if measure is not None:
        bound, champ_bound, what = measure(str(champ.version))
        if bound < champ_bound:
            return decide(True, champ_bound, f"{bound:.3f} beats {alias} version {champ.version} ({champ_bound:.3f}) "
                                             f"{mv.tags.get(UNIT_TAG, '')}, both recomputed on {what}")
        return decide(False, champ_bound, f"{bound:.3f} does not beat {alias} version {champ.version} "
                                          f"({champ_bound:.3f}) {mv.tags.get(UNIT_TAG, '')}, both recomputed on "
                                          f"{what}; {alias} stays")
    champ_bound = float(champ.tags[BOUND_TAG]) if BOUND_TAG in champ.tags else None
    if champ.tags.get(EPISODES_TAG) != mv.tags[EPISODES_TAG] or champ_bound is None:
        return decide(False, champ_bound, f"{alias} (version {champ.version}) was measured on other test episodes "
                                          f"({champ.tags.get(EPISODES_TAG, 'unknown')} vs {mv.tags[EPISODES_TAG]}): "
                                          f"the bounds are not comparable; {alias} stays")
    unit = mv.tags.get(UNIT_TAG, "")
    if bound < champ_bound:
        return decide(True, champ_bound, f"{bound:.3f} beats {alias} version {champ.version} ({champ_bound:.3f}) "
                                         f"{unit} on the same test episodes")
    return decide(False, champ_bound, f"{bound:.3f} does not beat {alias} version {champ.version} "
                                      f"({champ_bound:.3f}) {unit} on the same test episodes; {alias} stays")
