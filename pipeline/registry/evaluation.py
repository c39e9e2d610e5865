"""Evaluate a registered model on a prepared dataset's fixed test episodes: the bounds of kpp.evaluate with a 95%
interval over episodes, compared with the version's own test bound, logged as an MLflow run linked to the version.

The test episodes are the ones the training job measured its final test bound on: the same prepared data
(`--data`, checked against the version's tags), the same count, episode mode and seeds (version tags). Their
fingerprint (pipeline.registry.promotion.fingerprint) is recomputed from the data and compared with the version's
`test.episodes` tag, so the report says whether the numbers are comparable with the recorded ones.

Draws: kpp.evaluate.episode_bounds draws per batch of 16 episodes from a seed derived from (eval seed, batch), so
up to 16 episodes get exactly the training's final-evaluation draws (the recorded bound is reproduced up to
float rounding), and the numbers do not depend on how the batches are spread over Ray workers (`workers`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.registry import naming, promotion
from pipeline.registry.loading import Registered, RegistryError, check_data, data_card

# (key, label) of the reported numbers, in table order: the bounds (kpp/bounds.py: the chain bound first, the one
# that bounds -ln p(X)/T and that the champion rule compares by default; the memory-conditional one last, which a
# copying memory games), then the swap gap and the terms
BOUNDS = (*promotion.BOUNDS.items(),
          ("swap_gap", "memory-swap gap (other episode's M - own)"),
          ("recon", "  term: reconstruction"),
          ("kl_z", "  term: KL_z"),
          ("kl_y", "  term: KL_y (keys; DKM, KM: addressing)"),
          ("kl_m", "  term: KL_M (DKM's, KM's memory)"))
BATCH = 16  # episodes per batch of draws: the training's final evaluation (kpp.evaluate.evaluate's default)


@dataclass
class TestSet:
    episodes: torch.Tensor  # [E, T, C, H, W] floats
    url: str
    count: int
    mode: str
    seed: int
    eval_seed: int
    fingerprint: str
    warnings: list[str]
    recorded: str | None = None  # the version's test.episodes tag

    @property
    def same_as_training(self) -> bool:
        """The episodes and draws of the version's recorded test bound."""
        return self.recorded is not None and self.recorded == self.fingerprint


def _tag(reg: Registered, key: str, default: Any) -> str:
    return reg.tags.get(key, str(default))


def test_set(reg: Registered, url: str, count: int = 0) -> TestSet:
    """The fixed test episodes of prepared data `url` for `reg`: the version's count (or `count`), episode mode
    and seeds; DataMismatch when the data is not what the version was trained on."""
    from pipeline.data.train_data import TooFewEpisodes, shard_eval_episodes
    from pipeline.registry.tracking import file_hash
    from pipeline.urls import redact
    card = data_card(url)
    warnings = check_data(reg, card, url)
    cfg = reg.model.cfg
    count = count or int(_tag(reg, naming.TEST_EPISODES, 64))
    mode = _tag(reg, naming.EPISODES_MODE, "random")
    seed, eval_seed = int(_tag(reg, naming.DATA_SEED, 0)), int(_tag(reg, naming.EVAL_SEED, 1234))
    try:
        episodes = shard_eval_episodes(url, "test", cfg.episode_length, count, mode, seed)
    except TooFewEpisodes as e:
        # a capped count would be recorded (and fingerprinted) as the count asked for: refused instead
        raise RegistryError(f"--episodes: {count} {mode} test episodes of {cfg.episode_length} images asked for "
                            f"(the version's data.test_episodes unless given), and the test split of "
                            f"{redact(url)} holds {e.have}: pass --episodes <= {e.have}") from None
    except Exception as e:  # noqa: BLE001 - e.g. class episodes of a dataset without labels
        raise RegistryError(f"--data {redact(url)}: cannot build {count} {mode} test episodes ({e})") from None
    if episodes.shape[0] < 2:
        raise RegistryError(f"--data {redact(url)}: the test split holds {episodes.shape[0]} episode(s) of "
                            f"{cfg.episode_length}; evaluation needs at least 2")
    fp = promotion.fingerprint(file_hash(url.rstrip("/") + "/manifest.parquet"), count, cfg.episode_length, mode,
                               eval_seed, promotion.episode_seed(True, mode, seed))
    return TestSet(episodes, url, int(episodes.shape[0]), mode, seed, eval_seed, fp, warnings,
                   reg.tags.get(promotion.EPISODES_TAG))


# -- per-episode bounds, here or on Ray workers ----------------------------------------------------------------
def episode_values(model, episodes: torch.Tensor, *, iwae_samples: int, seed: int, leave_one_out: bool = True,
                   batch_size: int = BATCH, workers: int = 1) -> dict[str, np.ndarray]:
    """kpp.evaluate.episode_bounds over all episodes (nats per image, one value per episode), in this process or
    spread over `workers` Ray tasks by whole batches (the same numbers either way)."""
    from kpp.evaluate import episode_bounds
    if workers > 1:
        from pipeline.cluster.evaluation import episode_values_on_ray
        return episode_values_on_ray(model.state_dict(), model.cfg.to_dict(), episodes, workers=workers,
                                     iwae_samples=iwae_samples, seed=seed, leave_one_out=leave_one_out,
                                     batch_size=batch_size)
    out = episode_bounds(model, episodes, iwae_samples=iwae_samples, seed=seed, batch_size=batch_size,
                         leave_one_out=leave_one_out)
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


def interval(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean and a t interval over episodes (each episode one observation)."""
    from scipy import stats
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "sd": sd, "n": n}


def evaluate(reg: Registered, tests: TestSet, *, iwae_samples: int = 0, seed: int | None = None,
             leave_one_out: bool = True, batch_size: int = BATCH, workers: int = 1) -> dict[str, Any]:
    """The evaluation record (what jobs.evaluate prints and writes as JSON)."""
    from kpp.evaluate import unit_scale
    model = reg.model
    s = iwae_samples or int(_tag(reg, naming.IWAE_SAMPLES, 16))
    seed = tests.eval_seed if seed is None else seed
    t0 = time.perf_counter()
    values = episode_values(model, tests.episodes, iwae_samples=s, seed=seed, leave_one_out=leave_one_out,
                            batch_size=batch_size, workers=workers)
    seconds = time.perf_counter() - t0
    scale = unit_scale(model)
    bounds = {k: {**interval(values[k] * scale), "label": label} for k, label in BOUNDS if k in values}
    recorded = {k: float(reg.tags[t]) for k, t in [(b, promotion.bound_tag(b)) for b in promotion.BOUNDS]
                + [("swap_gap", naming.SWAP_GAP)] if t in reg.tags}
    from pipeline.urls import redact
    return {
        "model": reg.ref.uri, "name": reg.name, "version": reg.version, "model_id": reg.model_id,
        "training_run_id": reg.tags.get(naming.TRAINING_RUN, reg.run_id), "data": redact(tests.url),
        "dataset": reg.tags.get(naming.DATASET, ""), "episodes": tests.count,
        "images_per_episode": int(tests.episodes.shape[1]), "episode_mode": tests.mode,
        "test_episodes_fingerprint": tests.fingerprint, "same_episodes_as_recorded": tests.same_as_training,
        "unit": model.cfg.unit, "iwae_samples": s, "seed": seed, "batch_size": batch_size,
        "leave_one_out": leave_one_out, "workers": workers, "seconds": round(seconds, 3),
        "bounds": bounds, "per_episode": {k: (v * scale).tolist() for k, v in values.items()},
        "recorded": recorded, "recorded_iwae_samples": reg.tags.get(naming.IWAE_SAMPLES), "warnings": tests.warnings,
    }


def table(result: dict[str, Any]) -> str:
    """The printed report: one row per bound with its 95% interval, and the version's recorded numbers."""
    u = result["unit"]
    head = (f"{result['model']} = {result['name']} version {result['version']} on {result['data']} (test split): "
            f"{result['episodes']} {result['episode_mode']} episodes x {result['images_per_episode']} images, "
            f"IWAE S={result['iwae_samples']}, seed {result['seed']}")
    same = result["same_episodes_as_recorded"]
    lines = [head, f"{'bound':<46} {'mean':>10}   {'95% interval over episodes':<26} {'recorded':>10}"]
    for key, b in result["bounds"].items():
        label = b["label"] + (f" (S={result['iwae_samples']})" if key.endswith("iwae") else "")
        rec = result["recorded"].get(key)
        rec_s = f"{rec:10.3f}" if rec is not None and same else f"{'-':>10}"
        lines.append(f"{label:<46} {b['mean']:10.3f}   [{b['low']:9.3f}, {b['high']:9.3f}]{'':<5} {rec_s}")
    lines.append(f"unit: {u}; 'recorded' = the version's tags from its training run"
                 + ("" if same else " (not shown: these are other test episodes than the recorded ones)"))
    for w in result["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


# -- the evaluation run in MLflow ------------------------------------------------------------------------------
EVAL_KIND = "evaluation"


def log_run(uri: str, reg: Registered, result: dict[str, Any], experiment: str = "") -> str:
    """One MLflow run per evaluation, linked to the model version: tags name the version, the run and the
    LoggedModel; metrics are logged with the version's model_id (MLflow 3 shows them on the model's page); the
    version gets an `evaluation.last_run_id` tag. Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    client = MlflowClient(uri)
    exp_id = ""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    else:
        try:  # beside the training run
            exp_id = client.get_run(result["training_run_id"]).info.experiment_id
        except Exception:  # noqa: BLE001 - the training run was deleted: a default experiment
            exp = client.get_experiment_by_name("kpp-evaluations")
            exp_id = exp.experiment_id if exp else client.create_experiment("kpp-evaluations")
    tags = {"kpp.kind": EVAL_KIND, "kpp.model.uri": reg.ref.uri, "kpp.model.name": reg.name,
            "kpp.model.version": reg.version, "kpp.model.id": reg.model_id,
            "kpp.model.training_run_id": result["training_run_id"], "data.url": result["data"],
            "test.episodes": result["test_episodes_fingerprint"],
            "test.same_episodes_as_recorded": str(result["same_episodes_as_recorded"]).lower(),
            "test.unit": result["unit"]}
    run = client.create_run(exp_id, run_name=f"evaluate {reg.name} v{reg.version}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for key, b in result["bounds"].items():
        for stat in ("mean", "low", "high"):
            name = f"test/{key}" if stat == "mean" else f"test/{key}_{stat}95"
            if math.isfinite(b[stat]):
                metrics.append(Metric(name, float(b[stat]), now, 0, model_id=reg.model_id or None))
    params = [Param(k, str(result[k])) for k in ("iwae_samples", "seed", "episodes", "batch_size", "workers",
                                                 "leave_one_out", "data")]
    client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("kpp.evaluation.seconds",
                                                                          str(result["seconds"]))])
    client.log_dict(run_id, result, "evaluation/result.json")
    client.log_text(run_id, table(result) + "\n", "evaluation/table.txt")
    client.set_terminated(run_id, "FINISHED")
    client.set_model_version_tag(reg.name, reg.version, "evaluation.last_run_id", run_id)
    return run_id
