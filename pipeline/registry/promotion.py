"""Who is `champion`: a registered version takes the alias only if its test bound beats the current champion's on
the same fixed test episodes. Both numbers go on the version, with the decision and why.

The bounds (`BOUNDS`: test.chain_neg_elbo, test.loo_neg_elbo, test.neg_elbo, ... ) and the fingerprint of the test
episodes they were measured on are version tags (test.episodes), written when the version is registered. The rule
compares one bound, `tracking.champion_metric`: by default the chain bound, a proper bound on -ln p(X)/T; the
memory-conditional one (the paper's) is driven down by a memory that copies each image to its own prior, and would
crown that copy. Bounds measured on different episodes are not compared, nor is a champion without the bound's tag
(registered before it was measured): the version is not promoted and the reason says so.

Promotions are serialised per registered model: reading the champion, comparing and moving the alias happen under
a lock, so two jobs finishing at once cannot both compare with the old champion and leave the worse one holding the
alias. MLflow has no compare-and-set on aliases, but creating a registered model is atomic (a unique name), so the
lock is a registered model `<name>.promotion-lock` that exists while a promotion holds it (`promotion_lock`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from kpp.bounds import BOUNDS, SELECTING
from pipeline.train.config import JobConfig

CHAMPION = "champion"
EPISODES_TAG = "test.episodes"
UNIT_TAG = "test.unit"
IWAE_SAMPLES_TAG = "eval.iwae_samples"  # an IWAE bound tightens with its sample count: compared only at equal S
# The test bounds a run reports (its final metrics test/<bound>), each a version tag test.<bound>: what the champion
# rule may compare (kpp/bounds.py).
DEFAULT_METRIC = SELECTING


def bound_tag(metric: str) -> str:
    """The version tag of a test bound: test.<bound>."""
    return f"test.{metric}"


def check_metric(metric: str, field: str = "tracking.champion_metric") -> str:
    """`metric` if the champion rule can compare it, else ValueError naming `field` and the bounds it can."""
    if metric not in BOUNDS:
        raise ValueError(f"{field}: {metric!r} is not a test bound a run reports; one of {', '.join(BOUNDS)}")
    return metric


def episodes_fingerprint(cfg: JobConfig, manifest_hash: str) -> str:
    """What decides the fixed test episodes: the prepared data (its manifest's hash, or the source), how many
    episodes and of what length, how they are drawn, and every seed they are drawn with."""
    d = cfg.data
    return fingerprint(manifest_hash if d.shards else f"{d.dataset}:{d.source}", d.test_episodes,
                       cfg.model.episode_length, d.episodes, cfg.eval.seed,
                       episode_seed(bool(d.shards), d.episodes, cfg.seed))


def episode_seed(prepared: bool, episodes: str, seed: int) -> int | None:
    """The job seed the test episodes are drawn with, or None when they do not depend on it: a prepared dataset
    stores its i.i.d. test episodes (drawn by jobs.prepare, in the manifest's hash), while class episodes are drawn
    from its label index with the job's seed, and a raw source's with it in any case."""
    return seed if (not prepared or episodes == "class") else None


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
    metric: str = DEFAULT_METRIC  # the bound compared (a key of BOUNDS)


LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_S = 120.0  # a lock older than this is a crashed holder's (a promotion takes a few registry calls)


def promotion_lock(client, name: str, wait_s: float = 180.0, ttl_s: float = LOCK_TTL_S, poll_s: float = 0.2):
    """Hold `<name>.promotion-lock` while `name`'s champion is decided (registry_lock)."""
    return registry_lock(client, name + LOCK_SUFFIX, f"held while {name}'s champion is decided (kpp promotion)",
                         wait_s=wait_s, ttl_s=ttl_s, poll_s=poll_s)


@contextlib.contextmanager
def registry_lock(client, lock: str, purpose: str, wait_s: float = 180.0, ttl_s: float = LOCK_TTL_S,
                  poll_s: float = 0.2):
    """Hold the registered model `lock`: a registered model's name is the one key MLflow's server keeps unique,
    so creating it is an atomic test-and-set (deleted on exit). A lock older than ttl_s is a crashed holder's and
    is taken over; after wait_s of waiting, TimeoutError naming the holder."""
    from mlflow.exceptions import MlflowException
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": me, "acquired_unix": f"{time.time():.3f}"},
                                           description=purpose)
            break
        except MlflowException as e:
            # RESOURCE_DOES_NOT_EXIST: the server created it and it was deleted before its tags were written
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:  # released between the two calls
            continue
        # the age from the registry's own creation time: the server writes a new model's tags after the model,
        # so a lock read in between has none, and its age from the tag would be "since 1970" (taken over while
        # its holder worked: seen under load, two holders at once)
        since = (held.creation_timestamp or time.time() * 1000) / 1000
        if held.tags.get("holder") == me:  # the client retried a create that had succeeded: it is ours
            break
        if time.time() - since > ttl_s:
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)  # its holder died holding it
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{lock}: held by {held.tags.get('holder', '?')} for {time.time() - since:.0f} s; "
                               f"waited {wait_s:.0f} s")
        time.sleep(poll_s)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def _holder(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(uri: str, name: str, version: str, alias: str = CHAMPION, measure=None,
            metric: str = DEFAULT_METRIC) -> Decision:
    """Move `alias` to `version` if its bound `metric` (a key of BOUNDS) is lower than the alias holder's on the
    same episodes; under the registry's promotion lock, so concurrent promotions see each other's result.

    measure: optional `measure(champion_version) -> (bound, champion_bound, what)`, both values of `metric`
    recomputed now on the same test episodes (jobs.promote --data); then the tags' numbers are not compared and
    `what` (the episodes used) goes into the reason. It runs outside the lock (it may take minutes); if the
    champion moved meanwhile, it is measured again against the new one."""
    from mlflow import MlflowClient
    check_metric(metric)
    client = MlflowClient(uri)
    mv = client.get_model_version(name, version)
    tag = bound_tag(metric)
    if tag not in mv.tags or EPISODES_TAG not in mv.tags:
        raise ValueError(f"{name} version {version}: no {tag}/{EPISODES_TAG} tags; it cannot be compared by "
                         f"{metric}")
    for _ in range(5):
        measured = None
        if measure is not None:
            champ = _holder(client, name, alias)
            if champ is not None and str(champ.version) != str(version):
                measured = (str(champ.version), measure(str(champ.version)))
        with promotion_lock(client, name):
            champ = _holder(client, name, alias)
            if measured is not None and (champ is None or str(champ.version) != measured[0]):
                continue  # the champion moved while the bounds were recomputed: compare with the new one
            return _decide(client, name, str(version), mv, alias, champ, measured[1] if measured else None, metric)
    raise TimeoutError(f"{name}: {alias} moved during each of 5 measurements; promote again")


def _decide(client, name: str, version: str, mv, alias: str, champ, measured, metric: str) -> Decision:
    """The comparison itself, with the lock held: tags the decision on the version and moves the alias."""
    tag = bound_tag(metric)
    bound = float(mv.tags[tag])

    def decide(promoted: bool, champ_bound: float | None, reason: str) -> Decision:
        client.set_model_version_tag(name, version, f"{alias}.decision", "promoted" if promoted else "kept")
        client.set_model_version_tag(name, version, f"{alias}.reason", reason)
        client.set_model_version_tag(name, version, f"{alias}.metric", metric)
        client.set_model_version_tag(name, version, f"{alias}.bound_at_decision",
                                     "none" if champ_bound is None else f"{champ_bound:.6f}")
        if promoted:
            client.set_registered_model_alias(name, alias, version)
        return Decision(promoted, bound, champ_bound, champ.version if champ else None, reason, metric)

    if champ is None:
        return decide(True, None, f"no {alias} yet: version {version} ({metric} {bound:.3f}) becomes {alias}")
    if str(champ.version) == str(version):
        return Decision(True, bound, bound, str(version), f"version {version} already is {alias}", metric)
    if measured is not None:
        bound, champ_bound, what = measured
        if bound < champ_bound:
            return decide(True, champ_bound, f"{metric} {bound:.3f} beats {alias} version {champ.version} "
                                             f"({champ_bound:.3f}) {mv.tags.get(UNIT_TAG, '')}, both recomputed on "
                                             f"{what}")
        return decide(False, champ_bound, f"{metric} {bound:.3f} does not beat {alias} version {champ.version} "
                                          f"({champ_bound:.3f}) {mv.tags.get(UNIT_TAG, '')}, both recomputed on "
                                          f"{what}; {alias} stays")
    champ_bound = float(champ.tags[tag]) if tag in champ.tags else None
    if champ.tags.get(EPISODES_TAG) != mv.tags[EPISODES_TAG]:
        return decide(False, champ_bound, f"{alias} (version {champ.version}) was measured on other test episodes "
                                          f"({champ.tags.get(EPISODES_TAG, 'unknown')} vs {mv.tags[EPISODES_TAG]}): "
                                          f"the bounds are not comparable; {alias} stays")
    if metric.endswith("iwae") and champ.tags.get(IWAE_SAMPLES_TAG) != mv.tags.get(IWAE_SAMPLES_TAG):
        return decide(False, champ_bound, f"{alias} (version {champ.version}) measured {metric} with "
                                          f"S={champ.tags.get(IWAE_SAMPLES_TAG, 'unknown')} importance samples, this "
                                          f"version with S={mv.tags.get(IWAE_SAMPLES_TAG, 'unknown')}: the bounds are "
                                          f"not comparable; {alias} stays")
    if champ_bound is None:
        # a version registered before this bound was measured (the chain bound came later): no number to beat,
        # and none is made up; jobs.promote --data measures both on the same episodes
        return decide(False, None, f"{alias} (version {champ.version}) has no {tag} tag (registered before the "
                                   f"{BOUNDS[metric]} was measured): the bounds are not comparable; {alias} stays "
                                   f"(jobs.promote --data recomputes both)")
    unit = mv.tags.get(UNIT_TAG, "")
    if bound < champ_bound:
        return decide(True, champ_bound, f"{metric} {bound:.3f} beats {alias} version {champ.version} "
                                         f"({champ_bound:.3f}) {unit} on the same test episodes")
    return decide(False, champ_bound, f"{metric} {bound:.3f} does not beat {alias} version {champ.version} "
                                      f"({champ_bound:.3f}) {unit} on the same test episodes; {alias} stays")
